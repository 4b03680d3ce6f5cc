//! `fastfusion-gateway`: reads its settings, opens the image store, connects to the workers (or
//! starts one in-process from CONFIG_PATH when none is given), and serves the HTTP API until
//! SIGTERM or Ctrl-C, finishing in-flight requests first.
//!
//! The log line `listening on http://ADDR` carries the bound address (the real port when
//! FASTFUSION_PORT=0); end-to-end tests read it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Parser;
use fastfusion_gateway::auth::ApiKeys;
use fastfusion_gateway::concurrency::ConcurrencyLimit;
use fastfusion_gateway::config::{Args, Settings};
use fastfusion_gateway::image_urls::ImageUrls;
use fastfusion_gateway::storage::{ObjectImageStore, Sweeper};
use fastfusion_gateway::workers::{GrpcWorkerPool, PoolSettings};
use fastfusion_gateway::{router, AppState, HttpSettings};
use fastfusion_telemetry::TelemetrySettings;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let settings = Args::parse().validate()?;
    // RUST_LOG may add per-crate directives; FASTFUSION_LOGLEVEL sets the default level. Kept
    // until exit: dropping it flushes the spans still batched for OTLP.
    let _telemetry = fastfusion_telemetry::init(&TelemetrySettings {
        service_name: "fastfusion-gateway",
        level: settings.log_level,
        format: settings.log_format,
        stderr: false,
    })?;
    fastfusion_gateway::metrics::install()?;

    let images = ObjectImageStore::open(&settings.image_data_path)
        .await
        .context("IMAGE_DATA_PATH: cannot use the image store")?;
    match settings.image_ttl {
        Some(ttl) => {
            let sweeper = Sweeper::new(images.clone(), ttl);
            tokio::spawn(sweeper.run(settings.sweep_interval));
        }
        None => tracing::info!("FASTFUSION_IMAGE_TTL_SECS=0: stored images are never deleted"),
    }
    let (endpoints, embedded) = worker_endpoints(&settings).await?;
    let pool_settings = PoolSettings {
        dns_refresh_every: settings.dns_refresh,
        retries: settings.worker_retries,
        routing: settings.model_routing.clone(),
        ..PoolSettings::default()
    };
    let workers = GrpcWorkerPool::start(&endpoints, pool_settings)
        .context("FASTFUSION_WORKERS: invalid worker endpoint")?;
    tracing::info!(
        workers = ?endpoints,
        images = %settings.image_data_path,
        api_keys = settings.api_keys.len(),
        signed_urls = settings.url_signing_key.is_some(),
        max_concurrent_requests = ?settings.max_concurrent_requests,
        "gateway configured"
    );

    let urls = match &settings.url_signing_key {
        Some(key) => ImageUrls::signed(key.expose().as_bytes(), settings.url_ttl)
            .context("FASTFUSION_URL_SIGNING_KEY: unusable key")?,
        None => ImageUrls::unsigned(),
    };
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let state = AppState {
        workers: Arc::new(workers),
        images: Arc::new(images),
        api_keys: Arc::new(ApiKeys::new(&settings.api_keys)),
        urls: Arc::new(urls),
        concurrency: Arc::new(ConcurrencyLimit::new(settings.max_concurrent_requests)),
        http: Arc::new(HttpSettings {
            base_url: settings.base_url.clone(),
            request_timeout: settings.request_timeout,
            max_body_bytes: settings.max_body_bytes,
            max_input_pixels: settings.max_input_pixels,
            started_at,
        }),
    };
    let address = settings.bind_address();
    let listener = tokio::net::TcpListener::bind(&address)
        .await
        .with_context(|| format!("FASTFUSION_HOST/FASTFUSION_PORT: cannot listen on {address}"))?;
    let bound = listener.local_addr()?;
    tracing::info!("listening on http://{bound}");
    let serving = axum::serve(listener, router(state)).with_graceful_shutdown(shutdown_signal());
    // An embedded model that cannot load stops the gateway with the reason: serving 503s forever
    // would hide it.
    let failed = tokio::select! {
        served = serving => {
            served.context("serving HTTP")?;
            None
        }
        reason = embedded_load_failure(embedded.as_ref()) => Some(reason),
    };
    stop_embedded(embedded).await;
    if let Some(reason) = failed {
        anyhow::bail!(
            "CONFIG_PATH: the embedded worker's model failed to load from {}: {reason}",
            settings.config_path.display()
        );
    }
    tracing::info!("HTTP server stopped");
    Ok(())
}

/// Resolves with the reason if the embedded worker's model fails to load; never without one.
#[cfg(feature = "embedded-worker")]
async fn embedded_load_failure(embedded: Option<&Embedded>) -> String {
    match embedded {
        Some(worker) => worker.load_failure().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(feature = "embedded-worker"))]
async fn embedded_load_failure(_: Option<&Embedded>) -> String {
    std::future::pending().await
}

#[cfg(feature = "embedded-worker")]
type Embedded = fastfusion_worker::embedded::EmbeddedWorker;
#[cfg(not(feature = "embedded-worker"))]
type Embedded = std::convert::Infallible;

/// The configured endpoints, or the endpoint of a worker started in-process from CONFIG_PATH.
#[cfg(feature = "embedded-worker")]
async fn worker_endpoints(settings: &Settings) -> anyhow::Result<(Vec<String>, Option<Embedded>)> {
    if !settings.workers.is_empty() {
        return Ok((settings.workers.clone(), None));
    }
    tracing::info!(config = %settings.config_path.display(), "no worker endpoints given: starting an embedded worker");
    let worker = fastfusion_worker::embedded::start(&settings.config_path)
        .await
        .with_context(|| {
            format!(
                "CONFIG_PATH: cannot start the embedded worker from {}",
                settings.config_path.display()
            )
        })?;
    Ok((vec![worker.endpoint.clone()], Some(worker)))
}

#[cfg(not(feature = "embedded-worker"))]
async fn worker_endpoints(settings: &Settings) -> anyhow::Result<(Vec<String>, Option<Embedded>)> {
    if settings.workers.is_empty() {
        anyhow::bail!(
            "FASTFUSION_WORKERS (--worker): no worker endpoints given, and this build has no \
             embedded worker (cargo feature `embedded-worker`)"
        );
    }
    Ok((settings.workers.clone(), None))
}

#[cfg(feature = "embedded-worker")]
async fn stop_embedded(embedded: Option<Embedded>) {
    if let Some(worker) = embedded {
        worker.shutdown().await;
    }
}

#[cfg(not(feature = "embedded-worker"))]
async fn stop_embedded(embedded: Option<Embedded>) {
    if let Some(never) = embedded {
        match never {}
    }
}

/// Resolves on Ctrl-C or SIGTERM (what Kubernetes and Docker send).
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutting down: finishing in-flight requests");
}
