//! `fastfusion-worker bench --mode lora`: what per-request LoRA costs on the configured model.
//!
//! Writes `--lora-count` random adapters of rank `--lora-rank` (PEFT format, every attention and
//! feed-forward projection of the denoiser: `to_q/k/v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`,
//! plus FLUX's `add_*_proj`, `to_add_out`, `ff_context.*`, `proj_mlp`, single-block `proj_out`)
//! to a temporary folder, loads the model with them, and times whole requests in this order:
//! plain, a new set {a} (its first request), the same set again, a new set {a, b}, the same again,
//! plain again. With adapters applied
//! unfused, "new" and "again" should cost the same (switching is setting a few weights); the
//! difference from plain is the per-step cost of the low-rank products. Memory: the adapters'
//! bytes on the device (no per-set copy exists).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{mean, BenchSettings, StepClock, PROMPT};
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::lora::{AdapterFile, LoraWeight};
use crate::models::weights::load_tensors;
use crate::pipelines::{Pipeline, TextToImage};
use crate::startup;

/// The modules the random adapters touch (suffixes of diffusers module names).
const TARGETS: &[&str] = &[
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".add_q_proj",
    ".add_k_proj",
    ".add_v_proj",
    ".to_add_out",
    ".ff_context.net.0.proj",
    ".ff_context.net.2",
    ".proj_mlp",
];

/// One timed request kind.
#[derive(Debug, Clone)]
pub struct LoraRow {
    pub label: String,
    pub request: Duration,
    pub step: Duration,
}

#[derive(Debug, Clone)]
pub struct LoraReport {
    pub device: String,
    pub dtype: DType,
    pub settings: BenchSettings,
    pub rank: usize,
    pub modules: usize,
    /// Bytes of one adapter's tensors on the device.
    pub adapter_bytes: usize,
    pub adapter_load: Duration,
    pub rows: Vec<LoraRow>,
}

impl fmt::Display for LoraReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "device {} · dtype {:?} · {}x{} · {} steps · guidance {} · rank {} on {} modules · {} timed runs",
            self.device, self.dtype, s.width, s.height, s.steps, s.guidance_scale, self.rank,
            self.modules, s.repeat
        )?;
        writeln!(
            f,
            "adapter size on the device: {:.1} MiB each (per-set copies: none); load {:.3} s for all",
            self.adapter_bytes as f64 / (1 << 20) as f64,
            self.adapter_load.as_secs_f64()
        )?;
        let plain = self.rows.first().map_or(0.0, |r| r.step.as_secs_f64());
        writeln!(
            f,
            "{:<28} {:>12} {:>12} {:>14}",
            "request", "seconds", "s / step", "step vs plain"
        )?;
        for row in &self.rows {
            let step = row.step.as_secs_f64();
            let ratio = if plain > 0.0 { step / plain } else { 0.0 };
            writeln!(
                f,
                "{:<28} {:>12.4} {:>12.4} {:>13.3}x",
                row.label,
                row.request.as_secs_f64(),
                step,
                ratio
            )?;
        }
        Ok(())
    }
}

/// Random rank-`rank` PEFT adapters for the denoiser in `dir`, written to `out`.
fn write_adapters(
    dir: &Path,
    out: &Path,
    count: usize,
    rank: usize,
) -> Result<(Vec<AdapterFile>, usize, usize)> {
    let (folder, prefix) = if dir.join("unet").is_dir() {
        ("unet", "unet")
    } else {
        ("transformer", "transformer")
    };
    let weights = load_tensors(
        "bench",
        &dir.join(folder),
        "diffusion_pytorch_model",
        (DType::F32, DType::F32),
        &Device::Cpu,
    )?;
    let mut modules: Vec<(String, usize, usize)> = weights
        .iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let single_proj_out =
                module.starts_with("single_transformer_blocks.") && module.ends_with(".proj_out");
            let hit = TARGETS.iter().any(|s| module.ends_with(s)) || single_proj_out;
            match t.dims() {
                [o, i] if hit => Some((module.to_string(), *i, *o)),
                _ => None,
            }
        })
        .collect();
    drop(weights);
    modules.sort();
    let mut files = Vec::new();
    let mut bytes = 0;
    for k in 0..count {
        let mut tensors = HashMap::new();
        bytes = 0;
        for (module, i, o) in &modules {
            let down = (Tensor::randn(0f32, 1.0, (rank, *i), &Device::Cpu)? / (*i as f64).sqrt())?;
            let up = (Tensor::randn(0f32, 1.0, (*o, rank), &Device::Cpu)? * 0.01)?;
            bytes += (rank * i + o * rank) * 4;
            tensors.insert(format!("{prefix}.{module}.lora_A.weight"), down);
            tensors.insert(format!("{prefix}.{module}.lora_B.weight"), up);
        }
        let path = out.join(format!("bench_{k}.safetensors"));
        candle_core::safetensors::save(&tensors, &path)?;
        files.push(AdapterFile::new(format!("bench_{k}"), path));
    }
    Ok((files, modules.len(), bytes))
}

