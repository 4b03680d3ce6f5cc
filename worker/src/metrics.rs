//! The worker's Prometheus metrics: names, descriptions, buckets, and the scrape endpoint.
//!
//! Recording goes through the `metrics` facade, so it costs nothing when no recorder is
//! installed (tests, `generate`, `bench`) and lands in whatever recorder the process has: the
//! standalone worker installs a Prometheus one with [`install`] when `--metrics-listen` is set;
//! an embedded worker reports into the gateway's recorder, if it has one.
//!
//! Every name starts with `fastfusion_worker_`; histograms have explicit buckets (seconds for
//! times) because the exporter's default is a summary, which cannot be aggregated across workers.

use std::net::SocketAddr;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{Result, WorkerError};

/// Jobs waiting for the model thread (not counting the one it runs).
pub const QUEUE_DEPTH: &str = "fastfusion_worker_queue_depth";
/// Images denoised together in one batch (every job in it, each of its n images).
pub const BATCH_SIZE: &str = "fastfusion_worker_batch_size";
/// Seconds per denoising step.
pub const STEP_SECONDS: &str = "fastfusion_worker_step_seconds";
/// Seconds a finished job spent on the model thread (encode, denoise, decode, image encoding).
pub const JOB_SECONDS: &str = "fastfusion_worker_job_seconds";
/// Generate calls refused before a job started, by `reason` (the error kind).
pub const REJECTIONS: &str = "fastfusion_worker_rejections_total";
/// Jobs cancelled after they were accepted, by `reason` (`client_gone`, `drain`).
pub const CANCELLATIONS: &str = "fastfusion_worker_cancellations_total";
/// Seconds the model took to load.
pub const MODEL_LOAD_SECONDS: &str = "fastfusion_worker_model_load_seconds";
/// Seconds each LoRA adapter took to read and check at start-up, by `adapter`.
pub const LORA_LOAD_SECONDS: &str = "fastfusion_worker_lora_load_seconds";
/// Batches that ran with another LoRA set than the batch before (plain counts as a set).
pub const LORA_SWITCHES: &str = "fastfusion_worker_lora_switches_total";

const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0];
const STEP_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
const JOB_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Installs the Prometheus recorder for this process (once: a second call fails) and describes
/// every series; the handle renders the scrape text.
pub fn install_recorder() -> Result<PrometheusHandle> {
    let handle = with_buckets(PrometheusBuilder::new())
        .and_then(|b| b.install_recorder())
        .map_err(|e| WorkerError::Internal(format!("metrics recorder: {e}")))?;
    describe();
    Ok(handle)
}

/// Adds the worker's histogram buckets to `builder`; the gateway uses it for its recorder, which
/// an embedded worker reports into.
pub fn with_buckets(
    builder: PrometheusBuilder,
) -> std::result::Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    builder
        .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), BATCH_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(STEP_SECONDS.into()), STEP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(JOB_SECONDS.into()), JOB_BUCKETS)
}

/// [`install_recorder`], then binds the scrape address; the returned future serves the metrics
/// (on any path, as Prometheus' own exporters do) until dropped.
pub async fn install(
    addr: SocketAddr,
) -> Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let handle = install_recorder()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| WorkerError::Internal(format!("cannot listen on {addr} for metrics: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Internal(format!("metrics listener address: {e}")))?;
    Ok((local, serve(listener, handle)))
}

async fn serve(listener: tokio::net::TcpListener, handle: PrometheusHandle) {
    let app = axum::Router::new().fallback(move || {
        let handle = handle.clone();
        async move {
            // The exporter keeps histograms as they are recorded; upkeep drains idle buffers.
            handle.run_upkeep();
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
        }
    });
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "metrics endpoint stopped");
    }
}

/// Registers help text and units, so a scrape explains every series (in whichever recorder the
/// process installed).
pub fn describe() {
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting for the model thread");
    describe_histogram!(BATCH_SIZE, "Images denoised together in one batch");
    describe_histogram!(
        STEP_SECONDS,
        metrics::Unit::Seconds,
        "Duration of one denoising step"
    );
    describe_histogram!(
        JOB_SECONDS,
        metrics::Unit::Seconds,
        "Model-thread time of a finished job"
    );
    describe_counter!(
        REJECTIONS,
        "Generate calls refused before a job started, by reason"
    );
    describe_counter!(
        CANCELLATIONS,
        "Accepted jobs cancelled before they finished, by reason"
    );
    describe_gauge!(
        MODEL_LOAD_SECONDS,
        metrics::Unit::Seconds,
        "Time the model took to load"
    );
    describe_gauge!(
        LORA_LOAD_SECONDS,
        metrics::Unit::Seconds,
        "Time each LoRA adapter took to load, by adapter"
    );
    describe_counter!(
        LORA_SWITCHES,
        "Batches that ran with a different LoRA set than the batch before"
    );
    // Present from the first scrape, so dashboards see zero rather than no data.
    gauge!(QUEUE_DEPTH).set(0.0);
}

pub fn set_queue_depth(depth: usize) {
    gauge!(QUEUE_DEPTH).set(depth as f64);
}

pub fn observe_batch_size(n: usize) {
    histogram!(BATCH_SIZE).record(n as f64);
}

pub fn observe_step(took: Duration) {
    histogram!(STEP_SECONDS).record(took.as_secs_f64());
}

pub fn observe_job(took: Duration) {
    histogram!(JOB_SECONDS).record(took.as_secs_f64());
}

/// `reason` is a [`WorkerError::kind`].
pub fn request_rejected(reason: &'static str) {
    counter!(REJECTIONS, "reason" => reason).increment(1);
}

/// `reason`: `client_gone` or `drain`.
pub fn job_cancelled(reason: &'static str) {
    counter!(CANCELLATIONS, "reason" => reason).increment(1);
}

pub fn set_model_load_seconds(seconds: f64) {
    gauge!(MODEL_LOAD_SECONDS).set(seconds);
}

pub fn set_lora_load_seconds(adapter: &str, seconds: f64) {
    gauge!(LORA_LOAD_SECONDS, "adapter" => adapter.to_string()).set(seconds);
}

pub fn lora_switched() {
    counter!(LORA_SWITCHES).increment(1);
}
