//! Image-to-image and inpainting for every family, as diffusers'
//! `StableDiffusion[XL]Img2ImgPipeline` and `StableDiffusion[XL]InpaintPipeline` do them (the SDXL
//! classes prepare latents, masks and draws exactly like the SD ones).
//!
//! Inputs arrive decoded and already at the output size (`crate::inputs` decodes and resizes
//! uploads); the mask is 8-bit grey, white where the model repaints (diffusers' convention).
//!
//! What the seed's generator draws, in order (each VAE encoding is one `latent_dist.sample`):
//!
//! ```text
//! image-to-image                     encode(image) [1,C,h,w] → noise [n,C,h,w]
//! inpaint, ordinary UNet             encode(image) → noise → encode(masked image)
//! inpaint, inpainting UNet, s < 1    encode(image) → noise → encode(masked image)
//! inpaint, inpainting UNet, s = 1    noise → encode(masked image)
//! ```
//!
//! then whatever an ancestral scheduler draws per step. diffusers encodes the masked image even
//! for 4-channel UNets, which never use it; we only advance the generator by the same draw.
//! FLUX draws as the ordinary-UNet rows (`FluxImg2ImgPipeline`, `FluxInpaintPipeline`), and
//! `FluxFillPipeline` always encodes the image first, whatever the strength.
//!
//! `strength` picks the first step as diffusers' `get_timesteps`: SD and SDXL run
//! `int(steps × strength)` steps, from loop index `steps − that`; FLUX starts at
//! `int(steps − steps × strength)` ([`super::StrengthRule`]). The initial latents are the image's
//! latents noised to that step, except for inpainting at strength 1, which starts from pure noise
//! (FLUX's `scale_noise` at sigma 1 is that noise too).
//!
//! An inpainting model's extra channels follow the latents: SD's `[mask, masked-image latents]`,
//! FLUX Fill's `[masked-image latents, mask as vae_scale² channels]` (the pixel mask folded
//! per latent, see `models::flux::fill_mask_channels`). FLUX runs no classifier-free guidance,
//! so they are never doubled.

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

use super::denoise::{Blend, Plan};
use super::{Family, Input, Pipeline, TextToImage};
use crate::error::{Result, WorkerError};
use crate::models::flux::fill_mask_channels;
use crate::rng::TorchRng;
use crate::schedulers::Scheduler;

impl Pipeline {
    /// Checks an image task's inputs against the request before any work is done: sizes, and a
    /// strength that leaves a step to run.
    pub(super) fn check_inputs(&self, req: &TextToImage, input: Input<'_>) -> Result<()> {
        match input {
            Input::Text | Input::Redux { .. } => Ok(()),
            Input::Image { image, strength } => {
                check_input(req, image.dimensions(), "image")?;
                self.strength_rule()
                    .first_step(req.steps, strength)
                    .map(drop)
            }
            Input::Inpaint {
                image,
                mask,
                strength,
            } => {
                check_input(req, image.dimensions(), "image")?;
                check_input(req, mask.dimensions(), "mask")?;
                self.strength_rule()
                    .first_step(req.steps, strength)
                    .map(drop)
            }
        }
    }

