//! The gRPC face of the worker: `fastfusion.worker.v1.Worker` and `grpc.health.v1.Health`.
//!
//! Turns a `GenerateRequest` into a validated [`JobSpec`] (every default resolved here, so the
//! pipeline only sees complete values), hands it to the [`Engine`] and maps the job's events to the
//! response stream. [`WorkerError`] becomes a `tonic::Status` in exactly one place
//! (`impl From<WorkerError> for Status`), with the offending parameter in the `ff-param` metadata.
//!
//! ```text
//! GenerateRequest ─validate─▶ Validated (fields checked, defaults resolved, uploads still bytes)
//!   ─decode uploads (blocking pool)─▶ [variation without prompt: vision model or default prompt]
//!   ─▶ JobSpec ─▶ Engine
//! ```
//!
//! Endpoints and tasks (`GenerateRequest.endpoint`, `.task`):
//! * GENERATIONS serves TEXT_TO_IMAGE; EDITS serves IMAGE_TO_IMAGE (no mask) and INPAINT (with a
//!   mask); VARIATIONS serves IMAGE_TO_IMAGE. A request without an endpoint is taken as coming
//!   through GENERATIONS for text-to-image and EDITS otherwise. An endpoint switched off in the
//!   config (`*_config.enabled`) answers FAILED_PRECONDITION, and `Info` lists only enabled ones.
//! * Image tasks need at least one image; the first is edited. Further images (OpenAI's
//!   `image[]`) are accepted and unused by the Stable Diffusion family (logged at debug level).
//!   A mask belongs to INPAINT only.
//! * `strength` must be in (0, 1] and leave at least one step (`int(steps × strength) ≥ 1`, as
//!   diffusers requires). Absent, it is `pipeline.default_strength` for image-to-image (edits
//!   without a mask, variations) and 1.0 for inpainting: diffusers' own default there, which
//!   repaints the masked area from pure noise, what an OpenAI edit with a mask means.
//! * `partial_images` (0 to [`MAX_PARTIAL_IMAGES`]) previews per image stream as `partial_image`
//!   events after evenly spaced steps (`pipelines::preview_steps`; never the
//!   last step, so a request with fewer steps than that gets fewer), encoded like the final
//!   images.
//! * A variation's prompt is optional. Without one, the configured vision model
//!   (`variations_config.vision_model`, when not empty) describes the image; if that fails (a
//!   warning is logged) or none is configured, [`crate::vision::DEFAULT_VARIATION_PROMPT`] is used.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use fastfusion_proto::worker_server::{Worker, WorkerServer};
use fastfusion_proto::{
    generate_event, Defaults, Done, Endpoint, GenerateEvent, GenerateRequest, Image, InfoRequest,
    InfoResponse, Limits, MaskMode, ModelFamily, OutputFormat, Preset, Progress, Queued, Started,
    Task, PARAM_METADATA_KEY,
};
use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;
use tracing::Instrument;

use crate::backend::ModelDescription;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineState, JobEvent, JobSpec, JobTask};
use crate::error::{Result, WorkerError};
use crate::inputs;
use crate::pipelines::{TextToImage, MAX_PARTIAL_IMAGES};
use crate::schedulers::SchedulerKind;
use crate::vision::{describe_image, VisionSettings, DEFAULT_VARIATION_PROMPT};

/// Largest gRPC message either way: a request may carry uploaded images, an event one encoded
/// image of up to the configured pixel limit.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// The `Worker` service over one engine and its config.
#[derive(Debug, Clone)]
pub struct WorkerService {
    engine: Engine,
    config: Arc<ModelConfig>,
}

impl WorkerService {
    pub fn new(engine: Engine, config: Arc<ModelConfig>) -> Self {
        WorkerService { engine, config }
    }

    /// The `adapter_name`s of `pipeline.loras`: all loaded at start-up, or the model failed.
    fn lora_names(&self) -> Vec<String> {
        let loras = &self.config.pipeline.loras;
        loras.iter().map(|l| l.adapter_name.clone()).collect()
    }

