//! Stable Diffusion 1.x/2.x text-to-image, behaving as diffusers' `StableDiffusionPipeline`.
//!
//! ```text
//! prompt, negative ──tokenizer──▶ ids ──CLIP──▶ embeds [uncond×n; cond×n] (uncond only with CFG)
//! seed ──TorchRng──▶ noise (n, C, h/f, w/f) in one draw ──× init_noise_sigma──▶ latents
//! for each timestep: UNet(scale(latents) twice batched, t, embeds) → guidance → scheduler.step
//! latents / scaling_factor ──VAE decode──▶ (x/2+0.5).clamp(0,1)·255 ──▶ RGB images
//! ```
//!
//! The UNet, text encoder and VAE run in the load dtype; latents, guidance and scheduler math stay
//! in float32. Everything is synchronous: the service calls it on a blocking thread.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKL;

use super::image::to_rgb_images;
use crate::error::{Result, WorkerError};
use crate::models::clip::ClipTextTransformer;
use crate::models::config::{
    divides, read_json, ClipActivation, ClipTextConfig, UNetConfigFile, VaeConfigFile,
};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::UNet;
use crate::models::weights::load_var_builder;
use crate::rng::TorchRng;
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The dtype of the UNet, VAE and text encoder weights and activations.
    pub dtype: DType,
    /// The repo id or directory, used only to name the model in errors.
    pub source_name: String,
}

/// Which generation of Stable Diffusion a repo is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP text encoder (quick_gelu).
    Sd1,
    /// OpenCLIP text encoder (gelu).
    Sd2,
}

/// One text-to-image request, already validated by the caller except for the size.
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
}

