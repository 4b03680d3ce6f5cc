//! Stable Diffusion 1.x/2.x, behaving as diffusers' `StableDiffusionPipeline`,
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline`.
//!
//! ```text
//! prompt, negative ──tokenizer──▶ ids ──CLIP──▶ embeds [uncond×n; cond×n] (uncond only with CFG)
//! initial latents (text-to-image: seed ──TorchRng──▶ noise × init_noise_sigma;
//!                  image tasks: see edit.rs — VAE-encoded input noised to the first step)
//! for each timestep from the first: UNet(scale(latents) twice batched [+ mask channels], t, embeds)
//!                                   → guidance → scheduler.step [→ blend with the noised original]
//! latents / scaling_factor ──VAE decode──▶ (x/2+0.5).clamp(0,1)·255 ──▶ RGB images
//! ```
//!
//! The three tasks share every piece: [`StableDiffusion::conditioning`], the denoising loop
//! (`batch.rs`, driven per request by a [`Plan`] that says where the loop starts and what it
//! adds to each step; one request alone is a batch of one) and [`StableDiffusion::decode`].
//! `edit.rs` holds what only image-to-image and inpainting need (input images to tensors, VAE
//! encoding, masks); `batch.rs` runs several requests through shared UNet passes and decodes
//! the previews a [`Progress`] asks for.
//!
//! The UNet, text encoder and VAE run in the run dtype (`torch_dtype_run`) and are built resident or
//! offloaded (`enable_cpu_offload`, see `crate::models::component`); latents, guidance and
//! scheduler math stay in float32. Everything is synchronous: the service calls it on a blocking thread.

mod batch;
mod edit;

pub use batch::{preview_steps, BatchEntry, Input, MAX_PARTIAL_IMAGES};
pub use edit::first_step;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};

use super::image::to_rgb_images;
use crate::device::Precision;
use crate::error::{Result, WorkerError};
use crate::models::clip::ClipTextTransformer;
use crate::models::component::{Component, Offload, WeightFiles};
use crate::models::config::{
    divides, read_json, ClipActivation, ClipTextConfig, UNetConfigFile, VaeConfigFile,
};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet;
use crate::models::vae::Vae;
use crate::models::vae_tiling::TileSizes;
use crate::rng::TorchRng;
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype of the UNet, VAE and text encoder weights and activations
    /// (`torch_dtype_run`).
    pub dtype: DType,
    /// The dtype weights are converted to as they are read, before `dtype`
    /// (`torch_dtype_init`; see `crate::device`).
    pub init_dtype: DType,
    /// Keep the UNet, VAE and text encoder off the device except while each runs
    /// (`enable_cpu_offload`; see `crate::models::component`).
    pub cpu_offload: bool,
    /// The repo id or directory, used only to name the model in errors.
    pub source_name: String,
    /// Encode and decode large pictures tile by tile, with tiles of the VAE config's
    /// `sample_size` (diffusers' `enable_vae_tiling`). Slicing needs no option: the VAE always
    /// decodes one image at a time.
    pub vae_tiling: bool,
}

/// Which generation of Stable Diffusion a repo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP text encoder (quick_gelu).
    Sd1,
    /// OpenCLIP text encoder (gelu).
    Sd2,
}

/// One request's generation parameters, already validated by the caller except for the size.
/// Text-to-image is exactly this; image-to-image and inpainting add an input (see `edit.rs`).
#[derive(Debug, Clone)]
pub struct TextToImage {
    pub prompt: String,
    /// Empty when the client sent none (diffusers then uses "" as the unconditional prompt).
    pub negative_prompt: String,
    /// Images to generate from one prompt and one seed.
    pub n: usize,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub steps: usize,
    /// Classifier-free guidance runs only when this is above 1.
    pub guidance_scale: f64,
    pub scheduler: SchedulerKind,
}

