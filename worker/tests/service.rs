//! The gRPC service and the job engine, in-process over a real socket, with a scripted backend:
//! event order, validation statuses, health while loading, queue limits, cancellation and panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{GenerateRequest, InfoRequest, LoraSetting, ModelFamily, Task};
use fastfusion_worker::backend::{Backend, ModelDescription};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::engine::Engine;
use fastfusion_worker::error::{Result, WorkerError};
use fastfusion_worker::pipelines::stable_diffusion::{Progress, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use fastfusion_worker::service::{self, WorkerService};
use image::RgbImage;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A backend that "denoises" by sleeping per step and paints each image from its seed.
struct Scripted {
    step_time: Duration,
    /// Steps actually run, across all jobs.
    steps_run: Arc<AtomicUsize>,
    /// Requests seen, in order.
    seen: Arc<Mutex<Vec<TextToImage>>>,
}

impl Backend for Scripted {
    fn description(&self) -> ModelDescription {
        ModelDescription {
            family: ModelFamily::Sd1,
            native_width: 64,
            native_height: 48,
            size_multiple: 8,
            max_prompt_tokens: 77,
            default_scheduler: SchedulerKind::Pndm,
        }
    }

    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        if req.prompt == "panic" {
            panic!("scripted failure");
        }
        if let Ok(mut seen) = self.seen.lock() {
            seen.push(req.clone());
        }
        let latents = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
        for step in 1..=req.steps {
            std::thread::sleep(self.step_time);
            self.steps_run.fetch_add(1, Ordering::SeqCst);
            if progress.on_step(step, req.steps, &latents).is_break() {
                return Err(WorkerError::Cancelled);
            }
        }
        Ok((0..req.n)
            .map(|i| {
                let shade = ((req.seed as usize + i) % 256) as u8;
                RgbImage::from_pixel(
                    req.width as u32,
                    req.height as u32,
                    image::Rgb([shade, 0, 0]),
                )
            })
            .collect())
    }
}

struct Harness {
    client: WorkerClient<Channel>,
    health: HealthClient<Channel>,
    steps_run: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<TextToImage>>>,
    /// Lets the model "finish loading".
    release: Option<oneshot::Sender<()>>,
}

async fn start(max_queue: usize, step_time: Duration, loaded: bool) -> Harness {
    let mut config = ModelConfig::for_model("scripted");
    config.pipeline.max_n = 3;
    config.pipeline.max_queue = max_queue;
    config.pipeline.max_pixels = 128 * 128;
    config.pipeline.global_num_inference_steps = 3;
    config.pipeline.max_steps = 50;
    let steps_run = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let backend = Scripted {
        step_time,
        steps_run: steps_run.clone(),
        seen: seen.clone(),
    };
    let (release, released) = oneshot::channel::<()>();
    let engine = Engine::start(max_queue, move || {
        // Loading waits until the test says so.
        let _ = released.blocking_recv();
        Ok(Box::new(backend) as Box<dyn Backend>)
    });
    let (listener, addr) = service::bind("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind");
    tokio::spawn(service::serve(
        listener,
        WorkerService::new(engine.clone(), Arc::new(config)),
        std::future::pending(),
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut harness = Harness {
        client: WorkerClient::new(channel.clone()),
        health: HealthClient::new(channel),
        steps_run,
        seen,
        release: Some(release),
    };
    if loaded {
        harness.load(&engine).await;
    }
    harness
}

impl Harness {
    async fn load(&mut self, engine: &Engine) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        engine.ready().await.expect("model loads");
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
}

fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        request_id: "test".into(),
        task: Task::TextToImage as i32,
        prompt: prompt.into(),
        n: 1,
        width: 64,
        height: 48,
        ..Default::default()
    }
}

/// Runs a request to the end and returns its events.
async fn collect(
    client: &mut WorkerClient<Channel>,
    req: GenerateRequest,
) -> std::result::Result<Vec<Event>, tonic::Status> {
    let mut stream = client.generate(req).await?.into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.extend(event.event);
    }
    Ok(events)
}