    /// Resolves defaults and checks every field against the config and the loaded model.
    /// Uploads are only checked for presence here; [`Validated::prepare_job`] decodes them.
    fn validate(&self, mut req: GenerateRequest, model: &ModelDescription) -> Result<Validated> {
        let pipeline = &self.config.pipeline;
        let task =
            Task::try_from(req.task).map_err(|_| WorkerError::invalid("task", "unknown task"))?;
        let endpoint = Endpoint::try_from(req.endpoint)
            .map_err(|_| WorkerError::invalid("endpoint", "unknown endpoint"))?;
        let endpoint = match (endpoint, task) {
            (_, Task::Unspecified) => return Err(WorkerError::invalid("task", "no task given")),
            (Endpoint::Unspecified, Task::TextToImage) => Endpoint::Generations,
            (Endpoint::Unspecified, _) => Endpoint::Edits,
            (endpoint, _) => endpoint,
        };
        let (enabled, name) = match endpoint {
            Endpoint::Generations => (pipeline.generations_config.enabled, "image generation"),
            Endpoint::Edits => (pipeline.edits_config.enabled, "image editing"),
            Endpoint::Variations => (pipeline.variations_config.enabled, "image variations"),
            Endpoint::Unspecified => (false, "an unspecified endpoint"),
        };
        if !enabled {
            return Err(WorkerError::TaskDisabled(name.into()));
        }
        // With a Redux prior loaded, every variation is a Redux variation.
        let redux = endpoint == Endpoint::Variations && model.redux;
        match (endpoint, task) {
            (Endpoint::Variations, Task::Redux | Task::ImageToImage) if redux => {}
            (_, Task::Redux) => {
                return Err(WorkerError::TaskDisabled(
                    "redux (needs a FLUX model with variations_config.enable_flux_redux)".into(),
                ))
            }
            (Endpoint::Generations, Task::TextToImage)
            | (Endpoint::Edits, Task::ImageToImage | Task::Inpaint)
            | (Endpoint::Variations, Task::ImageToImage) => {}
            (endpoint, task) => {
                return Err(WorkerError::invalid(
                    "task",
                    format!(
                        "{} does not belong to {}",
                        task.as_str_name(),
                        endpoint.as_str_name()
                    ),
                ))
            }
        }
        if task == Task::TextToImage && model.inpainting_model {
            return Err(WorkerError::TaskDisabled(
                "text-to-image with an inpainting model".into(),
            ));
        }
        // A Redux variation's prompt is optional and stays empty without one (the prior's own
        // behaviour); other variations get one from the image.
        let describe = endpoint == Endpoint::Variations && !redux && req.prompt.trim().is_empty();
        let prompt_optional = describe || redux;
        if req.prompt.trim().is_empty() && !prompt_optional {
            return Err(WorkerError::invalid("prompt", "must not be empty"));
        }
        let max_n = pipeline.max_n;
        if req.n == 0 || req.n as usize > max_n {
            return Err(WorkerError::invalid(
                "n",
                format!("must be between 1 and {max_n}, got {}", req.n),
            ));
        }
        check_size(
            req.width,
            req.height,
            model.size_multiple,
            pipeline.max_pixels,
        )?;
        let steps = req
            .num_inference_steps
            .map(|s| s as usize)
            .unwrap_or(pipeline.global_num_inference_steps);
        if steps == 0 || steps > pipeline.max_steps {
            return Err(WorkerError::invalid(
                "num_inference_steps",
                format!("must be between 1 and {}, got {steps}", pipeline.max_steps),
            ));
        }
        let guidance_scale = req
            .guidance_scale
            .map(f64::from)
            .unwrap_or(pipeline.global_guidance_scale);
        if !guidance_scale.is_finite() || guidance_scale < 0.0 {
            return Err(WorkerError::invalid(
                "guidance_scale",
                format!("must be a finite number >= 0, got {guidance_scale}"),
            ));
        }
        let scheduler = self.scheduler(&req.scheduler, model)?;
        // Refused now rather than after queueing (e.g. more steps than the schedule has).
        self.engine.check_schedule(
            scheduler,
            steps,
            &model.schedule_context(req.width, req.height),
        )?;
        if let Some(len) = req.max_sequence_length {
            let limit = model.max_sequence_length;
            // Models without T5 ignore it (their prompt window is fixed).
            if limit > 0 && (len == 0 || len > limit) {
                return Err(WorkerError::invalid(
                    "max_sequence_length",
                    format!("must be between 1 and {limit}, got {len}"),
                ));
            }
        }
        let loras = crate::lora::validate_settings(
            std::mem::take(&mut req.loras)
                .into_iter()
                .map(|l| (l.name, l.weight)),
            &self.lora_names(),
        )?;
        let output_format = OutputFormat::try_from(req.output_format)
            .map_err(|_| WorkerError::invalid("output_format", "unknown output format"))?;
        if let Some(c) = req.output_compression.filter(|c| *c > 100) {
            return Err(WorkerError::invalid(
                "output_compression",
                format!("must be between 0 and 100, got {c}"),
            ));
        }
        let partial_images = req.partial_images as usize;
        if partial_images > MAX_PARTIAL_IMAGES {
            return Err(WorkerError::invalid(
                "partial_images",
                format!("must be between 0 and {MAX_PARTIAL_IMAGES}, got {partial_images}"),
            ));
        }
        let uploads = if redux {
            self.redux_upload(&mut req)?
        } else {
            self.uploads(task, &mut req, steps, model)?
        };
        Ok(Validated {
            describe,
            uploads,
            spec: JobSpec {
                request_id: req.request_id,
                generation: TextToImage {
                    prompt: req.prompt,
                    negative_prompt: req.negative_prompt,
                    n: req.n as usize,
                    width: req.width as usize,
                    height: req.height as usize,
                    // A random seed stays within 32 bits: torch only uses those, and JSON clients
                    // that parse numbers as doubles get it back exactly.
                    seed: req.seed.unwrap_or_else(|| u64::from(rand::random::<u32>())),
                    steps,
                    guidance_scale,
                    scheduler,
                    max_sequence_length: req.max_sequence_length.map(|l| l as usize),
                    loras,
                },
                task: JobTask::TextToImage,
                output_format,
                output_compression: req.output_compression,
                partial_images,
            },
        })
    }