/// Observer of the denoising loop.
pub trait Progress {
    /// Called after each denoising step (`step` counts from 1 to `total`) with the float32
    /// latents; `Break` cancels the generation (→ [`WorkerError::Cancelled`]).
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
    fn on_partial_images(
        &mut self,
        _index: usize,
        _images: Vec<image::RgbImage>,
    ) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// The stages of one request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Tokenizer and text encoder.
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

/// The conditioning for a batch of images, computed once per request.
#[derive(Debug)]
pub struct Conditioning {
    /// (2n, seq, dim) `[uncond×n; cond×n]` with guidance, else (n, seq, dim) in the model dtype.
    embeds: Tensor,
    /// The guidance scale when classifier-free guidance runs.
    guidance: Option<f64>,
}

/// A loaded Stable Diffusion 1.x/2.x model.
#[derive(Debug)]
pub struct StableDiffusion {
    unet: Component<UNet>,
    /// True for inpainting UNets (9 input channels: latents, mask, masked-image latents), which
    /// diffusers drives by concatenation; false for ordinary 4-channel UNets.
    inpaint_unet: bool,
    vae: Component<Vae>,
    text_encoder: Component<ClipTextTransformer>,
    /// The slot the three components share when offloaded; emptied after each request.
    offload: Option<Arc<Offload>>,
    tokenizer: ClipTokenizer,
    scheduler_config: SchedulerConfig,
    family: Family,
    /// Latent channels the UNet denoises (4 for SD).
    latent_channels: usize,
    /// The UNet's training resolution in latents.
    sample_size: usize,
    /// Pixels per latent along each side.
    vae_scale_factor: usize,
    /// Latents are divided by this before decoding.
    vae_scaling_factor: f64,
    device: Device,
    dtype: DType,
}

impl StableDiffusion {
    /// Loads every component of the diffusers repo in `dir`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let source = opts.source_name.as_str();
        let (device, dtype) = (&opts.device, opts.dtype);
        let precision = Precision {
            init: opts.init_dtype,
            run: dtype,
        };
        let offload = opts.cpu_offload.then(Offload::new);
        let files = |folder: &str, stem| WeightFiles {
            source_name: source.to_string(),
            dir: dir.join(folder),
            stem,
        };

        let te_config_path = dir.join("text_encoder/config.json");
        let te_config: ClipTextConfig = read_json(source, &te_config_path)?;
        te_config.validate(source, &te_config_path)?;
        let family = match te_config.hidden_act {
            ClipActivation::QuickGelu => Family::Sd1,
            ClipActivation::Gelu => Family::Sd2,
        };
        let tokenizer = ClipTokenizer::load(
            source,
            &dir.join("tokenizer"),
            te_config.max_position_embeddings,
        )?;
        let text_encoder = Component::load(
            files("text_encoder", "model"),
            precision,
            device,
            offload.as_ref(),
            move |vb| ClipTextTransformer::new(vb, te_config.clone()),
        )?;

        let unet_config_path = dir.join("unet/config.json");
        let unet_file: UNetConfigFile = read_json(source, &unet_config_path)?;
        let unet_spec = unet_file.to_candle(source, &unet_config_path)?;
        let vae_config_path = dir.join("vae/config.json");
        let vae_file: VaeConfigFile = read_json(source, &vae_config_path)?;
        let vae_spec = vae_file.to_candle(source, &vae_config_path)?;
        // diffusers decides the inpainting variant from the UNet's channels, never from names:
        // latents in and out, or latents + mask + masked-image latents in.
        let latent = vae_spec.latent_channels;
        let inpaint_unet = unet_spec.in_channels == 2 * latent + 1;
        if (unet_spec.in_channels != latent && !inpaint_unet) || unet_spec.out_channels != latent {
            return Err(WorkerError::model_load(
                source,
                &vae_config_path,
                format!(
                    "key 'latent_channels': {latent} does not match the UNet's in/out channels \
                     {}/{} (expected {latent}/{latent}, or {}/{latent} for inpainting)",
                    unet_spec.in_channels,
                    unet_spec.out_channels,
                    2 * latent + 1
                ),
            ));
        }
        let tiles = if opts.vae_tiling {
            let sizes =
                TileSizes::from_config_file(source, &vae_config_path, vae_spec.scale_factor)?;
            Some(sizes)
        } else {
            None
        };
        let unet = {
            let spec = unet_spec.clone();
            Component::load(
                files("unet", "diffusion_pytorch_model"),
                precision,
                device,
                offload.as_ref(),
                move |vb| UNet::new(vb, spec.in_channels, spec.out_channels, &spec.candle),
            )?
        };
        let vae = {
            let spec = vae_spec.clone();
            Component::load(
                files("vae", "diffusion_pytorch_model"),
                precision,
                device,
                offload.as_ref(),
                move |vb| {
                    let mut vae = Vae::new(vb, spec.in_channels, spec.out_channels, &spec.candle)?;
                    vae.set_tiling(tiles);
                    Ok(vae)
                },
            )?
        };

        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;

