//! The denoising network behind the loop's one call, [`Denoiser::predict`].
//!
//! The loop keeps latents in the VAE's layout (rows, C, h, w) for every family; a denoiser that
//! wants another layout (FLUX's packed 2×2 patches) converts on the way in and out, so guidance,
//! scheduler steps, blending and previews never see it. An inpainting model's extra input
//! channels arrive already appended to the latents.

use candle_core::{DType, Tensor};

use super::conditioning::Conditioning;
use crate::error::{Result, WorkerError};
use crate::models::component::Component;
use crate::models::flux::{self, FluxTransformer};
use crate::models::unet::{AddedConditions, UNet};

/// The network a pipeline denoises with.
#[derive(Debug)]
pub enum Denoiser {
    /// SD 1.x/2.x and SDXL (with the addition embedding) UNets.
    UNet(Component<UNet>),
    /// FLUX.1 transformers (dev, schnell, Fill).
    Flux(Component<FluxTransformer>),
}

impl Denoiser {
    /// The prediction (noise, v, sample or flow velocity, as the scheduler expects) for
    /// `latents` (rows, C_in, h, w) in the run dtype at `timestep`, conditioned row by row on
    /// `cond`; float32 (rows, C_out, h, w).
    pub fn predict(&self, latents: &Tensor, timestep: f64, cond: &Conditioning) -> Result<Tensor> {
        match self {
            Denoiser::UNet(unet) => {
                let added = match (&cond.pooled, &cond.time_ids) {
                    (Some(text_embeds), Some(time_ids)) => Some(AddedConditions {
                        text_embeds,
                        time_ids,
                    }),
                    (None, None) => None,
                    _ => {
                        return Err(WorkerError::Internal(
                            "pooled embeddings and time ids come together".into(),
                        ))
                    }
                };
                Ok(unet
                    .get()?
                    .forward(latents, timestep, &cond.context, added)?
                    .to_dtype(DType::F32)?)
            }
            Denoiser::Flux(transformer) => {
                let pooled = cond
                    .pooled
                    .as_ref()
                    .ok_or_else(|| WorkerError::Internal("FLUX needs the pooled prompt".into()))?;
                let (rows, _, h, w) = latents.dims4()?;
                let device = latents.device();
                // Packing the channel-concatenated input equals concatenating the packed parts
                // (FluxFillPipeline's `cat((latents, masked_image_latents), dim=2)`).
                let img = flux::pack_latents(latents)?;
                let img_ids = flux::image_ids(h / 2, w / 2, device)?;
                let txt_ids = flux::text_ids(cond.context.dim(1)?, device)?;
                // FluxPipeline: `timestep = t.expand(batch).to(latents.dtype) / 1000`.
                let t = Tensor::full(timestep as f32, rows, device)?
                    .broadcast_div(&Tensor::new(1000f32, device)?)?;
                let velocity = transformer.get()?.forward(
                    &img,
                    &img_ids,
                    &cond.context,
                    &txt_ids,
                    &t,
                    cond.guidance_embed.as_ref(),
                    pooled,
                )?;
                Ok(flux::unpack_latents(&velocity.to_dtype(DType::F32)?, h, w)?)
            }
        }
    }
}
