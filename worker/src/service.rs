//! The gRPC face of the worker: `fastfusion.worker.v1.Worker` and `grpc.health.v1.Health`.
//!
//! Turns a `GenerateRequest` into a validated [`JobSpec`] (every default resolved here, so the
//! pipeline only sees complete values), hands it to the [`Engine`] and maps the job's events to the
//! response stream. [`WorkerError`] becomes a `tonic::Status` in exactly one place
//! (`impl From<WorkerError> for Status`), with the offending parameter in the `ff-param` metadata.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use fastfusion_proto::worker_server::{Worker, WorkerServer};
use fastfusion_proto::{
    generate_event, Defaults, Done, Endpoint, GenerateEvent, GenerateRequest, Image, InfoRequest,
    InfoResponse, Limits, ModelFamily, OutputFormat, Preset, Progress, Queued, Started, Task,
    PARAM_METADATA_KEY,
};
use futures::Stream;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{TcpListenerStream, UnboundedReceiverStream};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::backend::ModelDescription;
use crate::config::ModelConfig;
use crate::engine::{Engine, EngineState, JobEvent, JobSpec};
use crate::error::{Result, WorkerError};
use crate::pipelines::stable_diffusion::TextToImage;
use crate::schedulers::SchedulerKind;

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

    /// Resolves defaults and checks every field against the config and the loaded model.
    fn validate(&self, req: GenerateRequest, model: &ModelDescription) -> Result<JobSpec> {
        let pipeline = &self.config.pipeline;
        let task =
            Task::try_from(req.task).map_err(|_| WorkerError::invalid("task", "unknown task"))?;
        match task {
            Task::TextToImage if pipeline.generations_config.enabled => {}
            Task::TextToImage => return Err(WorkerError::TaskDisabled("image generation".into())),
            Task::Unspecified => return Err(WorkerError::invalid("task", "no task given")),
            Task::ImageToImage | Task::Inpaint | Task::Redux => {
                return Err(WorkerError::TaskDisabled(format!(
                    "{} (not supported by this worker yet)",
                    task.as_str_name()
                )))
            }
        }
        if req.prompt.trim().is_empty() {
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
        if !req.loras.is_empty() {
            return Err(WorkerError::invalid(
                "lora_settings",
                "LoRA adapters are not supported by this worker yet",
            ));
        }
        let output_format = OutputFormat::try_from(req.output_format)
            .map_err(|_| WorkerError::invalid("output_format", "unknown output format"))?;
        if let Some(c) = req.output_compression.filter(|c| *c > 100) {
            return Err(WorkerError::invalid(
                "output_compression",
                format!("must be between 0 and 100, got {c}"),
            ));
        }
        Ok(JobSpec {
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
            },
            output_format,
            output_compression: req.output_compression,
        })
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
            EngineState::Ready(d) => Some(d.clone()),
            EngineState::Loading | EngineState::Failed(_) => None,
        };
        let mut tasks = Vec::new();
        let mut endpoints = Vec::new();
        if pipeline.generations_config.enabled {
            tasks.push(Task::TextToImage as i32);
            endpoints.push(Endpoint::Generations as i32);
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
            // Configured LoRAs are not applied yet, so none is offered.
            loras: Vec::new(),
            native_width: description.as_ref().map_or(0, |d| d.native_width),
            native_height: description.as_ref().map_or(0, |d| d.native_height),
            limits: Some(Limits {
                max_pixels: pipeline.max_pixels,
                size_multiple: description.as_ref().map_or(8, |d| d.size_multiple),
                max_steps: pipeline.max_steps as u32,
                max_queue: pipeline.max_queue as u32,
                max_batch: 1,
                max_prompt_tokens: description.as_ref().map_or(0, |d| d.max_prompt_tokens),
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
            schedulers: SchedulerKind::ALL
                .iter()
                .map(|k| k.name().to_string())
                .collect(),
            endpoints,
            loaded: description.is_some(),
        }
    }
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
        let model = match self.engine.state() {
            EngineState::Ready(d) => d,
            EngineState::Loading => {
                return Err(WorkerError::Unavailable("the model is still loading".into()).into())
            }
            EngineState::Failed(msg) => return Err(WorkerError::Unavailable(msg).into()),
        };
        let spec = self.validate(request.into_inner(), &model)?;
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
        Ok(Response::new(Box::pin(stream)))
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

/// Keeps `grpc.health.v1` in step with the engine: NOT_SERVING until the model is loaded.
async fn report_health(engine: Engine, reporter: tonic_health::server::HealthReporter) {
    let mut state = engine.watch_state();
    loop {
        let status = match &*state.borrow_and_update() {
            EngineState::Ready(_) => ServingStatus::Serving,
            EngineState::Loading | EngineState::Failed(_) => ServingStatus::NotServing,
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
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| WorkerError::Internal(format!("gRPC server: {e}")))
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
