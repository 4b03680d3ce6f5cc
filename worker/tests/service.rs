//! The gRPC service and the job engine, in-process over a real socket, with a scripted backend:
//! event order, validation statuses, health while loading, queue limits, cancellation and panics;
//! endpoint switches and what image tasks deliver to the backend.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::{Device, Tensor};
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::worker_client::WorkerClient;
use fastfusion_proto::{
    Endpoint, GenerateRequest, InfoRequest, LoraSetting, MaskMode, ModelFamily, Task,
};
use fastfusion_worker::backend::{Backend, ModelDescription};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::engine::Engine;
use fastfusion_worker::error::{Result, WorkerError};
use fastfusion_worker::pipelines::{Progress, StrengthRule, TextToImage};
use fastfusion_worker::schedulers::SchedulerKind;
use fastfusion_worker::service::{self, WorkerService};
use fastfusion_worker::vision::DEFAULT_VARIATION_PROMPT;
use image::{GrayImage, RgbImage};
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
    /// The inputs of image tasks, in order.
    edits: Arc<Mutex<Vec<EditSeen>>>,
    /// Describe the model as an inpainting model.
    inpainting: bool,
}

/// What an image task brought to the backend.
#[derive(Debug, Clone)]
struct EditSeen {
    prompt: String,
    image: RgbImage,
    mask: Option<GrayImage>,
    strength: f64,
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
            inpainting_model: self.inpainting,
            max_sequence_length: 0,
            image_seq_multiple: 0,
            strength_rule: StrengthRule::Discrete,
            redux: false,
            classifier_free_guidance: true,
        }
    }

    fn image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.record_edit(req, image, None, strength);
        self.text_to_image(req, progress)
    }

    fn inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.record_edit(req, image, Some(mask), strength);
        self.text_to_image(req, progress)
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

impl Scripted {
    fn record_edit(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: Option<&GrayImage>,
        strength: f64,
    ) {
        if let Ok(mut edits) = self.edits.lock() {
            edits.push(EditSeen {
                prompt: req.prompt.clone(),
                image: image.clone(),
                mask: mask.cloned(),
                strength,
            });
        }
    }
}

struct Harness {
    client: WorkerClient<Channel>,
    health: HealthClient<Channel>,
    steps_run: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<TextToImage>>>,
    edits: Arc<Mutex<Vec<EditSeen>>>,
    /// Lets the model "finish loading".
    release: Option<oneshot::Sender<()>>,
}

async fn start(max_queue: usize, step_time: Duration, loaded: bool) -> Harness {
    start_with(max_queue, step_time, loaded, false, |_| {}).await
}

