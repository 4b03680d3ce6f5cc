//! The workers behind the gateway: which models they serve, whether they are ready, and the one
//! streaming `Generate` call per request.
//!
//! [`WorkerPool`] is the seam handlers see (`Arc<dyn WorkerPool>`); tests substitute a fake.
//! [`GrpcWorkerPool`] is the real one: one lazily connected tonic `Channel` per endpoint and, per
//! endpoint, a refresher task that owns that worker's latest `InfoResponse` (published through a
//! `watch` channel, read without locks by requests). Info is polled because a worker answers it
//! even while its model loads; readiness is the standard `grpc.health.v1` check.
//!
//! Routing is deliberately simple for now: each endpoint serves one model; a request goes to the
//! first endpoint that serves its model. Balancing and failover across replicas come later and
//! belong here, behind the same trait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateEvent, GenerateRequest, InfoRequest, InfoResponse};
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::error::ApiError;

/// The events of one `Generate` call, worker errors already converted.
pub type EventStream = BoxStream<'static, Result<GenerateEvent, ApiError>>;

/// Everything the HTTP side needs from the workers.
#[async_trait::async_trait]
pub trait WorkerPool: Send + Sync {
    /// Ids of the models the workers have reported, the default model first.
    fn models(&self) -> Vec<String>;
    /// What the model a request names can do; `None` asks for the default model. With exactly
    /// one model served, every name resolves to it (clients send OpenAI model names).
    async fn info(&self, requested: Option<&str>) -> Result<Arc<InfoResponse>, ApiError>;
    /// Starts one generation on a worker serving `model` (an id `info` returned).
    async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<EventStream, ApiError>;
    /// Whether some worker for the default model answers its health check with SERVING.
    async fn ready(&self) -> bool;
}

/// Picks the model a request is for among those reported (default first).
pub fn resolve_model(
    known: &[Arc<InfoResponse>],
    requested: Option<&str>,
) -> Result<Arc<InfoResponse>, ApiError> {
    let Some(default) = known.first() else {
        return Err(ApiError::Unavailable(
            "no worker has reported its model yet; retry shortly".to_string(),
        ));
    };
    let single_model = known.iter().all(|info| info.model_id == default.model_id);
    match requested {
        _ if single_model => Ok(Arc::clone(default)),
        None => Ok(Arc::clone(default)),
        Some(name) => known
            .iter()
            .find(|info| info.model_id == name)
            .cloned()
            .ok_or_else(|| ApiError::ModelNotFound {
                requested: name.to_string(),
                available: distinct_models(known),
            }),
    }
}

/// Model ids in first-seen order, each once (several workers may serve one model).
fn distinct_models(known: &[Arc<InfoResponse>]) -> Vec<String> {
    let mut models: Vec<String> = Vec::new();
    for info in known {
        if !models.contains(&info.model_id) {
            models.push(info.model_id.clone());
        }
    }
    models
}

/// Settings of the gRPC pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// How often a worker's Info is polled once known.
    pub refresh_every: Duration,
    /// How often it is retried while a worker has not answered yet.
    pub retry_every: Duration,
    /// Deadline of Info and health calls (not of Generate, which the request timeout bounds).
    pub call_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            refresh_every: Duration::from_secs(10),
            retry_every: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// Largest gRPC message accepted from a worker: one encoded image (tonic's 4 MiB default is
/// smaller than a 2048x2048 PNG).
const MAX_WORKER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;
/// The worker's service name, as its health service reports it.
const WORKER_SERVICE_NAME: &str = fastfusion_proto::worker_server::SERVICE_NAME;

/// One worker endpoint.
struct WorkerHandle {
    /// As configured, for logs.
    endpoint: String,
    /// Lazily connected; tonic reconnects on its own after failures.
    channel: Channel,
    /// The latest Info; written only by this worker's refresher (and by an on-demand refresh
    /// when no worker is known yet), read by every request.
    info: watch::Sender<Option<Arc<InfoResponse>>>,
    /// Whether the last Info call succeeded; only changes are logged, so a worker that is down
    /// does not fill the log once a second.
    reachable: AtomicBool,
}

