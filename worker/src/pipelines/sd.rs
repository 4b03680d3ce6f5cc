//! Stable Diffusion 1.x/2.x conditioning, as diffusers' `StableDiffusionPipeline.encode_prompt`:
//! one CLIP text encoder, its final (layer-normed) hidden states, "" as the unconditional prompt
//! when there is no negative one.
//!
//! ```text
//! [negative, prompt] ─tokenizer (pad to 77)─▶ ids ─CLIP─▶ last_hidden_state ─repeat n─▶ context
//! ```

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::conditioning::Conditioning;
use crate::device::Precision;
use crate::error::Result;
use crate::lora::{self, ComponentLoras};
use crate::models::clip::ClipTextTransformer;
use crate::models::component::{Component, Offload, WeightFiles};
use crate::models::config::{read_json, ClipActivation, ClipTextConfig};
use crate::models::tokenizer::ClipTokenizer;

/// A CLIP text encoder and its tokenizer, from `<text_folder>/` and `<tokenizer_folder>/`.
#[derive(Debug)]
pub struct TextEncoder {
    pub(super) tokenizer: ClipTokenizer,
    pub(super) encoder: Component<ClipTextTransformer>,
    pub(super) config: ClipTextConfig,
}

impl TextEncoder {
    /// Loads one encoder, reachable by `loras`; errors name its folder's files.
    pub fn load(
        source: &str,
        dir: &Path,
        (text_folder, tokenizer_folder): (&str, &str),
        precision: Precision,
        device: &Device,
        offload: Option<&Arc<Offload>>,
        loras: Option<Arc<ComponentLoras>>,
    ) -> Result<Self> {
        let config_path = dir.join(text_folder).join("config.json");
        let config: ClipTextConfig = read_json(source, &config_path)?;
        config.validate(source, &config_path)?;
        let tokenizer = ClipTokenizer::load(
            source,
            &dir.join(tokenizer_folder),
            config.max_position_embeddings,
        )?;
        let built = config.clone();
        let encoder = Component::load(
            WeightFiles {
                source_name: source.to_string(),
                dir: dir.join(text_folder),
                stem: "model",
            },
            precision,
            device,
            offload,
            move |vb| {
                lora::build_with(loras.as_ref(), || {
                    ClipTextTransformer::new(vb, built.clone())
                })
            },
        )?;
        Ok(TextEncoder {
            tokenizer,
            encoder,
            config,
        })
    }

    /// Token ids of `texts`, one padded row each, as a (rows, max_len) tensor.
    pub(super) fn ids(&self, texts: &[&str], device: &Device) -> Result<Tensor> {
        let len = self.tokenizer.max_len();
        let mut ids = Vec::with_capacity(texts.len() * len);
        for text in texts {
            ids.extend(self.tokenizer.encode(text)?);
        }
        Ok(Tensor::from_vec(ids, (texts.len(), len), device)?)
    }
}

/// Repeats each row of a (rows, ...) tensor `n` times in place: `[a, b]` → `[a×n, b×n]`.
pub(super) fn repeat_rows(t: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(t.clone());
    }
    let mut dims = t.dims().to_vec();
    let rows = dims[0];
    let mut repeat = vec![1; dims.len() + 1];
    repeat[1] = n;
    dims[0] = rows * n;
    Ok(t.unsqueeze(1)?.repeat(repeat.as_slice())?.reshape(dims)?)
}

/// SD 1.x/2.x's prompt encoding.
#[derive(Debug)]
pub struct SdText {
    pub(super) text: TextEncoder,
}

impl SdText {
    /// SD 1.x uses OpenAI's CLIP (quick_gelu), SD 2.x OpenCLIP (gelu).
    pub fn is_sd2(&self) -> bool {
        self.text.config.hidden_act == ClipActivation::Gelu
    }

    /// `[negative×n; prompt×n]` with guidance (an absent negative prompt is ""), else `prompt×n`.
    pub fn encode(
        &self,
        prompt: &str,
        negative: Option<&str>,
        n: usize,
        guidance: Option<f64>,
        device: &Device,
    ) -> Result<Conditioning> {
        let mut texts = vec![prompt];
        if guidance.is_some() {
            texts.insert(0, negative.unwrap_or(""));
        }
        // One encoder pass for both prompts; each row then repeats for the n images.
        let ids = self.text.ids(&texts, device)?;
        let encoded = self.text.encoder.get()?.forward(&ids)?;
        Ok(Conditioning::text(repeat_rows(&encoded, n)?, guidance))
    }
}