    /// Checks the images, mask and strength a task needs (and that others bring none).
    fn uploads(
        &self,
        task: Task,
        req: &mut GenerateRequest,
        steps: usize,
        model: &ModelDescription,
    ) -> Result<Uploads> {
        if task == Task::TextToImage {
            if !req.images.is_empty() {
                return Err(WorkerError::invalid(
                    "image",
                    "text-to-image takes no input image",
                ));
            }
            if req.mask.is_some() {
                return Err(WorkerError::invalid("mask", "text-to-image takes no mask"));
            }
            return Ok(Uploads::None);
        }
        if req.images.is_empty() {
            return Err(WorkerError::invalid(
                "image",
                "at least one image is required",
            ));
        }
        if req.images.len() > 1 {
            tracing::debug!(
                request_id = %req.request_id,
                images = req.images.len(),
                "only the first input image is used by this model family"
            );
        }
        let mask_mode = MaskMode::try_from(req.mask_mode)
            .map_err(|_| WorkerError::invalid("mask_mode", "unknown mask mode"))?;
        let default_strength = match task {
            Task::Inpaint => 1.0,
            _ => self.config.pipeline.default_strength,
        };
        let strength = req.strength.map_or(default_strength, exact_f64);
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(WorkerError::invalid(
                "strength",
                format!("must be in (0, 1], got {strength}"),
            ));
        }
        model.strength_rule.first_step(steps, strength)?;
        // The first image is the one edited; the bytes move into the job, not copied.
        let image = std::mem::take(&mut req.images).swap_remove(0);
        match (task, req.mask.take()) {
            (Task::Inpaint, Some(mask)) => Ok(Uploads::Inpaint {
                image,
                mask,
                mask_mode,
                strength,
            }),
            (Task::Inpaint, None) => Err(WorkerError::invalid("mask", "inpainting needs a mask")),
            (_, Some(_)) => Err(WorkerError::invalid(
                "mask",
                "a mask is only accepted for inpainting (task INPAINT)",
            )),
            (_, None) => Ok(Uploads::Image { image, strength }),
        }
    }

    /// A Redux variation's one image (no mask, no strength: the prior reads the whole image).
    fn redux_upload(&self, req: &mut GenerateRequest) -> Result<Uploads> {
        if req.mask.is_some() {
            return Err(WorkerError::invalid("mask", "a variation takes no mask"));
        }
        if req.images.is_empty() {
            return Err(WorkerError::invalid(
                "image",
                "at least one image is required",
            ));
        }
        let image = std::mem::take(&mut req.images).swap_remove(0);
        Ok(Uploads::Redux { image })
    }

    /// The prompt for a variation that came without one: the vision model's description of
    /// `image`, else the default prompt. Never fails: a vision problem is only a warning.
    async fn variation_prompt(&self, image: &image::RgbImage) -> String {
        let Some(settings) = VisionSettings::from_config(&self.config.pipeline.variations_config)
        else {
            return DEFAULT_VARIATION_PROMPT.to_string();
        };
        let png = match crate::encode::encode(image, OutputFormat::Png, None) {
            Ok(png) => png,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode the image for the vision model; using the default prompt");
                return DEFAULT_VARIATION_PROMPT.to_string();
            }
        };
        match describe_image(&settings, &png).await {
            Ok(prompt) if !prompt.trim().is_empty() => prompt,
            Ok(_) => {
                tracing::warn!(
                    "the vision model answered with an empty prompt; using the default prompt"
                );
                DEFAULT_VARIATION_PROMPT.to_string()
            }
            Err(e) => {
                tracing::warn!(error = %e, "the vision model failed; using the default prompt");
                DEFAULT_VARIATION_PROMPT.to_string()
            }
        }
    }

    /// Decodes the uploads off the async threads, fills in a variation's prompt and returns the
    /// job to queue.
    async fn prepare_job(&self, valid: Validated) -> Result<JobSpec> {
        let Validated {
            mut spec,
            uploads,
            describe,
        } = valid;
        let (width, height) = (spec.generation.width as u32, spec.generation.height as u32);
        let decode = move || -> Result<JobTask> {
            let max = inputs::MAX_INPUT_PIXELS;
            Ok(match uploads {
                Uploads::None => JobTask::TextToImage,
                Uploads::Image { image, strength } => JobTask::ImageToImage {
                    image: inputs::load_image(&image, width, height, max)?,
                    strength,
                },
                Uploads::Inpaint {
                    image,
                    mask,
                    mask_mode,
                    strength,
                } => JobTask::Inpaint {
                    image: inputs::load_image(&image, width, height, max)?,
                    mask: inputs::load_mask(&mask, mask_mode, width, height, max)?,
                    strength,
                },
                // The prior resizes the upload itself, from its own size.
                Uploads::Redux { image } => JobTask::Redux {
                    image: inputs::decode(&image, "image", max)?.into_rgb8(),
                },
            })
        };
        spec.task = tokio::task::spawn_blocking(decode)
            .await
            .map_err(|e| WorkerError::Internal(format!("decoding the uploads: {e}")))??;
        if describe {
            if let JobTask::ImageToImage { image, .. } = &spec.task {
                spec.generation.prompt = self.variation_prompt(image).await;
            }
        }
        Ok(spec)
    }

    /// The request's scheduler, else the config's override, else the repo's own.
    fn scheduler(&self, requested: &str, model: &ModelDescription) -> Result<SchedulerKind> {
        let name = if requested.is_empty() {
            match &self.config.pipeline.scheduler {
                Some(name) => name.as_str(),
                None => return Ok(model.default_scheduler),
            }
        } else {
            requested
        };
        SchedulerKind::from_name(name).ok_or_else(|| WorkerError::NotFound {
            param: "scheduler".into(),
            name: name.into(),
        })
    }

    fn info_response(&self, state: &EngineState, load: crate::engine::Load) -> InfoResponse {
        let config = &self.config;
        let pipeline = &config.pipeline;
        let description = match state {
            // A draining worker still describes its model; health tells the gateway to go elsewhere.
            EngineState::Ready(d) | EngineState::Draining(d) => Some(d.clone()),
            EngineState::Loading | EngineState::Failed(_) => None,
        };
        let inpainting_model = description.as_ref().is_some_and(|d| d.inpainting_model);
        let mut tasks = Vec::new();
        let mut endpoints = Vec::new();
        if pipeline.generations_config.enabled {
            endpoints.push(Endpoint::Generations as i32);
            if !inpainting_model {
                tasks.push(Task::TextToImage as i32);
            }
        }
        if pipeline.edits_config.enabled {
            endpoints.push(Endpoint::Edits as i32);
            tasks.extend([Task::ImageToImage as i32, Task::Inpaint as i32]);
        }
        if pipeline.variations_config.enabled {
            endpoints.push(Endpoint::Variations as i32);
            if !tasks.contains(&(Task::ImageToImage as i32)) {
                tasks.push(Task::ImageToImage as i32);
            }
            if description.as_ref().is_some_and(|d| d.redux) {
                tasks.push(Task::Redux as i32);
            }
        }
        let default_scheduler = pipeline
            .scheduler
            .clone()
            .or_else(|| {
                description
                    .as_ref()
                    .map(|d| d.default_scheduler.name().to_string())
            })
            .unwrap_or_default();
        InfoResponse {
            model_id: config.name.clone(),
            source: pipeline.hf_model_id.clone(),
            family: description
                .as_ref()
                .map_or(ModelFamily::Unspecified, |d| d.family) as i32,
            tasks,
            max_n: pipeline.max_n as u32,
            presets: config
                .generation_presets
                .iter()
                .map(|(name, p)| Preset {
                    name: name.clone(),
                    guidance_scale: p.guidance_scale as f32,
                    num_inference_steps: p.num_inference_steps as u32,
                })
                .collect(),
            // Every configured adapter is loaded before the worker serves (or start-up fails).
            loras: self.lora_names(),
            // `size: auto` takes these: the config's default size wins over the model's own.
            native_width: description
                .as_ref()
                .map_or(0, |d| pipeline.default_size.map_or(d.native_width, |s| s.0)),
            native_height: description.as_ref().map_or(0, |d| {
                pipeline.default_size.map_or(d.native_height, |s| s.1)
            }),
            limits: Some(Limits {
                max_pixels: pipeline.max_pixels,
                size_multiple: description.as_ref().map_or(8, |d| d.size_multiple),
                max_steps: pipeline.max_steps as u32,
                max_queue: pipeline.max_queue as u32,
                max_batch: pipeline.max_batch as u32,
                max_prompt_tokens: description.as_ref().map_or(0, |d| d.max_prompt_tokens),
                max_sequence_length: description.as_ref().map_or(0, |d| d.max_sequence_length),
            }),
            load: Some(fastfusion_proto::Load {
                queued: load.queued,
                running: load.running,
            }),
            defaults: Some(Defaults {
                guidance_scale: pipeline.global_guidance_scale as f32,
                num_inference_steps: pipeline.global_num_inference_steps as u32,
                scheduler: default_scheduler,
                strength: pipeline.default_strength as f32,
            }),
            // Only the schedulers of the model's kind (discrete-time or flow matching).
            schedulers: SchedulerKind::ALL
                .iter()
                .filter(|k| {
                    description.as_ref().is_none_or(|d| {
                        k.is_flow_matching() == d.default_scheduler.is_flow_matching()
                    })
                })
                .map(|k| k.name().to_string())
                .collect(),
            endpoints,
            loaded: description.is_some(),
            load_error: match state {
                EngineState::Failed(why) => why.clone(),
                _ => String::new(),
            },
        }
    }
}

