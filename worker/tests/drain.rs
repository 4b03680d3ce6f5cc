//! Graceful drain, in-process over a real socket with a scripted backend: health turns
//! NOT_SERVING, new Generate calls get UNAVAILABLE, accepted jobs finish within the grace period,
//! and what is left when it ends is cancelled with UNAVAILABLE; the server then stops. The
//! refusals and cancellations show in the worker's metrics.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::{metric, metrics_text};
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateRequest, ModelFamily, Task};
use fastfusion_worker::backend::{Backend, ModelDescription};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::engine::{Engine, EngineState};
use fastfusion_worker::error::{Result, WorkerError};
use fastfusion_worker::pipelines::{Progress, StrengthRule, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use fastfusion_worker::service::{self, WorkerService};
use image::{GrayImage, RgbImage};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Sleeps per step; counts the steps it ran.
struct Slow {
    step_time: Duration,
    steps_run: Arc<AtomicUsize>,
}

impl Backend for Slow {
    fn description(&self) -> ModelDescription {
        ModelDescription {
            family: ModelFamily::Sd1,
            native_width: 64,
            native_height: 48,
            size_multiple: 8,
            max_prompt_tokens: 77,
            default_scheduler: SchedulerKind::Pndm,
            inpainting_model: false,
            max_sequence_length: 0,
            image_seq_multiple: 0,
            strength_rule: StrengthRule::Discrete,
            redux: false,
            classifier_free_guidance: true,
        }
    }

    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        let latents = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
        for step in 1..=req.steps {
            std::thread::sleep(self.step_time);
            self.steps_run.fetch_add(1, Ordering::SeqCst);
            if progress.on_step(step, req.steps, &latents).is_break() {
                return Err(WorkerError::Cancelled);
            }
        }
        Ok(vec![
            RgbImage::new(req.width as u32, req.height as u32);
            req.n
        ])
    }

    fn image_to_image(
        &self,
        req: &TextToImage,
        _: &RgbImage,
        _: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.text_to_image(req, progress)
    }

    fn inpaint(
        &self,
        req: &TextToImage,
        _: &RgbImage,
        _: &GrayImage,
        _: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.text_to_image(req, progress)
    }
}

struct Harness {
    engine: Engine,
    client: WorkerClient<Channel>,
    health: HealthClient<Channel>,
    steps_run: Arc<AtomicUsize>,
    /// Starts the drain, as SIGTERM does in `fastfusion-worker serve`.
    sigterm: Option<oneshot::Sender<()>>,
    /// Whether the drain finished without cancelling anything.
    drained_clean: Option<oneshot::Receiver<bool>>,
    server: JoinHandle<Result<()>>,
}

