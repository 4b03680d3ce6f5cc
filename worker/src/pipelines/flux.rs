//! FLUX.1 conditioning, as diffusers' `FluxPipeline.encode_prompt`: T5 hidden states for the
//! joint attention, CLIP's pooled output for the modulation, and (dev) the guidance scale as an
//! embedded input instead of classifier-free guidance.
//!
//! ```text
//! prompt ─tokenizer   (pad to 77)──────────────▶ CLIP-L ─pooler_output (EOS, final norm)─▶ pooled (…, 768)
//!        ─tokenizer_2 (pad to max_sequence_length)─▶ T5 ─last_hidden_state──────────────▶ context (…, S, 4096)
//! guidance_embeds: guidance = [scale × rows]          (schnell: none)
//! ```
//!
//! FluxPipeline runs no classifier-free guidance, so there are no negative rows: a request's rows
//! are its `n` images. A negative prompt is ignored (diffusers' `true_cfg_scale` path is off by
//! default and not offered here). Redux variations replace the context and pooled prompt with the
//! prior's ([`FluxText::redux`]), and the rest is the same.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::conditioning::Conditioning;
use super::sd::{repeat_rows, TextEncoder};
use crate::device::{without_float16, Precision};
use crate::error::{Result, WorkerError};
use crate::lora::ComponentLoras;
use crate::models::component::{Component, Offload, WeightFiles};
use crate::models::redux::{FluxRedux, PRIOR_TEXT_TOKENS};
use crate::models::t5::T5Encoder;
use crate::models::t5_tokenizer::T5Tokenizer;

/// The most T5 tokens a prompt may use: FluxPipeline refuses more than 512.
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// FLUX's two text encoders.
#[derive(Debug)]
pub struct FluxText {
    pub(super) clip: TextEncoder,
    pub(super) t5_tokenizer: T5Tokenizer,
    pub(super) t5: Component<T5Encoder>,
    /// `max_sequence_length` when a request names none: 512 for guidance-distilled models (dev),
    /// 256 for the others (schnell), as diffusers' examples and the models' cards use them.
    pub(super) default_len: usize,
    /// True when the transformer embeds the guidance scale (dev, Fill).
    pub(super) guidance_embeds: bool,
    /// T5's `d_model`: the width of the context (and of Redux tokens).
    pub(super) t5_width: usize,
}

impl FluxText {
    /// Loads `text_encoder` + `tokenizer` (CLIP) and `text_encoder_2` + `tokenizer_2` (T5). T5
    /// never runs in float16 (it overflows): it takes bfloat16, or float32 where the device has
    /// no bfloat16 (the CPU), which is logged.
    pub fn load(
        source: &str,
        dir: &Path,
        precision: Precision,
        device: &Device,
        offload: Option<&Arc<Offload>>,
        guidance_embeds: bool,
        clip_loras: Option<Arc<ComponentLoras>>,
    ) -> Result<Self> {
        let clip = TextEncoder::load(
            source,
            dir,
            ("text_encoder", "tokenizer"),
            precision,
            device,
            offload,
            clip_loras,
        )?;
        let t5_dir = dir.join("text_encoder_2");
        let config = T5Encoder::read_config(source, &t5_dir)?;
        let t5_run = without_float16(precision.run, device);
        let t5_precision = Precision {
            // Weights rounded to float16 on the way in could already overflow.
            init: if precision.init == DType::F16 {
                t5_run
            } else {
                precision.init
            },
            run: t5_run,
        };
        if t5_run != precision.run {
            tracing::warn!(
                run_dtype = ?precision.run,
                t5_dtype = ?t5_run,
                "T5 overflows in float16; text_encoder_2 runs in {t5_run:?} instead"
            );
        }
        let t5_width = config.d_model;
        let t5 = Component::load(
            WeightFiles {
                source_name: source.to_string(),
                dir: t5_dir,
                stem: "model",
            },
            t5_precision,
            device,
            offload,
            move |vb| T5Encoder::build(vb, &config),
        )?;
        let t5_tokenizer = T5Tokenizer::load(source, &dir.join("tokenizer_2"))?;
        Ok(FluxText {
            clip,
            t5_tokenizer,
            t5,
            default_len: if guidance_embeds { 512 } else { 256 },
            guidance_embeds,
            t5_width,
        })
    }

