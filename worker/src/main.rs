//! `fastfusion-worker`: serve one model over gRPC, or use it from the command line.
//!
//! * `serve`    — the worker a gateway talks to (`--config model_config.json --listen 0.0.0.0:50051`);
//!   SIGTERM or ctrl-c drains it (see [`serve`]), `--metrics-listen` serves Prometheus metrics
//! * `generate` — one request, straight to a PNG file, no server
//! * `bench`    — seconds per text encode, denoising step and VAE decode

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
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
        /// Serve Prometheus metrics on this address (any path); off when unset. Port 0 picks a
        /// free one (the log says which).
        #[arg(long, env = "FASTFUSION_WORKER_METRICS_LISTEN")]
        metrics_listen: Option<SocketAddr>,
    },
    /// Generate images from a prompt and write them as PNG files.
    Generate(GenerateArgs),
    /// Time the pipeline's stages on random inputs.
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
    #[arg(long, default_value = "")]
    negative_prompt: String,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log_level);
    let outcome = match cli.command {
        Command::Serve {
            config,
            listen,
            drain_grace_secs,
            metrics_listen,
        } => serve(
            &config,
            listen,
            Duration::from_secs(drain_grace_secs),
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

/// Maps the seed's level names (WARNING, CRITICAL) onto tracing's.
fn init_tracing(level: &str) {
    let level = match level.to_ascii_lowercase().as_str() {
        "warning" => "warn".to_string(),
        "critical" | "fatal" => "error".to_string(),
        other => other.to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
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
        let shutdown = async move {
            shutdown_signal().await;
            draining.drain(drain_grace).await;
        };
        service::serve(
            listener,
            service::WorkerService::new(engine, config),
            shutdown,
        )
        .await?;
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
    let request = fastfusion_worker::pipelines::stable_diffusion::TextToImage {
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
    };
    let started = Instant::now();
    let images = backend.text_to_image(
        &request,
        &mut fastfusion_worker::pipelines::stable_diffusion::NoProgress,
    )?;
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
    let (config, base_dir) = load_source(&args.source)?;
    let (width, height) = parse_size(&args.size)?;
    let report = bench::run(
        &config,
        base_dir.as_deref(),
        &bench::BenchSettings {
            width,
            height,
            steps: args.steps,
            guidance_scale: args.guidance,
            repeat: args.repeat.max(1),
        },
    )?;
    println!("{report}");
    Ok(())
}