/// A worker whose shutdown future drains the engine with `grace`, like `main.rs` wires it.
async fn start(step_time: Duration, grace: Duration, load: bool) -> Harness {
    // Recording starts once the recorder exists.
    metrics_text();
    let mut config = ModelConfig::for_model("scripted");
    config.pipeline.max_queue = 4;
    config.pipeline.max_steps = 1000;
    let steps_run = Arc::new(AtomicUsize::new(0));
    let backend = Slow {
        step_time,
        steps_run: steps_run.clone(),
    };
    let (release, released) = oneshot::channel::<()>();
    let engine = Engine::start(4, move || {
        let _ = released.blocking_recv();
        Ok(Box::new(backend) as Box<dyn Backend>)
    });
    if load {
        release.send(()).expect("loader waits");
        engine.ready().await.expect("model loads");
    } else {
        // Keep the loader blocked for the whole test.
        std::mem::forget(release);
    }
    let (listener, addr) = service::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    let (sigterm, signalled) = oneshot::channel::<()>();
    let (clean_tx, drained_clean) = oneshot::channel();
    let draining = engine.clone();
    let server = tokio::spawn(service::serve(
        listener,
        WorkerService::new(engine.clone(), Arc::new(config)),
        async move {
            let _ = signalled.await;
            let _ = clean_tx.send(draining.drain(grace).await);
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    Harness {
        engine,
        client: WorkerClient::new(channel.clone()),
        health: HealthClient::new(channel),
        steps_run,
        sigterm: Some(sigterm),
        drained_clean: Some(drained_clean),
        server,
    }
}

impl Harness {
    fn sigterm(&mut self) {
        self.sigterm
            .take()
            .expect("once")
            .send(())
            .expect("server waits");
    }

    async fn health(&mut self) -> i32 {
        self.health
            .check(HealthCheckRequest {
                service: "fastfusion.worker.v1.Worker".into(),
            })
            .await
            .expect("health")
            .into_inner()
            .status
    }

    /// Waits for the drain's verdict and for the server to stop.
    async fn stopped(mut self) -> bool {
        let clean = self
            .drained_clean
            .take()
            .expect("once")
            .await
            .expect("drain ran");
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .expect("server task")
            .expect("server ok");
        clean
    }
}

fn request(steps: u32) -> GenerateRequest {
    GenerateRequest {
        request_id: "drain".into(),
        task: Task::TextToImage as i32,
        prompt: "a lighthouse".into(),
        n: 1,
        width: 64,
        height: 48,
        num_inference_steps: Some(steps),
        ..Default::default()
    }
}

/// Runs a request in the background; resolves to its events or its error status.
fn spawn_request(
    client: &WorkerClient<Channel>,
    req: GenerateRequest,
) -> JoinHandle<std::result::Result<Vec<Event>, tonic::Status>> {
    let mut client = client.clone();
    tokio::spawn(async move {
        let mut stream = client.generate(req).await?.into_inner();
        let mut events = Vec::new();
        while let Some(event) = stream.message().await? {
            events.extend(event.event);
        }
        Ok(events)
    })
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until one job waits behind the running one.
async fn wait_queued(engine: &Engine) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.load().await.queued != 1 {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for a queued job"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn finished(events: &[Event]) -> bool {
    events.iter().any(|e| matches!(e, Event::Done(_)))
        && events.iter().any(|e| matches!(e, Event::Image(_)))
}

#[tokio::test]
async fn drain_refuses_new_work_and_finishes_accepted_jobs() {
    let mut h = start(Duration::from_millis(20), Duration::from_secs(30), true).await;
    assert_eq!(h.health().await, ServingStatus::Serving as i32);
    let running = spawn_request(&h.client, request(10));
    let steps = h.steps_run.clone();
    wait_until("the first job to start", || {
        steps.load(Ordering::SeqCst) > 0
    })
    .await;
    let queued = spawn_request(&h.client, request(5));
    wait_queued(&h.engine).await;

    h.sigterm();
    let engine = h.engine.clone();
    wait_until("the drain to start", || {
        matches!(engine.state(), EngineState::Draining(_))
    })
    .await;
    assert_eq!(h.health().await, ServingStatus::NotServing as i32);
    let rejected = r#"fastfusion_worker_rejections_total{reason="unavailable"}"#;
    let rejected_before = metric(rejected);
    let refused = h
        .client
        .generate(request(1))
        .await
        .expect_err("a draining worker refuses new work");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        metric(rejected) >= rejected_before + 1.0,
        "{}",
        metrics_text()
    );

    let running = running.await.expect("task").expect("running job finishes");
    let queued = queued.await.expect("task").expect("queued job finishes");
    assert!(finished(&running), "{running:?}");
    assert!(finished(&queued), "{queued:?}");
    assert_eq!(h.steps_run.load(Ordering::SeqCst), 15);
    assert!(h.stopped().await, "nothing should have been cancelled");
}

#[tokio::test]
async fn grace_period_over_cancels_running_and_queued_jobs() {
    let mut h = start(Duration::from_millis(20), Duration::ZERO, true).await;
    // 500 steps of 20 ms: ten seconds, far longer than the test waits.
    let running = spawn_request(&h.client, request(500));
    let steps = h.steps_run.clone();
    wait_until("the first job to start", || {
        steps.load(Ordering::SeqCst) > 0
    })
    .await;
    let queued = spawn_request(&h.client, request(500));
    wait_queued(&h.engine).await;

    let cancelled = r#"fastfusion_worker_cancellations_total{reason="drain"}"#;
    let cancelled_before = metric(cancelled);
    let started = Instant::now();
    h.sigterm();
    for job in [running, queued] {
        let status = job
            .await
            .expect("task")
            .expect_err("the job is cancelled by the drain");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("shut down"), "{status:?}");
    }
    let steps_run = h.steps_run.load(Ordering::SeqCst);
    assert!(!h.stopped().await, "the drain had to cancel jobs");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        steps_run < 500,
        "the running job stopped early ({steps_run} steps)"
    );
    assert!(
        metric(cancelled) >= cancelled_before + 2.0,
        "{}",
        metrics_text()
    );
}

#[tokio::test]
async fn drain_while_loading_stops_at_once() {
    let mut h = start(Duration::from_millis(1), Duration::from_secs(30), false).await;
    assert_eq!(h.health().await, ServingStatus::NotServing as i32);
    h.sigterm();
    let engine = h.engine.clone();
    assert!(h.stopped().await);
    assert!(matches!(engine.state(), EngineState::Failed(_)));
}
