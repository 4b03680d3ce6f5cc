//! `fastfusion-worker bench --mode unet --model DIR --size WxH`: one UNet forward pass at a real
//! architecture's width, for a batch of 2 (classifier-free guidance) at that image size.
//!
//! DIR holds a UNet folder's `config.json` (SD 1.5's, SDXL's, …) and
//! `diffusion_pytorch_model.safetensors`; `scripts/bench-unet-vs-diffusers.py` writes random ones
//! from the real configs and runs this next to diffusers' `UNet2DConditionModel` on the same
//! weights. The context is 77 tokens of `cross_attention_dim`; an SDXL UNet (`text_time`) also
//! gets pooled embeddings and six time ids. One untimed pass, then `--repeat` timed ones; the
//! report has the mean seconds per pass (= one denoising step with guidance) and the memory the
//! passes needed above what was resident before them (Linux peak RSS, as the FLUX block bench).

use std::fmt;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::flux_blocks::{measure, BlockRow};
use super::BenchSettings;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::models::config::{read_json, UNetConfigFile};
use crate::models::unet::{AddedConditions, UNet};
use crate::models::weights;
use crate::startup;

/// Starts each result line, so a driving script can find them among other output.
const MARKER: &str = "fastfusion-bench-unet";
/// CLIP's prompt window.
const TEXT_TOKENS: usize = 77;
/// Rows per pass: unconditional + conditional.
const BATCH: usize = 2;
/// The VAE scale factor of every SD-family model.
const VAE_SCALE: usize = 8;

/// The figures of one `--mode unet` run.
#[derive(Debug, Clone)]
pub struct UNetReport {
    pub device: String,
    pub dtype: DType,
    pub width: usize,
    pub height: usize,
    pub parameters: usize,
    pub repeat: usize,
    pub row: BlockRow,
    /// Winograd-transformed conv weights kept by the layers (made in the untimed pass).
    pub cached_weight_bytes: usize,
}

impl fmt::Display for UNetReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "UNet · device {} · dtype {:?} · {}x{} · batch {BATCH} · {:.2} B parameters · {} timed runs",
            self.device,
            self.dtype,
            self.width,
            self.height,
            self.parameters as f64 / 1e9,
            self.repeat
        )?;
        super::flux_blocks::write_kept_weights(f, self.cached_weight_bytes)?;
        self.row
            .write_figures(f, "pass", MARKER, (self.width, self.height))
    }
}

/// Loads the UNet in `config`'s model directory and times one guided step at `settings`' size.
pub fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
) -> Result<UNetReport> {
    let (dir, options) = startup::resolve(config, base_dir)?;
    let source = dir.display().to_string();
    let config_path = dir.join("config.json");
    let file: UNetConfigFile = read_json(&source, &config_path)?;
    let spec = file.to_spec(&source, &config_path)?;
    let (device, dtype) = (&options.device, options.dtype);
    let vb = weights::load_var_builder(&source, &dir, "diffusion_pytorch_model", dtype, device)?;
    let unet = UNet::new(vb, &spec).map_err(|e| {
        WorkerError::model_load(&source, dir.join("diffusion_pytorch_model.safetensors"), e)
    })?;
    let parameters = weights::load_tensors(
        &source,
        &dir,
        "diffusion_pytorch_model",
        (DType::F32, DType::F32),
        &candle_core::Device::Cpu,
    )
    .map(|t| t.values().map(|t| t.elem_count()).sum())
    .unwrap_or(0);
    let (h, w) = (settings.height / VAE_SCALE, settings.width / VAE_SCALE);
    if h == 0 || w == 0 {
        return Err(WorkerError::invalid(
            "size",
            format!("must be at least {VAE_SCALE}x{VAE_SCALE}"),
        ));
    }
    let random = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
    };
    let latents = random(&[BATCH, spec.in_channels, h, w])?;
    let context = random(&[BATCH, TEXT_TOKENS, spec.cross_attention_dim])?;
    let added = match spec.addition {
        Some(addition) => {
            let pooled = addition.pooled_dim(6).ok_or_else(|| {
                WorkerError::model_load(
                    &source,
                    &config_path,
                    "projection_class_embeddings_input_dim is smaller than the time ids",
                )
            })?;
            let (hf, wf) = (settings.height as f32, settings.width as f32);
            let ids = Tensor::new(&[hf, wf, 0.0, 0.0, hf, wf], device)?
                .unsqueeze(0)?
                .repeat((BATCH, 1))?
                .to_dtype(dtype)?;
            Some((random(&[BATCH, pooled])?, ids))
        }
        None => None,
    };
    let repeat = settings.repeat.max(1);
    let row = measure("unet", repeat, &mut || {
        let added = added
            .as_ref()
            .map(|(text_embeds, time_ids)| AddedConditions {
                text_embeds,
                time_ids,
            });
        unet.forward(&latents, 500.0, &context, added)
    })?;
    Ok(UNetReport {
        device: format!("{device:?}"),
        dtype,
        width: settings.width,
        height: settings.height,
        parameters,
        repeat,
        row,
        cached_weight_bytes: crate::models::conv::cached_bytes(),
    })
}
