//! The workers behind the gateway: which models they serve, whether they are ready, and the one
//! streaming `Generate` call per request.
//!
//! [`WorkerPool`] is the seam handlers see (`Arc<dyn WorkerPool>`); tests substitute a fake.
//! [`GrpcWorkerPool`] is the real one:
//!
//! ```text
//! discovery.rs  configured endpoints → Targets; host names resolved (and re-resolved every
//!               dns_refresh_every) into one replica per address
//! replica.rs    a replica: lazy tonic channel, latest Info and health (polled by its refresher
//!               task), in-flight count
//! routing.rs    request `model` → served model: aliases, default model, model_not_found
//! balance.rs    one Generate call: least-loaded healthy replica, failover before the first image
//! ```
//!
//! The replica set lives in a `watch` channel: discovery tasks replace it, requests read a
//! snapshot without locks. Info is polled because a worker answers it even while its model
//! loads; readiness is the standard `grpc.health.v1` check.

mod balance;
pub mod discovery;
mod replica;
pub mod routing;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use fastfusion_proto::{GenerateEvent, GenerateRequest, InfoResponse};
use futures::stream::BoxStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::ApiError;
use discovery::{InvalidTarget, Resolver, SystemResolver, Target};
use replica::{spawn_refresher, Replica};
pub use routing::{resolve_model, ModelRouting};

/// The events of one `Generate` call, worker errors already converted.
pub type EventStream = BoxStream<'static, Result<GenerateEvent, ApiError>>;

/// Everything the HTTP side needs from the workers.
#[async_trait::async_trait]
pub trait WorkerPool: Send + Sync {
    /// Ids of the models the workers have reported, the default model first.
    fn models(&self) -> Vec<String>;
    /// What the model a request names can do; `None` asks for the default model. Aliases are
    /// followed; with exactly one model served, every name resolves to it (clients send OpenAI
    /// model names).
    async fn info(&self, requested: Option<&str>) -> Result<Arc<InfoResponse>, ApiError>;
    /// Starts one generation on a worker serving `model` (an id `info` returned), failing over
    /// to another replica while none has produced an image.
    async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<EventStream, ApiError>;
    /// Whether some worker for the default model answers its health check with SERVING.
    async fn ready(&self) -> bool;
    /// Why the pool is not ready, for `/ready`'s 503: a worker's reported load failure when
    /// there is one.
    async fn unready_reason(&self) -> String {
        "no worker for the default model is serving yet (still loading or unreachable)".into()
    }
}

/// Settings of the gRPC pool.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// How often a worker's Info and health are polled once it serves.
    pub refresh_every: Duration,
    /// How often they are polled while a worker is unreachable, loading or not serving.
    pub retry_every: Duration,
    /// Deadline of Info and health calls (not of Generate, which the request timeout bounds).
    pub call_timeout: Duration,
    /// How often host names are resolved again to find replicas that came or went.
    pub dns_refresh_every: Duration,
    /// Most other replicas a request is sent to after the first refuses it.
    pub retries: u32,
    pub routing: ModelRouting,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            refresh_every: Duration::from_secs(5),
            retry_every: Duration::from_secs(1),
            call_timeout: Duration::from_secs(5),
            dns_refresh_every: Duration::from_secs(10),
            retries: 3,
            routing: ModelRouting::default(),
        }
    }
}

/// What the pool's tasks and requests share.
struct Shared {
    targets: Vec<Target>,
    resolver: Arc<dyn Resolver>,
    settings: PoolSettings,
    /// Every replica, ordered by (target, address) so the first target's model comes first;
    /// replaced by discovery, read by requests.
    replicas: watch::Sender<Vec<Arc<Replica>>>,
    /// Rotates the choice among equally loaded replicas.
    next: AtomicUsize,
}

impl Shared {
    fn replicas(&self) -> Vec<Arc<Replica>> {
        self.replicas.borrow().clone()
    }

    fn known(&self) -> Vec<Arc<InfoResponse>> {
        self.replicas
            .borrow()
            .iter()
            .filter_map(|replica| replica.info())
            .collect()
    }

    /// Resolves target `index` and makes the replica set match: new addresses get a replica
    /// (and a refresher), vanished ones are dropped (their in-flight calls keep them alive
    /// until they finish). A failed lookup keeps the replicas: DNS trouble is no reason to
    /// stop using workers that may well be there.
    async fn sync_target(&self, index: usize) {
        let Some(target) = self.targets.get(index) else {
            return;
        };
        let addresses = match discovery::addresses(target, self.resolver.as_ref()).await {
            Ok(addresses) => addresses,
            Err(error) => {
                tracing::warn!(host = %target.host, %error, "cannot resolve worker endpoint; keeping its replicas");
                return;
            }
        };
        self.apply(index, target, addresses.into_iter().collect());
    }

    /// Makes target `index`'s replicas the ones at `wanted`.
    fn apply(&self, index: usize, target: &Target, wanted: BTreeSet<SocketAddr>) {
        self.replicas.send_if_modified(|replicas| {
            let before = replicas.len();
            replicas.retain(|replica| {
                let keep = replica.target != index || wanted.contains(&replica.address);
                if !keep {
                    tracing::info!(worker = %replica.label, "worker replica gone from DNS");
                    if let Some(model) = replica.model_id() {
                        crate::metrics::set_worker_up(&replica.label, &model, false);
                    }
                }
                keep
            });
            let mut changed = replicas.len() != before;
            for &address in &wanted {
                let present = replicas
                    .iter()
                    .any(|r| r.target == index && r.address == address);
                if present {
                    continue;
                }
                match Replica::new(index, target, address, &self.settings) {
                    Ok(replica) => {
                        let replica = Arc::new(replica);
                        tracing::info!(worker = %replica.label, "worker replica added");
                        spawn_refresher(&replica, &self.settings);
                        replicas.push(replica);
                        changed = true;
                    }
                    Err(error) => {
                        tracing::error!(host = %target.host, %address, %error, "cannot make a channel to worker")
                    }
                }
            }
            replicas.sort_by_key(|replica| (replica.target, replica.address));
            changed
        });
    }

