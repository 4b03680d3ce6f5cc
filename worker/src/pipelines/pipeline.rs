//! A loaded diffusion model, whatever its family, behaving as diffusers' pipelines of its class
//! (`StableDiffusion[XL][Img2Img|Inpaint]Pipeline`, `Flux[Img2Img|Inpaint|Fill]Pipeline`).
//!
//! ```text
//! load: model_index.json ─_class_name─▶ family ─▶ text encoders (sd.rs | sdxl.rs | flux.rs),
//!       denoiser (UNet | FLUX transformer), VAE (latents.rs), scheduler config; the parts'
//!       configs are checked against each other. FLUX may add a Fill transformer from another
//!       repo (masked edits) and a Redux prior (variations).
//! run:  request ─check─▶ conditioning (family) ─▶ denoise.rs (shared loop) ─▶ VAE decode ─▶ RGB
//! ```
//!
//! The denoiser, text encoders and VAE run in the run dtype (`torch_dtype_run`) and are built
//! resident or offloaded (`enable_cpu_offload`, see `crate::models::component`); latents,
//! guidance and scheduler math stay in float32. Everything is synchronous: the service calls it
//! on the model thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::{GrayImage, RgbImage};

use super::conditioning::Conditioning;
use super::denoise::Plan;
use super::denoiser::Denoiser;
use super::flux::FluxText;
use super::latents::Autoencoder;
use super::model_index::{ModelIndex, PipelineClass};
use super::sd::{SdText, TextEncoder};
use super::sdxl::{SdxlText, TIME_IDS};
use super::{Input, LoadOptions, Progress, TextToImage};
use crate::device::Precision;
use crate::error::{Result, WorkerError};
use crate::lora::{self, LoraBank, Naming, Target};
use crate::models::component::{Component, Offload, WeightFiles};
use crate::models::config::{divides, read_json, UNetConfigFile, UNetSpec};
use crate::models::flux::{FluxTransformer, FluxTransformerConfig, FluxVariant};
use crate::models::redux::FluxRedux;
use crate::models::unet::UNet;
use crate::rng::TorchRng;
use crate::schedulers::{ScheduleContext, Scheduler, SchedulerConfig, SchedulerKind};

/// Which model family a loaded pipeline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// OpenAI CLIP text encoder (quick_gelu).
    Sd1,
    /// OpenCLIP text encoder (gelu).
    Sd2,
    /// Two CLIP text encoders, pooled embeddings and time ids.
    Sdxl,
    /// FLUX.1: CLIP pooled + T5 states, a flow-matching transformer on packed latents.
    Flux,
}

/// How a request's first step follows from its strength (image tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrengthRule {
    /// `StableDiffusion[XL]*Pipeline.get_timesteps`: `int(steps × strength)` steps run.
    Discrete,
    /// `Flux*Pipeline.get_timesteps`: the loop starts at `int(steps − steps × strength)`.
    Flow,
}

impl StrengthRule {
    /// The loop index of the first step, or an error naming `strength` when it is out of (0, 1]
    /// or leaves no step to run.
    pub fn first_step(self, steps: usize, strength: f64) -> Result<usize> {
        match self {
            StrengthRule::Discrete => super::image_tasks::first_step(steps, strength),
            StrengthRule::Flow => super::image_tasks::flux_first_step(steps, strength),
        }
    }
}

/// How a family turns a prompt into [`Conditioning`].
#[derive(Debug)]
enum TextEncoders {
    // Boxed: tokenizers are large and the variants differ a lot in size.
    Sd(Box<SdText>),
    Sdxl(Box<SdxlText>),
    Flux(Box<FluxText>),
}

