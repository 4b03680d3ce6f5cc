//! `fastfusion-worker bench --mode vae --model DIR --size WxH`: one VAE decode (batch 1) of random
//! latents for a picture of that size, with the model's VAE (`DIR/vae`), as a request's last stage
//! runs it (unscaling, decoding, conversion to 8-bit pixels). `scripts/bench-unet-vs-diffusers.py`
//! (case `vae:512`) writes SD's VAE with random weights and runs this next to diffusers'
//! `AutoencoderKL.decode` on the same weights. One untimed decode, then `--repeat` timed ones;
//! seconds per decode and the memory above what was resident before (Linux peak RSS).

use std::fmt;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::flux_blocks::{measure, BlockRow};
use super::BenchSettings;
use crate::config::ModelConfig;
use crate::device::Precision;
use crate::error::{Result, WorkerError};
use crate::pipelines::Autoencoder;
use crate::startup;

/// Starts each result line, so a driving script can find them among other output.
const MARKER: &str = "fastfusion-bench-vae";

#[derive(Debug, Clone)]
pub struct VaeReport {
    pub device: String,
    pub dtype: DType,
    pub width: usize,
    pub height: usize,
    pub repeat: usize,
    pub row: BlockRow,
    /// Winograd-transformed conv weights kept by the layers (made in the untimed pass).
    pub cached_weight_bytes: usize,
}

impl fmt::Display for VaeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "VAE decode · device {} · dtype {:?} · {}x{} · batch 1 · {} timed runs",
            self.device, self.dtype, self.width, self.height, self.repeat
        )?;
        super::flux_blocks::write_kept_weights(f, self.cached_weight_bytes)?;
        self.row
            .write_figures(f, "decode", MARKER, (self.width, self.height))
    }
}

pub fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
) -> Result<VaeReport> {
    let (dir, options) = startup::resolve(config, base_dir)?;
    let source = dir.display().to_string();
    let precision = Precision {
        init: options.init_dtype,
        run: options.dtype,
    };
    let vae = Autoencoder::load(&source, &dir, precision, &options.device, None, false)?;
    let f = vae.scale_factor();
    if !settings.width.is_multiple_of(f)
        || !settings.height.is_multiple_of(f)
        || settings.width < f
        || settings.height < f
    {
        return Err(WorkerError::invalid(
            "size",
            format!("must be a non-zero multiple of the VAE's factor {f}"),
        ));
    }
    let shape = (
        1,
        vae.latent_channels(),
        settings.height / f,
        settings.width / f,
    );
    let latents = Tensor::randn(0f32, 1.0, shape, &options.device)?;
    let repeat = settings.repeat.max(1);
    let row = measure("vae", repeat, &mut || {
        let images = vae
            .decode(&latents)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let first = images.first().map_or(0.0, |i| f32::from(i.as_raw()[0]));
        Tensor::new(&[first], &candle_core::Device::Cpu)
    })?;
    Ok(VaeReport {
        device: format!("{:?}", options.device),
        dtype: options.dtype,
        width: settings.width,
        height: settings.height,
        repeat,
        row,
        cached_weight_bytes: crate::models::conv::cached_bytes(),
    })
}
