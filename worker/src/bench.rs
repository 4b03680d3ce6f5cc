//! `fastfusion-worker bench`: figures for the issue notes, each printed as a small table.
//!
//! * `--mode stages` (this file): where a request's time goes. Times the text encoder, one
//!   denoising step (steady state: the mean interval between step callbacks after the first)
//!   and the VAE decode, each after a warm-up run, on the configured device and dtype.
//! * `--mode memory` ([`memory`]): peak resident memory and time per memory option set, one
//!   child process per set.
//! * `--mode throughput` ([`throughput`]): images per minute at several client concurrencies
//!   against the in-process engine, batching off and on.
//! * `--mode flux-blocks` ([`flux_blocks`]): one FLUX double and single block at full width.
//! * `--mode unet` ([`unet`]): one guided UNet pass (batch 2) of a full-size architecture.
//! * `--mode lora` ([`lora`]): request and step time with random LoRA sets vs without, switching.
//! * `--mode vae` ([`vae`]): one VAE decode of random latents at --size.
//! * `--mode ops` ([`ops`]): single ops at real shapes (fused GroupNorm + SiLU), ours vs candle's.

pub mod flux_blocks;
pub mod lora;
pub mod memory;
pub mod ops;
pub mod throughput;
pub mod unet;
pub mod vae;

use std::fmt;
use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::pipelines::{Pipeline, Progress, TextToImage};
use crate::rng::TorchRng;
use crate::startup;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchSettings {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Timed runs of each stage, after one untimed warm-up.
    pub repeat: usize,
    /// Images per request where a mode makes whole requests (memory).
    pub images: usize,
}

/// The prompt every bench request uses.
const PROMPT: &str = "a photograph of an astronaut riding a horse on the moon";

/// Mean seconds per stage.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub settings: BenchSettings,
    pub device: String,
    pub dtype: DType,
    pub load: Duration,
    pub text_encode: Duration,
    pub denoise_step: Duration,
    pub vae_decode: Duration,
    pub end_to_end: Duration,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "device {} · dtype {:?} · {}x{} · {} steps · guidance {} · {} timed runs",
            self.device, self.dtype, s.width, s.height, s.steps, s.guidance_scale, s.repeat
        )?;
        writeln!(f, "{:<22} {:>10}", "stage", "seconds")?;
        for (name, d) in [
            ("model load", self.load),
            ("text encode", self.text_encode),
            ("denoising step", self.denoise_step),
            ("vae decode", self.vae_decode),
            ("end to end (1 image)", self.end_to_end),
        ] {
            writeln!(f, "{name:<22} {:>10.4}", d.as_secs_f64())?;
        }
        Ok(())
    }
}

/// Records when each denoising step finished.
#[derive(Default)]
struct StepClock(Vec<Instant>);

impl Progress for StepClock {
    fn on_step(&mut self, _: usize, _: usize, _: &Tensor) -> ControlFlow<()> {
        self.0.push(Instant::now());
        ControlFlow::Continue(())
    }
}

fn mean(total: Duration, count: usize) -> Duration {
    total / count.max(1) as u32
}

/// Loads the model in `config` and times its stages.
pub fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
) -> Result<BenchReport> {
    let started = Instant::now();
    let (dir, options) = startup::resolve(config, base_dir)?;
    let device = format!("{:?}", options.device);
    let dtype = options.dtype;
    let model = Pipeline::load(&dir, &options)?;
    let load = started.elapsed();
    let cfg = settings.guidance_scale > 1.0;
    let prompt = PROMPT;

    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<Duration> {
        f()?; // warm-up: first-call allocations and kernel selection are not what we measure
        let t = Instant::now();
        for _ in 0..settings.repeat {
            f()?;
        }
        Ok(mean(t.elapsed(), settings.repeat))
    };

    let text_encode = time(&mut || model.encode_prompt(prompt, None, 1, cfg).map(drop))?;

    let f = model.size_multiple() as usize;
    let latents = TorchRng::new(0).randn_tensor(
        // SD latents have 4 channels (this bench is for the SD family).
        &[1, 4, settings.height / f, settings.width / f],
        &options.device,
        DType::F32,
    )?;
    let vae_decode = time(&mut || model.decode(&latents).map(drop))?;

    let request = TextToImage {
        prompt: prompt.into(),
        negative_prompt: None,
        n: 1,
        width: settings.width,
        height: settings.height,
        seed: 0,
        steps: settings.steps.max(2),
        guidance_scale: settings.guidance_scale,
        scheduler: model.default_scheduler(),
        max_sequence_length: None,
        loras: Vec::new(),
    };
    let mut step_total = Duration::ZERO;
    let mut step_count = 0usize;
    let end_to_end = time(&mut || {
        let mut clock = StepClock::default();
        model.text_to_image(&request, &mut clock)?;
        // Intervals between step callbacks: pure denoising, no encode or decode inside.
        for pair in clock.0.windows(2) {
            step_total += pair[1] - pair[0];
            step_count += 1;
        }
        Ok(())
    })?;
    Ok(BenchReport {
        settings: settings.clone(),
        device,
        dtype,
        load,
        text_encode,
        denoise_step: mean(step_total, step_count),
        vae_decode,
        end_to_end,
    })
}