/// A loaded model.
#[derive(Debug)]
pub struct Pipeline {
    family: Family,
    text: TextEncoders,
    pub(super) denoiser: Denoiser,
    /// True for inpainting models (SD: latents + mask + masked-image latents in; FLUX Fill:
    /// latents + masked-image latents + mask channels), which diffusers drives by
    /// concatenation; false for ordinary ones.
    pub(super) inpaint_unet: bool,
    /// FLUX: a Fill transformer loaded beside an ordinary one (`edits_config.inpaint_pipeline`),
    /// which then runs every masked edit.
    pub(super) fill: Option<Denoiser>,
    /// FLUX: the Redux prior variations run through (`variations_config.enable_flux_redux`).
    pub(super) redux: Option<FluxRedux>,
    pub(super) vae: Autoencoder,
    /// The slot the parts share when offloaded; emptied after each request.
    offload: Option<Arc<Offload>>,
    /// The LoRA adapters (`pipeline.loras`) the denoiser and text encoders were built to reach;
    /// each batch runs with its requests' set active (see `denoise.rs`).
    pub(super) loras: LoraBank,
    scheduler_config: SchedulerConfig,
    /// The denoiser's training resolution in latents (FLUX: diffusers' default 128).
    sample_size: usize,
    pub(super) device: Device,
    pub(super) dtype: DType,
}

impl Pipeline {
    /// Loads every part of the diffusers repo in `dir`, choosing the family from its
    /// `model_index.json`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let source = opts.source_name.as_str();
        let index = ModelIndex::read(source, dir)?;
        let class = index.class(source, dir)?;
        if index.requires_aesthetics_score {
            return Err(WorkerError::model_load(
                source,
                dir.join("model_index.json"),
                "key 'requires_aesthetics_score': SDXL refiner models are not supported",
            ));
        }
        let device = &opts.device;
        let precision = Precision {
            init: opts.init_dtype,
            run: opts.dtype,
        };
        let offload = opts.cpu_offload.then(Offload::new);
        let loras = LoraBank::load(&opts.loras, device, opts.dtype)?;