        Ok(Self {
            unet,
            inpaint_unet,
            vae,
            text_encoder,
            offload,
            tokenizer,
            scheduler_config,
            family,
            latent_channels: latent,
            sample_size: unet_spec.sample_size,
            vae_scale_factor: vae_spec.scale_factor,
            vae_scaling_factor: vae_spec.scaling_factor,
            device: device.clone(),
            dtype,
        })
    }

    /// Lets an offloaded model's last used component go (nothing to do when resident), so
    /// that an idle worker holds no component on the device.
    pub fn release_offloaded(&self) {
        if let Some(offload) = &self.offload {
            offload.release();
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// True when the UNet is an inpainting UNet (9 input channels). Such a model inpaints by
    /// concatenation, edits without a mask as an inpaint of the whole picture, and cannot do
    /// text-to-image.
    pub fn is_inpainting_model(&self) -> bool {
        self.inpaint_unet
    }

    /// (width, height) the model was trained at: the UNet's sample size times the VAE scale
    /// factor (512 for SD 1.5, 768 for SD 2.1; 64 for the tiny test models).
    pub fn native_size(&self) -> (u32, u32) {
        let side = u32::try_from(self.sample_size * self.vae_scale_factor).unwrap_or(u32::MAX);
        (side, side)
    }

    /// Width and height must be multiples of this (the VAE scale factor).
    pub fn size_multiple(&self) -> u32 {
        u32::try_from(self.vae_scale_factor).unwrap_or(u32::MAX)
    }

    /// The scheduler the repo's `scheduler_config.json` names, or Euler when it names one this
    /// worker does not implement.
    pub fn default_scheduler(&self) -> SchedulerKind {
        SchedulerKind::from_config(&self.scheduler_config).unwrap_or_else(|| {
            tracing::warn!(
                class = self
                    .scheduler_config
                    .class_name
                    .as_deref()
                    .unwrap_or("(none)"),
                "the model's scheduler is not supported; defaulting to euler"
            );
            SchedulerKind::Euler
        })
    }

    /// Prompt tokens that reach the text encoder; longer prompts are truncated.
    pub fn max_prompt_tokens(&self) -> usize {
        self.tokenizer.max_prompt_tokens()
    }

    /// The repo's `scheduler_config.json`, which every scheduler of a request is built from.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The text encoder's output for `[negative×n; prompt×n]` when `cfg`, else `prompt×n`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative: &str,
        n: usize,
        cfg: bool,
    ) -> Result<Tensor> {
        Ok(self
            .conditioning(prompt, negative, n, cfg.then_some(1.0))?
            .embeds)
    }

    /// The per-request conditioning the denoising loop takes: the embeddings of
    /// [`Self::encode_prompt`] and the guidance scale, `None` for no classifier-free guidance.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative: &str,
        n: usize,
        guidance: Option<f64>,
    ) -> Result<Conditioning> {
        let mut texts = vec![prompt];
        if guidance.is_some() {
            texts.insert(0, negative);
        }
        let len = self.tokenizer.max_len();
        let mut ids = Vec::with_capacity(texts.len() * len);
        for text in &texts {
            ids.extend(self.tokenizer.encode(text)?);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), len), &self.device)?;
        // One encoder pass for both prompts; each row then repeats for the n images.
        let encoded = self.text_encoder.get()?.forward(&ids)?;
        let (rows, seq, dim) = encoded.dims3()?;
        let embeds = encoded
            .unsqueeze(1)?
            .repeat((1, n, 1, 1))?
            .reshape((rows * n, seq, dim))?;
        Ok(Conditioning { embeds, guidance })
    }

    /// VAE-decodes float32 latents (as the scheduler leaves them) into images.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let scaled = (latents / self.vae_scaling_factor)?.to_dtype(self.dtype)?;
        let images = self.vae.get()?.decode(&scaled)?;
        to_rgb_images(&images)
    }

    /// Checks what every task requires of a request: size, image count and steps.
    fn check_request(&self, req: &TextToImage) -> Result<()> {
        let f = self.vae_scale_factor;
        let (width, height) = (req.width, req.height);
        if width == 0 || height == 0 || !divides(f, width) || !divides(f, height) {
            return Err(WorkerError::invalid(
                "size",
                format!("{width}x{height} must be positive multiples of {f}"),
            ));
        }
        if req.n == 0 {
            return Err(WorkerError::invalid("n", "must be at least 1"));
        }
        if req.steps == 0 {
            return Err(WorkerError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The latent shape of `req`'s batch: (n, channels, height / f, width / f).
    fn latent_shape(&self, req: &TextToImage) -> [usize; 4] {
        let f = self.vae_scale_factor;
        [req.n, self.latent_channels, req.height / f, req.width / f]
    }

    /// Generates `req.n` images from the prompt alone.
    pub fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<image::RgbImage>> {
        self.run_one(req, Input::Text, progress)
    }

    /// Text-to-image's initial latents: the seed's noise scaled to the first step. The
    /// Denoise stage includes this (and an input image's VAE encoding for the image tasks),
    /// which the timings have no separate field for.
    fn prepare_text(
        &self,
        req: &TextToImage,
        scheduler: Box<dyn Scheduler>,
        mut rng: TorchRng,
    ) -> Result<(Plan, Tensor)> {
        let noise = rng.randn_tensor(&self.latent_shape(req), &self.device, DType::F32)?;
        let latents = (noise * scheduler.init_noise_sigma())?;
        Ok((Plan::new(scheduler, rng), latents))
    }
}

/// How the denoising loop runs for one request.
struct Plan {
    scheduler: Box<dyn Scheduler>,
    /// The request's generator, after the draws that made the initial latents (ancestral
    /// schedulers keep drawing from it).
    rng: TorchRng,
    /// Loop index of the first step: 0, or later for image-to-image strengths below 1.
    start: usize,
    /// Inpainting UNets: mask and masked-image latents, appended to the UNet input's channels.
    extra_channels: Option<Tensor>,
    /// Inpainting with an ordinary UNet: keeps the original outside the mask after each step.
    blend: Option<Blend>,
}

impl Plan {
    fn new(scheduler: Box<dyn Scheduler>, rng: TorchRng) -> Self {
        Plan {
            scheduler,
            rng,
            start: 0,
            extra_channels: None,
            blend: None,
        }
    }
}

/// Inpainting with a 4-channel UNet: after each step, outside the mask the latents are replaced
/// by the original image's latents noised to the next step's level (diffusers' blending).
struct Blend {
    /// The input image's latents, (n, C, h, w) float32.
    original: Tensor,
    /// The noise the initial latents were made with, reused to noise the original.
    noise: Tensor,
    /// (n, 1, h, w) float32: 1 where the model repaints, 0 where the original stays.
    mask: Tensor,
}

impl Blend {
    /// `(1 - mask) · original_noised + mask · latents`, with the original noised to loop index
    /// `next` (not noised after the last step).
    fn apply(&self, scheduler: &dyn Scheduler, latents: &Tensor, next: usize) -> Result<Tensor> {
        let original = if next < scheduler.timesteps().len() {
            scheduler.add_noise(&self.original, &self.noise, next)?
        } else {
            self.original.clone()
        };
        let keep = self.mask.affine(-1.0, 1.0)?;
        Ok((original.broadcast_mul(&keep)? + latents.broadcast_mul(&self.mask)?)?)
    }
}
