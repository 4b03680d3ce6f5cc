//! `fastfusion-worker`: serve one model over gRPC, or use it from the command line.
//!
//! * `serve`    — the worker a gateway talks to (`--config model_config.json --listen 0.0.0.0:50051`);
//!   SIGTERM or ctrl-c drains it (see [`serve`]), `--metrics-listen` serves Prometheus metrics
//! * `generate` — one request, straight to a PNG file, no server
//! * `bench`    — seconds per text encode, denoising step and VAE decode; `--mode memory`: peak
//!   memory per memory option; `--mode throughput`: images/minute by concurrency, batching off/on;
//!   `--mode lora`: the cost of per-request LoRA sets

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use fastfusion_worker::config::ModelConfig;
use fastfusion_worker::error::{Result, WorkerError};
use fastfusion_worker::{bench, metrics, service, startup};

#[derive(Parser, Debug)]
#[command(name = "fastfusion-worker", version, about = "FastFusion model worker")]
struct Cli {
    /// Log level (error, warn, info, debug, trace); the seed's WARNING/CRITICAL spellings work too.
    #[arg(
        long,
        env = "FASTFUSION_LOGLEVEL",
        default_value = "info",
        global = true
    )]
    log_level: String,
    /// Log lines as `text` or `json` (one object per line). Spans go to OTLP when
    /// OTEL_EXPORTER_OTLP_ENDPOINT is set.
    #[arg(
        long,
        env = "FASTFUSION_LOGFORMAT",
        default_value = "text",
        global = true
    )]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the model in CONFIG over gRPC (Worker + grpc.health.v1).
    Serve {
        #[arg(long, env = "CONFIG_PATH", default_value = "model_config.json")]
        config: PathBuf,
        /// Address to listen on; port 0 picks a free one (the log says which).
        #[arg(
            long,
            env = "FASTFUSION_WORKER_LISTEN",
            default_value = "0.0.0.0:50051"
        )]
        listen: SocketAddr,
        /// Seconds accepted jobs get to finish after SIGTERM / ctrl-c before they are cancelled.
        #[arg(long, env = "FASTFUSION_DRAIN_GRACE_SECS", default_value_t = 30)]
        drain_grace_secs: u64,
        /// When the model fails to load: seconds the worker keeps answering Info and health
        /// (with the reason) so that gateways learn why, before it exits non-zero.
        #[arg(long, env = "FASTFUSION_FAILED_LOAD_LINGER_SECS", default_value_t = 5)]
        failed_load_linger_secs: u64,
        /// Serve Prometheus metrics on this address (any path); off when unset. Port 0 picks a
        /// free one (the log says which).
        #[arg(long, env = "FASTFUSION_WORKER_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Generate images from a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Time the pipeline's stages, measure peak memory per memory option, or throughput.
    Bench(BenchArgs),
}