pub fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
    count: usize,
    rank: usize,
) -> Result<LoraReport> {
    let (dir, mut options) = startup::resolve(config, base_dir)?;
    let temp = std::env::temp_dir().join(format!("fastfusion-bench-lora-{}", std::process::id()));
    std::fs::create_dir_all(&temp)
        .map_err(|e| WorkerError::Internal(format!("cannot create {}: {e}", temp.display())))?;
    let written = write_adapters(&dir, &temp, count.max(2), rank.max(1));
    let (files, modules, f32_bytes) = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&temp);
            return Err(e);
        }
    };
    options.loras = files;
    let started = Instant::now();
    let model = Pipeline::load(&dir, &options);
    let _ = std::fs::remove_dir_all(&temp);
    let model = model?;
    let adapter_load = started.elapsed();
    let dtype_bytes = options.dtype.size_in_bytes();

    let request = |loras: Vec<LoraWeight>| TextToImage {
        prompt: PROMPT.into(),
        negative_prompt: None,
        n: 1,
        width: settings.width,
        height: settings.height,
        seed: 0,
        steps: settings.steps.max(2),
        guidance_scale: settings.guidance_scale,
        scheduler: model.default_scheduler(),
        max_sequence_length: None,
        loras,
    };
    let a = vec![LoraWeight {
        name: "bench_0".into(),
        weight: 1.0,
    }];
    let ab = vec![
        a[0].clone(),
        LoraWeight {
            name: "bench_1".into(),
            weight: 0.5,
        },
    ];
    // One warm-up request, so that first-call allocations are not charged to the first row.
    let time = |req: &TextToImage, runs: usize| -> Result<(Duration, Duration)> {
        let mut request_total = Duration::ZERO;
        let mut step_total = Duration::ZERO;
        let mut steps = 0usize;
        for _ in 0..runs {
            let mut clock = StepClock::default();
            let t = Instant::now();
            model.text_to_image(req, &mut clock)?;
            request_total += t.elapsed();
            for pair in clock.0.windows(2) {
                step_total += pair[1] - pair[0];
                steps += 1;
            }
        }
        Ok((mean(request_total, runs), mean(step_total, steps)))
    };
    model.text_to_image(&request(Vec::new()), &mut StepClock::default())?;
    let mut rows = Vec::new();
    // A set's first request runs once (only the first use of a set is "new"); the others
    // `--repeat` times.
    let repeat = settings.repeat;
    for (label, set, runs) in [
        ("plain", Vec::new(), repeat),
        ("new set {a} (first request)", a.clone(), 1),
        ("same set {a} again", a, repeat),
        ("new set {a, b·0.5} (first)", ab.clone(), 1),
        ("same set {a, b·0.5} again", ab, repeat),
        ("plain after adapters", Vec::new(), repeat),
    ] {
        let (request, step) = time(&request(set), runs)?;
        rows.push(LoraRow {
            label: label.into(),
            request,
            step,
        });
    }
    Ok(LoraReport {
        device: format!("{:?}", options.device),
        dtype: options.dtype,
        settings: settings.clone(),
        rank,
        modules,
        adapter_bytes: f32_bytes / 4 * dtype_bytes,
        adapter_load,
        rows,
    })
}
