//! Shared test doubles: a fake [`WorkerPool`] that answers with real encoded images, and helpers
//! to drive the router without sockets.

// Each test binary that includes this module uses a different subset of it.
#![allow(dead_code)]

use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use fastfusion_gateway::auth::ApiKeys;
use fastfusion_gateway::concurrency::ConcurrencyLimit;
use fastfusion_gateway::image_urls::ImageUrls;
use fastfusion_gateway::openai::OutputFormat;
use fastfusion_gateway::storage::{ImageStore, ObjectImageStore};
use fastfusion_gateway::workers::{resolve_model, EventStream, WorkerPool};
use fastfusion_gateway::{router, ApiError, AppState, HttpSettings};
use fastfusion_proto::generate_event::Event;
use fastfusion_proto::{
    Defaults, Done, Endpoint, GenerateEvent, GenerateRequest, Image, InfoResponse, Limits, Preset,
    Progress, Started, Task, Timings,
};
use futures::StreamExt;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// The seed the fake reports when a request gives none.
pub const RANDOM_SEED: u64 = 987_654_321;
/// Side of the fake's images, whatever size was asked for (the gateway does not look inside).
pub const IMAGE_SIDE: u32 = 8;

/// How the fake answers `generate`.
#[derive(Clone)]
pub enum Behaviour {
    /// Queued, started, progress, n images, done.
    Succeed,
    /// The call fails with this status.
    Fail(tonic::Status),
    /// The stream never ends.
    Hang,
    /// Images, but one fewer than asked.
    ShortChange,
    /// Queued and started, then nothing more: a job still denoising.
    Stall,
    /// Queued and started, then the stream fails with this status.
    FailMidStream(tonic::Status),
}

pub struct FakePool {
    pub info: Arc<InfoResponse>,
    pub ready: bool,
    pub behaviour: Behaviour,
    /// Every request `generate` received, in order.
    pub seen: Mutex<Vec<GenerateRequest>>,
    /// How many of the streams `generate` returned have been dropped (the gRPC call cancelled).
    pub dropped: Arc<AtomicUsize>,
}

/// Counts a stream as dropped when it goes away.
struct DropGuard(Arc<AtomicUsize>);

