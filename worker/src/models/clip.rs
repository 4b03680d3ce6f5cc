//! The CLIP text transformer that turns prompt token ids into a diffusion model's conditioning.
//!
//! Same computation as transformers' `CLIPTextModel` / `CLIPTextModelWithProjection`: token +
//! position embeddings, `num_hidden_layers` pre-norm blocks (causal self-attention, MLP with
//! quick_gelu or exact gelu), then the final layer norm. [`ClipOutput`] holds what the families
//! take from it:
//!
//! ```text
//! SD 1.x/2.x  last_hidden_state (after the final layer norm)
//! SDXL        hidden_states[-2] (the penultimate layer's output, no final norm) of both
//!             encoders; pooled = text_projection(final-normed state at the EOS token) of the second
//! FLUX        pooled = the final-normed state at the EOS token (pooler_output, no projection)
//! ```
//!
//! Weights come from `text_encoder*/model.safetensors`, whose names carry a `text_model.` prefix
//! when saved by transformers 4 (and by transformers 5 for the projection model) and none when
//! saved by transformers 5; both load. `text_projection.weight` sits at the file's top level.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};

use super::config::{ClipActivation, ClipTextConfig};
use crate::lora::{linear, LoraLinear};

/// One pre-norm transformer block.
#[derive(Debug)]
struct EncoderLayer {
    layer_norm1: LayerNorm,
    q_proj: LoraLinear,
    k_proj: LoraLinear,
    v_proj: LoraLinear,
    out_proj: LoraLinear,
    layer_norm2: LayerNorm,
    fc1: LoraLinear,
    fc2: LoraLinear,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            layer_norm1: layer_norm(h, eps, vb.pp("layer_norm1"))?,
            q_proj: linear(h, h, attn.pp("q_proj"))?,
            k_proj: linear(h, h, attn.pp("k_proj"))?,
            v_proj: linear(h, h, attn.pp("v_proj"))?,
            out_proj: linear(h, h, attn.pp("out_proj"))?,
            layer_norm2: layer_norm(h, eps, vb.pp("layer_norm2"))?,
            fc1: linear(h, cfg.intermediate_size, mlp.pp("fc1"))?,
            fc2: linear(cfg.intermediate_size, h, mlp.pp("fc2"))?,
        })
    }

    /// `xs`: (batch, seq, hidden); `mask`: (seq, seq) additive causal mask.
    fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        heads: usize,
        act: ClipActivation,
    ) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let head_dim = h / heads;
        let normed = self.layer_norm1.forward(xs)?;
        // (b, t, h) -> (b, heads, t, head_dim)
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(&normed)? * (head_dim as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(&normed)?)?;
        let v = split(self.v_proj.forward(&normed)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
        let xs = (xs + self.out_proj.forward(&attn)?)?;

        let hidden = self.fc1.forward(&self.layer_norm2.forward(&xs)?)?;
        let hidden = match act {
            ClipActivation::QuickGelu => (&hidden * candle_nn::ops::sigmoid(&(&hidden * 1.702)?)?)?,
            ClipActivation::Gelu => hidden.gelu_erf()?,
        };
        xs + self.fc2.forward(&hidden)?
    }
}

/// A CLIP text encoder with its weights.
#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    /// CLIPTextModelWithProjection's `text_projection` (no bias), when the weights have one.
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

/// The encoder's outputs for a batch of token ids.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// (batch, seq, hidden) after the final layer norm.
    pub last_hidden_state: Tensor,
    /// (batch, seq, hidden): the second-to-last layer's output (`hidden_states[-2]`), no norm.
    pub penultimate: Tensor,
    /// (batch, hidden or projection_dim): the final-normed state at each row's EOS token, through
    /// `text_projection` when the model has one.
    pub pooled: Tensor,
}

