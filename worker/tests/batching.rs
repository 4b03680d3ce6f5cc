//! Dynamic batching in the engine, through the gRPC service over a real socket, with a scripted
//! backend that records which requests it was handed together: compatible requests share a
//! batch up to `max_batch` images, others wait for the next; a batch that is not full waits for
//! the window, or not at all with a window of 0; queue positions, `Started.batch_size`, `Info`
//! and the batch-size histogram report the real batches; a cancelled request leaves its batch.
//! (That batched images equal solo ones is `parity.rs`'s business, on the real pipeline.)

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use common::{metric, metrics_text};
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateRequest, InfoRequest, ModelFamily, Task};
use fastfusion_worker::backend::{Backend, ModelDescription};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::engine::{Engine, EngineOptions};
use fastfusion_worker::error::{Result, WorkerError};
use fastfusion_worker::pipelines::{BatchEntry, Progress, StrengthRule, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use fastfusion_worker::service::{self, WorkerService};
use image::{GrayImage, RgbImage};
use tonic::transport::Channel;
use tonic::Streaming;

/// Sleeps per step for the whole batch and records the prompts of every batch it runs.
struct Batcher {
    step_time: Duration,
    /// What the description says of guidance: SD's classifier-free guidance, or FLUX's embedded scale.
    cfg: bool,
    batches: Arc<Mutex<Vec<Vec<String>>>>,
}

impl Backend for Batcher {
    fn description(&self) -> ModelDescription {
        ModelDescription {
            family: ModelFamily::Sd1,
            native_width: 64,
            native_height: 64,
            size_multiple: 8,
            max_prompt_tokens: 77,
            default_scheduler: SchedulerKind::Euler,
            inpainting_model: false,
            max_sequence_length: 0,
            image_seq_multiple: 0,
            strength_rule: StrengthRule::Discrete,
            redux: false,
            classifier_free_guidance: self.cfg,
        }
    }

    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.generate(&mut [BatchEntry {
            request: req,
            input: fastfusion_worker::pipelines::Input::Text,
            progress,
        }])
        .pop()
        .unwrap_or(Err(WorkerError::Internal("no result".into())))
    }

    fn image_to_image(
        &self,
        _: &TextToImage,
        _: &RgbImage,
        _: f64,
        _: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        Err(WorkerError::Internal("text-to-image only".into()))
    }

    fn inpaint(
        &self,
        _: &TextToImage,
        _: &RgbImage,
        _: &GrayImage,
        _: f64,
        _: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        Err(WorkerError::Internal("text-to-image only".into()))
    }

    /// One sleep per step for everyone; a request whose observer breaks stops there.
    fn generate(&self, batch: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        if let Ok(mut batches) = self.batches.lock() {
            batches.push(batch.iter().map(|e| e.request.prompt.clone()).collect());
        }
        let latents = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu);
        let steps = batch.iter().map(|e| e.request.steps).max().unwrap_or(0);
        let mut live = vec![true; batch.len()];
        for step in 1..=steps {
            std::thread::sleep(self.step_time);
            for (entry, live) in batch.iter_mut().zip(live.iter_mut()) {
                if let (true, Ok(latents)) = (*live, &latents) {
                    *live = entry
                        .progress
                        .on_step(step, entry.request.steps, latents)
                        .is_continue();
                }
            }
        }
        batch
            .iter()
            .zip(live)
            .map(|(entry, live)| {
                let req = entry.request;
                match live {
                    true => Ok(vec![
                        RgbImage::new(req.width as u32, req.height as u32);
                        req.n
                    ]),
                    false => Err(WorkerError::Cancelled),
                }
            })
            .collect()
    }
}

struct Harness {
    client: WorkerClient<Channel>,
    batches: Arc<Mutex<Vec<Vec<String>>>>,
}

async fn start(max_batch: usize, window: Duration, step_time: Duration) -> Harness {
    start_on(max_batch, window, step_time, true).await
}