    /// Image-to-image's initial latents and loop: the input's latents noised to the first step.
    pub(super) fn prepare_image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        scheduler: Box<dyn Scheduler>,
        mut rng: TorchRng,
    ) -> Result<(Plan, Tensor)> {
        if self.inpaint_unet {
            let everything =
                GrayImage::from_pixel(image.width(), image.height(), image::Luma([255]));
            return self.prepare_inpaint(req, image, &everything, strength, scheduler, rng);
        }
        let start = self.strength_rule().first_step(req.steps, strength)?;
        let pixels = pixels_to_tensor(image, &self.device)?;
        let original = self
            .encode_image(&pixels, &mut rng)?
            .repeat((req.n, 1, 1, 1))?;
        let noise = rng.randn_tensor(&self.latent_shape(req), &self.device, DType::F32)?;
        let latents = scheduler.add_noise(&original, &noise, start)?;
        let mut plan = Plan::new(scheduler, rng);
        plan.start = start;
        Ok((plan, latents))
    }

    /// Inpainting's initial latents and loop: the mask (and masked image's latents) for an
    /// inpainting UNet, the blend with the original for an ordinary one.
    pub(super) fn prepare_inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        scheduler: Box<dyn Scheduler>,
        mut rng: TorchRng,
    ) -> Result<(Plan, Tensor)> {
        let start = self.strength_rule().first_step(req.steps, strength)?;
        // diffusers compares the float exactly: only 1.0 starts from pure noise.
        let from_noise = strength == 1.0;
        let flux = self.family() == Family::Flux;
        // A Fill transformer beside an ordinary FLUX model makes this an inpainting model's run.
        let fill = self.fill.is_some();
        let inpainting_model = self.inpaint_unet || fill;
        let pixels = pixels_to_tensor(image, &self.device)?;
        let mask = mask_to_tensor(mask, &self.device)?;
        let original = if !inpainting_model || !from_noise || flux {
            Some(
                self.encode_image(&pixels, &mut rng)?
                    .repeat((req.n, 1, 1, 1))?,
            )
        } else {
            None
        };
        let shape = self.latent_shape(req);
        let noise = rng.randn_tensor(&shape, &self.device, DType::F32)?;
        let latents = match (&original, from_noise) {
            (Some(original), false) => scheduler.add_noise(original, &noise, start)?,
            _ => (&noise * scheduler.init_noise_sigma())?,
        };
        let latent_mask = self.mask_to_latent_size(&mask)?.repeat((req.n, 1, 1, 1))?;
        let mut extra_channels = None;
        if inpainting_model {
            // Zero (grey) where the model repaints, the picture elsewhere.
            let kept = pixels.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
            let masked = self
                .encode_image(&kept, &mut rng)?
                .repeat((req.n, 1, 1, 1))?;
            extra_channels = Some(if flux {
                let folded =
                    fill_mask_channels(&mask, self.vae.scale_factor())?.repeat((req.n, 1, 1, 1))?;
                Tensor::cat(&[&masked, &folded], 1)?
            } else {
                let extra = Tensor::cat(&[&latent_mask, &masked], 1)?;
                if req.guidance_scale > 1.0 {
                    Tensor::cat(&[&extra, &extra], 0)?
                } else {
                    extra
                }
            });
        } else {
            // diffusers samples the masked image's latents here too, then never uses them:
            // draw the same count so that later draws (ancestral steps) line up.
            let [_, channels, h, w] = shape;
            rng.randn(channels * h * w);
        }
        let mut plan = Plan::new(scheduler, rng);
        plan.start = start;
        plan.extra_channels = extra_channels;
        plan.fill = fill;
        plan.blend = match original {
            Some(original) if !inpainting_model => Some(Blend {
                original,
                noise,
                mask: latent_mask,
            }),
            _ => None,
        };
        Ok((plan, latents))
    }

    /// The scaled latents of pixels (1, 3, H, W) in [-1, 1], sampled with `rng`: float32
    /// (1, C, H / f, W / f).
    fn encode_image(&self, pixels: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        self.vae.encode(pixels, rng)
    }

    /// The mask at latent resolution, as torch's default (nearest) `interpolate` shrinks it by
    /// the whole factor f: the pixel at (y·f, x·f) for latent (y, x).
    fn mask_to_latent_size(&self, mask: &Tensor) -> Result<Tensor> {
        let f = self.vae.scale_factor();
        let (b, c, h, w) = mask.dims4()?;
        Ok(mask
            .reshape((b, c, h / f, f, w / f, f))?
            .narrow(3, 0, 1)?
            .narrow(5, 0, 1)?
            .reshape((b, c, h / f, w / f))?)
    }
}

/// The request's first loop index for `strength`, as diffusers' `get_timesteps` (every
/// scheduler here has order 1): `steps − min(int(steps × strength), steps)`.
pub fn first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(WorkerError::invalid(
            "strength",
            format!("must be in (0, 1], got {strength}"),
        ));
    }
    // `int()` truncates toward zero; the product is positive and at most `steps`.
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(WorkerError::invalid(
            "strength",
            format!(
                "{strength} × {steps} steps leaves no step to run; raise strength or num_inference_steps"
            ),
        ));
    }
    Ok(steps - run)
}

