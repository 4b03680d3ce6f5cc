//! The job engine: a bounded FIFO queue in front of the one thread that runs the model.
//!
//! ```text
//!  service (many tasks) ──Submit──▶ queue actor (one task, owns the queue) ◀──Next── model thread
//!        ▲                                  │ Queued{position}                     │ runs Backend
//!        └──────────── JobEvent (per-job unbounded channel) ◀──────────────────────┘
//! ```
//!
//! * The queue actor owns all queue state; everyone else talks to it through [`Command`]s with
//!   oneshot replies, so there are no locks.
//! * The model thread is a plain OS thread: forward passes never run on the async runtime. It loads
//!   the model first (the engine is [`EngineState::Loading`] meanwhile), then takes one job at a
//!   time.
//! * A job is cancelled when its event receiver is dropped (the gRPC stream went away): a queued
//!   job is purged, a running job stops at its next denoising step.
//! * Draining ([`Engine::drain`]): the state becomes [`EngineState::Draining`], so health says
//!   NOT_SERVING and `Submit` is refused as unavailable (the gateway retries elsewhere); queued
//!   and running jobs go on until the engine is idle or the grace period ends, when the rest is
//!   cancelled with an UNAVAILABLE error.
//! * Batching several jobs into one forward pass slots in at `Command::Next` (hand the thread a
//!   group of compatible jobs instead of one).

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use fastfusion_proto::{OutputFormat, Timings};
use image::{GrayImage, RgbImage};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::{Backend, ModelDescription};
use crate::encode;
use crate::error::{Result, WorkerError};
use crate::metrics;
use crate::pipelines::stable_diffusion::{Progress, Stage, TextToImage};

/// What a job asks for, already validated against the loaded model.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub request_id: String,
    /// The parameters every task shares.
    pub generation: TextToImage,
    pub task: JobTask,
    pub output_format: OutputFormat,
    pub output_compression: Option<u32>,
}

/// The task of a job and its inputs, decoded and already at the output size.
#[derive(Debug, Clone)]
pub enum JobTask {
    TextToImage,
    ImageToImage {
        image: RgbImage,
        strength: f64,
    },
    /// `mask` is white where the model repaints.
    Inpaint {
        image: RgbImage,
        mask: GrayImage,
        strength: f64,
    },
}

/// Everything a job reports back, in order. The stream ends after `Done` or `Failed`.
#[derive(Debug)]
pub enum JobEvent {
    Queued {
        position: u32,
    },
    Started {
        batch_size: u32,
    },
    Progress {
        step: u32,
        total: u32,
    },
    Image {
        index: u32,
        data: Vec<u8>,
        width: u32,
        height: u32,
    },
    Done(Timings),
    Failed(WorkerError),
}

/// The model's lifecycle, published through a `watch` channel (health and `Info` read it).
#[derive(Debug, Clone)]
pub enum EngineState {
    Loading,
    Ready(Arc<ModelDescription>),
    /// Shutting down: jobs already accepted run on, new ones are refused.
    Draining(Arc<ModelDescription>),
    Failed(String),
}

/// Current load, as reported in `Info`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    pub queued: u32,
    pub running: u32,
}

struct Job {
    spec: JobSpec,
    events: mpsc::UnboundedSender<JobEvent>,
    enqueued: Instant,
}

