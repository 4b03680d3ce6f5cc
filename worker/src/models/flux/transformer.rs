//! `FluxTransformer2DModel` with diffusers' weight layout (`transformer/` of a FLUX repo).
//!
//! ```text
//! img (B, L, in) ─x_embedder─┐                        ┌─ norm_out(·, temb) ─ proj_out ─▶ (B, L, out)
//! txt (B, S, joint) ─context_embedder─┤ double blocks ×N ─ single blocks ×M (on cat(txt, img)) ┤
//! t, guidance, pooled ─▶ temb ────────┘   RoPE of cat(txt_ids, img_ids)   (image tokens only) ┘
//! ```
//!
//! Weights stay in diffusers' unfused names (`attn.to_q`, `attn.add_k_proj`, `ff.net.0.proj`, ...)
//! so PEFT LoRA keys map onto them one to one. The whole model runs in the weights' dtype, except
//! the pieces diffusers runs in float32 too: sinusoids, RoPE, layer/RMS norm statistics and the
//! attention softmax.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

use super::attention::Rope;
use super::blocks::{DoubleBlock, SingleBlock};
use super::config::FluxTransformerConfig;
use super::embeddings::{rope_tables, timestep_sinusoids, Mlp2};
use super::layers::{chunks, layer_norm, linear, Linear};
use crate::error::{Result, WorkerError};
use crate::models::weights;

/// File stem of diffusers' model weights.
const WEIGHTS_STEM: &str = "diffusion_pytorch_model";
/// Channels of the sinusoidal time and guidance projections.
const TIME_CHANNELS: usize = 256;

/// A loaded FLUX transformer.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    x_embedder: Linear,
    context_embedder: Linear,
    timestep_embedder: Mlp2,
    /// Present exactly when `config.guidance_embeds`.
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double_blocks: Vec<DoubleBlock>,
    single_blocks: Vec<SingleBlock>,
    norm_out: Linear,
    proj_out: Linear,
    config: FluxTransformerConfig,
    dtype: DType,
}

impl FluxTransformer {
    /// Loads `dir` (a repo's `transformer/`): `config.json` and the weights (one file or the shards
    /// of `diffusion_pytorch_model.safetensors.index.json`) in `dtype` on `device`.
    pub fn load(source_name: &str, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = FluxTransformerConfig::load(source_name, &dir.join("config.json"))?;
        let vb = weights::load_var_builder(source_name, dir, WEIGHTS_STEM, dtype, device)?;
        Self::new(vb, config)
            .map_err(|e| WorkerError::model_load(source_name, weights_file(dir), format!("{e}")))
    }