    /// Prompt tokens that reach CLIP (the pooled prompt); T5 takes up to the sequence length.
    pub fn max_prompt_tokens(&self) -> usize {
        self.clip.tokenizer.max_prompt_tokens()
    }

    /// The T5 length a request asking for `requested` gets, checked against the limit.
    pub fn sequence_length(&self, requested: Option<usize>) -> Result<usize> {
        let len = requested.unwrap_or(self.default_len);
        if len == 0 || len > MAX_SEQUENCE_LENGTH {
            return Err(WorkerError::invalid(
                "max_sequence_length",
                format!("must be between 1 and {MAX_SEQUENCE_LENGTH}, got {len}"),
            ));
        }
        Ok(len)
    }

    /// T5's `last_hidden_state` for `prompt` padded or truncated to `len` tokens: (1, len, d).
    pub fn t5_states(&self, prompt: &str, len: usize, device: &Device) -> Result<Tensor> {
        let encoding = self.t5_tokenizer.encode(prompt, len)?;
        if encoding.truncated() {
            tracing::warn!(
                tokens = encoding.untruncated_len,
                kept = len,
                "prompt is longer than max_sequence_length T5 tokens; truncated"
            );
        }
        let ids = Tensor::from_vec(encoding.ids, (1, len), device)?;
        Ok(self.t5.get()?.forward(&ids)?)
    }

    /// CLIP's pooled output for `prompt`: (1, hidden).
    pub fn pooled(&self, prompt: &str, device: &Device) -> Result<Tensor> {
        let ids = self.clip.ids(&[prompt], device)?;
        Ok(self.clip.encoder.get()?.encode(&ids)?.pooled)
    }

    /// The conditioning of `n` images of one prompt.
    pub fn encode(
        &self,
        prompt: &str,
        n: usize,
        len: usize,
        guidance_scale: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Conditioning> {
        let context = self.t5_states(prompt, len, device)?;
        let pooled = self.pooled(prompt, device)?;
        self.rows(context, pooled, n, guidance_scale, dtype)
    }

    /// A Redux variation's conditioning: the prior's tokens for `image`, after the prompt's T5
    /// states when there is a prompt (else after zeros, what FLUX.1-Redux-dev does without text
    /// encoders), and the prompt's pooled CLIP output (else zeros).
    #[allow(clippy::too_many_arguments)]
    pub fn redux(
        &self,
        redux: &FluxRedux,
        image: &RgbImage,
        prompt: &str,
        n: usize,
        guidance_scale: f64,
        device: &Device,
        dtype: DType,
    ) -> Result<Conditioning> {
        let encoded = if prompt.trim().is_empty() {
            None
        } else {
            Some((
                self.t5_states(prompt, PRIOR_TEXT_TOKENS, device)?,
                self.pooled(prompt, device)?,
            ))
        };
        let prompt = encoded.as_ref().map(|(t, p)| (t, p));
        let pooled_dim = self.clip.config.hidden_size;
        let (context, pooled) =
            redux.conditioning(std::slice::from_ref(image), prompt, pooled_dim)?;
        self.rows(context, pooled, n, guidance_scale, dtype)
    }

    /// One prompt's (1, …) context and pooled output repeated for `n` images, with the guidance
    /// embedding input when the model has one.
    fn rows(
        &self,
        context: Tensor,
        pooled: Tensor,
        n: usize,
        guidance_scale: f64,
        dtype: DType,
    ) -> Result<Conditioning> {
        let guidance_embed = if self.guidance_embeds {
            // diffusers: torch.full([1], guidance_scale, dtype=float32).expand(batch).
            let device = context.device();
            Some(Tensor::full(guidance_scale as f32, n, device)?)
        } else {
            None
        };
        Ok(Conditioning {
            context: repeat_rows(&context.to_dtype(dtype)?, n)?,
            pooled: Some(repeat_rows(&pooled.to_dtype(dtype)?, n)?),
            time_ids: None,
            guidance_embed,
            guidance: None,
        })
    }
}