enum Command {
    Submit {
        /// Boxed: a job may carry decoded images, and commands are moved around a lot.
        job: Box<Job>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The model thread is idle and wants the next job.
    Next {
        reply: oneshot::Sender<Job>,
    },
    /// The model thread finished its job.
    Finished,
    Load {
        reply: oneshot::Sender<Load>,
    },
    /// The grace period is over: fail every queued job (the running one is aborted separately).
    CancelQueued,
}

/// Cloneable handle to the engine. Dropping every handle stops the queue actor and, after its
/// current job, the model thread.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<EngineState>,
    /// Shared with the model thread, which moves Loading → Ready/Failed; `drain` moves Ready →
    /// Draining.
    state_tx: Arc<watch::Sender<EngineState>>,
    /// Queued + running, published by the queue actor after every command (drain waits on it).
    load: watch::Receiver<Load>,
    /// Set when the grace period ends; the running job stops at its next step.
    abort: Arc<AtomicBool>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Engine {
    /// Starts the queue actor and the model thread, which calls `load` before taking jobs.
    /// Must be called inside a tokio runtime.
    pub fn start<F>(max_queue: usize, load: F) -> Engine
    where
        F: FnOnce() -> Result<Box<dyn Backend>> + Send + 'static,
    {
        let (commands, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let state_tx = Arc::new(state_tx);
        let (load_tx, load_rx) = watch::channel(Load::default());
        let abort = Arc::new(AtomicBool::new(false));
        tokio::spawn(run_queue(rx, max_queue.max(1), state.clone(), load_tx));
        let thread_commands = commands.clone();
        let thread_state = state_tx.clone();
        let thread_abort = abort.clone();
        let spawned = std::thread::Builder::new()
            .name("fastfusion-model".into())
            .spawn(move || run_model(load, thread_commands, thread_state, thread_abort));
        if let Err(e) = spawned {
            // Without a model thread the engine can never serve; say so through the state.
            tracing::error!(error = %e, "cannot start the model thread");
        }
        Engine {
            commands,
            state,
            state_tx,
            load: load_rx,
            abort,
        }
    }

    /// Stops taking jobs: the state becomes [`EngineState::Draining`] (a model still loading is
    /// marked failed, as it will never serve). Jobs already accepted keep running.
    pub fn start_draining(&self) {
        self.state_tx.send_if_modified(|state| {
            let next = match state {
                EngineState::Ready(d) => EngineState::Draining(d.clone()),
                EngineState::Loading => EngineState::Failed("the worker is shutting down".into()),
                EngineState::Draining(_) | EngineState::Failed(_) => return false,
            };
            *state = next;
            true
        });
    }

    /// Waits until no job is queued or running.
    pub async fn idle(&self) {
        let mut load = self.load.clone();
        // An error means the queue actor is gone, and with it every job.
        let _ = load.wait_for(|l| l.queued == 0 && l.running == 0).await;
    }

    /// Fails every queued job and stops the running one at its next step, all with UNAVAILABLE.
    pub fn cancel_all(&self) {
        self.abort.store(true, Ordering::SeqCst);
        let _ = self.commands.send(Command::CancelQueued);
    }

    /// Graceful drain: stop taking jobs, give accepted ones up to `grace` to finish, cancel the
    /// rest and wait for the model thread to let go of them. Returns true when nothing had to be
    /// cancelled.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.start_draining();
        let load = *self.load.borrow();
        tracing::info!(
            queued = load.queued,
            running = load.running,
            grace_secs = grace.as_secs_f64(),
            "draining"
        );
        if tokio::time::timeout(grace, self.idle()).await.is_ok() {
            tracing::info!("drained: every accepted job finished");
            return true;
        }
        let load = *self.load.borrow();
        tracing::warn!(
            queued = load.queued,
            running = load.running,
            "grace period over; cancelling the remaining jobs"
        );
        self.cancel_all();
        // The running job stops at its next denoising step; a decode already under way cannot be
        // interrupted, so this wait is bounded by one step or one decode.
        self.idle().await;
        false
    }

    /// The model's lifecycle state now.
    pub fn state(&self) -> EngineState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change (for the health service).
    pub fn watch_state(&self) -> watch::Receiver<EngineState> {
        self.state.clone()
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn ready(&self) -> Result<Arc<ModelDescription>> {
        let mut state = self.state.clone();
        loop {
            match &*state.borrow_and_update() {
                EngineState::Ready(d) => return Ok(d.clone()),
                EngineState::Failed(msg) => return Err(WorkerError::Unavailable(msg.clone())),
                EngineState::Draining(_) => return Err(draining()),
                EngineState::Loading => {}
            }
            if state.changed().await.is_err() {
                return Err(WorkerError::Unavailable("the model thread stopped".into()));
            }
        }
    }

    /// Queues a job; its events arrive on the returned receiver. Dropping the receiver cancels it.
    pub async fn submit(&self, spec: JobSpec) -> Result<mpsc::UnboundedReceiver<JobEvent>> {
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let job = Job {
            spec,
            events,
            enqueued: Instant::now(),
        };
        self.commands
            .send(Command::Submit {
                job: Box::new(job),
                reply,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())??;
        Ok(rx)
    }

    /// Jobs queued and running now.
    pub async fn load(&self) -> Load {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Load { reply }).is_err() {
            return Load::default();
        }
        answer.await.unwrap_or_default()
    }
}

fn stopped() -> WorkerError {
    WorkerError::Unavailable("the worker is shutting down".into())
}

fn draining() -> WorkerError {
    WorkerError::Unavailable("the worker is draining for shutdown".into())
}

fn cancelled_by_shutdown() -> WorkerError {
    WorkerError::Unavailable("the worker shut down before the job finished".into())
}

/// The queue actor: owns the FIFO and hands jobs to the model thread one at a time.
async fn run_queue(
    mut commands: mpsc::UnboundedReceiver<Command>,
    max_queue: usize,
    state: watch::Receiver<EngineState>,
    load: watch::Sender<Load>,
) {
    let mut queue: VecDeque<Job> = VecDeque::new();
    // Set while the model thread waits for work.
    let mut idle_runner: Option<oneshot::Sender<Job>> = None;
    let mut running = 0u32;
    while let Some(command) = commands.recv().await {
        match command {
            Command::Submit { job, reply } => {
                let admitted = match &*state.borrow() {
                    EngineState::Loading => Err(WorkerError::Unavailable(
                        "the model is still loading".into(),
                    )),
                    EngineState::Failed(msg) => Err(WorkerError::Unavailable(msg.clone())),
                    EngineState::Draining(_) => Err(draining()),
                    EngineState::Ready(_) => Ok(()),
                };
                queue.retain(|j| !j.events.is_closed());
                let admitted = admitted.and_then(|()| {
                    if queue.len() + running as usize >= max_queue {
                        Err(WorkerError::QueueFull(max_queue))
                    } else {
                        Ok(())
                    }
                });
                if admitted.is_ok() {
                    let _ = job.events.send(JobEvent::Queued {
                        position: queue.len() as u32,
                    });
                    queue.push_back(*job);
                }
                let _ = reply.send(admitted);
            }
            Command::Next { reply } => idle_runner = Some(reply),
            Command::Finished => running = running.saturating_sub(1),
            Command::Load { reply } => {
                queue.retain(|j| !j.events.is_closed());
                let _ = reply.send(Load {
                    queued: queue.len() as u32,
                    running,
                });
            }
            Command::CancelQueued => {
                for job in queue.drain(..) {
                    metrics::job_cancelled("drain");
                    let _ = job.events.send(JobEvent::Failed(cancelled_by_shutdown()));
                }
            }
        }
        if idle_runner.is_some() {
            queue.retain(|j| !j.events.is_closed());
            if let Some(job) = queue.pop_front() {
                if let Some(runner) = idle_runner.take() {
                    running += 1;
                    if let Err(job) = runner.send(job) {
                        running -= 1;
                        queue.push_front(job);
                    }
                }
                for (position, waiting) in queue.iter().enumerate() {
                    let _ = waiting.events.send(JobEvent::Queued {
                        position: position as u32,
                    });
                }
            }
        }
        let now = Load {
            queued: queue.len() as u32,
            running,
        };
        metrics::set_queue_depth(queue.len());
        load.send_if_modified(|published| {
            let changed = *published != now;
            *published = now;
            changed
        });
    }
}

/// The model thread: load, then run jobs until the queue actor goes away.
fn run_model<F>(
    load: F,
    commands: mpsc::UnboundedSender<Command>,
    state: Arc<watch::Sender<EngineState>>,
    abort: Arc<AtomicBool>,
) where
    F: FnOnce() -> Result<Box<dyn Backend>>,
{
    let started = Instant::now();
    let backend = match load() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, kind = e.kind(), "model failed to load");
            state.send_replace(EngineState::Failed(format!("model failed to load: {e}")));
            return;
        }
    };
    let description = Arc::new(backend.description());
    let seconds = started.elapsed().as_secs_f64();
    metrics::set_model_load_seconds(seconds);
    tracing::info!(seconds, family = ?description.family, "model loaded");
    // A drain that began while loading has already marked the engine failed; leave it so.
    state.send_if_modified(|s| {
        if matches!(s, EngineState::Loading) {
            *s = EngineState::Ready(description);
            true
        } else {
            false
        }
    });
    loop {
        let (reply, job) = oneshot::channel();
        if commands.send(Command::Next { reply }).is_err() {
            return;
        }
        let Ok(job) = job.blocking_recv() else {
            return;
        };
        run_job(backend.as_ref(), job, &abort);
        if commands.send(Command::Finished).is_err() {
            return;
        }
    }
}

