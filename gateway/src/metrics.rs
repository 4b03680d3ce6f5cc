//! The gateway's Prometheus metrics: names, descriptions, buckets, the request-tracking
//! middleware ([`track`]) and the `GET /metrics` scrape handler ([`scrape`]).
//!
//! Recording goes through the `metrics` facade, so it costs nothing until [`install`] puts a
//! Prometheus recorder in place (the binary does at start-up). The recorder is process-global:
//! an embedded worker's `fastfusion_worker_*` series land in it too and are served on the same
//! page, with the worker's buckets.
//!
//! Every name starts with `fastfusion_gateway_`; histograms have explicit buckets (seconds)
//! because the exporter's default is a summary, which cannot be aggregated across replicas.
//! Labels never carry ids: the route label is the matched route pattern
//! (`/v1/images/data/{file_id}`), or `unmatched` for paths no route serves.

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;

/// HTTP requests answered, by `route` and `status`.
pub const REQUESTS: &str = "fastfusion_gateway_requests_total";
/// Seconds from request to response headers, by `route`.
pub const REQUEST_SECONDS: &str = "fastfusion_gateway_request_duration_seconds";
/// Images returned to clients, by `model`.
pub const IMAGES: &str = "fastfusion_gateway_images_generated_total";
/// Seconds a generation waited in the worker's queue (from the worker's Done timings), by
/// `model`.
pub const QUEUE_SECONDS: &str = "fastfusion_gateway_queue_seconds";
/// Seconds a generation ran on the model (worker total minus queue time), by `model`.
pub const INFERENCE_SECONDS: &str = "fastfusion_gateway_inference_seconds";
/// 1 when a worker answered its last Info call with its model loaded, else 0; by `endpoint`
/// and `model`.
pub const WORKER_UP: &str = "fastfusion_gateway_worker_up";
/// Generate calls sent again to another worker after a refusal, by `model` and `reason`.
pub const RETRIES: &str = "fastfusion_gateway_retries_total";

/// Label for requests no route matched (their paths would make unbounded label values).
const UNMATCHED_ROUTE: &str = "unmatched";

const REQUEST_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];
const GENERATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// The process's recorder, once installed.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
/// Serialises installing, so two callers at once do not both try to set the global recorder.
static INSTALLING: Mutex<()> = Mutex::new(());

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct MetricsError(#[from] BuildError);

/// Installs the Prometheus recorder for this process and describes every series; later calls
/// return the same handle.
pub fn install() -> Result<&'static PrometheusHandle, MetricsError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let _installing = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(handle) = HANDLE.get() {
        return Ok(handle);
    }
    let handle = buckets(PrometheusBuilder::new())?.install_recorder()?;
    let handle = HANDLE.get_or_init(|| handle);
    describe();
    Ok(handle)
}

fn buckets(builder: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    let builder = builder
        .set_buckets_for_metric(Matcher::Full(REQUEST_SECONDS.into()), REQUEST_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE_SECONDS.into()), GENERATION_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(INFERENCE_SECONDS.into()), GENERATION_BUCKETS)?;
    #[cfg(feature = "embedded-worker")]
    let builder = fastfusion_worker::metrics::with_buckets(builder)?;
    Ok(builder)
}

fn describe() {
    describe_counter!(REQUESTS, "HTTP requests answered, by route and status");
    describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time from request to response headers, by route"
    );
    describe_counter!(IMAGES, "Images returned to clients, by model");
    describe_histogram!(
        QUEUE_SECONDS,
        metrics::Unit::Seconds,
        "Time generations waited in a worker's queue"
    );
    describe_histogram!(
        INFERENCE_SECONDS,
        metrics::Unit::Seconds,
        "Time generations ran on a worker's model, queue excluded"
    );
    describe_gauge!(
        WORKER_UP,
        "1 when the worker answered its last Info call with its model loaded, by endpoint and model"
    );
    describe_counter!(
        RETRIES,
        "Generate calls sent again to another worker, by model and refusal reason"
    );
    #[cfg(feature = "embedded-worker")]
    fastfusion_worker::metrics::describe();
}

/// Middleware: counts and times every request by matched route and status.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    histogram!(REQUEST_SECONDS, "route" => route.clone()).record(started.elapsed().as_secs_f64());
    counter!(REQUESTS, "route" => route, "status" => status).increment(1);
    response
}

/// `GET /metrics`: the Prometheus text format. A 404 when no recorder is installed (an app built
/// by tests that did not ask for metrics).
pub async fn scrape() -> Result<Response, ApiError> {
    let handle = HANDLE.get().ok_or_else(|| ApiError::RouteNotFound {
        method: "GET".to_string(),
        path: "/metrics".to_string(),
    })?;
    // The exporter keeps histogram samples as recorded; upkeep folds them in.
    handle.run_upkeep();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response())
}

/// A generation for `model` finished with `images` images; `timings` are the worker's (time
/// queued, and time on the model as the rest of its total).
pub fn generation_done(model: &str, images: usize, timings: Option<&fastfusion_proto::Timings>) {
    counter!(IMAGES, "model" => model.to_string()).increment(images as u64);
    if let Some(timings) = timings {
        let queue = Duration::from_millis(timings.queue_ms);
        let inference = Duration::from_millis(timings.total_ms.saturating_sub(timings.queue_ms));
        histogram!(QUEUE_SECONDS, "model" => model.to_string()).record(queue.as_secs_f64());
        histogram!(INFERENCE_SECONDS, "model" => model.to_string()).record(inference.as_secs_f64());
    }
}

/// Whether the worker at `endpoint` answers with `model` loaded.
pub fn set_worker_up(endpoint: &str, model: &str, up: bool) {
    gauge!(WORKER_UP, "endpoint" => endpoint.to_string(), "model" => model.to_string())
        .set(if up { 1.0 } else { 0.0 });
}

/// A Generate call for `model` is sent again to another worker; `reason` is why the last one
/// refused it (`busy`, `unavailable`, `unreachable`).
pub fn record_retry(model: &str, reason: &'static str) {
    counter!(RETRIES, "model" => model.to_string(), "reason" => reason).increment(1);
}