    /// Resolves every target and asks every replica for Info now, rather than failing a
    /// request that arrives before the background tasks have heard back.
    async fn refresh_now(&self) {
        futures::future::join_all((0..self.targets.len()).map(|i| self.sync_target(i))).await;
        let timeout = self.settings.call_timeout;
        let replicas = self.replicas();
        futures::future::join_all(replicas.iter().map(|r| r.refresh(timeout))).await;
    }
}

/// The [`WorkerPool`] over gRPC endpoints.
pub struct GrpcWorkerPool {
    shared: Arc<Shared>,
    /// The DNS re-resolution tasks, stopped when the pool is dropped.
    discoverers: Vec<JoinHandle<()>>,
}

impl GrpcWorkerPool {
    /// Starts discovering `endpoints` (`http://host:port`) with the system resolver and polling
    /// the workers' Info. Nothing is connected yet: workers may come up after the gateway.
    pub fn start(endpoints: &[String], settings: PoolSettings) -> Result<Self, InvalidTarget> {
        Self::start_with_resolver(endpoints, settings, Arc::new(SystemResolver))
    }

    /// [`start`](Self::start) with another way of resolving host names.
    pub fn start_with_resolver(
        endpoints: &[String],
        settings: PoolSettings,
        resolver: Arc<dyn Resolver>,
    ) -> Result<Self, InvalidTarget> {
        let targets = endpoints
            .iter()
            .map(|endpoint| Target::parse(endpoint))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            targets,
            resolver,
            settings,
            replicas: watch::Sender::new(Vec::new()),
            next: AtomicUsize::new(0),
        });
        let mut discoverers = Vec::new();
        for (index, target) in shared.targets.iter().enumerate() {
            if let Some(address) = target.literal() {
                // Nothing to re-resolve: its one replica is there from the start.
                shared.apply(index, target, BTreeSet::from([address]));
                continue;
            }
            let shared = Arc::clone(&shared);
            discoverers.push(tokio::spawn(async move {
                loop {
                    shared.sync_target(index).await;
                    tokio::time::sleep(shared.settings.dns_refresh_every).await;
                }
            }));
        }
        Ok(GrpcWorkerPool {
            shared,
            discoverers,
        })
    }

    /// The addresses of the replicas now known, in order (for tests and diagnostics).
    pub fn replica_addresses(&self) -> Vec<SocketAddr> {
        self.shared
            .replicas
            .borrow()
            .iter()
            .map(|replica| replica.address)
            .collect()
    }
}

impl Drop for GrpcWorkerPool {
    fn drop(&mut self) {
        for discoverer in &self.discoverers {
            discoverer.abort();
        }
    }
}

#[async_trait::async_trait]
impl WorkerPool for GrpcWorkerPool {
    fn models(&self) -> Vec<String> {
        self.shared.settings.routing.models(&self.shared.known())
    }

    async fn info(&self, requested: Option<&str>) -> Result<Arc<InfoResponse>, ApiError> {
        let routing = &self.shared.settings.routing;
        if self.shared.known().is_empty() {
            self.shared.refresh_now().await;
        }
        let info = routing.resolve(&self.shared.known(), requested)?;
        if info.loaded {
            return Ok(info);
        }
        // The cached Info predates the model load: ask the replicas of that model again.
        let timeout = self.shared.settings.call_timeout;
        let replicas = self.shared.replicas();
        let serving = replicas.iter().filter(|r| r.serves(&info.model_id));
        futures::future::join_all(serving.map(|r| r.refresh(timeout))).await;
        let info = routing.resolve(&self.shared.known(), requested)?;
        if info.loaded {
            Ok(info)
        } else if !info.load_error.is_empty() {
            Err(ApiError::Unavailable(format!(
                "model '{}' failed to load on its worker: {}",
                info.model_id, info.load_error
            )))
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
        balance::generate(&self.shared, model, request).await
    }

    async fn ready(&self) -> bool {
        if self.shared.known().is_empty() {
            self.shared.refresh_now().await;
        }
        let configured = self.shared.settings.routing.default_model.clone();
        let Some(default) = configured.or_else(|| self.models().into_iter().next()) else {
            return false;
        };
        let mut replicas = self.shared.replicas();
        replicas.retain(|replica| replica.model_id().as_deref() == Some(default.as_str()));
        // Healthy ones first: one SERVING answer is enough.
        replicas.sort_by_key(|replica| !replica.healthy());
        for replica in replicas {
            if replica.serving(self.shared.settings.call_timeout).await {
                return true;
            }
        }
        false
    }

    async fn unready_reason(&self) -> String {
        let configured = self.shared.settings.routing.default_model.clone();
        let default = configured.or_else(|| self.models().into_iter().next());
        let failed = self.shared.replicas().into_iter().find_map(|replica| {
            let info = replica.info()?;
            let default_model = default.as_deref().is_none_or(|d| d == info.model_id);
            (default_model && !info.loaded && !info.load_error.is_empty())
                .then(|| (replica.label.clone(), info))
        });
        match failed {
            Some((label, info)) => format!(
                "model '{}' failed to load on worker {label}: {}",
                info.model_id, info.load_error
            ),
            None => "no worker for the default model is serving yet (still loading or \
                     unreachable)"
                .into(),
        }
    }
}
