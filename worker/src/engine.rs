//! The job engine: a bounded FIFO queue in front of the one thread that runs the model, which
//! takes compatible jobs in batches.
//!
//! ```text
//!  service (many tasks) ──Submit──▶ queue actor (one task, owns the queue) ◀──Next── model thread
//!        ▲                                  │ Queued{position}        hands a batch │ runs Backend
//!        └──────────── JobEvent (per-job unbounded channel) ◀──────────────────────┘
//! ```
//!
//! * The queue actor owns all queue state; everyone else talks to it through [`Command`]s with
//!   oneshot replies, so there are no locks.
//! * The model thread is a plain OS thread: forward passes never run on the async runtime. It loads
//!   the model first (the engine is [`EngineState::Loading`] meanwhile), then takes one batch at a
//!   time.
//! * Dynamic batching: when the model thread asks for work, the actor gives it the oldest job plus
//!   every later queued job with the same [`BatchKey`] (task, size, steps, scheduler, classifier-
//!   free guidance on or off where the model runs it, strength, LoRA set) while the images fit in `max_batch` (a job of n images takes n; a job
//!   larger than that runs alone). A batch that is not full waits for compatible jobs until
//!   `batch_window` after its oldest job arrived (0: never waits; a draining engine never waits).
//!   A job skipped because it does not fit goes first in the next batch, so it is overtaken at
//!   most once. Each job keeps its own seed, prompts, guidance, events and cancellation (see
//!   `pipelines::denoise`).
//! * A job is cancelled when its event receiver is dropped (the gRPC stream went away): a queued
//!   job is purged, a running job leaves its batch at the next denoising step.
//! * Draining ([`Engine::drain`]): the state becomes [`EngineState::Draining`], so health says
//!   NOT_SERVING and `Submit` is refused as unavailable (the gateway retries elsewhere); queued
//!   and running jobs go on until the engine is idle or the grace period ends, when the rest is
//!   cancelled with an UNAVAILABLE error.
//! * Previews: a job asking for `partial_images` gets them as [`JobEvent::PartialImage`]s,
//!   encoded in its output format, between its progress events.

use std::cell::Cell;
use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::Tensor;
use fastfusion_proto::{OutputFormat, Timings};
use image::{GrayImage, RgbImage};
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::{Backend, ModelDescription};
use crate::encode;
use crate::error::{Result, WorkerError};
use crate::lora::LoraWeight;
use crate::metrics;
use crate::pipelines::{BatchEntry, Input, Progress, Stage, TextToImage};
use crate::schedulers::{ScheduleContext, SchedulerConfig, SchedulerKind};

/// How the engine queues and batches jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineOptions {
    /// Jobs held, queued plus running, before `Submit` answers QueueFull.
    pub max_queue: usize,
    /// Most images one batch denoises together (`pipeline.max_batch`); 1 runs one job at a time.
    pub max_batch: usize,
    /// How long a batch that is not full waits for compatible jobs, counted from its oldest
    /// job's arrival (`pipeline.batch_window_ms`).
    pub batch_window: Duration,
}

impl EngineOptions {
    /// One job at a time, no waiting.
    pub fn unbatched(max_queue: usize) -> Self {
        EngineOptions {
            max_queue,
            max_batch: 1,
            batch_window: Duration::ZERO,
        }
    }
}

/// What a job asks for, already validated against the loaded model.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub request_id: String,
    /// The parameters every task shares.
    pub generation: TextToImage,
    pub task: JobTask,
    pub output_format: OutputFormat,
    pub output_compression: Option<u32>,
    /// Previews to stream while denoising, 0 to `MAX_PARTIAL_IMAGES`.
    pub partial_images: usize,
}

impl JobSpec {
    /// What a job must share with others to run in one batch; `cfg`: the model runs
    /// classifier-free guidance for scales above 1 ([`ModelDescription::classifier_free_guidance`]).
    fn batch_key(&self, cfg: bool) -> BatchKey {
        let g = &self.generation;
        let (task, strength) = match &self.task {
            JobTask::TextToImage => (0, None),
            JobTask::ImageToImage { strength, .. } => (1, Some(*strength)),
            JobTask::Inpaint { strength, .. } => (2, Some(*strength)),
            JobTask::Redux { .. } => (3, None),
        };
        BatchKey {
            task,
            width: g.width,
            height: g.height,
            steps: g.steps,
            scheduler: g.scheduler,
            guidance: cfg && g.guidance_scale > 1.0,
            strength,
            max_sequence_length: g.max_sequence_length,
            loras: g.loras.clone(),
        }
    }
}