/// The first loop index for `strength`, as `Flux*Pipeline.get_timesteps`:
/// `int(max(steps − steps × strength, 0))`. At least one step always runs for a strength in
/// (0, 1].
pub fn flux_first_step(steps: usize, strength: f64) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(WorkerError::invalid(
            "strength",
            format!("must be in (0, 1], got {strength}"),
        ));
    }
    let init = (steps as f64 * strength).min(steps as f64);
    // `int()` truncates; the difference is in [0, steps).
    Ok(((steps as f64 - init).max(0.0) as usize).min(steps.saturating_sub(1)))
}

/// The input must already be at the output size (the service resizes uploads).
fn check_input(req: &TextToImage, (width, height): (u32, u32), param: &str) -> Result<()> {
    if (width as usize, height as usize) != (req.width, req.height) {
        return Err(WorkerError::invalid(
            param,
            format!(
                "is {width}x{height}, the output is {}x{}",
                req.width, req.height
            ),
        ));
    }
    Ok(())
}

/// (1, 3, H, W) float32 in [-1, 1], as diffusers' `VaeImageProcessor`: `x / 255` then `2x − 1`.
fn pixels_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let values: Vec<f32> = image
        .as_raw()
        .iter()
        .map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, (1, h, w, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// (1, 1, H, W) float32, binarized as diffusers' mask processor: `x / 255 < 0.5` → 0, else 1.
fn mask_to_tensor(mask: &GrayImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let values: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if f32::from(v) / 255.0 < 0.5 { 0.0 } else { 1.0 })
        .collect();
    Ok(Tensor::from_vec(values, (1, 1, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_picks_the_tail_of_the_schedule_like_diffusers() -> Result<()> {
        assert_eq!(first_step(10, 1.0)?, 0);
        assert_eq!(first_step(10, 0.75)?, 3);
        // int(3 * 0.5) = 1 step runs.
        assert_eq!(first_step(3, 0.5)?, 2);
        // 0.7 is exactly representable enough: int(10 * 0.7) = 7.
        assert_eq!(first_step(10, 0.7)?, 3);
        for bad in [0.0, -0.1, 1.01, f64::NAN] {
            assert!(first_step(10, bad).is_err(), "{bad}");
        }
        // FLUX: int(4 − 2.4) = 1, int(4 − 3.2) = 0, and a small strength still runs one step.
        assert_eq!(flux_first_step(4, 0.6)?, 1);
        assert_eq!(flux_first_step(4, 0.8)?, 0);
        assert_eq!(flux_first_step(4, 1.0)?, 0);
        assert_eq!(flux_first_step(3, 0.2)?, 2);
        assert!(flux_first_step(3, 0.0).is_err());
        // int(3 * 0.2) = 0: nothing would run.
        assert!(matches!(
            first_step(3, 0.2),
            Err(WorkerError::InvalidArgument { ref param, .. }) if param == "strength"
        ));
        Ok(())
    }

    #[test]
    fn pixels_and_masks_become_diffusers_tensors() -> Result<()> {
        let image = RgbImage::from_raw(2, 1, vec![0, 255, 51, 128, 0, 255])
            .ok_or_else(|| WorkerError::Internal("buffer".into()))?;
        let t = pixels_to_tensor(&image, &Device::Cpu)?;
        assert_eq!(t.dims(), [1, 3, 1, 2]);
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        // Channel-major: R of both pixels, then G, then B.
        let expected = [
            -1.0,
            2.0 * (128.0 / 255.0) - 1.0,
            1.0,
            -1.0,
            2.0 * 0.2 - 1.0,
            1.0,
        ];
        for (got, want) in v.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{v:?}");
        }
        let mask = GrayImage::from_raw(3, 1, vec![127, 128, 255])
            .ok_or_else(|| WorkerError::Internal("buffer".into()))?;
        let m = mask_to_tensor(&mask, &Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(m, [0.0, 1.0, 1.0]);
        Ok(())
    }
}