    /// Builds the model from a var builder rooted at the weights' top level.
    pub fn new(vb: VarBuilder, config: FluxTransformerConfig) -> candle_core::Result<Self> {
        let dim = config.inner_dim();
        let heads = config.num_attention_heads;
        let tte = vb.pp("time_text_embed");
        let guidance_embedder = if config.guidance_embeds {
            Some(Mlp2::new(TIME_CHANNELS, dim, tte.pp("guidance_embedder"))?)
        } else {
            None
        };
        let double_blocks = (0..config.num_layers)
            .map(|i| DoubleBlock::new(dim, heads, vb.pp("transformer_blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let single_blocks = (0..config.num_single_layers)
            .map(|i| SingleBlock::new(dim, heads, vb.pp("single_transformer_blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            x_embedder: linear(config.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(config.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: Mlp2::new(TIME_CHANNELS, dim, tte.pp("timestep_embedder"))?,
            guidance_embedder,
            text_embedder: Mlp2::new(config.pooled_projection_dim, dim, tte.pp("text_embedder"))?,
            double_blocks,
            single_blocks,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out.linear"))?,
            proj_out: linear(dim, config.out_channels(), vb.pp("proj_out"))?,
            dtype: vb.dtype(),
            config,
        })
    }

    pub fn config(&self) -> &FluxTransformerConfig {
        &self.config
    }

    /// The dtype the weights (and the activations) are in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The velocity prediction for packed latents.
    ///
    /// * `img`: (B, L, in_channels) packed latents (for Fill: latents, masked-image latents and the
    ///   packed mask concatenated on the last dimension); `img_ids`: (L, 3).
    /// * `txt`: (B, S, joint_attention_dim) T5 hidden states; `txt_ids`: (S, 3).
    /// * `timestep`: (B,) the scheduler's timestep / 1000, as FluxPipeline passes it.
    /// * `guidance`: (B,) the guidance scale, exactly for models with `guidance_embeds`.
    /// * `pooled`: (B, pooled_projection_dim) the pooled CLIP prompt.
    ///
    /// Returns (B, L, out_channels) in the model's dtype.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        img_ids: &Tensor,
        txt: &Tensor,
        txt_ids: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, image_len, _) = img.dims3()?;
        let text_len = txt.dim(1)?;
        if img_ids.dim(0)? != image_len || txt_ids.dim(0)? != text_len {
            candle_core::bail!(
                "position ids for {} image and {} text tokens, inputs have {image_len} and {text_len}",
                img_ids.dim(0)?,
                txt_ids.dim(0)?
            );
        }
        let temb = self.conditioning(b, timestep, guidance, pooled)?;
        let mut img = self.x_embedder.forward(&img.to_dtype(self.dtype)?)?;
        let mut txt = self.context_embedder.forward(&txt.to_dtype(self.dtype)?)?;
        let (cos, sin) = rope_tables(
            &Tensor::cat(&[txt_ids, img_ids], 0)?,
            &self.config.axes_dims_rope,
            img.device(),
        )?;
        let rope = Rope { cos, sin };
        for block in &self.double_blocks {
            (img, txt) = block.forward(&img, &txt, &temb, &rope)?;
        }
        let mut joint = Tensor::cat(&[txt, img], 1)?;
        for block in &self.single_blocks {
            joint = block.forward(&joint, &temb, &rope)?;
        }
        let img = joint.narrow(1, text_len, image_len)?;
        // AdaLayerNormContinuous: scale first, then shift (BFL checkpoints store them swapped).
        let m = chunks(&self.norm_out.forward(&temb.silu()?)?, 2)?;
        let normed = layer_norm(&img, 1e-6)?
            .broadcast_mul(&(m[0].unsqueeze(1)? + 1.0)?)?
            .broadcast_add(&m[1].unsqueeze(1)?)?;
        self.proj_out.forward(&normed)
    }

    /// `temb` (B, inner_dim) from the timestep, the guidance and the pooled prompt. As in diffusers,
    /// timestep and guidance are cast to the model dtype before the `· 1000` (diffusers #9405).
    fn conditioning(
        &self,
        batch: usize,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        pooled: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let embed = |values: &Tensor, what: &str, mlp: &Mlp2| -> candle_core::Result<Tensor> {
            if values.dims() != [batch] {
                candle_core::bail!("{what} must have shape ({batch},), got {:?}", values.dims());
            }
            let scaled = values.to_dtype(self.dtype)?.affine(1000.0, 0.0)?;
            mlp.forward(&timestep_sinusoids(&scaled)?.to_dtype(self.dtype)?)
        };
        let mut temb = embed(timestep, "timestep", &self.timestep_embedder)?;
        match (&self.guidance_embedder, guidance) {
            (Some(mlp), Some(g)) => temb = (temb + embed(g, "guidance", mlp)?)?,
            (None, None) => {}
            (Some(_), None) => {
                candle_core::bail!(
                    "this FLUX model has a guidance embedding: pass a guidance scale"
                )
            }
            (None, Some(_)) => {
                candle_core::bail!(
                    "this FLUX model has no guidance embedding (schnell-like): pass none"
                )
            }
        }
        temb + self.text_embedder.forward(&pooled.to_dtype(self.dtype)?)?
    }

    /// The double-stream blocks (for the block benchmark).
    pub fn double_blocks(&self) -> &[DoubleBlock] {
        &self.double_blocks
    }

    /// The single-stream blocks (for the block benchmark).
    pub fn single_blocks(&self) -> &[SingleBlock] {
        &self.single_blocks
    }
}

/// The file to name when a weight is missing or misshapen: the shard index for a sharded
/// checkpoint, else the single weights file.
fn weights_file(dir: &Path) -> PathBuf {
    let index = dir.join(format!("{WEIGHTS_STEM}.safetensors.index.json"));
    if index.is_file() {
        index
    } else {
        dir.join(format!("{WEIGHTS_STEM}.safetensors"))
    }
}