/// Sends step events, notices cancellation between steps and keeps the stage timings.
struct EventProgress<'a> {
    events: &'a mpsc::UnboundedSender<JobEvent>,
    abort: &'a AtomicBool,
    /// When the previous step ended (or the prompt was encoded), for the step-time histogram.
    last_step: Instant,
    encode_prompt: Duration,
    denoise: Duration,
    decode: Duration,
}

impl Progress for EventProgress<'_> {
    fn on_step(&mut self, step: usize, total: usize, _latents: &Tensor) -> ControlFlow<()> {
        metrics::observe_step(self.last_step.elapsed());
        self.last_step = Instant::now();
        if self.abort.load(Ordering::SeqCst) {
            return ControlFlow::Break(());
        }
        let sent = self.events.send(JobEvent::Progress {
            step: step as u32,
            total: total as u32,
        });
        if sent.is_err() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }

    fn on_stage(&mut self, stage: Stage, took: Duration) {
        match stage {
            Stage::EncodePrompt => {
                self.encode_prompt = took;
                // Steps are timed from here, so the first one does not include prompt encoding.
                self.last_step = Instant::now();
            }
            Stage::Denoise => self.denoise = took,
            Stage::Decode => self.decode = took,
        }
    }
}

fn run_job(backend: &dyn Backend, job: Job, abort: &AtomicBool) {
    let started = Instant::now();
    let queue_time = started.duration_since(job.enqueued);
    let batch_size = job.spec.generation.n;
    metrics::observe_batch_size(batch_size);
    let _ = job.events.send(JobEvent::Started {
        batch_size: batch_size as u32,
    });
    let mut progress = EventProgress {
        events: &job.events,
        abort,
        last_step: started,
        encode_prompt: Duration::ZERO,
        denoise: Duration::ZERO,
        decode: Duration::ZERO,
    };
    // A panic inside candle must not take the worker down with it.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let generation = &job.spec.generation;
        match &job.spec.task {
            JobTask::TextToImage => backend.text_to_image(generation, &mut progress),
            JobTask::ImageToImage { image, strength } => {
                backend.image_to_image(generation, image, *strength, &mut progress)
            }
            JobTask::Inpaint {
                image,
                mask,
                strength,
            } => backend.inpaint(generation, image, mask, *strength, &mut progress),
        }
    }))
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(WorkerError::Internal(format!("pipeline panicked: {what}")))
    });
    let result = outcome.and_then(|images| {
        for (index, image) in images.iter().enumerate() {
            let data = encode::encode(image, job.spec.output_format, job.spec.output_compression)?;
            let _ = job.events.send(JobEvent::Image {
                index: index as u32,
                data,
                width: image.width(),
                height: image.height(),
            });
        }
        Ok(())
    });
    match result {
        Ok(()) => {
            metrics::observe_job(started.elapsed());
            let ms = |d: Duration| d.as_millis() as u64;
            let _ = job.events.send(JobEvent::Done(Timings {
                queue_ms: ms(queue_time),
                encode_prompt_ms: ms(progress.encode_prompt),
                denoise_ms: ms(progress.denoise),
                decode_ms: ms(progress.decode),
                total_ms: ms(job.enqueued.elapsed()),
            }));
        }
        Err(WorkerError::Cancelled) if abort.load(Ordering::SeqCst) => {
            metrics::job_cancelled("drain");
            tracing::warn!(request_id = %job.spec.request_id, "cancelled: grace period over");
            let _ = job.events.send(JobEvent::Failed(cancelled_by_shutdown()));
        }
        Err(WorkerError::Cancelled) => {
            metrics::job_cancelled("client_gone");
            tracing::info!(request_id = %job.spec.request_id, "cancelled by the caller");
        }
        Err(e) => {
            tracing::error!(request_id = %job.spec.request_id, error = %e, kind = e.kind(), "job failed");
            let _ = job.events.send(JobEvent::Failed(e));
        }
    }
}