async fn start_on(max_batch: usize, window: Duration, step_time: Duration, cfg: bool) -> Harness {
    metrics_text();
    let mut config = ModelConfig::for_model("batcher");
    config.pipeline.max_n = 4;
    config.pipeline.max_batch = max_batch;
    config.pipeline.batch_window_ms = window.as_millis() as u64;
    config.pipeline.max_pixels = 128 * 128;
    config.pipeline.global_num_inference_steps = 3;
    let batches = Arc::new(Mutex::new(Vec::new()));
    let backend = Batcher {
        step_time,
        cfg,
        batches: batches.clone(),
    };
    let options = EngineOptions {
        max_queue: 16,
        max_batch,
        batch_window: window,
    };
    let engine = Engine::start_with(options, move || Ok(Box::new(backend) as Box<dyn Backend>));
    engine.ready().await.expect("model loads");
    let (listener, addr) = service::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    tokio::spawn(service::serve(
        listener,
        WorkerService::new(engine, Arc::new(config)),
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    Harness {
        client: WorkerClient::new(channel),
        batches,
    }
}

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: prompt.into(),
        task: Task::TextToImage as i32,
        prompt: prompt.into(),
        n: 1,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

/// Submits `req`; returns once the worker has queued it.
async fn submit(
    h: &mut Harness,
    req: GenerateRequest,
) -> Streaming<fastfusion_proto::GenerateEvent> {
    h.client.generate(req).await.expect("admitted").into_inner()
}

async fn events(mut stream: Streaming<fastfusion_proto::GenerateEvent>) -> Vec<Event> {
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.expect("event") {
        events.extend(event.event);
    }
    events
}

fn batch_size(events: &[Event]) -> Option<u32> {
    events.iter().find_map(|e| match e {
        Event::Started(s) => Some(s.batch_size),
        _ => None,
    })
}

fn positions(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Queued(q) => Some(q.position),
            _ => None,
        })
        .collect()
}

