//! The worker running inside the gateway's process (the single-machine default).
//!
//! It is the same gRPC service as a standalone worker, bound to a loopback port, so the gateway
//! talks to it exactly as it talks to remote workers: one code path, tested once.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::engine::Engine;
use crate::error::Result;
use crate::service::{self, WorkerService};
use crate::startup;

/// A running in-process worker. Drop or [`EmbeddedWorker::shutdown`] stops it.
#[derive(Debug)]
pub struct EmbeddedWorker {
    /// `http://127.0.0.1:PORT`, for the gateway's gRPC client.
    pub endpoint: String,
    engine: Engine,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<Result<()>>,
}

impl EmbeddedWorker {
    /// Resolves, with the reason, if the model fails to load (never once it has loaded).
    pub async fn load_failure(&self) -> String {
        self.engine.load_failure().await
    }

    /// Stops serving and waits for the server task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match (&mut self.server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "embedded worker stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "embedded worker task failed"),
        }
    }
}

/// Starts a worker from `config_path` on a loopback port. Returns once the port is bound; the model
/// loads in the background (health says NOT_SERVING until it is ready).
pub async fn start(config_path: &Path) -> Result<EmbeddedWorker> {
    let config = Arc::new(startup::read_config(config_path)?);
    let engine = startup::start_engine(config.clone(), config_path.parent());
    let (listener, addr) = service::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(service::serve(
        listener,
        WorkerService::new(engine.clone(), config),
        async {
            let _ = stopped.await;
        },
    ));
    tracing::info!(%addr, config = %config_path.display(), "embedded worker started");
    Ok(EmbeddedWorker {
        endpoint: format!("http://{addr}"),
        engine,
        stop: Some(stop),
        server,
    })
}

impl Drop for EmbeddedWorker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