impl ClipTextTransformer {
    /// Builds the encoder from a var builder rooted at the safetensors file's top level.
    pub fn new(root: VarBuilder, config: ClipTextConfig) -> candle_core::Result<Self> {
        let vb = if root.contains_tensor("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else {
            root.clone()
        };
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(config.vocab_size, h, emb.pp("token_embedding"))?;
        let position_embedding = embedding(
            config.max_position_embeddings,
            h,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder.layers").pp(i.to_string()), &config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let final_layer_norm = layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
        let text_projection = if root.contains_tensor("text_projection.weight") {
            let width = config.projection_dim.unwrap_or(h);
            Some(linear_no_bias(h, width, root.pp("text_projection"))?)
        } else {
            None
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config,
        })
    }

    /// True when the weights carry `text_projection` (CLIPTextModelWithProjection).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `ids`: (batch, seq) u32 token ids, seq <= max_position_embeddings. Returns the final
    /// hidden states (batch, seq, hidden) in the weights' dtype.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        Ok(self.encode(ids)?.last_hidden_state)
    }

    /// Every output the families use (see the module doc), in the weights' dtype.
    pub fn encode(&self, ids: &Tensor) -> candle_core::Result<ClipOutput> {
        let (_, t) = ids.dims2()?;
        let device = ids.device();
        let positions = Tensor::arange(0u32, t as u32, device)?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(t, xs.dtype(), device)?;
        // hidden_states[-2] is the embeddings' output for a one-layer encoder.
        let mut penultimate = xs.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = xs.clone();
            }
            xs = layer.forward(
                &xs,
                &mask,
                self.config.num_attention_heads,
                self.config.hidden_act,
            )?;
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        let rows = eos_positions(&ids.to_vec2::<u32>()?, self.config.eos_token_id)
            .into_iter()
            .enumerate()
            .map(|(row, at)| last_hidden_state.get(row)?.get(at))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pooled = Tensor::stack(&rows, 0)?;
        if let Some(projection) = &self.text_projection {
            pooled = projection.forward(&pooled)?;
        }
        Ok(ClipOutput {
            last_hidden_state,
            penultimate,
            pooled,
        })
    }
}

/// Where each row's pooled output is read, as transformers' `CLIPTextTransformer` decides: the
/// highest id for legacy configs whose `eos_token_id` is 2 (the EOS token has the highest id in
/// CLIP's vocabulary), else the first `eos_token_id`; the first position when a row has none.
fn eos_positions(ids: &[Vec<u32>], eos_token_id: u32) -> Vec<usize> {
    ids.iter()
        .map(|row| {
            if eos_token_id == 2 {
                // argmax: the first of the largest ids.
                let max = row.iter().copied().max().unwrap_or(0);
                row.iter().position(|&id| id == max).unwrap_or(0)
            } else {
                row.iter().position(|&id| id == eos_token_id).unwrap_or(0)
            }
        })
        .collect()
}

/// (t, t) additive mask: 0 on and below the diagonal, -inf above, so a token only sees itself
/// and the tokens before it.
fn causal_mask(t: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let values: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (t, t), device)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_position_follows_transformers() {
        let ids = vec![vec![999, 5, 1000, 1000], vec![999, 1000, 0, 0]];
        // Legacy configs (eos 2): argmax, the first of the largest ids.
        assert_eq!(eos_positions(&ids, 2), [2, 1]);
        assert_eq!(eos_positions(&ids, 1000), [2, 1]);
        // No EOS in the row: position 0, like argmax over all-false.
        assert_eq!(eos_positions(&[vec![3, 4]], 7), [0]);
    }

    #[test]
    fn causal_mask_hides_future_tokens() -> candle_core::Result<()> {
        let m = causal_mask(3, DType::F32, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][0], 0.0);
        assert_eq!(m[1][0], 0.0);
        assert!(m[0][1].is_infinite() && m[1][2].is_infinite());
        assert_eq!(m[2].iter().filter(|v| v.is_infinite()).count(), 0);
        Ok(())
    }
}