        let vae = Autoencoder::load(
            source,
            dir,
            precision,
            device,
            offload.as_ref(),
            opts.vae_tiling,
        )?;
        let parts = match class {
            PipelineClass::StableDiffusion | PipelineClass::StableDiffusionXl => load_unet_family(
                source,
                dir,
                &index,
                class,
                &vae,
                precision,
                device,
                offload.as_ref(),
                &loras,
            )?,
            PipelineClass::Flux => load_flux(
                source,
                dir,
                &index,
                &vae,
                precision,
                device,
                offload.as_ref(),
                &loras,
            )?,
        };
        let adapted: &[Target] = match parts.family {
            Family::Sdxl => &[Target::Denoiser, Target::TextEncoder, Target::TextEncoder2],
            Family::Sd1 | Family::Sd2 | Family::Flux => &[Target::Denoiser, Target::TextEncoder],
        };
        loras.check_parts(adapted)?;
        let fill = match &opts.fill_transformer {
            Some(fill_dir) => Some(load_fill_beside(
                source,
                dir,
                fill_dir,
                &parts,
                &vae,
                &loras,
                precision,
                device,
                offload.as_ref(),
            )?),
            None => None,
        };
        let redux = match &opts.redux {
            Some(redux_dir) => Some(load_redux(source, redux_dir, &parts, opts.dtype, device)?),
            None => None,
        };
        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let pipeline = Self {
            family: parts.family,
            text: parts.text,
            denoiser: parts.denoiser,
            inpaint_unet: parts.inpainting,
            fill,
            redux,
            vae,
            offload,
            loras,
            scheduler_config,
            sample_size: parts.sample_size,
            device: device.clone(),
            dtype: opts.dtype,
        };
        // The load's checks may have left a part in the offload slot.
        pipeline.release_offloaded();
        Ok(pipeline)
    }

    /// Lets an offloaded model's last used part go (nothing to do when resident), so that an
    /// idle worker holds no part on the device.
    pub fn release_offloaded(&self) {
        if let Some(offload) = &self.offload {
            offload.release();
        }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// The LoRA adapters requests can name, in config order.
    pub fn lora_names(&self) -> Vec<String> {
        self.loras.names()
    }

    /// True when the UNet is an inpainting UNet (9 input channels). Such a model inpaints by
    /// concatenation, edits without a mask as an inpaint of the whole picture, and cannot do
    /// text-to-image.
    pub fn is_inpainting_model(&self) -> bool {
        self.inpaint_unet
    }

    /// (width, height) the model was trained at: the denoiser's sample size times the VAE scale
    /// factor (512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL; 64 for the tiny test models).
    pub fn native_size(&self) -> (u32, u32) {
        let side = u32::try_from(self.sample_size * self.vae.scale_factor()).unwrap_or(u32::MAX);
        (side, side)
    }

    /// Width and height must be multiples of this: the VAE scale factor, twice that for FLUX
    /// (its latents are packed in 2×2 patches; 16 for FLUX.1).
    pub fn size_multiple(&self) -> u32 {
        u32::try_from(self.pixel_multiple()).unwrap_or(u32::MAX)
    }

    fn pixel_multiple(&self) -> usize {
        match self.family {
            Family::Flux => 2 * self.vae.scale_factor(),
            Family::Sd1 | Family::Sd2 | Family::Sdxl => self.vae.scale_factor(),
        }
    }

    /// The packed tokens per image of `width` × `height` (FLUX), for the schedule's shift.
    pub fn image_seq_len(&self, width: usize, height: usize) -> Option<usize> {
        let m = self.pixel_multiple();
        (self.family == Family::Flux).then(|| (width / m) * (height / m))
    }

    /// How a strength picks the first step for this model's pipelines.
    pub fn strength_rule(&self) -> StrengthRule {
        match self.family {
            Family::Flux => StrengthRule::Flow,
            Family::Sd1 | Family::Sd2 | Family::Sdxl => StrengthRule::Discrete,
        }
    }

    /// FLUX: the most T5 tokens a request may ask for (0 for CLIP-only families).
    pub fn max_sequence_length(&self) -> usize {
        match &self.text {
            TextEncoders::Flux(_) => super::flux::MAX_SEQUENCE_LENGTH,
            TextEncoders::Sd(_) | TextEncoders::Sdxl(_) => 0,
        }
    }

    /// True when variations run through a Redux prior.
    pub fn has_redux(&self) -> bool {
        self.redux.is_some()
    }

    /// True when a guidance scale above 1 runs classifier-free guidance (a second, unconditional
    /// row per image); FLUX embeds the scale in the transformer's input instead.
    pub fn runs_classifier_free_guidance(&self) -> bool {
        match &self.text {
            TextEncoders::Sd(_) | TextEncoders::Sdxl(_) => true,
            TextEncoders::Flux(_) => false,
        }
    }

    /// True when a Fill transformer beside the ordinary one runs the masked edits.
    pub fn has_fill(&self) -> bool {
        self.fill.is_some()
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

    /// Prompt tokens that reach the text encoder(s); longer prompts are truncated.
    pub fn max_prompt_tokens(&self) -> usize {
        match &self.text {
            TextEncoders::Sd(sd) => sd.text.tokenizer.max_prompt_tokens(),
            TextEncoders::Sdxl(sdxl) => sdxl.max_prompt_tokens(),
            TextEncoders::Flux(flux) => flux.max_prompt_tokens(),
        }
    }

    /// The repo's `scheduler_config.json`, which every scheduler of a request is built from.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// The scheduler `req` asks for, set to its steps.
    pub(super) fn scheduler(&self, req: &TextToImage) -> Result<Box<dyn Scheduler>> {
        let context = ScheduleContext {
            image_seq_len: self.image_seq_len(req.width, req.height),
        };
        req.scheduler
            .build_with(&self.scheduler_config, req.steps, &context)
    }

    /// The context the text encoder(s) give for `[negative×n; prompt×n]` when `cfg`, else
    /// `prompt×n` (for tests and tools that inspect the conditioning).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative: Option<&str>,
        n: usize,
        cfg: bool,
    ) -> Result<Tensor> {
        let (h, w) = self.native_size();
        Ok(self
            .conditioning(
                prompt,
                negative,
                n,
                cfg.then_some(1.0),
                (h as usize, w as usize),
            )?
            .context)
    }

    /// The per-request conditioning the loop takes, for `n` images of (height, width);
    /// `guidance` is the classifier-free guidance scale, `None` for none.
    pub fn conditioning(
        &self,
        prompt: &str,
        negative: Option<&str>,
        n: usize,
        guidance: Option<f64>,
        size: (usize, usize),
    ) -> Result<Conditioning> {
        match &self.text {
            TextEncoders::Sd(sd) => sd.encode(prompt, negative, n, guidance, &self.device),
            TextEncoders::Sdxl(sdxl) => sdxl.encode(
                prompt,
                negative,
                n,
                guidance,
                size,
                &self.device,
                self.dtype,
            ),
            // Through `conditioning` (tests, tools) FLUX takes its default text length and the
            // guidance scale as its embedded guidance (1.0 when none).
            TextEncoders::Flux(flux) => flux.encode(
                prompt,
                n,
                flux.sequence_length(None)?,
                guidance.unwrap_or(1.0),
                &self.device,
                self.dtype,
            ),
        }
    }

    /// A request's conditioning: classifier-free guidance above a scale of 1 for SD and SDXL;
    /// FLUX embeds the scale instead and takes the request's T5 length; Redux variations take
    /// the prior's tokens.
    pub(super) fn request_conditioning(
        &self,
        req: &TextToImage,
        input: Input<'_>,
    ) -> Result<Conditioning> {
        match (&self.text, input) {
            (TextEncoders::Flux(flux), Input::Redux { image }) => {
                let redux = self.redux.as_ref().ok_or_else(|| {
                    WorkerError::TaskDisabled("Redux variations (no Redux prior is loaded)".into())
                })?;
                flux.redux(
                    redux,
                    image,
                    &req.prompt,
                    req.n,
                    req.guidance_scale,
                    &self.device,
                    self.dtype,
                )
            }
            (_, Input::Redux { .. }) => Err(WorkerError::TaskDisabled(
                "Redux variations (for FLUX models only)".into(),
            )),
            (TextEncoders::Flux(flux), _) => {
                if req
                    .negative_prompt
                    .as_deref()
                    .is_some_and(|n| !n.is_empty())
                {
                    tracing::debug!(
                        "FLUX runs no classifier-free guidance; negative_prompt ignored"
                    );
                }
                flux.encode(
                    &req.prompt,
                    req.n,
                    flux.sequence_length(req.max_sequence_length)?,
                    req.guidance_scale,
                    &self.device,
                    self.dtype,
                )
            }
            _ => {
                let guidance = (req.guidance_scale > 1.0).then_some(req.guidance_scale);
                self.conditioning(
                    &req.prompt,
                    req.negative_prompt.as_deref(),
                    req.n,
                    guidance,
                    (req.height, req.width),
                )
            }
        }
    }

    /// VAE-decodes float32 latents (as the scheduler leaves them) into images.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        self.vae.decode(latents)
    }

    /// Checks what every task requires of a request: size, image count and steps.
    pub(super) fn check_request(&self, req: &TextToImage) -> Result<()> {
        let f = self.pixel_multiple();
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
    pub(super) fn latent_shape(&self, req: &TextToImage) -> [usize; 4] {
        let f = self.vae.scale_factor();
        [
            req.n,
            self.vae.latent_channels(),
            req.height / f,
            req.width / f,
        ]
    }

    /// Generates `req.n` images from the prompt alone.
    pub fn text_to_image(
        &self,
        req: &TextToImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.run_one(req, Input::Text, progress)
    }

    /// Generates `req.n` variations of `image` (already `req.width` × `req.height`), keeping
    /// `1 − strength` of the schedule's way from it. An inpainting model does this as an
    /// inpaint of the whole picture.
    pub fn image_to_image(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.run_one(req, Input::Image { image, strength }, progress)
    }

    /// Repaints the white part of `mask` in `image` (both `req.width` × `req.height`).
    /// Inpainting UNets see the mask and the masked image; ordinary UNets keep the original
    /// outside the mask after every step.
    pub fn inpaint(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        mask: &GrayImage,
        strength: f64,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        let input = Input::Inpaint {
            image,
            mask,
            strength,
        };
        self.run_one(req, input, progress)
    }

    /// A FLUX Redux variation of `image` (any size; the prior resizes it): `req.n` images of
    /// `req.width` × `req.height` conditioned on the image's tokens (after the prompt's, when
    /// `req.prompt` is not empty).
    pub fn redux_variation(
        &self,
        req: &TextToImage,
        image: &RgbImage,
        progress: &mut dyn Progress,
    ) -> Result<Vec<RgbImage>> {
        self.run_one(req, Input::Redux { image }, progress)
    }

    /// Text-to-image's initial latents: the seed's noise scaled to the first step. The Denoise
    /// stage includes this (and an input image's VAE encoding for the image tasks), which the
    /// timings have no separate field for.
    pub(super) fn prepare_text(
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

/// What a family's loader gives the pipeline besides the VAE.
struct Parts {
    family: Family,
    text: TextEncoders,
    denoiser: Denoiser,
    inpainting: bool,
    sample_size: usize,
}

/// SD 1.x/2.x and SDXL: text encoder(s) and a UNet whose channels fit the VAE.
#[allow(clippy::too_many_arguments)]
fn load_unet_family(
    source: &str,
    dir: &Path,
    index: &ModelIndex,
    class: PipelineClass,
    vae: &Autoencoder,
    precision: Precision,
    device: &Device,
    offload: Option<&Arc<Offload>>,
    loras: &LoraBank,
) -> Result<Parts> {
    let unet_config_path = dir.join("unet/config.json");
    let unet_file: UNetConfigFile = read_json(source, &unet_config_path)?;
    let unet_spec = unet_file.to_spec(source, &unet_config_path)?;
    let (family, text) = if class == PipelineClass::StableDiffusionXl {
        let load = |folders, target| {
            let adapters = loras.component(target, Naming::Clip);
            TextEncoder::load(source, dir, folders, precision, device, offload, adapters)
        };
        let first = load(("text_encoder", "tokenizer"), Target::TextEncoder)?;
        let second = load(("text_encoder_2", "tokenizer_2"), Target::TextEncoder2)?;
        let sdxl = SdxlText {
            first,
            second,
            force_zeros: index.force_zeros_for_empty_prompt,
        };
        check_sdxl(source, dir, &sdxl, &unet_spec)?;
        (Family::Sdxl, TextEncoders::Sdxl(Box::new(sdxl)))
    } else {
        let text = TextEncoder::load(
            source,
            dir,
            ("text_encoder", "tokenizer"),
            precision,
            device,
            offload,
            loras.component(Target::TextEncoder, Naming::Clip),
        )?;
        if let Some(addition) = unet_spec.addition {
            return Err(WorkerError::model_load(
                source,
                &unet_config_path,
                format!(
                    "key 'addition_embed_type': this UNet takes pooled text embeddings \
                     ({} inputs), which a {} repo has no second text encoder for",
                    addition.in_features, index.class_name
                ),
            ));
        }
        let sd = SdText { text };
        let family = if sd.is_sd2() {
            Family::Sd2
        } else {
            Family::Sd1
        };
        (family, TextEncoders::Sd(Box::new(sd)))
    };
    // diffusers decides the inpainting variant from the UNet's channels, never from names:
    // latents in and out, or latents + mask + masked-image latents in.
    let latent = vae.latent_channels();
    let inpainting = unet_spec.in_channels == 2 * latent + 1;
    if (unet_spec.in_channels != latent && !inpainting) || unet_spec.out_channels != latent {
        return Err(WorkerError::model_load(
            source,
            dir.join("vae/config.json"),
            format!(
                "key 'latent_channels': {latent} does not match the UNet's in/out channels \
                 {}/{} (expected {latent}/{latent}, or {}/{latent} for inpainting)",
                unet_spec.in_channels,
                unet_spec.out_channels,
                2 * latent + 1
            ),
        ));
    }
    let sample_size = unet_spec.sample_size;
    let naming = Naming::Unet {
        layers_per_block: unet_spec.down_blocks.first().map_or(0, |b| b.resnets),
    };
    let adapters = loras.component(Target::Denoiser, naming);
    let unet = Component::load(
        WeightFiles {
            source_name: source.to_string(),
            dir: dir.join("unet"),
            stem: "diffusion_pytorch_model",
        },
        precision,
        device,
        offload,
        move |vb| lora::build_with(adapters.as_ref(), || UNet::new(vb, &unet_spec)),
    )?;
    Ok(Parts {
        family,
        text,
        denoiser: Denoiser::UNet(unet),
        inpainting,
        sample_size,
    })
}

/// diffusers' FluxPipeline `default_sample_size`: 128 latents (1024 px with the FLUX VAE).
const FLUX_SAMPLE_SIZE: usize = 128;

/// FLUX.1: CLIP + T5 and a transformer that is an ordinary (dev, schnell) or a Fill model by
/// its input width next to the VAE; control models are refused by name.
#[allow(clippy::too_many_arguments)]
fn load_flux(
    source: &str,
    dir: &Path,
    index: &ModelIndex,
    vae: &Autoencoder,
    precision: Precision,
    device: &Device,
    offload: Option<&Arc<Offload>>,
    loras: &LoraBank,
) -> Result<Parts> {
    let (transformer, config) =
        load_flux_transformer(source, dir, precision, device, offload, Some(loras))?;
    let config_path = dir.join("transformer/config.json");
    // The class must agree with the transformer: a FluxFillPipeline repo with an ordinary
    // transformer (or the reverse) is broken or mislabelled.
    let expected = if index.class_name == "FluxFillPipeline" {
        FluxVariant::Fill
    } else {
        FluxVariant::Base
    };
    let inpainting = match config.variant(vae.latent_channels(), vae.scale_factor()) {
        found @ (FluxVariant::Base | FluxVariant::Fill) if found != expected => {
            return Err(WorkerError::model_load(
                source,
                &config_path,
                format!(
                    "key 'in_channels': {} makes this {}, but model_index.json's _class_name {} \
                     needs {}",
                    config.in_channels,
                    found.name(),
                    index.class_name,
                    expected.name()
                ),
            ))
        }
        FluxVariant::Base => false,
        FluxVariant::Fill => true,
        other => {
            return Err(WorkerError::model_load(
                source,
                &config_path,
                format!(
                    "key 'in_channels': {} is a {} transformer; this worker serves ordinary \
                     FLUX.1 models and Fill models",
                    config.in_channels,
                    other.name()
                ),
            ))
        }
    };
    let text = FluxText::load(
        source,
        dir,
        precision,
        device,
        offload,
        config.guidance_embeds,
        loras.component(Target::TextEncoder, Naming::Clip),
    )?;
    check_flux_text(source, dir, &text, &config)?;
    Ok(Parts {
        family: Family::Flux,
        text: TextEncoders::Flux(Box::new(text)),
        denoiser: Denoiser::Flux(transformer),
        inpainting,
        sample_size: FLUX_SAMPLE_SIZE,
    })
}

/// `dir/transformer/` as an offloadable component, with its config; `loras` reach it when given
/// (the base's transformer and a Fill transformer beside it share the adapters and their weights,
/// so a request's set applies to whichever runs it).
fn load_flux_transformer(
    source: &str,
    dir: &Path,
    precision: Precision,
    device: &Device,
    offload: Option<&Arc<Offload>>,
    loras: Option<&LoraBank>,
) -> Result<(Component<FluxTransformer>, FluxTransformerConfig)> {
    let config_path = dir.join("transformer/config.json");
    let config = FluxTransformerConfig::load(source, &config_path)?;
    let built = config.clone();
    let adapters = loras.and_then(|l| l.component(Target::Denoiser, Naming::Flux));
    let transformer = Component::load(
        WeightFiles {
            source_name: source.to_string(),
            dir: dir.join("transformer"),
            stem: "diffusion_pytorch_model",
        },
        precision,
        device,
        offload,
        move |vb| {
            lora::build_with(adapters.as_ref(), || {
                FluxTransformer::new(vb, built.clone())
            })
        },
    )?;
    Ok((transformer, config))
}

/// The text encoders' widths must be what the transformer reads.
fn check_flux_text(
    source: &str,
    dir: &Path,
    text: &FluxText,
    config: &FluxTransformerConfig,
) -> Result<()> {
    let file = dir.join("transformer/config.json");
    let t5 = text.t5_width;
    if t5 != config.joint_attention_dim {
        return Err(WorkerError::model_load(
            source,
            &file,
            format!(
                "key 'joint_attention_dim': {} does not match text_encoder_2's d_model {t5}",
                config.joint_attention_dim
            ),
        ));
    }
    let clip = text.clip.config.hidden_size;
    if clip != config.pooled_projection_dim {
        return Err(WorkerError::model_load(
            source,
            &file,
            format!(
                "key 'pooled_projection_dim': {} does not match text_encoder's hidden_size {clip}",
                config.pooled_projection_dim
            ),
        ));
    }
    Ok(())
}

/// `edits_config.inpaint_pipeline`: a FluxFillPipeline repo whose transformer runs the masked
/// edits of an ordinary FLUX model. It shares the base's text encoders and VAE, so their files
/// must be the base's (FLUX.1-Fill-dev's are FLUX.1-dev's); a repo whose parts differ is refused
/// (serve it as `hf_model_id` instead).
#[allow(clippy::too_many_arguments)]
fn load_fill_beside(
    source: &str,
    dir: &Path,
    fill_dir: &Path,
    parts: &Parts,
    vae: &Autoencoder,
    loras: &LoraBank,
    precision: Precision,
    device: &Device,
    offload: Option<&Arc<Offload>>,
) -> Result<Denoiser> {
    let fill_source = fill_dir.display().to_string();
    if parts.family != Family::Flux {
        return Err(WorkerError::config(
            "pipeline.edits_config.inpaint_pipeline",
            "a separate Fill transformer is for FLUX models only",
        ));
    }
    if parts.inpainting {
        return Err(WorkerError::config(
            "pipeline.edits_config.inpaint_pipeline",
            "hf_model_id is already a Fill model; leave inpaint_pipeline null",
        ));
    }
    for part in ["text_encoder", "text_encoder_2", "vae"] {
        if !same_files(&dir.join(part), &fill_dir.join(part)) {
            return Err(WorkerError::model_load(
                &fill_source,
                fill_dir.join(part),
                format!(
                    "differs from {}'s {part}: a Fill transformer beside the base must share its \
                     text encoders and VAE (serve this repo as hf_model_id instead)",
                    source
                ),
            ));
        }
    }
    let (transformer, config) = load_flux_transformer(
        &fill_source,
        fill_dir,
        precision,
        device,
        offload,
        Some(loras),
    )?;
    config.require(
        &FluxVariant::Fill,
        vae.latent_channels(),
        vae.scale_factor(),
        &fill_source,
        &fill_dir.join("transformer/config.json"),
    )?;
    Ok(Denoiser::Flux(transformer))
}

/// True when two component folders hold the same config (up to provenance keys) and the same
/// weight files (names and sizes; a repo that only links to the base's blobs, as the Hub cache does, has them).
fn same_files(a: &Path, b: &Path) -> bool {
    let listing = |dir: &Path| -> Option<Vec<(PathBuf, u64)>> {
        let mut files: Vec<(PathBuf, u64)> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let meta = std::fs::metadata(e.path()).ok()?;
                meta.is_file()
                    .then(|| (PathBuf::from(e.file_name()), meta.len()))
            })
            .collect();
        files.sort();
        Some(files)
    };
    match (listing(a), listing(b), model_config(a), model_config(b)) {
        (Some(x), Some(y), Some(ca), Some(cb)) => x == y && ca == cb,
        _ => false,
    }
}

