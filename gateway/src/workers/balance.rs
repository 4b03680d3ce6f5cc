//! Balancing and failover for one `Generate` call.
//!
//! The replicas of the model are ordered once per request: healthy ones only (all of them when
//! none is healthy, since health may be stale), least loaded first (this gateway's in-flight
//! calls plus the queued and running requests the worker last reported), ties rotated so equal
//! replicas share the work. The call goes to the first; a replica that refuses it
//! (RESOURCE_EXHAUSTED, UNAVAILABLE) or cannot be reached, before any image (final or preview)
//! came back, is left for the next one — each replica at most once, at most `retries` times.
//! Events before the first image (queued, started, progress) are passed on as they come, so
//! after a retry a client may see them again. Once an image was produced, errors pass through.
//! When every replica tried refused: 429 if any was busy, else 503.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateEvent, GenerateRequest};
use futures::StreamExt;
use tonic::codec::Streaming;
use tonic::Code;

use super::replica::{Lease, Replica};
use super::{EventStream, Shared};
use crate::error::ApiError;

/// Largest gRPC message accepted from a worker: one encoded image (tonic's 4 MiB default is
/// smaller than a 2048x2048 PNG).
const MAX_WORKER_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The order to try replicas in, given each one's load (`None`: unhealthy) and a rotation that
/// breaks ties: healthy replicas by load, or every replica when none is healthy.
pub(super) fn attempt_order(loads: &[Option<u64>], rotate: usize) -> Vec<usize> {
    let count = loads.len();
    let rotated: Vec<usize> = (0..count).map(|k| (k + rotate % count) % count).collect();
    let mut healthy: Vec<usize> = rotated
        .iter()
        .copied()
        .filter(|&i| loads[i].is_some())
        .collect();
    if healthy.is_empty() {
        return rotated;
    }
    // Stable: equally loaded replicas keep their rotated order.
    healthy.sort_by_key(|&i| loads[i]);
    healthy
}

/// Starts `request` on the best replica serving `model`, failing over as described above.
pub(super) async fn generate(
    shared: &Shared,
    model: &str,
    request: GenerateRequest,
) -> Result<EventStream, ApiError> {
    let candidates: Vec<Arc<Replica>> = shared
        .replicas
        .borrow()
        .iter()
        .filter(|replica| replica.serves(model))
        .cloned()
        .collect();
    let loads: Vec<Option<u64>> = candidates
        .iter()
        .map(|replica| replica.healthy().then(|| replica.load()))
        .collect();
    let rotate = shared.next.fetch_add(1, Ordering::Relaxed);
    let attempts = shared.settings.retries as usize + 1;
    let mut order: Vec<Arc<Replica>> = attempt_order(&loads, rotate)
        .into_iter()
        .take(attempts)
        .map(|i| Arc::clone(&candidates[i]))
        .collect();
    // Popped from the back.
    order.reverse();
    let mut call = Call {
        model: model.to_string(),
        request,
        order,
        refusals: Refusals::default(),
    };
    let (lease, events) = call.open().await?;
    let running = Running {
        call,
        lease,
        events,
        produced: false,
        done: false,
    };
    Ok(futures::stream::unfold(Some(running), next_event).boxed())
}

/// One request's remaining choices and what the replicas tried so far answered.
struct Call {
    model: String,
    request: GenerateRequest,
    /// Replicas not tried yet, best last.
    order: Vec<Arc<Replica>>,
    refusals: Refusals,
}

/// Why a replica did not take a call; anything else is the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// RESOURCE_EXHAUSTED: its queue is full.
    Busy,
    /// UNAVAILABLE from the worker (loading, draining): it said why.
    Unavailable,
    /// No answer: connect failure or the connection broke (the worker died).
    Unreachable,
}

impl Refusal {
    fn of(status: &tonic::Status) -> Option<Refusal> {
        // Statuses made from transport errors carry their cause; a worker's own status, read
        // from the response's trailers, does not.
        let transport = std::error::Error::source(status).is_some();
        match status.code() {
            Code::ResourceExhausted => Some(Refusal::Busy),
            Code::Unavailable if transport => Some(Refusal::Unreachable),
            Code::Unavailable => Some(Refusal::Unavailable),
            Code::Unknown | Code::Internal | Code::Cancelled if transport => {
                Some(Refusal::Unreachable)
            }
            _ => None,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Unavailable => "unavailable",
            Refusal::Unreachable => "unreachable",
        }
    }
}

/// Counts of refusals, for the error when no replica takes the call.
#[derive(Debug, Default)]
struct Refusals {
    busy: usize,
    others: usize,
    /// The last message a worker itself gave (transport errors can name internal addresses).
    last_message: Option<String>,
}

impl Refusals {
    fn into_error(self, model: &str) -> ApiError {
        let tried = self.busy + self.others;
        if tried == 0 {
            ApiError::Unavailable(format!(
                "no worker serving model '{model}' is reachable now"
            ))
        } else if self.busy > 0 {
            ApiError::Busy(format!(
                "every worker serving model '{model}' is busy ({} of {tried} tried had a full queue); retry shortly",
                self.busy
            ))
        } else {
            let why = self
                .last_message
                .unwrap_or_else(|| "unreachable".to_string());
            ApiError::Unavailable(format!(
                "no worker serving model '{model}' could take the request ({why}); retry shortly"
            ))
        }
    }
}