impl Drop for DropGuard {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

impl FakePool {
    pub fn new(behaviour: Behaviour) -> Self {
        FakePool {
            info: Arc::new(tiny_info()),
            ready: true,
            behaviour,
            seen: Mutex::new(Vec::new()),
            dropped: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub fn last_request(&self) -> GenerateRequest {
        self.seen
            .lock()
            .expect("lock")
            .last()
            .cloned()
            .expect("a generate call")
    }
}

pub fn tiny_info() -> InfoResponse {
    InfoResponse {
        model_id: "tiny-sd".into(),
        source: "tests/fixtures/tiny-sd".into(),
        tasks: vec![
            Task::TextToImage as i32,
            Task::ImageToImage as i32,
            Task::Inpaint as i32,
        ],
        endpoints: vec![
            Endpoint::Generations as i32,
            Endpoint::Edits as i32,
            Endpoint::Variations as i32,
        ],
        max_n: 3,
        presets: vec![Preset {
            name: "hd".into(),
            guidance_scale: 5.0,
            num_inference_steps: 50,
        }],
        loras: vec![],
        native_width: 512,
        native_height: 512,
        limits: Some(Limits {
            max_pixels: 1024 * 1024,
            size_multiple: 8,
            max_steps: 150,
            max_queue: 8,
            max_batch: 4,
            max_prompt_tokens: 77,
            max_sequence_length: 0,
        }),
        defaults: Some(Defaults {
            guidance_scale: 7.5,
            num_inference_steps: 20,
            scheduler: "pndm".into(),
            strength: 0.8,
        }),
        schedulers: vec!["pndm".into(), "euler".into()],
        ..Default::default()
    }
}

/// A real `IMAGE_SIDE`² image in `format`, its colour derived from `index`.
pub fn encode_image(index: u32, format: OutputFormat) -> Vec<u8> {
    let shade = (index * 60 % 256) as u8;
    let image = image::RgbImage::from_pixel(IMAGE_SIDE, IMAGE_SIDE, image::Rgb([shade, 100, 200]));
    let mut out = Cursor::new(Vec::new());
    let format = match format {
        OutputFormat::Png => image::ImageFormat::Png,
        OutputFormat::Jpeg => image::ImageFormat::Jpeg,
        OutputFormat::Webp => image::ImageFormat::WebP,
    };
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn event(event: Event) -> Result<GenerateEvent, ApiError> {
    Ok(GenerateEvent { event: Some(event) })
}

/// `events`, counted in `FakePool::dropped` when dropped.
fn guarded(
    events: impl futures::Stream<Item = Result<GenerateEvent, ApiError>> + Send + 'static,
    guard: DropGuard,
) -> EventStream {
    Box::pin(events.map(move |event| {
        // The closure owns the guard, so it lives exactly as long as the stream.
        let _owned = &guard;
        event
    }))
}

#[async_trait::async_trait]
impl WorkerPool for FakePool {
    fn models(&self) -> Vec<String> {
        vec![self.info.model_id.clone()]
    }

    async fn info(&self, requested: Option<&str>) -> Result<Arc<InfoResponse>, ApiError> {
        resolve_model(&[Arc::clone(&self.info)], requested)
    }

    async fn generate(
        &self,
        model: &str,
        request: GenerateRequest,
    ) -> Result<EventStream, ApiError> {
        assert_eq!(model, self.info.model_id);
        self.seen.lock().expect("lock").push(request.clone());
        let format = fastfusion_proto::OutputFormat::try_from(request.output_format)
            .map(OutputFormat::from_proto)
            .expect("known format");
        let seed = request.seed.unwrap_or(RANDOM_SEED);
        let guard = DropGuard(Arc::clone(&self.dropped));
        let start = vec![
            event(Event::Queued(Default::default())),
            event(Event::Started(Started {
                seed,
                batch_size: request.n,
                num_inference_steps: request.num_inference_steps.unwrap_or(20),
                guidance_scale: request.guidance_scale.unwrap_or(7.5),
                scheduler: "pndm".into(),
            })),
        ];
        let count = match self.behaviour {
            Behaviour::Fail(ref status) => return Err(ApiError::from(status.clone())),
            Behaviour::Hang => return Ok(guarded(futures::stream::pending(), guard)),
            Behaviour::Stall => {
                let events = futures::stream::iter(start).chain(futures::stream::pending());
                return Ok(guarded(events, guard));
            }
            Behaviour::FailMidStream(ref status) => {
                let mut events = start;
                events.push(Err(ApiError::from(status.clone())));
                return Ok(guarded(futures::stream::iter(events), guard));
            }
            Behaviour::Succeed => request.n,
            Behaviour::ShortChange => request.n - 1,
        };
        let mut events = start;
        events.push(event(Event::Progress(Progress { step: 1, total: 1 })));
        // Previews as the worker sends them: every image's, in order, before the final images.
        for partial_index in 0..request.partial_images {
            for index in 0..count {
                events.push(event(Event::PartialImage(Image {
                    index,
                    data: encode_image(index + 10 * (partial_index + 1), format),
                    format: format.to_proto() as i32,
                    width: IMAGE_SIDE,
                    height: IMAGE_SIDE,
                    seed,
                    partial_index,
                })));
            }
        }
        // Images arrive out of order: the gateway must sort them by index.
        for index in (0..count).rev() {
            events.push(event(Event::Image(Image {
                index,
                data: encode_image(index, format),
                format: format.to_proto() as i32,
                width: IMAGE_SIDE,
                height: IMAGE_SIDE,
                seed,
                partial_index: 0,
            })));
        }
        events.push(event(Event::Done(Done {
            timings: Some(Timings::default()),
        })));
        Ok(guarded(futures::stream::iter(events), guard))
    }

    async fn ready(&self) -> bool {
        self.ready
    }
}

/// A router over `pool` and a fresh image directory (kept alive by the returned guard).
pub fn app_with(pool: Arc<FakePool>, base_url: Option<&str>, max_body_bytes: usize) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ObjectImageStore::directory(dir.path()).expect("store");
    app_with_state(
        pool,
        base_url,
        max_body_bytes,
        Access::default(),
        Arc::new(store),
        dir,
    )
}

/// Keys, url signing and concurrency limit for [`app_with_state`]; the default is the open,
/// unsigned, unlimited gateway the other tests use.
#[derive(Default)]
pub struct Access {
    pub api_keys: ApiKeys,
    pub urls: ImageUrls,
    pub concurrency: ConcurrencyLimit,
}

/// A router over `pool` and `images`, with `access`; `dir` is kept alive with the app.
pub fn app_with_state(
    pool: Arc<FakePool>,
    base_url: Option<&str>,
    max_body_bytes: usize,
    access: Access,
    images: Arc<dyn ImageStore>,
    dir: tempfile::TempDir,
) -> TestApp {
    let state = AppState {
        workers: pool.clone(),
        images,
        api_keys: Arc::new(access.api_keys),
        urls: Arc::new(access.urls),
        concurrency: Arc::new(access.concurrency),
        http: Arc::new(HttpSettings {
            base_url: base_url.map(str::to_string),
            request_timeout: Duration::from_millis(300),
            max_body_bytes,
            max_input_pixels: 1024 * 1024,
            started_at: 1_700_000_000,
        }),
    };
    TestApp {
        router: router(state),
        pool,
        _dir: dir,
    }
}

pub fn app(behaviour: Behaviour) -> TestApp {
    app_with(Arc::new(FakePool::new(behaviour)), None, 64 * 1024)
}

pub struct TestApp {
    pub router: axum::Router,
    pub pool: Arc<FakePool>,
    _dir: tempfile::TempDir,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts OpenAI's error shape and returns `error.param`.
    pub fn error_param(&self, status: StatusCode) -> Option<String> {
        assert_eq!(
            self.status,
            status,
            "{}",
            String::from_utf8_lossy(&self.body)
        );
        let body = self.json();
        let error = body["error"].as_object().expect("error object");
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert!(error["type"].is_string());
        assert!(error.contains_key("param") && error.contains_key("code"));
        error["param"].as_str().map(str::to_string)
    }
}

impl TestApp {
    pub async fn call(&self, method: &str, uri: &str, body: Option<&str>) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "gateway.test:8123");
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
            .expect("request");
        self.send(request).await
    }

