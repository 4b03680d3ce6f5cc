//! One worker replica (one resolved address): its channel, its latest Info, whether it is
//! healthy, and how many of this gateway's calls it is running. A refresher task polls Info
//! and the health check; it holds only a weak reference, so a replica that discovery dropped
//! goes away once its last in-flight call finishes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{InfoRequest, InfoResponse};
use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::discovery::Target;
use super::PoolSettings;

/// The worker's service name, as its health service reports it.
const WORKER_SERVICE_NAME: &str = fastfusion_proto::worker_server::SERVICE_NAME;

/// One worker process, as this gateway sees it.
pub(super) struct Replica {
    /// Index of the configured target it was discovered from (the first target's model is the
    /// default model).
    pub target: usize,
    pub address: SocketAddr,
    /// `host:port (address)` for logs.
    pub label: String,
    /// Lazily connected; tonic reconnects on its own after failures.
    pub channel: Channel,
    /// The latest Info; written by the refresher (and on-demand refreshes), read by requests.
    info: watch::Sender<Option<Arc<InfoResponse>>>,
    /// Last Info succeeded and the health check said SERVING; cleared at once when a call
    /// finds the replica unreachable or refusing, set again by the next good poll.
    healthy: AtomicBool,
    /// Whether the last Info call succeeded; only changes are logged, so a worker that is down
    /// does not fill the log once a second.
    reachable: AtomicBool,
    /// Generate calls this gateway has open on it (see [`Lease`]).
    in_flight: AtomicUsize,
}

impl Replica {
    /// A replica at `address` with a lazy channel; call [`spawn_refresher`] to start polling.
    pub fn new(
        target_index: usize,
        target: &Target,
        address: SocketAddr,
        settings: &PoolSettings,
    ) -> Result<Replica, tonic::transport::Error> {
        let channel = Endpoint::from_shared(target.replica_uri(address))?
            .origin(target.origin.clone())
            .connect_timeout(settings.call_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Replica {
            target: target_index,
            address,
            label: format!("{}:{} ({address})", target.host, target.port),
            channel,
            info: watch::Sender::new(None),
            healthy: AtomicBool::new(false),
            // So that the first failure is logged as a warning.
            reachable: AtomicBool::new(true),
            in_flight: AtomicUsize::new(0),
        })
    }

    pub fn info(&self) -> Option<Arc<InfoResponse>> {
        self.info.borrow().clone()
    }

    pub fn model_id(&self) -> Option<String> {
        self.info
            .borrow()
            .as_ref()
            .map(|info| info.model_id.clone())
    }

    pub fn serves(&self, model: &str) -> bool {
        self.info
            .borrow()
            .as_ref()
            .is_some_and(|info| info.model_id == model)
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Until the next successful poll, after a call found it down or refusing.
    pub fn mark_unhealthy(&self) {
        self.healthy.store(false, Ordering::Relaxed);
    }

    /// What balancing compares: this gateway's calls on it plus the work it last reported.
    pub fn load(&self) -> u64 {
        let reported = self
            .info
            .borrow()
            .as_ref()
            .and_then(|info| info.load)
            .map_or(0, |load| u64::from(load.queued) + u64::from(load.running));
        self.in_flight.load(Ordering::Relaxed) as u64 + reported
    }

    /// Asks for Info, then health; publishes both. Returns whether the replica is healthy.
    pub async fn refresh(&self, timeout: Duration) -> bool {
        let mut request = tonic::Request::new(InfoRequest {});
        request.set_timeout(timeout);
        let answer = WorkerClient::new(self.channel.clone()).info(request).await;
        let info = match answer {
            Ok(response) => response.into_inner(),
            Err(status) => {
                self.healthy.store(false, Ordering::Relaxed);
                if let Some(model) = self.model_id() {
                    crate::metrics::set_worker_up(&self.label, &model, false);
                }
                // Keep the last Info: a worker that restarts serves the same model, and requests
                // sent to it meanwhile go to other replicas or get a 503, which is the truth.
                if self.reachable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(worker = %self.label, code = ?status.code(), detail = status.message(), "worker Info failed");
                } else {
                    tracing::debug!(worker = %self.label, code = ?status.code(), "worker still unreachable");
                }
                return false;
            }
        };
        let previous = self.info.send_replace(Some(Arc::new(info.clone())));
        let was_reachable = self.reachable.swap(true, Ordering::Relaxed);
        if !was_reachable || previous.is_none_or(|p| p.model_id != info.model_id) {
            tracing::info!(worker = %self.label, model = %info.model_id, "worker reachable");
        }
        let healthy = self.serving(timeout).await;
        crate::metrics::set_worker_up(&self.label, &info.model_id, healthy && info.loaded);
        healthy
    }

    /// Asks the health check; a SERVING answer makes the replica healthy, anything else not.
    pub async fn serving(&self, timeout: Duration) -> bool {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: WORKER_SERVICE_NAME.to_string(),
        });
        request.set_timeout(timeout);
        let serving = match HealthClient::new(self.channel.clone()).check(request).await {
            Ok(response) => response.into_inner().status == ServingStatus::Serving as i32,
            Err(status) => {
                tracing::debug!(worker = %self.label, code = ?status.code(), "worker health check failed");
                false
            }
        };
        let was = self.healthy.swap(serving, Ordering::Relaxed);
        if was != serving {
            tracing::info!(worker = %self.label, serving, "worker health changed");
        }
        serving
    }

    /// Whether the last Info came from a worker with its model loaded.
    fn loaded(&self) -> bool {
        self.info.borrow().as_ref().is_some_and(|info| info.loaded)
    }
}

/// Polls the replica until it is dropped: often while it is unhealthy or loading (its Info is
/// incomplete until the model is loaded), at `refresh_every` once it serves.
pub(super) fn spawn_refresher(replica: &Arc<Replica>, settings: &PoolSettings) {
    let weak: Weak<Replica> = Arc::downgrade(replica);
    let settings = settings.clone();
    tokio::spawn(async move {
        loop {
            let Some(replica) = weak.upgrade() else {
                return;
            };
            let known = replica.refresh(settings.call_timeout).await && replica.loaded();
            drop(replica);
            let pause = if known {
                settings.refresh_every
            } else {
                settings.retry_every
            };
            tokio::time::sleep(pause).await;
        }
    });
}

/// One call's claim on a replica: counted in its in-flight load while held.
pub(super) struct Lease {
    pub replica: Arc<Replica>,
}

impl Lease {
    pub fn new(replica: Arc<Replica>) -> Lease {
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { replica }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