/// Everything that fixes the shape and the timesteps of a batch's denoiser passes: the task, the
/// size (SDXL's time ids follow from it), steps, scheduler, whether classifier-free guidance
/// doubles the rows, the strength (where an image task's loop starts) and FLUX's text length;
/// and the LoRA set, which is active for the whole batch.
#[derive(Debug, Clone, PartialEq)]
struct BatchKey {
    /// 0 text-to-image, 1 image-to-image, 2 inpaint, 3 Redux variation.
    task: u8,
    width: usize,
    height: usize,
    steps: usize,
    scheduler: SchedulerKind,
    guidance: bool,
    strength: Option<f64>,
    max_sequence_length: Option<usize>,
    loras: Vec<LoraWeight>,
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
    /// A FLUX Redux variation: `image` conditions the generation through the prior.
    Redux {
        image: RgbImage,
    },
}

impl JobTask {
    /// The pipeline's view of the inputs.
    fn input(&self) -> Input<'_> {
        match self {
            JobTask::TextToImage => Input::Text,
            JobTask::ImageToImage { image, strength } => Input::Image {
                image,
                strength: *strength,
            },
            JobTask::Inpaint {
                image,
                mask,
                strength,
            } => Input::Inpaint {
                image,
                mask,
                strength: *strength,
            },
            JobTask::Redux { image } => Input::Redux { image },
        }
    }
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
    /// Preview `partial_index` of image `index`, sent right after the step it shows.
    PartialImage {
        index: u32,
        partial_index: u32,
        data: Vec<u8>,
        width: u32,
        height: u32,
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
    /// Jobs waiting for a batch.
    pub queued: u32,
    /// Jobs in the batch on the model thread.
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
    /// The model thread is idle and wants the next batch.
    Next {
        reply: oneshot::Sender<Vec<Job>>,
    },
    /// The model thread finished a batch of this many jobs.
    Finished {
        jobs: usize,
    },
    Load {
        reply: oneshot::Sender<Load>,
    },
    /// The grace period is over: fail every queued job (running ones are aborted separately).
    CancelQueued,
}

