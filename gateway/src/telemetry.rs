//! Tracing across the gateway's edges: the span each HTTP request runs in, joined to the trace
//! the client started (W3C `traceparent`), and the trace context handed on to workers in each
//! gRPC call's metadata, so a worker's job span belongs to the same trace.
//!
//! Subscriber and exporter set-up (log format, OTLP) is shared with the worker binary and lives in
//! the `fastfusion-telemetry` crate.

use axum::http::Request;
use tracing::Span;

/// Header carrying the request id, set by the middleware when the client sends none.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The `http` span of one request: method, path and request id; its parent is the client's
/// trace when the request carries a valid `traceparent` and spans are exported.
pub fn request_span<B>(request: &Request<B>) -> Span {
    let id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "http",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %id
    );
    fastfusion_telemetry::set_parent(
        &span,
        fastfusion_telemetry::context_from_headers(request.headers()),
    );
    span
}

/// A gRPC request carrying the current span's trace context (nothing extra when spans are not
/// exported).
pub fn traced<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    fastfusion_telemetry::inject_current(request.metadata_mut());
    request
}
