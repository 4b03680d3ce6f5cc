//! `fastfusion-worker bench --mode throughput`: images per minute against one worker, by
//! client concurrency, with batching off and on.
//!
//! For each `pipeline.max_batch` value the bench starts the real engine in-process (the same
//! [`startup::start_engine`] that `serve` uses, with the config's `batch_window_ms`), waits for
//! the model, runs one warm-up job, and then for each concurrency level `c` lets `c` clients
//! submit `requests` text-to-image jobs in all, each client sending its next job as soon as its
//! previous one is done (PNG-encoded, as the service would stream it). The figure is images
//! finished per minute of wall time; the mean batch size (from each job's `Started` event) shows
//! whether the engine actually batched.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fastfusion_proto::OutputFormat;

use crate::config::ModelConfig;
use crate::engine::{Engine, JobEvent, JobSpec, JobTask};
use crate::error::{Result, WorkerError};
use crate::pipelines::TextToImage;
use crate::schedulers::SchedulerKind;
use crate::startup;

/// What to measure.
#[derive(Debug, Clone)]
pub struct ThroughputSettings {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Images per request.
    pub images: usize,
    /// Requests per concurrency level, shared among the clients.
    pub requests: usize,
    pub concurrency: Vec<usize>,
    /// The `pipeline.max_batch` values compared (1 is batching off).
    pub max_batch: Vec<usize>,
}

/// One measurement.
#[derive(Debug, Clone, Copy)]
pub struct Cell {
    pub images: usize,
    pub elapsed: Duration,
    /// Mean of the batch sizes the jobs started in.
    pub mean_batch: f64,
}

impl Cell {
    pub fn images_per_minute(&self) -> f64 {
        self.images as f64 * 60.0 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// `cells[b][c]`: max_batch `settings.max_batch[b]` at concurrency `settings.concurrency[c]`.
#[derive(Debug, Clone)]
pub struct ThroughputReport {
    pub settings: ThroughputSettings,
    pub batch_window_ms: u64,
    pub cells: Vec<Vec<Cell>>,
}

/// Runs every max_batch × concurrency combination (see the module doc).
pub async fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &ThroughputSettings,
) -> Result<ThroughputReport> {
    let mut cells = Vec::with_capacity(settings.max_batch.len());
    for &max_batch in &settings.max_batch {
        let mut config = config.clone();
        config.pipeline.max_batch = max_batch;
        // Room for every client's job: a full queue would measure refusals, not throughput.
        let most_clients = settings.concurrency.iter().copied().max().unwrap_or(1);
        config.pipeline.max_queue = config.pipeline.max_queue.max(most_clients);
        let engine = startup::start_engine(Arc::new(config), base_dir);
        let scheduler = engine.ready().await?.default_scheduler;
        let job = Arc::new(JobMaker {
            settings: settings.clone(),
            scheduler,
        });
        // Warm-up: first-call allocations are not what we measure.
        run_job(&engine, job.spec(0)).await?;
        let mut row = Vec::with_capacity(settings.concurrency.len());
        for &clients in &settings.concurrency {
            row.push(measure(&engine, &job, clients, settings.requests).await?);
        }
        cells.push(row);
    }
    Ok(ThroughputReport {
        settings: settings.clone(),
        batch_window_ms: config.pipeline.batch_window_ms,
        cells,
    })
}

/// Makes the bench's jobs: the same prompt and size, a seed per job.
struct JobMaker {
    settings: ThroughputSettings,
    scheduler: SchedulerKind,
}

impl JobMaker {
    fn spec(&self, seed: u64) -> JobSpec {
        let s = &self.settings;
        JobSpec {
            request_id: format!("bench-{seed}"),
            generation: TextToImage {
                prompt: super::PROMPT.into(),
                negative_prompt: None,
                n: s.images,
                width: s.width,
                height: s.height,
                seed,
                steps: s.steps,
                guidance_scale: s.guidance_scale,
                scheduler: self.scheduler,
                max_sequence_length: None,
                loras: Vec::new(),
            },
            task: JobTask::TextToImage,
            output_format: OutputFormat::Png,
            output_compression: None,
            partial_images: 0,
        }
    }
}

/// `clients` clients share `requests` jobs; returns when all are done.
async fn measure(
    engine: &Engine,
    job: &Arc<JobMaker>,
    clients: usize,
    requests: usize,
) -> Result<Cell> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let (engine, job, next) = (engine.clone(), job.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut batch_sizes = Vec::new();
            loop {
                let ticket = next.fetch_add(1, Ordering::Relaxed);
                if ticket >= requests {
                    return Ok::<_, WorkerError>(batch_sizes);
                }
                batch_sizes.push(run_job(&engine, job.spec(ticket as u64 + 1)).await?);
            }
        }));
    }
    let mut batch_sizes = Vec::with_capacity(requests);
    for task in tasks {
        let sizes = task
            .await
            .map_err(|e| WorkerError::Internal(format!("bench client: {e}")))??;
        batch_sizes.extend(sizes);
    }
    let elapsed = started.elapsed();
    let mean_batch = batch_sizes.iter().sum::<u32>() as f64 / batch_sizes.len().max(1) as f64;
    Ok(Cell {
        images: requests * job.settings.images,
        elapsed,
        mean_batch,
    })
}

/// Submits one job and waits for it; returns the size of the batch it ran in.
async fn run_job(engine: &Engine, spec: JobSpec) -> Result<u32> {
    let mut events = engine.submit(spec).await?;
    let mut batch_size = 0;
    while let Some(event) = events.recv().await {
        match event {
            JobEvent::Started { batch_size: size } => batch_size = size,
            JobEvent::Done(_) => return Ok(batch_size),
            JobEvent::Failed(e) => return Err(e),
            JobEvent::Queued { .. }
            | JobEvent::Progress { .. }
            | JobEvent::PartialImage { .. }
            | JobEvent::Image { .. } => {}
        }
    }
    Err(WorkerError::Internal(
        "the job's events ended without Done".into(),
    ))
}

impl fmt::Display for ThroughputReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "throughput · {}x{} · {} steps · guidance {} · {} image(s) per request · \
             {} requests per cell · batch_window_ms {}",
            s.width,
            s.height,
            s.steps,
            s.guidance_scale,
            s.images,
            s.requests,
            self.batch_window_ms
        )?;
        write!(f, "{:<12}", "concurrency")?;
        for max_batch in &s.max_batch {
            let head = format!("max_batch {max_batch}");
            write!(f, " {head:>16} {:>10}", "mean batch")?;
        }
        writeln!(f)?;
        for (c, clients) in s.concurrency.iter().enumerate() {
            write!(f, "{clients:<12}")?;
            for row in &self.cells {
                if let Some(cell) = row.get(c) {
                    let rate = format!("{:.1} img/min", cell.images_per_minute());
                    write!(f, " {rate:>16} {:>10.2}", cell.mean_batch)?;
                }
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
