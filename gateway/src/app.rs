//! The axum application: [`router`] wires routes, fallbacks and middleware over an
//! [`AppState`] (state.rs). Built without sockets, so tests drive it with `oneshot`.
//!
//! Middleware, outermost first: request id (an incoming `x-request-id` is kept, else a UUID is
//! made; it is echoed back and passed to the worker), tracing span per request (joined to the
//! client's W3C trace, see telemetry.rs), body limit (enforced by the body extractors, JSON and
//! multipart alike, so a 413 comes out in OpenAI's shape), draining of what a refused request
//! left unread (drain.rs, so the answer reaches a client still sending), request metrics by
//! matched route (metrics.rs). On the image endpoints and `/v1/models` the API key check (auth.rs) comes
//! next, then on generation endpoints the concurrency limit (concurrency.rs).

use axum::extract::DefaultBodyLimit;
use axum::http::HeaderName;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use tower::ServiceBuilder;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

use crate::auth::require_api_key;
use crate::concurrency::limit_concurrency;
use crate::drain::{drain_unread_body, DrainLimits, DRAIN_TIMEOUT};
use crate::routes;
use crate::state::AppState;
use crate::telemetry::REQUEST_ID_HEADER;

/// The whole HTTP API.
pub fn router(state: AppState) -> Router {
    let request_id = HeaderName::from_static(REQUEST_ID_HEADER);
    let drain = DrainLimits {
        max_bytes: state.http.max_body_bytes,
        timeout: DRAIN_TIMEOUT,
    };
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
    // Image urls, probes, metrics and the playground page stay open (see auth.rs).
    keyed
        .route("/v1/images/data/{file_id}", get(routes::images::get_image))
        .route("/", get(routes::playground::page))
        .route("/playground", get(routes::playground::page))
        .route("/playground/playground.js", get(routes::playground::script))
        .route(
            "/playground/playground.css",
            get(routes::playground::styles),
        )
        .route("/health", get(routes::probes::health))
        .route("/ready", get(routes::probes::ready))
        .route("/metrics", get(crate::metrics::scrape))
        .route("/openapi.json", get(crate::openapi::serve))
        .fallback(routes::route_not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        // Inside the router so the matched route pattern (not the raw path) labels the series.
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(from_fn_with_state(drain, drain_unread_body))
        .layer(DefaultBodyLimit::max(state.http.max_body_bytes))
        .layer(middleware)
        .with_state(state)
}