impl Call {
    /// Opens the call on the next replica that accepts it.
    async fn open(&mut self) -> Result<(Lease, Streaming<GenerateEvent>), ApiError> {
        while let Some(replica) = self.order.pop() {
            let lease = Lease::new(replica);
            let mut client = WorkerClient::new(lease.replica.channel.clone())
                .max_decoding_message_size(MAX_WORKER_MESSAGE_BYTES);
            // The trace context joins the worker's job span to this request's trace.
            match client
                .generate(crate::telemetry::traced(self.request.clone()))
                .await
            {
                Ok(response) => return Ok((lease, response.into_inner())),
                Err(status) => self.refused(&lease.replica, status)?,
            }
        }
        Err(std::mem::take(&mut self.refusals).into_error(&self.model))
    }

    /// Records a refusal so the next replica is tried, or returns the answer to pass on.
    fn refused(&mut self, replica: &Replica, status: tonic::Status) -> Result<(), ApiError> {
        let Some(refusal) = Refusal::of(&status) else {
            return Err(ApiError::from(status));
        };
        self.refuse(replica, refusal, Some(status.message()));
        Ok(())
    }

    fn refuse(&mut self, replica: &Replica, refusal: Refusal, message: Option<&str>) {
        tracing::warn!(
            worker = %replica.label,
            model = %self.model,
            reason = refusal.reason(),
            detail = message.unwrap_or_default(),
            left = self.order.len(),
            "worker refused the request; trying another"
        );
        match refusal {
            Refusal::Busy => self.refusals.busy += 1,
            Refusal::Unavailable => {
                replica.mark_unhealthy();
                self.refusals.others += 1;
                self.refusals.last_message = message.map(str::to_string);
            }
            Refusal::Unreachable => {
                replica.mark_unhealthy();
                self.refusals.others += 1;
            }
        }
        if !self.order.is_empty() {
            count_retry(&self.model, refusal);
        }
    }
}

/// Hook for the gateway's metrics: one more request re-sent to another replica.
fn count_retry(model: &str, refusal: Refusal) {
    tracing::debug!(reason = refusal.reason(), "retrying on another worker");
    crate::metrics::record_retry(model, refusal.reason());
}

/// A call in progress.
struct Running {
    call: Call,
    /// The replica serving it now.
    lease: Lease,
    events: Streaming<GenerateEvent>,
    /// An image or preview came back: from here on, errors are the answer.
    produced: bool,
    /// The worker sent `Done`.
    done: bool,
}

/// The next event of the call, failing over to another replica while no image came back.
async fn next_event(
    state: Option<Running>,
) -> Option<(Result<GenerateEvent, ApiError>, Option<Running>)> {
    let mut running = state?;
    loop {
        match running.events.next().await {
            Some(Ok(event)) => {
                match event.event {
                    Some(Event::Image(_) | Event::PartialImage(_)) => running.produced = true,
                    Some(Event::Done(_)) => running.done = true,
                    Some(Event::Queued(_) | Event::Started(_) | Event::Progress(_)) | None => {}
                }
                return Some((Ok(event), Some(running)));
            }
            Some(Err(status)) if running.produced => {
                return Some((Err(ApiError::from(status)), None))
            }
            Some(Err(status)) => {
                let replica = Arc::clone(&running.lease.replica);
                if let Err(error) = running.call.refused(&replica, status) {
                    return Some((Err(error), None));
                }
            }
            None if running.produced || running.done => return None,
            // Ended without a status, images or Done: the worker went away mid-call.
            None => {
                let replica = Arc::clone(&running.lease.replica);
                running.call.refuse(&replica, Refusal::Unreachable, None);
            }
        }
        match running.call.open().await {
            Ok((lease, events)) => {
                running.lease = lease;
                running.events = events;
            }
            Err(error) => return Some((Err(error), None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_loaded_healthy_replicas_first() {
        assert_eq!(
            attempt_order(&[Some(3), Some(0), None, Some(1)], 0),
            vec![1, 3, 0]
        );
    }

    #[test]
    fn ties_rotate() {
        let loads = [Some(0), Some(0), Some(0)];
        assert_eq!(attempt_order(&loads, 0), vec![0, 1, 2]);
        assert_eq!(attempt_order(&loads, 1), vec![1, 2, 0]);
        assert_eq!(attempt_order(&loads, 5), vec![2, 0, 1]);
        assert_eq!(attempt_order(&loads, usize::MAX), vec![0, 1, 2]);
    }

    #[test]
    fn with_none_healthy_all_are_tried() {
        assert_eq!(attempt_order(&[None, None], 1), vec![1, 0]);
        assert!(attempt_order(&[], 3).is_empty());
    }

    #[test]
    fn refusals_are_told_from_answers() {
        assert_eq!(
            Refusal::of(&tonic::Status::resource_exhausted("full")),
            Some(Refusal::Busy)
        );
        assert_eq!(
            Refusal::of(&tonic::Status::unavailable("draining")),
            Some(Refusal::Unavailable)
        );
        let broken = tonic::Status::from_error(Box::new(std::io::Error::other("reset")));
        assert_eq!(broken.code(), Code::Unknown);
        assert_eq!(Refusal::of(&broken), Some(Refusal::Unreachable));
        // A worker's own INTERNAL or bad-request answer is not retried elsewhere.
        assert_eq!(Refusal::of(&tonic::Status::internal("boom")), None);
        assert_eq!(Refusal::of(&tonic::Status::invalid_argument("n")), None);
    }

    #[test]
    fn busy_wins_over_unreachable_in_the_final_error() {
        let refusals = Refusals {
            busy: 1,
            others: 1,
            last_message: None,
        };
        assert!(matches!(refusals.into_error("m"), ApiError::Busy(_)));
        let none = Refusals::default();
        assert!(matches!(none.into_error("m"), ApiError::Unavailable(_)));
        let loading = Refusals {
            busy: 0,
            others: 2,
            last_message: Some("the model is still loading".into()),
        };
        let message = loading.into_error("m").to_string();
        assert!(message.contains("still loading"), "{message}");
    }
}
