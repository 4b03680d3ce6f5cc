//! The VAE between pixels and the latents the loop denoises, with every family's latent scaling.
//!
//! ```text
//! encode: pixels [-1,1] ─VAE encoder─▶ latent_dist.sample(rng) ─▶ (x − mean)·scale / std   (stats)
//!                                                                  (x − shift)·scale       (FLUX)
//!                                                                  x·scale                 (SD, SDXL)
//! decode: latents ─▶ x·std / scale + mean | x / scale + shift | x / scale ─VAE decoder─▶ pixels
//! ```
//!
//! `scaling_factor`, `shift_factor` and `latents_mean`/`latents_std` come from `vae/config.json`
//! (never a preset). With `force_upcast` (SDXL's VAE overflows in float16) and a float16 run dtype
//! the VAE is built and run in float32, as diffusers upcasts it. Latents stay float32 outside the
//! VAE, as the loop keeps them.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::image::to_rgb_images;
use crate::device::Precision;
use crate::error::Result;
use crate::models::component::{Component, Offload, WeightFiles};
use crate::models::config::{read_json, VaeConfigFile, VaeSpec};
use crate::models::vae::Vae;
use crate::models::vae_tiling::TileSizes;
use crate::rng::TorchRng;

/// A loaded VAE and how latents are scaled for it.
#[derive(Debug)]
pub struct Autoencoder {
    vae: Component<Vae>,
    scaling_factor: f64,
    shift_factor: Option<f64>,
    /// (1, C, 1, 1) float32 per-channel mean and std, when the config has both.
    stats: Option<(Tensor, Tensor)>,
    /// What the VAE runs in: the run dtype, or float32 when upcast.
    dtype: DType,
    spec: VaeSpec,
}

impl Autoencoder {
    /// Loads `dir/vae/`, tiled when `tiling`.
    pub fn load(
        source: &str,
        dir: &Path,
        precision: Precision,
        device: &Device,
        offload: Option<&Arc<Offload>>,
        tiling: bool,
    ) -> Result<Self> {
        let config_path = dir.join("vae/config.json");
        let file: VaeConfigFile = read_json(source, &config_path)?;
        let spec = file.to_spec(source, &config_path)?;
        let tiles = if tiling {
            Some(TileSizes::from_config_file(
                source,
                &config_path,
                spec.scale_factor,
            )?)
        } else {
            None
        };
        let upcast = spec.force_upcast && precision.run == DType::F16;
        if upcast {
            tracing::info!("the VAE runs in float32 (force_upcast: it overflows in float16)");
        }
        let precision = Precision {
            run: if upcast { DType::F32 } else { precision.run },
            ..precision
        };
        let built = spec.clone();
        let vae = Component::load(
            WeightFiles {
                source_name: source.to_string(),
                dir: dir.join("vae"),
                stem: "diffusion_pytorch_model",
            },
            precision,
            device,
            offload,
            move |vb| {
                let mut vae = Vae::new(vb, built.in_channels, built.out_channels, &built.candle)?;
                vae.set_tiling(tiles);
                Ok(vae)
            },
        )?;
        let stats = match &spec.latents_stats {
            Some((mean, std)) => {
                let channel = |values: &[f64]| -> Result<Tensor> {
                    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
                    Ok(Tensor::from_vec(
                        values,
                        (1, spec.latent_channels, 1, 1),
                        device,
                    )?)
                };
                Some((channel(mean)?, channel(std)?))
            }
            None => None,
        };
        Ok(Autoencoder {
            vae,
            scaling_factor: spec.scaling_factor,
            shift_factor: spec.shift_factor,
            stats,
            dtype: precision.run,
            spec,
        })
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        self.spec.scale_factor
    }

    pub fn latent_channels(&self) -> usize {
        self.spec.latent_channels
    }

    /// Float32 latents (as the loop leaves them) → images.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let unscaled = match &self.stats {
            Some((mean, std)) => {
                (latents.broadcast_mul(std)? / self.scaling_factor)?.broadcast_add(mean)?
            }
            None => (latents / self.scaling_factor)?,
        };
        let unscaled = match self.shift_factor {
            Some(shift) => (unscaled + shift)?,
            None => unscaled,
        };
        let images = self.vae.get()?.decode(&unscaled.to_dtype(self.dtype)?)?;
        to_rgb_images(&images)
    }

    /// `latent_dist.sample(rng)` of pixels (1, 3, H, W) in [-1, 1], scaled for the denoiser:
    /// float32 latents (1, C, H / f, W / f).
    pub fn encode(&self, pixels: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let dist = self.vae.get()?.encode(&pixels.to_dtype(self.dtype)?)?;
        let sample = dist.sample(rng)?;
        Ok(match (&self.stats, self.shift_factor) {
            (Some((mean, std)), _) => {
                (sample.broadcast_sub(mean)? * self.scaling_factor)?.broadcast_div(std)?
            }
            (None, Some(shift)) => ((sample - shift)? * self.scaling_factor)?,
            (None, None) => (sample * self.scaling_factor)?,
        })
    }
}