/// The stages of one request, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Tokenizer and text encoder.
    EncodePrompt,
    /// The whole denoising loop.
    Denoise,
    /// VAE decode and conversion to 8-bit pixels.
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
    unet: UNet,
    vae: AutoEncoderKL,
    text_encoder: ClipTextTransformer,
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
        let te_dir = dir.join("text_encoder");
        let te_vb = load_var_builder(source, &te_dir, "model", dtype, device)?;
        let text_encoder = ClipTextTransformer::new(te_vb, te_config)
            .map_err(|e| WorkerError::model_load(source, te_dir.join("model.safetensors"), e))?;

        let unet_config_path = dir.join("unet/config.json");
        let unet_file: UNetConfigFile = read_json(source, &unet_config_path)?;
        let unet_spec = unet_file.to_candle(source, &unet_config_path)?;
        let unet_dir = dir.join("unet");
        let unet_vb =
            load_var_builder(source, &unet_dir, "diffusion_pytorch_model", dtype, device)?;
        let unet = UNet::new(
            unet_vb,
            unet_spec.in_channels,
            unet_spec.out_channels,
            &unet_spec.candle,
        )
        .map_err(|e| {
            WorkerError::model_load(
                source,
                unet_dir.join("diffusion_pytorch_model.safetensors"),
                e,
            )
        })?;

        let vae_config_path = dir.join("vae/config.json");
        let vae_file: VaeConfigFile = read_json(source, &vae_config_path)?;
        let vae_spec = vae_file.to_candle(source, &vae_config_path)?;
        if vae_spec.latent_channels != unet_spec.in_channels
            || unet_spec.in_channels != unet_spec.out_channels
        {
            return Err(WorkerError::model_load(
                source,
                &vae_config_path,
                format!(
                    "key 'latent_channels': {} does not match the UNet's in/out channels {}/{}",
                    vae_spec.latent_channels, unet_spec.in_channels, unet_spec.out_channels
                ),
            ));
        }
        let vae_dir = dir.join("vae");
        let vae_vb = load_var_builder(source, &vae_dir, "diffusion_pytorch_model", dtype, device)?;
        let vae = AutoEncoderKL::new(
            vae_vb,
            vae_spec.in_channels,
            vae_spec.out_channels,
            vae_spec.candle,
        )
        .map_err(|e| {
            WorkerError::model_load(
                source,
                vae_dir.join("diffusion_pytorch_model.safetensors"),
                e,
            )
        })?;

        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;

        Ok(Self {
            unet,
            vae,
            text_encoder,
            tokenizer,
            scheduler_config,
            family,
            latent_channels: unet_spec.in_channels,
            sample_size: unet_spec.sample_size,
            vae_scale_factor: vae_spec.scale_factor,
            vae_scaling_factor: vae_spec.scaling_factor,
            device: device.clone(),
            dtype,
        })
    }

    pub fn family(&self) -> Family {
        self.family
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

    /// The per-request conditioning [`Self::denoise_step`] takes: the embeddings of
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
        let encoded = self.text_encoder.forward(&ids)?;
        let (rows, seq, dim) = encoded.dims3()?;
        let embeds = encoded
            .unsqueeze(1)?
            .repeat((1, n, 1, 1))?
            .reshape((rows * n, seq, dim))?;
        Ok(Conditioning { embeds, guidance })
    }

    /// Runs one denoising step: the batched UNet pass, guidance, and the scheduler update.
    /// `latents` are float32; returns the next latents.
    pub fn denoise_step(
        &self,
        scheduler: &mut dyn Scheduler,
        cond: &Conditioning,
        latents: &Tensor,
        step_index: usize,
        rng: &mut TorchRng,
    ) -> Result<Tensor> {
        let timestep = *scheduler.timesteps().get(step_index).ok_or_else(|| {
            WorkerError::Internal(format!("step {step_index} is past the schedule"))
        })?;
        // Scaling depends only on the step, so scale once and then duplicate for guidance.
        let scaled = scheduler.scale_model_input(latents, step_index)?;
        let input = match cond.guidance {
            Some(_) => Tensor::cat(&[&scaled, &scaled], 0)?,
            None => scaled,
        };
        let output = self
            .unet
            .forward(&input.to_dtype(self.dtype)?, timestep, &cond.embeds)?
            .to_dtype(DType::F32)?;
        let noise_pred = match cond.guidance {
            Some(g) => {
                let halves = output.chunk(2, 0)?;
                let (uncond, text) = (&halves[0], &halves[1]);
                (uncond + ((text - uncond)? * g)?)?
            }
            None => output,
        };
        Ok(scheduler.step(&noise_pred, step_index, latents, rng)?)
    }

    /// VAE-decodes float32 latents (as the scheduler leaves them) into images.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<image::RgbImage>> {
        let scaled = (latents / self.vae_scaling_factor)?.to_dtype(self.dtype)?;
        let images = self.vae.decode(&scaled)?;
        to_rgb_images(&images)
    }

    /// Checks the request size against the VAE scale factor.
    fn check_size(&self, width: usize, height: usize) -> Result<()> {
        let f = self.vae_scale_factor;
        if width == 0 || height == 0 || !divides(f, width) || !divides(f, height) {
            return Err(WorkerError::invalid(
                "size",
                format!("{width}x{height} must be positive multiples of {f}"),
            ));
        }
        Ok(())
    }

    /// Generates `req.n` images.
    pub fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<image::RgbImage>> {
        self.check_size(req.width, req.height)?;
        if req.n == 0 {
            return Err(WorkerError::invalid("n", "must be at least 1"));
        }
        if req.steps == 0 {
            return Err(WorkerError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let guidance = (req.guidance_scale > 1.0).then_some(req.guidance_scale);
        let started = Instant::now();
        let cond = self.conditioning(&req.prompt, &req.negative_prompt, req.n, guidance)?;
        progress.on_stage(Stage::EncodePrompt, started.elapsed());
        let started = Instant::now();
        let mut scheduler = req.scheduler.build(&self.scheduler_config, req.steps)?;
        let mut rng = TorchRng::new(req.seed);
        let f = self.vae_scale_factor;
        let shape = [req.n, self.latent_channels, req.height / f, req.width / f];
        let noise = rng.randn_tensor(&shape, &self.device, DType::F32)?;
        let mut latents = (noise * scheduler.init_noise_sigma())?;
        let total = scheduler.timesteps().len();
        for step_index in 0..total {
            latents =
                self.denoise_step(scheduler.as_mut(), &cond, &latents, step_index, &mut rng)?;
            if progress.on_step(step_index + 1, total, &latents).is_break() {
                return Err(WorkerError::Cancelled);
            }
        }
        progress.on_stage(Stage::Denoise, started.elapsed());
        let started = Instant::now();
        let images = self.decode(&latents)?;
        progress.on_stage(Stage::Decode, started.elapsed());
        Ok(images)
    }
}