/// [`start`] with the config adjusted by `configure`, optionally as an inpainting model.
async fn start_with(
    max_queue: usize,
    step_time: Duration,
    loaded: bool,
    inpainting: bool,
    configure: impl FnOnce(&mut ModelConfig),
) -> Harness {
    let mut config = ModelConfig::for_model("scripted");
    config.pipeline.max_n = 3;
    config.pipeline.max_queue = max_queue;
    config.pipeline.max_pixels = 128 * 128;
    config.pipeline.global_num_inference_steps = 3;
    config.pipeline.max_steps = 50;
    configure(&mut config);
    let steps_run = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let edits = Arc::new(Mutex::new(Vec::new()));
    let backend = Scripted {
        step_time,
        steps_run: steps_run.clone(),
        seen: seen.clone(),
        edits: edits.clone(),
        inpainting,
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
        edits,
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
    assert_eq!(info.limits.as_ref().map(|l| l.max_batch), Some(4));
    assert_eq!(info.tasks, vec![Task::TextToImage as i32]);
    assert_eq!(
        info.defaults.as_ref().map(|d| d.scheduler.as_str()),
        Some("pndm")
    );
    // A discrete-time model lists every scheduler but FLUX's flow matching.
    let discrete: Vec<String> = SchedulerKind::ALL
        .iter()
        .filter(|k| !k.is_flow_matching())
        .map(|k| k.name().to_string())
        .collect();
    assert_eq!(info.schedulers, discrete);
    assert!(!info.schedulers.iter().any(|s| s == "flow_match_euler"));
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
    assert_eq!(seen[0].negative_prompt, None);

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
                partial_images: 4,
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "partial_images",
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

/// PNG bytes of `image`.
fn png(image: image::DynamicImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

/// A 32×24 picture of one colour.
fn picture(rgb: [u8; 3]) -> Vec<u8> {
    png(RgbImage::from_pixel(32, 24, image::Rgb(rgb)).into())
}

/// A 16×16 OpenAI mask: the left half transparent (repaint), the right half opaque.
fn alpha_mask() -> Vec<u8> {
    png(image::RgbaImage::from_fn(16, 16, |x, _| {
        image::Rgba([0, 0, 0, if x < 8 { 0 } else { 255 }])
    })
    .into())
}

fn edit(task: Task, endpoint: Endpoint) -> GenerateRequest {
    GenerateRequest {
        task: task as i32,
        endpoint: endpoint as i32,
        images: vec![picture([200, 10, 10])],
        ..request("a red square")
    }
}

fn enable_all(config: &mut ModelConfig) {
    config.pipeline.generations_config.enabled = true;
    config.pipeline.edits_config.enabled = true;
    config.pipeline.variations_config.enabled = true;
    // No vision model unless a test sets one.
    config.pipeline.variations_config.vision_model = String::new();
}

async fn info_of(h: &mut Harness) -> fastfusion_proto::InfoResponse {
    h.client
        .info(InfoRequest {})
        .await
        .expect("info")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_lists_what_the_config_enables() {
    let mut h = start_with(4, Duration::ZERO, true, false, enable_all).await;
    let info = info_of(&mut h).await;
    let ids = |v: &[Endpoint]| v.iter().map(|e| *e as i32).collect::<Vec<_>>();
    assert_eq!(
        info.endpoints,
        ids(&[Endpoint::Generations, Endpoint::Edits, Endpoint::Variations])
    );
    assert_eq!(
        info.tasks,
        vec![
            Task::TextToImage as i32,
            Task::ImageToImage as i32,
            Task::Inpaint as i32
        ]
    );
    assert_eq!(info.defaults.map(|d| d.strength), Some(0.8));

    let mut h = start_with(4, Duration::ZERO, true, false, |c| {
        c.pipeline.generations_config.enabled = false;
        c.pipeline.variations_config.enabled = true;
    })
    .await;
    let info = info_of(&mut h).await;
    assert_eq!(info.endpoints, ids(&[Endpoint::Variations]));
    assert_eq!(info.tasks, vec![Task::ImageToImage as i32]);

    // An inpainting model cannot do text-to-image, whatever the config says.
    let mut h = start_with(4, Duration::ZERO, true, true, enable_all).await;
    let info = info_of(&mut h).await;
    assert!(!info.tasks.contains(&(Task::TextToImage as i32)));
    let err = collect(&mut h.client, request("a cat"))
        .await
        .expect_err("text-to-image on an inpainting model");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disabled_endpoints_fail_their_precondition() {
    // The default config serves generations only.
    let mut h = start(4, Duration::ZERO, true).await;
    for req in [
        edit(Task::ImageToImage, Endpoint::Edits),
        edit(Task::ImageToImage, Endpoint::Variations),
        // Without an endpoint an image task counts as an edit.
        edit(Task::ImageToImage, Endpoint::Unspecified),
    ] {
        let err = collect(&mut h.client, req).await.expect_err("disabled");
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    }
    let mut h = start_with(4, Duration::ZERO, true, false, |c| {
        c.pipeline.generations_config.enabled = false;
        c.pipeline.edits_config.enabled = true;
    })
    .await;
    let err = collect(&mut h.client, request("a cat"))
        .await
        .expect_err("generations off");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("generation"), "{err:?}");
    collect(&mut h.client, edit(Task::ImageToImage, Endpoint::Edits))
        .await
        .expect("edits on");
    assert_eq!(h.steps_run.load(Ordering::SeqCst), 3, "only the edit ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_image_requests_name_their_parameter() {
    let mut h = start_with(4, Duration::ZERO, true, false, enable_all).await;
    let inpaint = || GenerateRequest {
        mask: Some(alpha_mask()),
        ..edit(Task::Inpaint, Endpoint::Edits)
    };
    let i2i = || edit(Task::ImageToImage, Endpoint::Edits);
    let cases: Vec<(GenerateRequest, tonic::Code, &str)> = vec![
        (
            GenerateRequest {
                images: vec![],
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "image",
        ),
        (
            GenerateRequest {
                images: vec![b"GIF89a not really".to_vec()],
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "image",
        ),
        (
            GenerateRequest {
                images: vec![b"\x89PNG\r\n\x1a\n truncated".to_vec()],
                ..inpaint()
            },
            tonic::Code::InvalidArgument,
            "image",
        ),
        (
            GenerateRequest {
                mask: None,
                ..inpaint()
            },
            tonic::Code::InvalidArgument,
            "mask",
        ),
        (
            GenerateRequest {
                mask: Some(b"not a mask".to_vec()),
                ..inpaint()
            },
            tonic::Code::InvalidArgument,
            "mask",
        ),
        (
            GenerateRequest {
                mask: Some(alpha_mask()),
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "mask",
        ),
        (
            GenerateRequest {
                // An RGB picture has no alpha channel to read.
                mask: Some(picture([255, 255, 255])),
                mask_mode: MaskMode::Alpha as i32,
                ..inpaint()
            },
            tonic::Code::InvalidArgument,
            "mask",
        ),
        (
            GenerateRequest {
                mask_mode: 7,
                ..inpaint()
            },
            tonic::Code::InvalidArgument,
            "mask_mode",
        ),
        (
            GenerateRequest {
                images: vec![picture([1, 2, 3])],
                ..request("x")
            },
            tonic::Code::InvalidArgument,
            "image",
        ),
        (
            edit(Task::Inpaint, Endpoint::Variations),
            tonic::Code::InvalidArgument,
            "task",
        ),
        (
            edit(Task::ImageToImage, Endpoint::Generations),
            tonic::Code::InvalidArgument,
            "task",
        ),
        (
            GenerateRequest {
                endpoint: 9,
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "endpoint",
        ),
        (
            GenerateRequest {
                prompt: String::new(),
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "prompt",
        ),
    ];
    let strengths = [0.0, -0.5, 1.5, f32::NAN, 0.1];
    let cases = cases.into_iter().chain(strengths.iter().map(|&s| {
        (
            // 0.1 × 3 steps leaves no step to run.
            GenerateRequest {
                strength: Some(s),
                ..i2i()
            },
            tonic::Code::InvalidArgument,
            "strength",
        )
    }));
    for (req, code, name) in cases {
        let err = collect(&mut h.client, req).await.expect_err(name);
        assert_eq!(err.code(), code, "{name}: {err:?}");
        assert_eq!(param(&err).as_deref(), Some(name), "{err:?}");
    }
    let err = collect(
        &mut h.client,
        GenerateRequest {
            task: Task::Redux as i32,
            ..edit(Task::ImageToImage, Endpoint::Variations)
        },
    )
    .await
    .expect_err("redux");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        h.steps_run.load(Ordering::SeqCst),
        0,
        "nothing invalid reached the model"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_tasks_reach_the_backend_decoded_at_the_output_size() {
    let mut h = start_with(4, Duration::ZERO, true, false, enable_all).await;
    // Image-to-image: the default strength; extra images are accepted, the first is edited.
    let events = collect(
        &mut h.client,
        GenerateRequest {
            images: vec![picture([200, 10, 10]), picture([10, 10, 200])],
            ..edit(Task::ImageToImage, Endpoint::Edits)
        },
    )
    .await
    .expect("image-to-image");
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    // A float32 strength arrives as the decimal the client meant.
    collect(
        &mut h.client,
        GenerateRequest {
            strength: Some(0.7),
            ..edit(Task::ImageToImage, Endpoint::Edits)
        },
    )
    .await
    .expect("strength 0.7");
    // Inpainting with an OpenAI mask: strength 1 by default, the mask white where transparent.
    collect(
        &mut h.client,
        GenerateRequest {
            mask: Some(alpha_mask()),
            ..edit(Task::Inpaint, Endpoint::Edits)
        },
    )
    .await
    .expect("inpaint");
    // Variations without a prompt and without a vision model: the default prompt.
    collect(
        &mut h.client,
        GenerateRequest {
            prompt: String::new(),
            ..edit(Task::ImageToImage, Endpoint::Variations)
        },
    )
    .await
    .expect("variation");

    let edits = h.edits.lock().expect("lock").clone();
    assert_eq!(edits.len(), 4);
    for e in &edits {
        assert_eq!(e.image.dimensions(), (64, 48), "resized to the output size");
    }
    assert_eq!(
        edits[0].image.get_pixel(32, 24).0,
        [200, 10, 10],
        "first image"
    );
    assert_eq!(edits[0].strength, 0.8);
    assert!(edits[0].mask.is_none());
    assert_eq!(edits[1].strength, 0.7);
    let mask = edits[2].mask.as_ref().expect("inpaint mask");
    assert_eq!(mask.dimensions(), (64, 48));
    assert_eq!(mask.get_pixel(4, 24).0, [255], "transparent = repaint");
    assert_eq!(mask.get_pixel(60, 24).0, [0], "opaque = keep");
    assert_eq!(edits[2].strength, 1.0);
    assert_eq!(edits[2].prompt, "a red square");
    assert_eq!(edits[3].prompt, DEFAULT_VARIATION_PROMPT);
    assert_eq!(edits[3].strength, 0.8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_vision_model_falls_back_to_the_default_prompt() {
    let mut h = start_with(4, Duration::ZERO, true, false, |c| {
        enable_all(c);
        c.pipeline.variations_config.vision_model = "gpt-4o".into();
        // Nothing listens on port 1: the call fails at once.
        c.pipeline.variations_config.vision_model_host = "http://127.0.0.1:1".into();
    })
    .await;
    collect(
        &mut h.client,
        GenerateRequest {
            prompt: String::new(),
            ..edit(Task::ImageToImage, Endpoint::Variations)
        },
    )
    .await
    .expect("a vision failure is not the client's problem");
    collect(
        &mut h.client,
        GenerateRequest {
            prompt: "keep my prompt".into(),
            ..edit(Task::ImageToImage, Endpoint::Variations)
        },
    )
    .await
    .expect("variation with a prompt");
    let edits = h.edits.lock().expect("lock").clone();
    assert_eq!(edits[0].prompt, DEFAULT_VARIATION_PROMPT);
    assert_eq!(edits[1].prompt, "keep my prompt");
}

/// A chat-completions server that answers with a fixed description and keeps the request bodies.
async fn vision_server(bodies: Arc<Mutex<Vec<serde_json::Value>>>) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(body): axum::Json<serde_json::Value>| {
            let bodies = bodies.clone();
            async move {
                bodies.lock().expect("lock").push(body);
                axum::Json(serde_json::json!({
                    "choices": [{"message": {"role": "assistant", "content": "a red square"}}]
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("vision server") });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_variation_without_prompt_asks_the_vision_model() {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let addr = vision_server(bodies.clone()).await;
    let mut h = start_with(4, Duration::ZERO, true, false, |c| {
        enable_all(c);
        c.pipeline.variations_config.vision_model = "tiny-vision".into();
        c.pipeline.variations_config.vision_model_host = format!("http://{addr}/v1");
    })
    .await;
    collect(
        &mut h.client,
        GenerateRequest {
            prompt: String::new(),
            ..edit(Task::ImageToImage, Endpoint::Variations)
        },
    )
    .await
    .expect("variation");
    assert_eq!(h.edits.lock().expect("lock")[0].prompt, "a red square");
    let bodies = bodies.lock().expect("lock").clone();
    assert_eq!(bodies.len(), 1, "one vision call");
    assert_eq!(bodies[0]["model"], "tiny-vision");
    // The image travels as a PNG data URL (of the picture at the output size).
    let text = bodies[0].to_string();
    assert!(text.contains("data:image/png;base64,"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_loras_are_listed_and_requests_are_checked_against_them() {
    let mut h = start_with(4, Duration::ZERO, true, false, |c| {
        c.pipeline.loras = vec![fastfusion_worker::config::LoraConfig {
            source: fastfusion_worker::config::LoraSource::Local,
            address: "style.safetensors".into(),
            weight_name: None,
            adapter_name: "style".into(),
            sha256: None,
        }];
    })
    .await;
    assert_eq!(info_of(&mut h).await.loras, vec!["style".to_string()]);
    let with = |name: &str, weight: f32| GenerateRequest {
        loras: vec![LoraSetting {
            name: name.into(),
            weight,
        }],
        ..request("x")
    };
    let events = collect(&mut h.client, with("style", 0.5))
        .await
        .expect("a known adapter runs");
    assert!(matches!(events.last(), Some(Event::Done(_))), "{events:?}");
    for (req, needle) in [
        (with("other", 1.0), "loaded: style"),
        (with("style", 9.0), "between -8 and 8"),
        (with("style", f32::NAN), "between -8 and 8"),
    ] {
        let err = collect(&mut h.client, req).await.expect_err(needle);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(param(&err).as_deref(), Some("lora_settings"));
        assert!(err.message().contains(needle), "{err:?}");
    }
}