/// Cloneable handle to the engine. Dropping every handle stops the queue actor and, after its
/// current batch, the model thread.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::UnboundedSender<Command>,
    state: watch::Receiver<EngineState>,
    /// Shared with the model thread, which moves Loading → Ready/Failed; `drain` moves Ready →
    /// Draining.
    state_tx: Arc<watch::Sender<EngineState>>,
    /// Queued + running, published by the queue actor after every command (drain waits on it).
    load: watch::Receiver<Load>,
    /// Set when the grace period ends; the running jobs stop at their next step.
    abort: Arc<AtomicBool>,
    /// The loaded model's scheduler config (set once by the model thread before Ready), for
    /// [`Engine::check_schedule`].
    schedules: Arc<OnceLock<SchedulerConfig>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Engine {
    /// An engine that runs one job at a time (see [`Engine::start_with`]).
    pub fn start<F>(max_queue: usize, load: F) -> Engine
    where
        F: FnOnce() -> Result<Box<dyn Backend>> + Send + 'static,
    {
        Self::start_with(EngineOptions::unbatched(max_queue), load)
    }

    /// Starts the queue actor and the model thread, which calls `load` before taking jobs.
    /// Must be called inside a tokio runtime.
    pub fn start_with<F>(options: EngineOptions, load: F) -> Engine
    where
        F: FnOnce() -> Result<Box<dyn Backend>> + Send + 'static,
    {
        let (commands, rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(EngineState::Loading);
        let state_tx = Arc::new(state_tx);
        let (load_tx, load_rx) = watch::channel(Load::default());
        let abort = Arc::new(AtomicBool::new(false));
        let options = EngineOptions {
            max_queue: options.max_queue.max(1),
            max_batch: options.max_batch.max(1),
            ..options
        };
        tokio::spawn(run_queue(rx, options, state.clone(), load_tx));
        let thread_commands = commands.clone();
        let thread_state = state_tx.clone();
        let thread_abort = abort.clone();
        let schedules = Arc::new(OnceLock::new());
        let thread_schedules = schedules.clone();
        let spawned = std::thread::Builder::new()
            .name("fastfusion-model".into())
            .spawn(move || {
                let model = ModelThread {
                    commands: thread_commands,
                    state: thread_state,
                    abort: thread_abort,
                    schedules: thread_schedules,
                };
                model.run(load)
            });
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
            schedules,
        }
    }

    /// Refuses a step count `scheduler` cannot place on the loaded model's schedule (e.g. more
    /// steps than training timesteps), as the model thread would after queueing. Nothing to
    /// check before the model is loaded or when its backend has no scheduler config.
    pub fn check_schedule(
        &self,
        scheduler: SchedulerKind,
        steps: usize,
        context: &ScheduleContext,
    ) -> Result<()> {
        match self.schedules.get() {
            Some(config) => scheduler.build_with(config, steps, context).map(drop),
            None => Ok(()),
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

    /// Fails every queued job and stops the running ones at their next step, all with UNAVAILABLE.
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
        // Running jobs stop at their next denoising step; a decode already under way cannot be
        // interrupted, so this wait is bounded by one step or the batch's decodes.
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

    /// Waits until the model has failed to load, and says why; never returns once it loaded. (A
    /// drain that starts while loading marks the engine failed too, with its own reason.)
    pub async fn load_failure(&self) -> String {
        let mut state = self.state.clone();
        loop {
            // The borrow ends before any await: the guard must not live across one.
            let failed = match &*state.borrow_and_update() {
                EngineState::Failed(why) => Some(Some(why.clone())),
                EngineState::Ready(_) | EngineState::Draining(_) => Some(None),
                EngineState::Loading => None,
            };
            match failed {
                Some(Some(why)) => return why,
                Some(None) => return std::future::pending().await,
                None => {}
            }
            if state.changed().await.is_err() {
                return "the model thread stopped".into();
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

/// Why the queue actor woke up.
enum Wake {
    Command(Command),
    /// The waiting batch's window is over.
    Deadline,
    /// Every engine handle is gone.
    Closed,
}

/// The queue actor: owns the FIFO and hands batches of compatible jobs to the model thread.
async fn run_queue(
    mut commands: mpsc::UnboundedReceiver<Command>,
    options: EngineOptions,
    state: watch::Receiver<EngineState>,
    load: watch::Sender<Load>,
) {
    let max_queue = options.max_queue;
    let mut queue: VecDeque<Job> = VecDeque::new();
    // Set while the model thread waits for work.
    let mut idle_runner: Option<oneshot::Sender<Vec<Job>>> = None;
    // Jobs on the model thread now.
    let mut running = 0usize;
    // When the batch waiting for more jobs must go anyway.
    let mut deadline: Option<Instant> = None;
    loop {
        let wake = match deadline {
            Some(at) => tokio::select! {
                command = commands.recv() => command.map_or(Wake::Closed, Wake::Command),
                () = tokio::time::sleep_until(at.into()) => Wake::Deadline,
            },
            None => commands.recv().await.map_or(Wake::Closed, Wake::Command),
        };
        let command = match wake {
            Wake::Closed => break,
            Wake::Deadline => None,
            Wake::Command(command) => Some(command),
        };
        match command {
            None => {}
            Some(Command::Submit { job, reply }) => {
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
                    if queue.len() + running >= max_queue {
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
            Some(Command::Next { reply }) => idle_runner = Some(reply),
            Some(Command::Finished { jobs }) => running = running.saturating_sub(jobs),
            Some(Command::Load { reply }) => {
                queue.retain(|j| !j.events.is_closed());
                let _ = reply.send(Load {
                    queued: queue.len() as u32,
                    running: running as u32,
                });
            }
            Some(Command::CancelQueued) => {
                for job in queue.drain(..) {
                    metrics::job_cancelled("drain");
                    let _ = job.events.send(JobEvent::Failed(cancelled_by_shutdown()));
                }
            }
        }
        deadline = None;
        if idle_runner.is_some() {
            queue.retain(|j| !j.events.is_closed());
            // No job can join while draining, so a batch waits only while accepting.
            let (accepting, cfg) = match &*state.borrow() {
                EngineState::Ready(d) => (true, d.classifier_free_guidance),
                EngineState::Draining(d) => (false, d.classifier_free_guidance),
                EngineState::Loading | EngineState::Failed(_) => (false, true),
            };
            match next_batch(&mut queue, &options, accepting, cfg) {
                Err(wait_until) => deadline = wait_until,
                Ok(batch) => {
                    if let Some(runner) = idle_runner.take() {
                        running += batch.len();
                        if let Err(batch) = runner.send(batch) {
                            running -= batch.len();
                            for job in batch.into_iter().rev() {
                                queue.push_front(job);
                            }
                        }
                    }
                    for (position, waiting) in queue.iter().enumerate() {
                        let _ = waiting.events.send(JobEvent::Queued {
                            position: position as u32,
                        });
                    }
                }
            }
        }
        let now = Load {
            queued: queue.len() as u32,
            running: running as u32,
        };
        metrics::set_queue_depth(queue.len());
        load.send_if_modified(|published| {
            let changed = *published != now;
            *published = now;
            changed
        });
    }
}

/// Takes the next batch out of `queue`: the oldest job, then every later job with its key while
/// the images fit in `max_batch`. `Err` when there is nothing to run yet: `None` for an empty
/// queue, else the moment the batch, not full, stops waiting for more jobs. `cfg`: see
/// [`JobSpec::batch_key`].
fn next_batch(
    queue: &mut VecDeque<Job>,
    options: &EngineOptions,
    accepting: bool,
    cfg: bool,
) -> Result<Vec<Job>, Option<Instant>> {
    let head = queue.front().ok_or(None)?;
    let key = head.spec.batch_key(cfg);
    let mut members = vec![0];
    let mut images = head.spec.generation.n;
    for (i, job) in queue.iter().enumerate().skip(1) {
        let n = job.spec.generation.n;
        if images + n <= options.max_batch && job.spec.batch_key(cfg) == key {
            members.push(i);
            images += n;
        }
    }
    let due = head.enqueued + options.batch_window;
    if images < options.max_batch && accepting && Instant::now() < due {
        return Err(Some(due));
    }
    // Highest index first, so the lower ones stay valid; then back into queue order.
    let mut batch: Vec<Job> = members
        .into_iter()
        .rev()
        .filter_map(|i| queue.remove(i))
        .collect();
    batch.reverse();
    Ok(batch)
}

/// What the model thread shares with the rest of the engine.
struct ModelThread {
    commands: mpsc::UnboundedSender<Command>,
    state: Arc<watch::Sender<EngineState>>,
    abort: Arc<AtomicBool>,
    schedules: Arc<OnceLock<SchedulerConfig>>,
}

impl ModelThread {
    /// Loads, then runs batches until the queue actor goes away.
    fn run<F>(self, load: F)
    where
        F: FnOnce() -> Result<Box<dyn Backend>>,
    {
        let started = Instant::now();
        let backend = match load() {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, kind = e.kind(), "model failed to load");
                self.state
                    .send_replace(EngineState::Failed(format!("model failed to load: {e}")));
                return;
            }
        };
        let description = Arc::new(backend.description());
        if let Some(config) = backend.scheduler_config() {
            let _ = self.schedules.set(config);
        }
        let seconds = started.elapsed().as_secs_f64();
        metrics::set_model_load_seconds(seconds);
        tracing::info!(seconds, family = ?description.family, "model loaded");
        // A drain that began while loading has already marked the engine failed; leave it so.
        self.state.send_if_modified(|s| {
            if matches!(s, EngineState::Loading) {
                *s = EngineState::Ready(description);
                true
            } else {
                false
            }
        });
        loop {
            let (reply, batch) = oneshot::channel();
            if self.commands.send(Command::Next { reply }).is_err() {
                return;
            }
            let Ok(batch) = batch.blocking_recv() else {
                return;
            };
            let jobs = batch.len();
            run_batch(backend.as_ref(), batch, &self.abort);
            if self.commands.send(Command::Finished { jobs }).is_err() {
                return;
            }
        }
    }
}

/// Times denoising steps once per batch: every job of a batch reports the same steps, and the
/// first report of each step records it.
struct StepClock {
    /// When the previous step ended (or the prompts were encoded, or a preview was sent).
    last: Cell<Instant>,
    /// The last step recorded.
    step: Cell<usize>,
}

impl StepClock {
    fn tick(&self, step: usize) {
        if self.step.replace(step) != step {
            metrics::observe_step(self.last.get().elapsed());
            self.restart();
        }
    }

    /// Starts the next step's time now, leaving out what happened since the last step.
    fn restart(&self) {
        self.last.set(Instant::now());
    }
}

/// One job's observer: sends step events and previews, notices cancellation between steps and
/// keeps the stage timings.
struct EventProgress<'a> {
    job: &'a Job,
    abort: &'a AtomicBool,
    clock: &'a StepClock,
    encode_prompt: Duration,
    denoise: Duration,
    decode: Duration,
    /// Why the job stopped when it was not cancelled (a preview that could not be encoded).
    failed: Option<WorkerError>,
}

impl<'a> EventProgress<'a> {
    fn new(job: &'a Job, abort: &'a AtomicBool, clock: &'a StepClock) -> Self {
        EventProgress {
            job,
            abort,
            clock,
            encode_prompt: Duration::ZERO,
            denoise: Duration::ZERO,
            decode: Duration::ZERO,
            failed: None,
        }
    }

    fn send(&self, event: JobEvent) -> ControlFlow<()> {
        match self.job.events.send(event) {
            Ok(()) => ControlFlow::Continue(()),
            // The caller went away: cancel.
            Err(_) => ControlFlow::Break(()),
        }
    }
}

impl Progress for EventProgress<'_> {
    fn on_step(&mut self, step: usize, total: usize, _latents: &Tensor) -> ControlFlow<()> {
        self.clock.tick(step);
        if self.abort.load(Ordering::SeqCst) {
            return ControlFlow::Break(());
        }
        self.send(JobEvent::Progress {
            step: step as u32,
            total: total as u32,
        })
    }

    fn on_stage(&mut self, stage: Stage, took: Duration) {
        match stage {
            Stage::EncodePrompt => {
                self.encode_prompt = took;
                // Steps are timed from here, so the first one does not include prompt encoding.
                self.clock.restart();
            }
            Stage::Denoise => self.denoise = took,
            Stage::Decode => self.decode = took,
        }
    }

    fn partial_images(&self) -> usize {
        self.job.spec.partial_images
    }

    fn on_partial_images(&mut self, index: usize, images: Vec<RgbImage>) -> ControlFlow<()> {
        let spec = &self.job.spec;
        for (i, image) in images.iter().enumerate() {
            let data = match encode::encode(image, spec.output_format, spec.output_compression) {
                Ok(data) => data,
                Err(e) => {
                    self.failed = Some(e);
                    return ControlFlow::Break(());
                }
            };
            self.send(JobEvent::PartialImage {
                index: i as u32,
                partial_index: index as u32,
                data,
                width: image.width(),
                height: image.height(),
            })?;
        }
        // Preview work is not part of the next step's time.
        self.clock.restart();
        ControlFlow::Continue(())
    }
}

/// Runs one batch on the backend and reports every job's outcome.
fn run_batch(backend: &dyn Backend, jobs: Vec<Job>, abort: &AtomicBool) {
    let started = Instant::now();
    let batch_size: usize = jobs.iter().map(|job| job.spec.generation.n).sum();
    metrics::observe_batch_size(batch_size);
    for job in &jobs {
        let _ = job.events.send(JobEvent::Started {
            batch_size: batch_size as u32,
        });
    }
    let clock = StepClock {
        last: Cell::new(started),
        step: Cell::new(0),
    };
    let mut observers: Vec<EventProgress> = jobs
        .iter()
        .map(|job| EventProgress::new(job, abort, &clock))
        .collect();
    // A panic inside candle must not take the worker down with it.
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut entries: Vec<BatchEntry> = jobs
            .iter()
            .zip(observers.iter_mut())
            .map(|(job, progress)| BatchEntry {
                request: &job.spec.generation,
                input: job.spec.task.input(),
                progress,
            })
            .collect();
        backend.generate(&mut entries)
    }));
    let results = match outcome {
        Ok(results) if results.len() == jobs.len() => results,
        Ok(results) => {
            let message = format!("{} results for {} jobs", results.len(), jobs.len());
            jobs.iter()
                .map(|_| Err(WorkerError::Internal(message.clone())))
                .collect()
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            jobs.iter()
                .map(|_| Err(WorkerError::Internal(format!("pipeline panicked: {what}"))))
                .collect()
        }
    };
    for (progress, result) in observers.into_iter().zip(results) {
        finish_job(progress, result, started, abort);
    }
}

/// Sends a job's images and `Done`, or why it failed.
fn finish_job(
    mut progress: EventProgress<'_>,
    result: Result<Vec<RgbImage>>,
    started: Instant,
    abort: &AtomicBool,
) {
    let job = progress.job;
    let result = result.and_then(|images| {
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
    let result = match (result, progress.failed.take()) {
        (Err(WorkerError::Cancelled), Some(e)) => Err(e),
        (result, _) => result,
    };
    match result {
        Ok(()) => {
            metrics::observe_job(started.elapsed());
            let ms = |d: Duration| d.as_millis() as u64;
            let _ = job.events.send(JobEvent::Done(Timings {
                queue_ms: ms(started.duration_since(job.enqueued)),
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
