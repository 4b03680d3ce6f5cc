//! Which pipeline serves a model, behind one object-safe seam for the engine.
//!
//! The engine only sees [`Backend`]; [`load`] gives it a [`Pipeline`], which picks the family
//! (SD 1.x/2.x, SDXL, FLUX) from the model's `model_index.json` and configs. Every task takes the shared generation parameters
//! ([`TextToImage`]); image-to-image and inpainting add their input, already decoded and at the
//! output size (see `crate::inputs`). [`Backend::generate`] runs a batch of compatible requests
//! (the engine's dynamic batching); a backend that cannot share forward passes runs them one
//! after the other.

use std::path::Path;

use fastfusion_proto::ModelFamily;
use image::{GrayImage, RgbImage};

use crate::error::Result;
use crate::error::WorkerError;
use crate::pipelines::{
    BatchEntry, Family, Input, LoadOptions, Pipeline, Progress, StrengthRule, TextToImage,
};
use crate::schedulers::{ScheduleContext, SchedulerConfig, SchedulerKind};

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
    /// FLUX: the most T5 tokens a request may ask for; 0 for models without T5.
    pub max_sequence_length: u32,
    /// FLUX: pixels per packed latent token side (the schedule's shift depends on the token
    /// count `(width / m)·(height / m)`); 0 for models whose schedule does not.
    pub image_seq_multiple: u32,
    /// How an image task's strength picks its first step.
    pub strength_rule: StrengthRule,
    /// Variations run through a FLUX Redux prior.
    pub redux: bool,
    /// A guidance scale above 1 means classifier-free guidance, which doubles the denoiser's rows
    /// (SD, SDXL); false where the scale is an input of the model instead (FLUX), so requests
    /// with any scales can share a batch.
    pub classifier_free_guidance: bool,
}

impl ModelDescription {
    /// What a request's schedule may depend on besides the step count.
    pub fn schedule_context(&self, width: u32, height: u32) -> ScheduleContext {
        let m = self.image_seq_multiple;
        ScheduleContext {
            image_seq_len: (m > 0).then(|| ((width / m) * (height / m)) as usize),
        }
    }
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
                    Input::Redux { .. } => Err(WorkerError::TaskDisabled(
                        "Redux variations (for FLUX models only)".into(),
                    )),
                }
            })
            .collect()
    }
}

/// Loads the pipeline that fits the model directory `dir`.
pub fn load(dir: &Path, options: &LoadOptions) -> Result<Box<dyn Backend>> {
    Ok(Box::new(Pipeline::load(dir, options)?))
}

impl Backend for Pipeline {
    fn description(&self) -> ModelDescription {
        let (native_width, native_height) = self.native_size();
        ModelDescription {
            family: match self.family() {
                Family::Sd1 => ModelFamily::Sd1,
                Family::Sd2 => ModelFamily::Sd2,
                Family::Sdxl => ModelFamily::Sdxl,
                Family::Flux => ModelFamily::Flux,
            },
            native_width,
            native_height,
            // OpenAI clients and the contract speak in multiples of 8 even where a tiny
            // test VAE would allow less.
            size_multiple: self.size_multiple().max(8),
            max_prompt_tokens: self.max_prompt_tokens() as u32,
            default_scheduler: self.default_scheduler(),
            inpainting_model: self.is_inpainting_model(),
            max_sequence_length: self.max_sequence_length() as u32,
            image_seq_multiple: match self.family() {
                Family::Flux => self.size_multiple(),
                Family::Sd1 | Family::Sd2 | Family::Sdxl => 0,
            },
            strength_rule: self.strength_rule(),
            redux: self.has_redux(),
            classifier_free_guidance: self.runs_classifier_free_guidance(),
        }
    }

    fn scheduler_config(&self) -> Option<SchedulerConfig> {
        Some(Pipeline::scheduler_config(self).clone())
    }

    fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        Pipeline::text_to_image(self, req, progress)
    }

    fn image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        Pipeline::image_to_image(self, req, image, strength, progress)
    }

    fn inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        Pipeline::inpaint(self, req, image, mask, strength, progress)
    }

    fn generate(&self, batch: &mut [BatchEntry<'_>]) -> Vec<Result<Vec<RgbImage>>> {
        self.generate_batch(batch)
    }
}
