//! The axum application: [`AppState`] (the seams handlers use) and [`router`], which wires routes,
//! fallbacks and middleware. Built without sockets, so tests drive it with `oneshot`.
//!
//! Middleware, outermost first: request id (an incoming `x-request-id` is kept, else a UUID is
//! made; it is echoed back and passed to the worker), tracing span per request, body limit
//! (enforced by the body extractors, JSON and multipart alike, so a 413 comes out in OpenAI's
//! shape).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::routes;
use crate::storage::ImageStore;
use crate::workers::WorkerPool;

/// Header carrying the request id, set by the middleware when the client sends none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What every handler can reach. Cheap to clone: all shared behind `Arc`s, set once at start-up.
#[derive(Clone)]
pub struct AppState {
    pub workers: Arc<dyn WorkerPool>,
    pub images: Arc<dyn ImageStore>,
    pub http: Arc<HttpSettings>,
}

/// The HTTP side's settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// BASE_URL without trailing slash; `None`: urls follow the request's host.
    pub base_url: Option<String>,
    /// Longest a generation may take, queueing included.
    pub request_timeout: Duration,
    /// Largest request body, in bytes (uploads included).
    pub max_body_bytes: usize,
    /// Most pixels an uploaded image or mask may declare.
    pub max_input_pixels: u64,
    /// Unix seconds at start-up; reported as the models' `created`.
    pub started_at: u64,
}

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let middleware = ServiceBuilder::new()
        .layer(SetRequestIdLayer::new(request_id.clone(), MakeRequestUuid))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|request: &Request<_>| {
                    let id = request
                        .headers()
                        .get(REQUEST_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default();
                    tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = %id)
                })
                // One access-log line per request at the default level.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(request_id));
    Router::new()
        .route(
            "/v1/images/generations",
            post(routes::generations::create_image),
        )
        .route("/v1/images/edits", post(routes::edits::create_edit))
        .route(
            "/v1/images/variations",
            post(routes::variations::create_variation),
        )
        .route("/v1/images/data/{file_id}", get(routes::images::get_image))
        .route("/v1/models", get(routes::models::list_models))
        .route("/health", get(routes::probes::health))
        .route("/ready", get(routes::probes::ready))
        .fallback(routes::route_not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(middleware)
        .with_state(state)
}