fn param(status: &tonic::Status) -> Option<String> {
    status
        .metadata()
        .get(fastfusion_proto::PARAM_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_serving_and_unavailable_until_the_model_is_loaded() {
    let mut h = start(4, Duration::ZERO, false).await;
    // The health service answers at once, NOT_SERVING while loading.
    let mut status = h.health().await;
    for _ in 0..50 {
        if status == ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        status = h.health().await;
    }
    assert_eq!(status, ServingStatus::NotServing as i32);
    let info = h
        .client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert!(!info.loaded);
    assert_eq!(info.native_width, 0);
    let err = collect(&mut h.client, request("a cat"))
        .await
        .expect_err("still loading");
    assert_eq!(err.code(), tonic::Code::Unavailable);

    let release = h.release.take().expect("release");
    let _ = release.send(());
    let mut serving = false;
    for _ in 0..200 {
        if h.health().await == ServingStatus::Serving as i32 {
            serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(serving, "health must turn SERVING after the load");
    let info = h
        .client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert!(info.loaded);
    assert_eq!((info.native_width, info.native_height), (64, 48));
    assert_eq!(info.family, ModelFamily::Sd1 as i32);
    assert_eq!(info.model_id, "scripted");
    assert_eq!(info.max_n, 3);
    assert_eq!(info.tasks, vec![Task::TextToImage as i32]);
    assert_eq!(
        info.defaults.as_ref().map(|d| d.scheduler.as_str()),
        Some("pndm")
    );
    assert_eq!(info.schedulers.len(), SchedulerKind::ALL.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_with_the_seed_and_every_image() {
    let mut h = start(4, Duration::ZERO, true).await;
    let mut req = request("a cat");
    req.n = 2;
    req.seed = Some(7);
    req.num_inference_steps = Some(4);
    let events = collect(&mut h.client, req).await.expect("generate");
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::Queued(_) => "queued",
            Event::Started(_) => "started",
            Event::Progress(_) => "progress",
            Event::PartialImage(_) => "partial",
            Event::Image(_) => "image",
            Event::Done(_) => "done",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "queued", "started", "progress", "progress", "progress", "progress", "image", "image",
            "done"
        ]
    );
    let Event::Started(started) = &events[1] else {
        unreachable!()
    };
    assert_eq!(started.seed, 7);
    assert_eq!(started.num_inference_steps, 4);
    assert_eq!(
        started.scheduler, "pndm",
        "the model's own scheduler by default"
    );
    let Event::Progress(last) = &events[5] else {
        unreachable!()
    };
    assert_eq!((last.step, last.total), (4, 4));
    for (i, event) in events[6..8].iter().enumerate() {
        let Event::Image(img) = event else {
            unreachable!()
        };
        assert_eq!(img.index as usize, i);
        assert_eq!((img.width, img.height), (64, 48));
        let decoded = image::load_from_memory(&img.data).expect("png").to_rgb8();
        assert_eq!(decoded.get_pixel(0, 0).0, [7 + i as u8, 0, 0]);
    }
    // The defaults were resolved before the pipeline saw the request.
    let seen = h.seen.lock().expect("lock").clone();
    assert_eq!(seen[0].guidance_scale, 7.5);
    assert_eq!(seen[0].negative_prompt, "");

    // No seed: a random 32-bit one, reported in Started.
    let events = collect(&mut h.client, request("a dog"))
        .await
        .expect("generate");
    let seed = events
        .iter()
        .find_map(|e| match e {
            Event::Started(s) => Some(s.seed),
            _ => None,
        })
        .expect("started");
    assert!(seed <= u64::from(u32::MAX));
    assert_eq!(h.seen.lock().expect("lock")[1].seed, seed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_name_their_parameter() {
    let mut h = start(4, Duration::ZERO, true).await;
    let cases: Vec<(GenerateRequest, tonic::Code, &str)> = vec![
        (
            GenerateRequest {
                prompt: "  ".into(),
                ..request("")
            },
            tonic::Code::InvalidArgument,
            "prompt",
        ),
        (
            GenerateRequest {
                n: 0,
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "n",
        ),
        (
            GenerateRequest {
                n: 4,
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "n",
        ),
        (
            GenerateRequest {
                width: 60,
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "size",
        ),
        (
            GenerateRequest {
                width: 256,
                height: 256,
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "size",
        ),
        (
            GenerateRequest {
                num_inference_steps: Some(0),
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "num_inference_steps",
        ),
        (
            GenerateRequest {
                num_inference_steps: Some(51),
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "num_inference_steps",
        ),
        (
            GenerateRequest {
                guidance_scale: Some(f32::NAN),
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "guidance_scale",
        ),
        (
            GenerateRequest {
                scheduler: "lms".into(),
                ..request("x")
            },
            tonic::Code::NotFound,
            "scheduler",
        ),
        (
            GenerateRequest {
                output_compression: Some(101),
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "output_compression",
        ),
        (
            GenerateRequest {
                loras: vec![LoraSetting {
                    name: "style".into(),
                    weight: 1.0,
                }],
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "lora_settings",
        ),
    ];
    for (req, code, name) in cases {
        let err = collect(&mut h.client, req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert_eq!(param(&err).as_deref(), Some(name), "{err:?}");
    }
    let err = collect(
        &mut h.client,
        GenerateRequest {
            task: Task::Inpaint as i32,
            ..request("x")
        },
    )
    .await
    .expect_err("inpaint");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        h.steps_run.load(Ordering::SeqCst),
        0,
        "nothing invalid reached the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted_at_once() {
    let mut h = start(1, Duration::from_millis(40), true).await;
    let mut slow = request("slow");
    slow.num_inference_steps = Some(20);
    let mut first = h.client.generate(slow).await.expect("first").into_inner();
    // Wait until it runs, so it holds the only slot.
    while let Some(event) = first.message().await.expect("event") {
        if matches!(event.event, Some(Event::Progress(_))) {
            break;
        }
    }
    let err = collect(&mut h.client, request("second"))
        .await
        .expect_err("queue full");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_cancels_the_running_job_at_its_next_step() {
    let mut h = start(4, Duration::from_millis(30), true).await;
    let mut slow = request("slow");
    slow.num_inference_steps = Some(40);
    let mut stream = h.client.generate(slow).await.expect("slow").into_inner();
    let mut progressed = 0;
    while let Some(event) = stream.message().await.expect("event") {
        if matches!(event.event, Some(Event::Progress(_))) {
            progressed += 1;
            if progressed == 2 {
                break;
            }
        }
    }
    drop(stream);
    // The next request runs to completion, and the cancelled job stopped long before its 40 steps.
    let events = collect(&mut h.client, request("next")).await.expect("next");
    assert!(matches!(events.last(), Some(Event::Done(_))));
    let ran = h.steps_run.load(Ordering::SeqCst);
    assert!(
        ran < 40,
        "the cancelled job ran {ran} steps (3 of them the next request's)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_pipeline_is_an_internal_error_and_the_worker_goes_on() {
    let mut h = start(4, Duration::ZERO, true).await;
    let err = collect(&mut h.client, request("panic"))
        .await
        .expect_err("panics");
    assert_eq!(err.code(), tonic::Code::Internal);
    assert!(
        !err.message().contains("scripted failure"),
        "internal detail leaked: {}",
        err.message()
    );
    let events = collect(&mut h.client, request("after"))
        .await
        .expect("still serving");
    assert!(matches!(events.last(), Some(Event::Done(_))));
}