/// A request whose fields are checked; the uploads are still bytes.
struct Validated {
    /// Complete but for `task`, which [`WorkerService::prepare_job`] fills in from `uploads`.
    spec: JobSpec,
    uploads: Uploads,
    /// A variation without a prompt: the prompt comes from the image.
    describe: bool,
}

/// The uploads a task needs, as received.
enum Uploads {
    None,
    Image {
        image: Vec<u8>,
        strength: f64,
    },
    Inpaint {
        image: Vec<u8>,
        mask: Vec<u8>,
        mask_mode: MaskMode,
        strength: f64,
    },
    Redux {
        image: Vec<u8>,
    },
}

/// The float64 a client meant by a float32 field: its shortest decimal form (0.7f32 is
/// 0.699999988 as a float64, and `int(10 × that)` would run 6 steps where diffusers runs 7).
fn exact_f64(value: f32) -> f64 {
    value.to_string().parse().unwrap_or(f64::from(value))
}

/// Width and height: positive, multiples of the model's multiple, within the pixel budget.
fn check_size(width: u32, height: u32, multiple: u32, max_pixels: u64) -> Result<()> {
    let multiple = multiple.max(1);
    if width == 0
        || height == 0
        || !width.is_multiple_of(multiple)
        || !height.is_multiple_of(multiple)
    {
        return Err(WorkerError::invalid(
            "size",
            format!("{width}x{height}: width and height must be positive multiples of {multiple}"),
        ));
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(WorkerError::invalid(
            "size",
            format!("{width}x{height} is over this model's limit of {max_pixels} pixels"),
        ));
    }
    Ok(())
}

type EventStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        let load = self.engine.load().await;
        Ok(Response::new(
            self.info_response(&self.engine.state(), load),
        ))
    }

    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The job's span, a child of the gateway's request span when the call carries its W3C
        // trace context (exported spans only; otherwise just log context).
        let span = tracing::info_span!("generate", request_id = %request.get_ref().request_id);
        fastfusion_telemetry::set_parent(
            &span,
            fastfusion_telemetry::context_from_metadata(request.metadata()),
        );
        let events = self
            .admit(request.into_inner())
            .instrument(span.clone())
            .await
            .map_err(|e| {
                crate::metrics::request_rejected(e.kind());
                Status::from(e)
            })?;
        // The stream holds the span, so it closes (and is exported) when the job's last event
        // has gone out or the caller hung up: it covers the whole job, queueing included.
        let events: EventStream = Box::pin(events.map(move |event| {
            let _job = &span;
            event
        }));
        Ok(Response::new(events))
    }
}

impl WorkerService {
    /// Validates, prepares and queues a request; every error here is a rejection (counted by
    /// kind in `fastfusion_worker_rejections_total`).
    async fn admit(&self, request: GenerateRequest) -> Result<EventStream> {
        let model = match self.engine.state() {
            EngineState::Ready(d) => d,
            EngineState::Loading => {
                return Err(WorkerError::Unavailable(
                    "the model is still loading".into(),
                ))
            }
            // UNAVAILABLE sends the gateway to another worker.
            EngineState::Draining(_) => {
                return Err(WorkerError::Unavailable(
                    "the worker is draining for shutdown".into(),
                ))
            }
            EngineState::Failed(msg) => return Err(WorkerError::Unavailable(msg)),
        };
        let valid = self.validate(request, &model)?;
        let spec = self.prepare_job(valid).await?;
        let seed = spec.generation.seed;
        let format = spec.output_format;
        let (steps, guidance, scheduler) = (
            spec.generation.steps as u32,
            spec.generation.guidance_scale as f32,
            spec.generation.scheduler.name().to_string(),
        );
        let events = self.engine.submit(spec).await?;
        let stream = UnboundedReceiverStream::new(events).map(move |event| {
            let event = match event {
                JobEvent::Queued { position } => generate_event::Event::Queued(Queued { position }),
                JobEvent::Started { batch_size } => generate_event::Event::Started(Started {
                    seed,
                    batch_size,
                    num_inference_steps: steps,
                    guidance_scale: guidance,
                    scheduler: scheduler.clone(),
                }),
                JobEvent::Progress { step, total } => {
                    generate_event::Event::Progress(Progress { step, total })
                }
                JobEvent::PartialImage {
                    index,
                    partial_index,
                    data,
                    width,
                    height,
                } => generate_event::Event::PartialImage(Image {
                    index,
                    data,
                    format: format as i32,
                    width,
                    height,
                    seed,
                    partial_index,
                }),
                JobEvent::Image {
                    index,
                    data,
                    width,
                    height,
                } => generate_event::Event::Image(Image {
                    index,
                    data,
                    format: format as i32,
                    width,
                    height,
                    seed,
                    partial_index: 0,
                }),
                JobEvent::Done(timings) => generate_event::Event::Done(Done {
                    timings: Some(timings),
                }),
                JobEvent::Failed(e) => return Err(Status::from(e)),
            };
            Ok(GenerateEvent { event: Some(event) })
        });
        Ok(Box::pin(stream))
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Status {
        let mut status = match &e {
            WorkerError::InvalidArgument { param, .. } => {
                with_param(Status::invalid_argument(e.to_string()), param)
            }
            WorkerError::NotFound { param, .. } => {
                with_param(Status::not_found(e.to_string()), param)
            }
            WorkerError::TaskDisabled(_) => Status::failed_precondition(e.to_string()),
            WorkerError::QueueFull(_) => Status::resource_exhausted(e.to_string()),
            WorkerError::Unavailable(_) => Status::unavailable(e.to_string()),
            WorkerError::Cancelled => Status::cancelled(e.to_string()),
            // Internal detail stays in the worker's log; the caller gets the kind only.
            WorkerError::Config { .. }
            | WorkerError::ModelLoad { .. }
            | WorkerError::Tensor(_)
            | WorkerError::Internal(_) => {
                tracing::error!(error = %e, kind = e.kind(), "request failed");
                Status::internal(format!("worker error ({})", e.kind()))
            }
        };
        if let Ok(kind) = e.kind().parse() {
            status.metadata_mut().insert("ff-kind", kind);
        }
        status
    }
}

fn with_param(mut status: Status, param: &str) -> Status {
    if let Ok(value) = param.parse() {
        status.metadata_mut().insert(PARAM_METADATA_KEY, value);
    }
    status
}

/// Keeps `grpc.health.v1` in step with the engine: NOT_SERVING until the model is loaded and
/// again from the moment a drain begins.
async fn report_health(engine: Engine, reporter: tonic_health::server::HealthReporter) {
    let mut state = engine.watch_state();
    loop {
        let status = match &*state.borrow_and_update() {
            EngineState::Ready(_) => ServingStatus::Serving,
            EngineState::Loading | EngineState::Draining(_) | EngineState::Failed(_) => {
                ServingStatus::NotServing
            }
        };
        reporter.set_service_status("", status).await;
        reporter
            .set_service_status("fastfusion.worker.v1.Worker", status)
            .await;
        if state.changed().await.is_err() {
            return;
        }
    }
}

/// Serves the worker and health services on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    service: WorkerService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    tokio::spawn(report_health(service.engine.clone(), reporter));
    let worker = WorkerServer::new(service)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(worker)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await
        .map_err(|e| WorkerError::Internal(format!("gRPC server: {e}")))
}

/// The accepted connections, with Nagle's algorithm off: an image leaves in several HTTP/2 frames,
/// and Nagle holding the last one back for the client's delayed ACK adds ~40 ms to a response.
/// (tonic's own `tcp_nodelay` applies only to listeners it binds itself.)
pub fn incoming(
    listener: TcpListener,
) -> impl Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    TcpListenerStream::new(listener).map(|accepted| {
        let stream = accepted?;
        stream.set_nodelay(true)?;
        Ok(stream)
    })
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and its real address.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| WorkerError::Internal(format!("cannot listen on {addr}: {e}")))?;
    let local = listener
        .local_addr()
        .map_err(|e| WorkerError::Internal(format!("listener address: {e}")))?;
    Ok((listener, local))
}
