//! [`ConcurrencyLimit`]: at most FASTFUSION_MAX_CONCURRENT_REQUESTS generation requests run on
//! this gateway at once; one more is answered 429 with Retry-After straight away, not queued,
//! so a client or load balancer can try another replica. The permit is taken before the body is
//! read and held until the response is ready, or for a server-sent event stream until the stream
//! ends or the client goes away (a stream keeps its worker busy long after the handler returns).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The limit and its permits; `None`: unlimited.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyLimit {
    permits: Option<(Arc<Semaphore>, usize)>,
}

impl ConcurrencyLimit {
    /// `None`: no limit.
    pub fn new(max: Option<usize>) -> Self {
        ConcurrencyLimit {
            permits: max.map(|max| (Arc::new(Semaphore::new(max)), max)),
        }
    }
}

/// Middleware: runs the request under a permit, or refuses it when none is free.
pub async fn limit_concurrency(
    State(limit): State<Arc<ConcurrencyLimit>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some((semaphore, max)) = &limit.permits else {
        return Ok(next.run(request).await);
    };
    let permit = Arc::clone(semaphore)
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyConcurrentRequests(*max))?;
    let response = next.run(request).await;
    if !is_event_stream(&response) {
        return Ok(response);
    }
    // The permit travels with the body and is released when the body is dropped: at the
    // stream's end or when the client disconnects.
    Ok(response.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &permit;
            chunk
        }))
    }))
}

fn is_event_stream(response: &Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"))
}