/// Which model: a model_config.json, or a model directory / Hub repo id with defaults.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct ModelSource {
    /// A diffusers model directory or Hugging Face Hub repo id.
    #[arg(long)]
    model: Option<String>,
    /// A model_config.json (the seed's schema).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    #[command(flatten)]
    source: ModelSource,
    #[arg(long)]
    prompt: String,
    /// Absent: SD uses "", SDXL zero embeddings.
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Seed for torch's CPU generator; random when absent (printed).
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    guidance: Option<f64>,
    /// WIDTHxHEIGHT; the model's native size when absent.
    #[arg(long)]
    size: Option<String>,
    /// euler, euler_ancestral, ddim, pndm, dpmpp_2m, dpmpp_2m_karras; the model's own when absent.
    #[arg(long)]
    scheduler: Option<String>,
    /// Images to make; FILE-1.png, FILE-2.png... when more than one.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// The picture's file; its extension (.png, .jpg, .webp) picks the format.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    source: ModelSource,
    #[arg(long, default_value = "512x512")]
    size: String,
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Guidance > 1 runs classifier-free guidance (a batch of 2 per image), as real requests do.
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Timed repetitions of each stage (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, value_enum, default_value_t = BenchMode::Stages)]
    mode: BenchMode,
    /// Images per request (memory, throughput).
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Memory: option sets to compare, comma-separated (baseline, vae_tiling, vae_slicing,
    /// cpu_offload, "cpu_offload+vae_tiling", "init f16 / run f32", "init f32 / run f16",
    /// "init f16 / run f16"); all when absent.
    #[arg(long, value_delimiter = ',')]
    options: Vec<String>,
    /// Throughput: requests per concurrency level, shared among the clients.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Throughput: numbers of concurrent clients.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Throughput: `pipeline.max_batch` values to compare (1 is batching off).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    max_batch: Vec<usize>,
    /// LoRA: rank of the random adapters.
    #[arg(long, default_value_t = 16)]
    lora_rank: usize,
    /// LoRA: how many random adapters to load (at least 2).
    #[arg(long, default_value_t = 2)]
    lora_count: usize,
    /// Internal to `--mode memory`: measure this one option set in this process and report.
    #[arg(long, hide = true)]
    memory_child: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchMode {
    /// Seconds per text encode, denoising step and VAE decode.
    Stages,
    /// Peak resident memory and time per memory option set, one child process each.
    Memory,
    /// Images per minute at each concurrency, for each max_batch.
    Throughput,
    /// One FLUX double and single block (weights in --model DIR) at --size.
    FluxBlocks,
    /// One UNet pass with guidance (batch 2; a UNet folder in --model DIR) at --size.
    Unet,
    /// Request and step time with random rank --lora-rank adapters vs without, and switching.
    Lora,
    /// One VAE decode (batch 1) of random latents at --size (the VAE in --model DIR/vae).
    Vae,
    /// Single ops at real models' shapes, ours vs candle's (no model is loaded).
    Ops,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Kept until exit: dropping it flushes the spans still batched for OTLP.
    let _telemetry = match init_tracing(&cli.log_level, &cli.log_format) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match cli.command {
        Command::Serve {
            config,
            listen,
            drain_grace_secs,
            failed_load_linger_secs,
            metrics_listen,
        } => serve(
            &config,
            listen,
            Duration::from_secs(drain_grace_secs),
            Duration::from_secs(failed_load_linger_secs),
            metrics_listen,
        ),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => run_bench(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Logging (the seed's level names, WARNING and CRITICAL, work too) and OTLP tracing.
fn init_tracing(level: &str, format: &str) -> Result<fastfusion_telemetry::Telemetry> {
    let level = fastfusion_telemetry::parse_level(level).ok_or_else(|| {
        WorkerError::invalid(
            "FASTFUSION_LOGLEVEL (--log-level)",
            format!("must be one of trace, debug, info, warning, error, got '{level}'"),
        )
    })?;
    let format = fastfusion_telemetry::LogFormat::parse(format).ok_or_else(|| {
        WorkerError::invalid(
            "FASTFUSION_LOGFORMAT (--log-format)",
            format!("must be text or json, got '{format}'"),
        )
    })?;
    fastfusion_telemetry::init(&fastfusion_telemetry::TelemetrySettings {
        service_name: "fastfusion-worker",
        level,
        format,
        stderr: true,
    })
    .map_err(|e| WorkerError::Internal(e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Internal(format!("tokio runtime: {e}")))
}

/// Serves until SIGTERM / ctrl-c, then drains: health goes NOT_SERVING and new Generate calls
/// get UNAVAILABLE at once, accepted jobs have `drain_grace` to finish, the rest is cancelled
/// (their callers get UNAVAILABLE), and the server stops once their streams are flushed.
fn serve(
    config_path: &Path,
    listen: SocketAddr,
    drain_grace: Duration,
    failed_load_linger: Duration,
    metrics_listen: Option<SocketAddr>,
) -> Result<()> {
    runtime()?.block_on(async {
        let config = Arc::new(startup::read_config(config_path)?);
        if let Some(addr) = metrics_listen {
            let (bound, exporter) = metrics::install(addr).await?;
            // Not "listening on": the end-to-end tests look for that marker for the gRPC port.
            tracing::info!("metrics at http://{bound}/metrics");
            tokio::spawn(exporter);
        }
        let engine = startup::start_engine(config.clone(), config_path.parent());
        let (listener, addr) = service::bind(listen).await?;
        // The end-to-end tests read this line to find the port.
        tracing::info!("listening on {addr}");
        let draining = engine.clone();
        let failed = Arc::new(std::sync::OnceLock::new());
        let failure = failed.clone();
        let shutdown = async move {
            tokio::select! {
                () = shutdown_signal() => {
                    draining.drain(drain_grace).await;
                }
                reason = draining.load_failure() => {
                    // Kubernetes shows the restart loop; the log and the exit status say why.
                    tracing::error!(
                        linger_secs = failed_load_linger.as_secs(),
                        "{reason}; exiting after answering Info for a while"
                    );
                    tokio::time::sleep(failed_load_linger).await;
                    let _ = failure.set(reason);
                }
            }
        };
        service::serve(
            listener,
            service::WorkerService::new(engine, config),
            shutdown,
        )
        .await?;
        if let Some(reason) = failed.get() {
            return Err(WorkerError::Unavailable(reason.clone()));
        }
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = terminate => {} }
    tracing::info!("shutdown requested");
}

/// The config and the directory its relative paths are resolved against.
fn load_source(source: &ModelSource) -> Result<(ModelConfig, Option<PathBuf>)> {
    match (&source.config, &source.model) {
        (Some(path), _) => Ok((
            startup::read_config(path)?,
            path.parent().map(Path::to_path_buf),
        )),
        (None, Some(model)) => Ok((ModelConfig::for_model(model), None)),
        (None, None) => Err(WorkerError::invalid("model", "give --model or --config")),
    }
}

fn parse_size(size: &str) -> Result<(usize, usize)> {
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    parsed.ok_or_else(|| WorkerError::invalid("size", format!("'{size}' is not WIDTHxHEIGHT")))
}

fn generate(args: GenerateArgs) -> Result<()> {
    // Checked before the model loads: the format comes from the file name.
    if image::ImageFormat::from_path(&args.out).is_err() {
        return Err(WorkerError::invalid(
            "out",
            format!(
                "'{}' has no image extension (.png, .jpg or .webp)",
                args.out.display()
            ),
        ));
    }
    let (config, base_dir) = load_source(&args.source)?;
    let backend = startup::load_backend(&config, base_dir.as_deref())?;
    let model = backend.description();
    let (width, height) = match &args.size {
        Some(size) => parse_size(size)?,
        None => (model.native_width as usize, model.native_height as usize),
    };
    let scheduler =
        match args
            .scheduler
            .as_deref()
            .or(config.pipeline.scheduler.as_deref())
        {
            Some(name) => fastfusion_worker::schedulers::SchedulerKind::from_name(name)
                .ok_or_else(|| WorkerError::NotFound {
                    param: "scheduler".into(),
                    name: name.into(),
                })?,
            None => model.default_scheduler,
        };
    let request = fastfusion_worker::pipelines::TextToImage {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        n: args.n.max(1),
        width,
        height,
        seed: args
            .seed
            .unwrap_or_else(|| u64::from(rand::random::<u32>())),
        steps: args
            .steps
            .unwrap_or(config.pipeline.global_num_inference_steps),
        guidance_scale: args
            .guidance
            .unwrap_or(config.pipeline.global_guidance_scale),
        scheduler,
        max_sequence_length: None,
        loras: Vec::new(),
    };
    let started = Instant::now();
    let images = backend.text_to_image(&request, &mut fastfusion_worker::pipelines::NoProgress)?;
    eprintln!(
        "seed {} · {} steps · {} · {:.2}s",
        request.seed,
        request.steps,
        scheduler.name(),
        started.elapsed().as_secs_f64()
    );
    for (i, image) in images.iter().enumerate() {
        let path = if images.len() == 1 {
            args.out.clone()
        } else {
            numbered(&args.out, i + 1)
        };
        image
            .save(&path)
            .map_err(|e| WorkerError::Internal(format!("writing {}: {e}", path.display())))?;
        println!("{}", path.display());
    }
    Ok(())
}

/// `out.png` → `out-2.png`.
fn numbered(path: &Path, i: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|s| s.to_string_lossy())
        .unwrap_or_else(|| "png".into());
    path.with_file_name(format!("{stem}-{i}.{ext}"))
}

fn run_bench(args: BenchArgs) -> Result<()> {
    if args.mode == BenchMode::Ops {
        println!("{}", bench::ops::run(args.repeat)?);
        return Ok(());
    }
    let (config, base_dir) = load_source(&args.source)?;
    let (width, height) = parse_size(&args.size)?;
    let at_least_one = |flag: &str, values: &[usize]| {
        if values.is_empty() || values.contains(&0) {
            return Err(WorkerError::invalid(flag, "give numbers of at least 1"));
        }
        Ok(())
    };
    at_least_one("n", &[args.n])?;
    let settings = bench::BenchSettings {
        width,
        height,
        steps: args.steps,
        guidance_scale: args.guidance,
        repeat: args.repeat.max(1),
        images: args.n,
    };
    if let Some(name) = &args.memory_child {
        let case = memory_case(name)?;
        let report = bench::memory::run_child(case, &config, base_dir.as_deref(), &settings)?;
        println!("{}", report.line());
        return Ok(());
    }
    match args.mode {
        BenchMode::Stages => {
            println!("{}", bench::run(&config, base_dir.as_deref(), &settings)?);
        }
        BenchMode::FluxBlocks => {
            let report = bench::flux_blocks::run(&config, base_dir.as_deref(), &settings)?;
            println!("{report}");
        }
        BenchMode::Unet => {
            let report = bench::unet::run(&config, base_dir.as_deref(), &settings)?;
            println!("{report}");
        }
        BenchMode::Lora => {
            let report = bench::lora::run(
                &config,
                base_dir.as_deref(),
                &settings,
                args.lora_count,
                args.lora_rank,
            )?;
            println!("{report}");
        }
        BenchMode::Vae => {
            let report = bench::vae::run(&config, base_dir.as_deref(), &settings)?;
            println!("{report}");
        }
        // Answered before a model is resolved.
        BenchMode::Ops => {}
        BenchMode::Memory => {
            let cases = if args.options.is_empty() {
                bench::memory::MemoryCase::ALL.to_vec()
            } else {
                args.options
                    .iter()
                    .map(|name| memory_case(name.trim()))
                    .collect::<Result<_>>()?
            };
            let exe = std::env::current_exe()
                .map_err(|e| WorkerError::Internal(format!("cannot find this program: {e}")))?;
            let report = bench::memory::run(&settings, &cases, |case| {
                let mut child = std::process::Command::new(&exe);
                child.args(["--log-level", "error", "bench"]);
                match (&args.source.config, &args.source.model) {
                    (Some(path), _) => child.arg("--config").arg(path),
                    (None, model) => child.arg("--model").args(model),
                };
                child
                    .args(["--size", &args.size])
                    .args(["--steps", &args.steps.to_string()])
                    .args(["--guidance", &args.guidance.to_string()])
                    .args(["--n", &args.n.to_string()])
                    .args(["--memory-child", case.name()]);
                child
            })?;
            println!("{report}");
        }
        BenchMode::Throughput => {
            at_least_one("concurrency", &args.concurrency)?;
            at_least_one("max-batch", &args.max_batch)?;
            at_least_one("requests", &[args.requests])?;
            let throughput = bench::throughput::ThroughputSettings {
                width,
                height,
                steps: args.steps,
                guidance_scale: args.guidance,
                images: args.n,
                requests: args.requests,
                concurrency: args.concurrency.clone(),
                max_batch: args.max_batch.clone(),
            };
            let report = runtime()?.block_on(bench::throughput::run(
                &config,
                base_dir.as_deref(),
                &throughput,
            ))?;
            println!("{report}");
        }
    }
    Ok(())
}

fn memory_case(name: &str) -> Result<bench::memory::MemoryCase> {
    bench::memory::MemoryCase::from_name(name).ok_or_else(|| WorkerError::NotFound {
        param: "options".into(),
        name: name.into(),
    })
}