impl WorkerHandle {
    /// Asks the worker for its Info and publishes it; logs when the worker appears or goes away.
    async fn refresh(&self, timeout: Duration) -> bool {
        let mut request = tonic::Request::new(InfoRequest {});
        request.set_timeout(timeout);
        let answer = WorkerClient::new(self.channel.clone()).info(request).await;
        match answer {
            Ok(response) => {
                let info = response.into_inner();
                let previous = self.info.send_replace(Some(Arc::new(info.clone())));
                let was_reachable = self.reachable.swap(true, Ordering::Relaxed);
                if !was_reachable || previous.is_none_or(|p| p.model_id != info.model_id) {
                    tracing::info!(endpoint = %self.endpoint, model = %info.model_id, "worker reachable");
                }
                true
            }
            Err(status) => {
                // Keep the last Info: a worker that restarts serves the same model, and requests
                // sent to it meanwhile get UNAVAILABLE (503), which is the truth.
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(endpoint = %self.endpoint, code = ?status.code(), message = status.message(), "worker Info failed");
                } else {
                    tracing::debug!(endpoint = %self.endpoint, code = ?status.code(), "worker still unreachable");
                }
                false
            }
        }
    }

    async fn serving(&self, timeout: Duration) -> bool {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: WORKER_SERVICE_NAME.to_string(),
        });
        request.set_timeout(timeout);
        match HealthClient::new(self.channel.clone()).check(request).await {
            Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
            Err(status) => {
                tracing::debug!(endpoint = %self.endpoint, code = ?status.code(), "worker health check failed");
                false
            }
        }
    }

    /// Whether the last Info came from a worker with its model loaded.
    fn loaded(&self) -> bool {
        self.info.borrow().as_ref().is_some_and(|info| info.loaded)
    }

    fn model_id(&self) -> Option<String> {
        self.info
            .borrow()
            .as_ref()
            .map(|info| info.model_id.clone())
    }
}

/// The [`WorkerPool`] over gRPC endpoints.
pub struct GrpcWorkerPool {
    /// In configuration order; the first one's model is the default model.
    workers: Vec<Arc<WorkerHandle>>,
    settings: PoolSettings,
    /// The refresher tasks, stopped when the pool is dropped.
    refreshers: Vec<JoinHandle<()>>,
}

