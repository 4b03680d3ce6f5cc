//! The axum application: [`AppState`] (the seams handlers use) and [`router`], which wires routes,
//! fallbacks and middleware. Built without sockets, so tests drive it with `oneshot`.
//!
//! Middleware, outermost first: request id (an incoming `x-request-id` is kept, else a UUID is
//! made; it is echoed back and passed to the worker), tracing span per request (joined to the
//! client's W3C trace, see telemetry.rs), body limit (enforced by the body extractors, JSON and
//! multipart alike, so a 413 comes out in OpenAI's shape), request metrics by matched route
//! (metrics.rs). On the image endpoints and `/v1/models` the API key check (auth.rs) comes
//! next, then on generation endpoints the concurrency limit (concurrency.rs).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::{require_api_key, ApiKeys};
use crate::concurrency::{limit_concurrency, ConcurrencyLimit};
use crate::image_urls::ImageUrls;
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
    /// Keys the image endpoints and `/v1/models` ask for (none: open).
    pub api_keys: Arc<ApiKeys>,
    /// Builds (and signs) image urls; checks downloads.
    pub urls: Arc<ImageUrls>,
    /// Generation requests running at once on this gateway.
    pub concurrency: Arc<ConcurrencyLimit>,
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
                .make_span_with(crate::telemetry::request_span)
                // One access-log line per request at the default level.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(PropagateRequestIdLayer::new(request_id));
    // Route layers run before the body is read, the key check first: an unauthenticated client
    // neither takes a concurrency permit nor gets to upload.
    let generation = Router::new()
        .route(
            "/v1/images/generations",
            post(routes::generations::create_image),
        )
        .route("/v1/images/edits", post(routes::edits::create_edit))
        .route(
            "/v1/images/variations",
            post(routes::variations::create_variation),
        )
        .route_layer(from_fn_with_state(
            state.concurrency.clone(),
            limit_concurrency,
        ));
    let keyed = generation
        .route("/v1/models", get(routes::models::list_models))
        .route_layer(from_fn_with_state(state.api_keys.clone(), require_api_key));
    // Image urls, probes and metrics stay open (see auth.rs).
    keyed
        .route("/v1/images/data/{file_id}", get(routes::images::get_image))
        .route("/health", get(routes::probes::health))
        .route("/ready", get(routes::probes::ready))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(routes::route_not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Inside the router so the matched route pattern (not the raw path) labels the series.
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(middleware)
        .with_state(state)
}