/// A component's `config.json` without what says where and by which library version it was
/// saved (`_name_or_path`, `_diffusers_version`, `transformers_version`, …): two repos saving the
/// same weights differ there and nowhere that matters.
fn model_config(dir: &Path) -> Option<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).ok()?;
    config.retain(|key, _| !key.starts_with('_') && key != "transformers_version");
    Some(config)
}

/// `variations_config.enable_flux_redux`: the Redux prior in `redux_dir`, whose tokens must be
/// as wide as the transformer's text input.
fn load_redux(
    source: &str,
    redux_dir: &Path,
    parts: &Parts,
    dtype: DType,
    device: &Device,
) -> Result<FluxRedux> {
    let redux_source = redux_dir.display().to_string();
    let TextEncoders::Flux(text) = &parts.text else {
        return Err(WorkerError::config(
            "pipeline.variations_config.enable_flux_redux",
            "Redux is for FLUX models only",
        ));
    };
    // SigLIP and the embedder are small and stay resident, in the run dtype but never float16
    // (like T5: bfloat16, or float32 on a device without it).
    let redux = FluxRedux::load(
        &redux_source,
        redux_dir,
        crate::device::without_float16(dtype, device),
        device,
    )?;
    let width = text.t5_width;
    if redux.joint_dim() != width {
        return Err(WorkerError::model_load(
            &redux_source,
            redux_dir.join("image_embedder/config.json"),
            format!(
                "key 'txt_in_features': {} does not match {source}'s T5 width {width}",
                redux.joint_dim()
            ),
        ));
    }
    Ok(redux)
}