fn batches(h: &Harness) -> Vec<Vec<String>> {
    h.batches.lock().expect("lock").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_requests_share_a_batch_up_to_max_batch_images() {
    let full_batches = || {
        metric("fastfusion_worker_batch_size_bucket{le=\"4\"}")
            - metric("fastfusion_worker_batch_size_bucket{le=\"3\"}")
    };
    let full_before = full_batches();
    // A long window: the batch leaves when it is full, not when the window ends.
    let mut h = start(4, Duration::from_secs(5), Duration::from_millis(5)).await;
    let info = h
        .client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.limits.map(|l| l.max_batch), Some(4));

    let a = submit(&mut h, request("a")).await;
    let b = submit(&mut h, request("b")).await;
    // Another size cannot share the passes.
    let c = submit(
        &mut h,
        GenerateRequest {
            width: 32,
            ..request("c")
        },
    )
    .await;
    // Neither can another step count, or guidance on where the others have it off.
    let d = submit(
        &mut h,
        GenerateRequest {
            num_inference_steps: Some(4),
            ..request("d")
        },
    )
    .await;
    let e = submit(
        &mut h,
        GenerateRequest {
            guidance_scale: Some(1.0),
            ..request("e")
        },
    )
    .await;
    // Two images fill the batch of a and b: it leaves at once.
    let f = submit(
        &mut h,
        GenerateRequest {
            n: 2,
            ..request("f")
        },
    )
    .await;
    let started = std::time::Instant::now();
    let (a, b, f) = (events(a).await, events(b).await, events(f).await);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a full batch does not wait"
    );
    for done in [&a, &b, &f] {
        assert!(matches!(done.last(), Some(Event::Done(_))), "{done:?}");
        assert_eq!(batch_size(done), Some(4));
    }
    let images = f.iter().filter(|e| matches!(e, Event::Image(_))).count();
    assert_eq!(images, 2);
    assert_eq!(batches(&h)[0], ["a", "b", "f"]);
    assert!(
        full_batches() > full_before,
        "the histogram saw the batch of 4"
    );
    // The others wait for companions (the window is long); cancelled while queued, they never run.
    drop((c, d, e));
    assert_eq!(batches(&h).len(), 1, "cancelled while queued, never run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_the_model_embeds_the_guidance_scale_any_scales_share_a_batch() {
    // A FLUX-like model: the scale is an input per row, nothing doubles.
    let mut h = start_on(2, Duration::from_secs(5), Duration::from_millis(5), false).await;
    let a = submit(&mut h, request("a")).await;
    let e = submit(
        &mut h,
        GenerateRequest {
            guidance_scale: Some(1.0),
            ..request("e")
        },
    )
    .await;
    let started = std::time::Instant::now();
    let (a, e) = (events(a).await, events(e).await);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "a full batch does not wait"
    );
    for done in [&a, &e] {
        assert!(matches!(done.last(), Some(Event::Done(_))), "{done:?}");
        assert_eq!(batch_size(done), Some(2));
    }
    assert_eq!(batches(&h), [["a", "e"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_is_not_full_waits_for_the_window_or_not_at_all() {
    let mut h = start(4, Duration::from_millis(500), Duration::from_millis(5)).await;
    let a = submit(&mut h, request("a")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = submit(&mut h, request("b")).await;
    let (a, b) = (events(a).await, events(b).await);
    assert_eq!((batch_size(&a), batch_size(&b)), (Some(2), Some(2)));
    assert_eq!(batches(&h), [["a", "b"]]);

    // Window 0: the first request starts at once; the second, queued meanwhile, runs next.
    let mut h = start(4, Duration::ZERO, Duration::from_millis(50)).await;
    let a = submit(&mut h, request("a")).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = submit(&mut h, request("b")).await;
    let (a, b) = (events(a).await, events(b).await);
    assert_eq!((batch_size(&a), batch_size(&b)), (Some(1), Some(1)));
    assert_eq!(batches(&h), [vec!["a"], vec!["b"]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_positions_count_what_is_left_after_each_batch() {
    let mut h = start(2, Duration::ZERO, Duration::from_millis(50)).await;
    let a = submit(&mut h, request("a")).await;
    // Wait until a runs, so the next ones queue behind it.
    let mut a = a;
    let mut a_events = Vec::new();
    while let Some(event) = a.message().await.expect("event") {
        let started = matches!(event.event, Some(Event::Started(_)));
        a_events.extend(event.event);
        if started {
            break;
        }
    }
    let b = submit(&mut h, request("b")).await;
    let c = submit(&mut h, request("c")).await;
    let d = submit(&mut h, request("d")).await;
    let (b, c, d) = (events(b).await, events(c).await, events(d).await);
    assert_eq!(positions(&b), [0]);
    assert_eq!(positions(&c), [1]);
    // b and c leave together, so d moves from 2 straight to the front.
    assert_eq!(positions(&d), [2, 0]);
    assert_eq!(batches(&h), [vec!["a"], vec!["b", "c"], vec!["d"]]);
    assert_eq!(batch_size(&d), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_leaves_its_batch_and_the_other_finishes() {
    let mut h = start(2, Duration::from_secs(5), Duration::from_millis(20)).await;
    let steps = GenerateRequest {
        num_inference_steps: Some(20),
        ..request("x")
    };
    let mut gone = submit(
        &mut h,
        GenerateRequest {
            prompt: "gone".into(),
            ..steps.clone()
        },
    )
    .await;
    let stays = submit(
        &mut h,
        GenerateRequest {
            prompt: "stays".into(),
            ..steps
        },
    )
    .await;
    let mut progressed = 0;
    while let Some(event) = gone.message().await.expect("event") {
        if matches!(event.event, Some(Event::Progress(_))) {
            progressed += 1;
            if progressed == 2 {
                break;
            }
        }
    }
    drop(gone);
    let stays = events(stays).await;
    assert!(matches!(stays.last(), Some(Event::Done(_))), "{stays:?}");
    let steps = stays
        .iter()
        .filter(|e| matches!(e, Event::Progress(_)))
        .count();
    assert_eq!(steps, 20);
    assert_eq!(batch_size(&stays), Some(2));
    assert_eq!(batches(&h), [["gone", "stays"]]);
}