    pub async fn send(&self, request: Request<Body>) -> Reply {
        let response = self
            .router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    pub async fn generate(&self, body: &str) -> Reply {
        self.call("POST", "/v1/images/generations", Some(body))
            .await
    }
}

/// A PNG of `width`x`height`, RGBA when `alpha` (the corner pixel transparent), else RGB.
pub fn png(width: u32, height: u32, alpha: bool) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    if alpha {
        let mut image = image::RgbaImage::from_pixel(width, height, image::Rgba([0, 0, 0, 255]));
        image.put_pixel(0, 0, image::Rgba([0, 0, 0, 0]));
        image.write_to(&mut out, image::ImageFormat::Png)
    } else {
        image::RgbImage::from_pixel(width, height, image::Rgb([200, 120, 40]))
            .write_to(&mut out, image::ImageFormat::Png)
    }
    .expect("encode");
    out.into_inner()
}

/// A `multipart/form-data` body built part by part, as curl `-F` or the SDKs send it.
#[derive(Default)]
pub struct Form {
    body: Vec<u8>,
}

pub const BOUNDARY: &str = "----fastfusion-test-boundary";

impl Form {
    pub fn new() -> Self {
        Form::default()
    }

    /// A text part.
    pub fn text(mut self, name: &str, value: &str) -> Self {
        self.body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
        self
    }

    /// A file part named `name` with file name `file.png`.
    pub fn file(mut self, name: &str, bytes: &[u8]) -> Self {
        self.body.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                 filename=\"file.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        self.body.extend_from_slice(bytes);
        self.body.extend_from_slice(b"\r\n");
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.body
            .extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        self.body
    }
}

impl TestApp {
    /// POSTs a multipart form to `path`.
    pub async fn post_form(&self, path: &str, form: Form) -> Reply {
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "gateway.test:8123")
            .header(
                "content-type",
                format!("multipart/form-data; boundary={BOUNDARY}"),
            )
            .body(Body::from(form.finish()))
            .expect("request");
        self.send(request).await
    }
}
