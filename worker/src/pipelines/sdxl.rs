//! SDXL conditioning, as diffusers' `StableDiffusionXLPipeline.encode_prompt` and
//! `_get_add_time_ids` build it.
//!
//! ```text
//! text   ─tokenizer   (pads <|endoftext|>)─▶ CLIP-L   ─hidden_states[-2]─┐
//!        ─tokenizer_2 (pads "!" on the Hub)─▶ CLIP-G  ─hidden_states[-2]─┴─concat─▶ context (…, 2048)
//!                                                      └─text_projection(EOS)──────▶ pooled  (…, 1280)
//! time ids = [height, width, 0, 0, height, width]  (original size, crop top-left, target size)
//! ```
//!
//! With guidance and no negative prompt, `force_zeros_for_empty_prompt` (model_index.json, true
//! by default) makes the negative context and pooled embeddings zeros; an explicit negative
//! prompt, even "", is encoded. Rows are `[negative×n; prompt×n]` for context, pooled and time
//! ids alike.

use candle_core::{DType, Device, Tensor};

use super::conditioning::Conditioning;
use super::sd::{repeat_rows, TextEncoder};
use crate::error::Result;

/// Time ids per row: original (h, w), crop top-left (y, x), target (h, w).
pub const TIME_IDS: usize = 6;

/// SDXL's two text encoders.
#[derive(Debug)]
pub struct SdxlText {
    pub(super) first: TextEncoder,
    pub(super) second: TextEncoder,
    /// `force_zeros_for_empty_prompt` from model_index.json.
    pub(super) force_zeros: bool,
}

impl SdxlText {
    /// Prompt tokens that reach the encoders (both have the same window on every SDXL repo).
    pub fn max_prompt_tokens(&self) -> usize {
        self.first
            .tokenizer
            .max_prompt_tokens()
            .min(self.second.tokenizer.max_prompt_tokens())
    }

    /// Context, pooled embeddings and time ids for `n` images of `height` × `width`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
        n: usize,
        guidance: Option<f64>,
        (height, width): (usize, usize),
        device: &Device,
        dtype: DType,
    ) -> Result<Conditioning> {
        let zero_negative = guidance.is_some() && negative.is_none() && self.force_zeros;
        let mut texts = vec![prompt];
        if guidance.is_some() && !zero_negative {
            texts.insert(0, negative.unwrap_or(""));
        }
        let first = self
            .first
            .encoder
            .get()?
            .encode(&self.first.ids(&texts, device)?)?;
        let second = self
            .second
            .encoder
            .get()?
            .encode(&self.second.ids(&texts, device)?)?;
        let mut context = Tensor::cat(&[&first.penultimate, &second.penultimate], 2)?;
        let mut pooled = second.pooled;
        if zero_negative {
            context = Tensor::cat(&[&context.zeros_like()?, &context], 0)?;
            pooled = Tensor::cat(&[&pooled.zeros_like()?, &pooled], 0)?;
        }
        let rows = context.dim(0)? * n;
        let (h, w) = (height as f32, width as f32);
        let time_ids = Tensor::new(&[h, w, 0.0, 0.0, h, w], device)?
            .unsqueeze(0)?
            .repeat((rows, 1))?
            .to_dtype(dtype)?;
        Ok(Conditioning {
            context: repeat_rows(&context.to_dtype(dtype)?, n)?,
            pooled: Some(repeat_rows(&pooled.to_dtype(dtype)?, n)?),
            time_ids: Some(time_ids),
            guidance_embed: None,
            guidance,
        })
    }
}
