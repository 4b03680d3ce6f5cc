//! [`drain_unread_body`]: a refused request's unread body is read and discarded before the answer
//! goes out, so the answer reaches clients that are still sending.
//!
//! Many refusals come before the body is read: a missing API key (401), an endpoint switched off
//! or an unknown route (404), the concurrency limit (429), a body over the limit (413). A client
//! that streams its upload without `Expect: 100-continue` (the openai Node SDK, browsers) is still
//! writing then. If the server answered and closed the connection with that data unread, the
//! kernel would reset the connection, and the client would see a broken pipe ("Connection error")
//! instead of the status. So the body travels through a shared slot: whatever the handler left
//! unread is taken back after it answered, and read to its end, at most
//! [`DrainLimits::max_bytes`] (the body limit) and [`DrainLimits::timeout`], before the answer is
//! returned.
//!
//! Requests with `Expect: 100-continue` are left alone: such a client waits for the answer before
//! sending, and reading its body would make hyper tell it to go ahead.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, BodyDataStream};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;

/// How much of a refused request's leftover body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct DrainLimits {
    /// Most leftover bytes read; the body limit, so a refusal costs no more than an accepted
    /// request would have.
    pub max_bytes: usize,
    /// Longest the answer waits for a slow sender.
    pub timeout: Duration,
}

/// How long the answer to a refused request waits for the rest of its body.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The body as the handler sees it; the middleware keeps the other handle.
type Slot = Arc<Mutex<Option<BodyDataStream>>>;

/// Middleware: runs the request, then drains what its handler left of the body.
pub async fn drain_unread_body(
    State(limits): State<DrainLimits>,
    request: Request,
    next: Next,
) -> Response {
    if expects_continue(request.headers()) {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let slot: Slot = Arc::new(Mutex::new(Some(body.into_data_stream())));
    let request = Request::from_parts(parts, shared_body(Arc::clone(&slot)));
    let response = next.run(request).await;
    // A poisoned lock only means a handler panicked mid-read; the body is still there to drain.
    let leftover = slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    if let Some(leftover) = leftover {
        let drained = tokio::time::timeout(limits.timeout, discard(leftover, limits.max_bytes));
        if let Ok(bytes) = drained.await {
            if bytes > 0 {
                tracing::debug!(bytes, "read the rest of a refused request's body");
            }
        } else {
            tracing::debug!("gave up waiting for the rest of a refused request's body");
        }
    }
    response
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers
        .get(header::EXPECT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
}

/// A body that reads from `slot`; dropping it leaves whatever is unread in the slot.
fn shared_body(slot: Slot) -> Body {
    Body::from_stream(futures::stream::poll_fn(move |cx| {
        let mut guard = slot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match guard.as_mut() {
            Some(stream) => stream.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }))
}

/// Reads `body` to its end or past `max_bytes`, whichever comes first; returns the bytes read.
async fn discard(mut body: BodyDataStream, max_bytes: usize) -> usize {
    let mut read = 0;
    while let Some(Ok(chunk)) = body.next().await {
        read += chunk.len();
        if read > max_bytes {
            break;
        }
    }
    read
}
