//! Generation pipelines: a loaded model plus the one denoising loop every family runs.
//!
//! ```text
//! model_index.rs  which pipeline class the repo is (its `model_index.json`), never its name
//! pipeline.rs     Pipeline: loads a repo's parts by family, checks requests, owns the pieces below
//! sd.rs           SD 1.x/2.x conditioning: one CLIP, final hidden states
//! sdxl.rs         SDXL conditioning: two CLIPs (penultimate states), pooled embeds, time ids
//! flux.rs         FLUX conditioning: CLIP pooled + T5 states, embedded guidance, Redux tokens
//! conditioning.rs Conditioning: what a family's prompt encoding hands the loop, batchable by rows
//! denoiser.rs     the denoising network behind one `predict` (UNet, FLUX transformer on packed
//!                 latents)
//! latents.rs      the VAE between pixels and latents: scaling, shift, statistics, upcast, tiling
//! denoise.rs      THE loop: one or several requests through shared forward passes, previews
//! image_tasks.rs  image-to-image and inpainting: VAE-encoded inputs, strength, masks
//! image.rs        decoded VAE output → 8-bit RGB images
//! ```
//!
//! What differs between families is how the prompt becomes [`Conditioning`] and which network
//! predicts; the loop, guidance, schedulers, image tasks, batching, previews, cancellation,
//! offload and dtype handling exist once. A new family adds its conditioning module and a
//! [`denoiser`] arm.

mod conditioning;
mod denoise;
mod denoiser;
mod flux;
mod image;
mod image_tasks;
mod latents;
mod model_index;
mod pipeline;
mod sd;
mod sdxl;

pub use conditioning::Conditioning;
pub use denoise::{preview_steps, MAX_PARTIAL_IMAGES};
pub use flux::MAX_SEQUENCE_LENGTH;
pub use image_tasks::{first_step, flux_first_step};
pub use latents::Autoencoder;
pub use model_index::{ModelIndex, PipelineClass};
pub use pipeline::{Family, Pipeline, StrengthRule};

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Duration;

use ::image::{GrayImage, RgbImage};
use candle_core::{DType, Device, Tensor};

use crate::lora::{AdapterFile, LoraWeight};
use crate::schedulers::SchedulerKind;

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype of the denoiser, VAE and text encoder weights and activations
    /// (`torch_dtype_run`).
    pub dtype: DType,
    /// The dtype weights are converted to as they are read, before `dtype`
    /// (`torch_dtype_init`; see `crate::device`).
    pub init_dtype: DType,
    /// Keep the parts off the device except while each runs (`enable_cpu_offload`; see
    /// `crate::models::component`).
    pub cpu_offload: bool,
    /// The repo id or directory, used only to name the model in errors.
    pub source_name: String,
    /// Encode and decode large pictures tile by tile, with tiles of the VAE config's
    /// `sample_size` (diffusers' `enable_vae_tiling`). Slicing needs no option: the VAE always
    /// decodes one image at a time.
    pub vae_tiling: bool,
    /// FLUX: a FluxFillPipeline repo whose transformer runs masked edits beside the ordinary
    /// model (`edits_config.inpaint_pipeline` with `edits_config.pipeline: FluxFillPipeline`).
    pub fill_transformer: Option<PathBuf>,
    /// FLUX: a FluxPriorReduxPipeline repo for variations (`variations_config.enable_flux_redux`).
    pub redux: Option<PathBuf>,
    /// LoRA adapters loaded with the model (`pipeline.loras`), applied per request.
    pub loras: Vec<AdapterFile>,
}

impl LoadOptions {
    /// Options for `source_name` on `device` in `dtype` (weights converted straight to it),
    /// resident, untiled, without extra FLUX parts.
    pub fn new(source_name: impl Into<String>, device: Device, dtype: DType) -> Self {
        LoadOptions {
            device,
            dtype,
            init_dtype: dtype,
            cpu_offload: false,
            source_name: source_name.into(),
            vae_tiling: false,
            fill_transformer: None,
            redux: None,
            loras: Vec::new(),
        }
    }
}

/// One request's generation parameters, already validated by the caller except for the size.
/// Text-to-image is exactly this; image-to-image and inpainting add an [`Input`].
#[derive(Debug, Clone)]
pub struct TextToImage {
    pub prompt: String,
    /// `None` when the client sent none. SD 1.x/2.x then use "" as the unconditional prompt;
    /// SDXL (with `force_zeros_for_empty_prompt`) uses zero embeddings, and encodes an explicit
    /// "" like any other negative prompt, as diffusers does.
    pub negative_prompt: Option<String>,
    /// Images to generate from one prompt and one seed.
    pub n: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub steps: usize,
    /// Classifier-free guidance runs only when this is above 1 (SD, SDXL); FLUX dev embeds it.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
    /// FLUX: T5 tokens the prompt is padded or truncated to; `None` = the model's default.
    /// Ignored by CLIP-only families (their window is fixed).
    pub max_sequence_length: Option<usize>,
    /// LoRA adapters and weights for this request (`lora_settings`); empty = the plain model.
    pub loras: Vec<LoraWeight>,
}

/// What a request starts from besides its prompt, already at the output size.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    Text,
    Image {
        image: &'a RgbImage,
        strength: f64,
    },
    /// `mask` is white where the model repaints.
    Inpaint {
        image: &'a RgbImage,
        mask: &'a GrayImage,
        strength: f64,
    },
    /// FLUX Redux: the image conditions the generation through the prior (any size).
    Redux {
        image: &'a RgbImage,
    },
}

/// One request of a batch.
pub struct BatchEntry<'a> {
    pub request: &'a TextToImage,
    pub input: Input<'a>,
    pub progress: &'a mut dyn Progress,
}

/// Observer of the denoising loop.
pub trait Progress {
    /// Called after each denoising step (`step` counts from 1 to `total`) with the float32
    /// latents; `Break` cancels the generation (→ `WorkerError::Cancelled`).
    fn on_step(&mut self, step: usize, total: usize, latents: &Tensor) -> ControlFlow<()>;

    /// Called when a stage of the request finishes, with its wall time (for the worker's
    /// timings and metrics). Ignored by default.
    fn on_stage(&mut self, _stage: Stage, _took: Duration) {}

    /// Previews of the request's images wanted while it denoises (0 to [`MAX_PARTIAL_IMAGES`];
    /// more count as the most). None by default.
    fn partial_images(&self) -> usize {
        0
    }

    /// Preview `index` (from 0) of every image of the request, decoded after one of the steps
    /// [`preview_steps`] picks; `Break` cancels the generation like [`Progress::on_step`].
    fn on_partial_images(&mut self, _index: usize, _images: Vec<RgbImage>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// The stages of one request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Tokenizers and text encoders.
    EncodePrompt,
    /// The whole denoising loop (preparing the initial latents included, previews excluded).
    Denoise,
    /// VAE decode and conversion to 8-bit pixels, of the images and of their previews.
    Decode,
}

/// A [`Progress`] that never cancels and ignores the steps.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn on_step(&mut self, _: usize, _: usize, _: &Tensor) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}
