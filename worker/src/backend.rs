//! Which pipeline serves a model, behind one object-safe seam for the engine.
//!
//! The engine only sees [`Backend`]; this module picks the implementation from the model's
//! files (today: the Stable Diffusion 1.x/2.x family; SDXL and FLUX slot in here by
//! `model_index.json`'s `_class_name`). Every task takes the shared generation parameters
//! ([`TextToImage`]); image-to-image and inpainting add their input, already decoded and at the
//! output size (see `crate::inputs`). [`Backend::generate`] runs a batch of compatible requests
//! (the engine's dynamic batching); a backend that cannot share forward passes runs them one
//! after the other.

use std::path::Path;

use fastfusion_proto::ModelFamily;
use image::{GrayImage, RgbImage};

use crate::error::Result;
use crate::pipelines::stable_diffusion::{
    BatchEntry, Family, Input, LoadOptions, Progress, StableDiffusion, TextToImage,
};
use crate::schedulers::{SchedulerConfig, SchedulerKind};

/// What the loaded model is and what it accepts; reported through `Info`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDescription {
    pub family: ModelFamily,
    /// The resolution the model was trained at (`size: auto`).
    pub native_width: u32,
    pub native_height: u32,
    /// Width and height must be multiples of this.
    pub size_multiple: u32,
    pub max_prompt_tokens: u32,
    /// The repo's own scheduler.
    pub default_scheduler: SchedulerKind,
    /// An inpainting model (its UNet also takes the mask): it cannot do text-to-image.
    pub inpainting_model: bool,
}

/// A loaded model that can make images. Runs on the model thread only (synchronous).
pub trait Backend: Send {
    fn description(&self) -> ModelDescription;
    /// The scheduler config requests' schedulers are built from, so that a step count a
    /// scheduler cannot place is refused before queueing; `None` when there is nothing to check.
    fn scheduler_config(&self) -> Option<SchedulerConfig> {
        None
    }
    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>>;
    /// `req.n` images from `image`, keeping `1 - strength` of the way (0 < strength <= 1).
    fn image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>>;
    /// `req.n` images repainting `image` where `mask` is white.
    fn inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>>;

    /// Runs `batch` (requests that share task, size, steps, scheduler, guidance on or off and
    /// strength), one result per entry in order; one request's failure or cancellation leaves
    /// the others running. By default one after the other; a pipeline that can share forward
    /// passes overrides this.
    fn generate(&self, batch: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        batch
            .iter_mut()
            .map(|entry| {
                let (req, progress) = (entry.request, &mut *entry.progress);
                match entry.input {
                    Input::Text => self.text_to_image(req, progress),
                    Input::Image { image, strength } => {
                        self.image_to_image(req, image, strength, progress)
                    }
                    Input::Inpaint {
                        image,
                        mask,
                        strength,
                    } => self.inpaint(req, image, mask, strength, progress),
                }
            })
            .collect()
    }
}

/// Loads the pipeline that fits the model directory `dir`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backend>> {
    Ok(Box::new(StableDiffusion::load(dir, options)?))
}

impl Backend for StableDiffusion {
    fn description(&self) -> ModelDescription {
        let (native_width, native_height) = self.native_size();
        ModelDescription {
            family: match self.family() {
                Family::Sd1 => ModelFamily::Sd1,
                Family::Sd2 => ModelFamily::Sd2,
            },
            native_width,
            native_height,
            // OpenAI clients and the contract speak in multiples of 8 even where a tiny
            // test VAE would allow less.
            size_multiple: self.size_multiple().max(8),
            max_prompt_tokens: self.max_prompt_tokens() as u32,
            default_scheduler: self.default_scheduler(),
            inpainting_model: self.is_inpainting_model(),
        }
    }

    fn scheduler_config(&self) -> Option<SchedulerConfig> {
        Some(StableDiffusion::scheduler_config(self).clone())
    }

    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        StableDiffusion::text_to_image(self, req, progress)
    }

    fn image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        StableDiffusion::image_to_image(self, req, image, strength, progress)
    }

    fn inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        StableDiffusion::inpaint(self, req, image, mask, strength, progress)
    }

    fn generate(&self, batch: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        self.generate_batch(batch)
    }
}