/// An SDXL repo's parts must fit together: the UNet's cross-attention reads both encoders'
/// states side by side, and its addition embedding takes the second encoder's projection next
/// to the time ids. Errors name the file and key at fault.
fn check_sdxl(source: &str, dir: &Path, text: &SdxlText, unet: &UNetSpec) -> Result<()> {
    let unet_file = dir.join("unet/config.json");
    let Some(addition) = unet.addition else {
        return Err(WorkerError::model_load(
            source,
            &unet_file,
            "key 'addition_embed_type': an SDXL UNet needs 'text_time' (pooled text embeddings \
             and time ids)",
        ));
    };
    let (first, second) = (&text.first.config, &text.second.config);
    if !text.second.encoder.get()?.has_projection() {
        return Err(WorkerError::model_load(
            source,
            dir.join("text_encoder_2"),
            "no 'text_projection.weight': text_encoder_2 must be a CLIPTextModelWithProjection",
        ));
    }
    let pooled = second.projection_dim.unwrap_or(second.hidden_size);
    if addition.pooled_dim(TIME_IDS) != Some(pooled) {
        return Err(WorkerError::model_load(
            source,
            &unet_file,
            format!(
                "key 'projection_class_embeddings_input_dim': {} does not match {TIME_IDS} time \
                 ids × addition_time_embed_dim {} + text_encoder_2's projection_dim {pooled} = {}",
                addition.in_features,
                addition.time_embed_dim,
                TIME_IDS * addition.time_embed_dim + pooled
            ),
        ));
    }
    let context = first.hidden_size + second.hidden_size;
    if unet.cross_attention_dim != context {
        return Err(WorkerError::model_load(
            source,
            &unet_file,
            format!(
                "key 'cross_attention_dim': {} does not match text_encoder + text_encoder_2 \
                 hidden sizes {} + {} = {context}",
                unet.cross_attention_dim, first.hidden_size, second.hidden_size
            ),
        ));
    }
    Ok(())
}