impl GrpcWorkerPool {
    /// Creates channels to `endpoints` (`http://host:port`) and starts polling their Info.
    /// Nothing is connected yet: workers may come up after the gateway.
    pub fn start(
        endpoints: &[String],
        settings: PoolSettings,
    ) -> Result<Self, tonic::transport::Error> {
        let mut workers = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let channel = Endpoint::from_shared(endpoint.clone())?
                .connect_timeout(settings.call_timeout)
                .tcp_nodelay(true)
                .connect_lazy();
            workers.push(Arc::new(WorkerHandle {
                endpoint: endpoint.clone(),
                channel,
                info: watch::Sender::new(None),
                // So that the first failure is logged as a warning.
                reachable: AtomicBool::new(true),
            }));
        }
        let refreshers = workers
            .iter()
            .map(|worker| {
                let worker = Arc::clone(worker);
                let settings = settings.clone();
                tokio::spawn(async move {
                    loop {
                        // A worker still loading its model is asked again soon: its Info
                        // (native size, limits) is incomplete until then.
                        let known = worker.refresh(settings.call_timeout).await && worker.loaded();
                        let pause = if known {
                            settings.refresh_every
                        } else {
                            settings.retry_every
                        };
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Ok(GrpcWorkerPool {
            workers,
            settings,
            refreshers,
        })
    }

    fn known(&self) -> Vec<Arc<InfoResponse>> {
        self.workers
            .iter()
            .filter_map(|worker| worker.info.borrow().clone())
            .collect()
    }

    fn default_model(&self) -> Option<String> {
        self.workers.first().and_then(|worker| worker.model_id())
    }
}

impl Drop for GrpcWorkerPool {
    fn drop(&mut self) {
        for refresher in &self.refreshers {
            refresher.abort();
        }
    }
}

#[async_trait::async_trait]
impl WorkerPool for GrpcWorkerPool {
    fn models(&self) -> Vec<String> {
        distinct_models(&self.known())
    }

    async fn info(&self, requested: Option<&str>) -> Result<Arc<InfoResponse>, ApiError> {
        if self.known().is_empty() {
            // Right after start-up the refreshers may not have heard back yet: ask now rather
            // than failing the first request.
            let timeout = self.settings.call_timeout;
            futures::future::join_all(self.workers.iter().map(|w| w.refresh(timeout))).await;
        }
        let info = resolve_model(&self.known(), requested)?;
        if info.loaded {
            return Ok(info);
        }
        // The cached Info predates the model load: ask the workers of that model again.
        let timeout = self.settings.call_timeout;
        let serving = self
            .workers
            .iter()
            .filter(|w| w.model_id().as_deref() == Some(info.model_id.as_str()));
        futures::future::join_all(serving.map(|w| w.refresh(timeout))).await;
        let info = resolve_model(&self.known(), requested)?;
        if info.loaded {
            Ok(info)
        } else {
            Err(ApiError::Unavailable(format!(
                "model '{}' is still loading",
                info.model_id
            )))
        }
    }

    async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<EventStream, ApiError> {
        let worker = self
            .workers
            .iter()
            .find(|worker| worker.model_id().as_deref() == Some(model))
            .ok_or_else(|| {
                ApiError::Unavailable(format!("no worker serves model '{model}' now"))
            })?;
        let mut client = WorkerClient::new(worker.channel.clone())
            .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES);
        let stream = client.generate(request).await?.into_inner();
        Ok(stream.map(|event| event.map_err(ApiError::from)).boxed())
    }

    async fn ready(&self) -> bool {
        let Some(default) = self.default_model() else {
            // A default worker that never answered Info may just have started: ask once.
            return match self.workers.first() {
                Some(first) => {
                    first.refresh(self.settings.call_timeout).await
                        && first.serving(self.settings.call_timeout).await
                }
                None => false,
            };
        };
        for worker in &self.workers {
            if worker.model_id().as_deref() == Some(default.as_str())
                && worker.serving(self.settings.call_timeout).await
            {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model_id: &str) -> Arc<InfoResponse> {
        Arc::new(InfoResponse {
            model_id: model_id.to_string(),
            ..Default::default()
        })
    }

    fn resolved(known: &[Arc<InfoResponse>], requested: Option<&str>) -> Result<String, String> {
        resolve_model(known, requested)
            .map(|info| info.model_id.clone())
            .map_err(|error| error.to_string())
    }

    #[test]
    fn replicas_of_one_model_count_as_one_model() {
        let known = [info("sd"), info("sd")];
        assert_eq!(resolved(&known, Some("gpt-image-1")), Ok("sd".to_string()));
        assert_eq!(resolved(&known, None), Ok("sd".to_string()));
    }

    #[test]
    fn several_models_need_a_known_name() {
        let known = [info("a"), info("b"), info("a")];
        assert_eq!(resolved(&known, None), Ok("a".to_string()));
        assert_eq!(resolved(&known, Some("b")), Ok("b".to_string()));
        let error = resolved(&known, Some("c")).expect_err("unknown model");
        assert!(error.ends_with("available models: a, b"), "{error}");
    }

    #[test]
    fn nothing_known_is_unavailable() {
        assert!(matches!(
            resolve_model(&[], None),
            Err(ApiError::Unavailable(_))
        ));
    }
}
