//! The UNet's spatial transformer (diffusers `Transformer2DModel` with continuous input).
//!
//! A feature map (b, c, h, w) is group-normed, projected in (1×1 conv, or linear when
//! `use_linear_projection`), flattened to h·w tokens, run through `BasicTransformerBlock`s
//! (self-attention, cross-attention on the text embeddings, GEGLU feed-forward, each pre-layer-
//! norm with a residual), projected back and added to the input.
//!
//! Ours rather than candle's because candle's feed-forward uses the tanh approximation of GELU
//! where diffusers' GEGLU uses the exact (erf) one; the difference is visible in the latents.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::norm::{group_norm, GroupNorm};
use super::softmax::scaled_softmax_last_dim;
use crate::lora::{conv2d, linear, linear_no_bias, LoraConv2d, LoraLinear};

/// Multi-head attention, self (`context = None`) or cross.
#[derive(Debug)]
pub struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `context_dim`: width of the cross-attention context, `None` for self-attention.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
    ) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        let context_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out.0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// (b, t, dim) → (b, heads, t, head_dim), contiguous for the matmuls.
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, inner) = xs.dims3()?;
        xs.reshape((b, t, self.heads, inner / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(xs);
        let (b, t, _) = xs.dims3()?;
        let in_dtype = xs.dtype();
        // Scores and softmax in float32 whatever the model dtype (diffusers' upcast_attention),
        // so half-precision models do not overflow on large logits.
        let q = self
            .split_heads(&self.to_q.forward(xs)?)?
            .to_dtype(DType::F32)?;
        let k = self
            .split_heads(&self.to_k.forward(context)?)?
            .to_dtype(DType::F32)?;
        let v = self
            .split_heads(&self.to_v.forward(context)?)?
            .to_dtype(DType::F32)?;
        let out = blocked_attention(&q, &k, &v, self.scale)?
            .to_dtype(in_dtype)?
            .transpose(1, 2)?
            .reshape((b, t, ()))?;
        self.to_out.forward(&out)
    }
}

/// Most bytes of float32 scores one block of query rows may take. A whole (b, heads, t, t)
/// score tensor of SDXL's 64×64 self-attention at 1024² is 1.3 GB (and its softmax as much
/// again); blocks keep attention's memory bounded whatever the image size, with the same result
/// row for row.
// 16 MiB rather than more: glibc serves blocks up to 32 MiB from its heap once freed blocks of
// that size exist, so the blocks' memory is reused; larger ones are fresh mappings that fault
// in every page again (2.5 M faults per SD 1.5 512² step at 64 MiB, 0.5 M at 16 MiB).
const SCORE_BLOCK_BYTES: usize = 16 << 20;

/// softmax(q·kᵀ·scale)·v for (b, heads, tokens, head_dim) float32 tensors, over blocks of query
/// rows of at most [`SCORE_BLOCK_BYTES`] of scores.
pub(crate) fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, _, _) = q.dims4()?;
    let row_bytes = b * heads * k.dim(2)? * DType::F32.size_in_bytes();
    attention_in_rows(q, k, v, scale, SCORE_BLOCK_BYTES / row_bytes.max(1))
}

/// [`blocked_attention`] over blocks of `rows` query rows.
fn attention_in_rows(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    rows: usize,
) -> candle_core::Result<Tensor> {
    let tokens = q.dim(2)?;
    let rows = rows.clamp(1, tokens.max(1));
    let kt = k.t()?;
    let mut blocks = Vec::with_capacity(tokens.div_ceil(rows));
    let mut start = 0;
    while start < tokens {
        let len = rows.min(tokens - start);
        let scores = q.narrow(2, start, len)?.matmul(&kt)?;
        blocks.push(scaled_softmax_last_dim(scores, scale)?.matmul(v)?);
        start += len;
    }
    if blocks.len() == 1 {
        return blocks
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no block".into()));
    }
    Tensor::cat(&blocks, 2)
}

/// GEGLU feed-forward: `Linear(dim → 4·dim·2)`, `hidden * gelu(gate)`, `Linear(4·dim → dim)`.
#[derive(Debug)]
struct FeedForward {
    proj_in: LoraLinear,
    proj_out: LoraLinear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize) -> candle_core::Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj_in: linear(dim, inner * 2, vb.pp("net.0.proj"))?,
            proj_out: linear(inner, dim, vb.pp("net.2"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let projected = self.proj_in.forward(xs)?;
        let halves = projected.chunk(2, D::Minus1)?;
        let gated = (&halves[0] * halves[1].gelu_erf()?)?;
        self.proj_out.forward(&gated)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-norm with a residual.
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        // diffusers' UNet builds these blocks with its default norm_eps of 1e-5.
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(context_dim), heads, head_dim)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (self.attn1.forward(&self.norm1.forward(xs)?, None)? + xs)?;
        let xs = (self
            .attn2
            .forward(&self.norm2.forward(&xs)?, Some(context))?
            + xs)?;
        self.ff.forward(&self.norm3.forward(&xs)?)? + xs
    }
}

/// The projection in or out of the transformer's token space.
#[derive(Debug)]
enum Projection {
    /// 1×1 convolution on the feature map (SD 1.x).
    Conv(LoraConv2d),
    /// Linear layer on the tokens (SD 2.x, `use_linear_projection`).
    Linear(LoraLinear),
}

/// What a [`Transformer2D`] needs to know about its place in the UNet.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub channels: usize,
    pub heads: usize,
    /// Number of stacked `BasicTransformerBlock`s (`transformer_layers_per_block`).
    pub depth: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// diffusers' `Transformer2DModel` for feature maps.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    pub fn new(vb: VarBuilder, cfg: Transformer2DConfig) -> candle_core::Result<Self> {
        let c = cfg.channels;
        let projection = |name: &str| -> candle_core::Result<Projection> {
            Ok(if cfg.use_linear_projection {
                Projection::Linear(linear(c, c, vb.pp(name))?)
            } else {
                Projection::Conv(conv2d(c, c, 1, Default::default(), vb.pp(name))?)
            })
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i.to_string()),
                    c,
                    cfg.heads,
                    cfg.context_dim,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.groups, c, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    /// `xs`: (b, c, h, w); `context`: (b, seq, context_dim).
    pub fn forward(&self, xs: &Tensor, context: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let to_tokens = |x: &Tensor| x.permute((0, 2, 3, 1))?.reshape((b, h * w, c));
        let normed = self.norm.forward(xs)?;
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_map = |t: &Tensor| t.reshape((b, h, w, c))?.permute((0, 3, 1, 2));
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_map(&tokens)?.contiguous()?)?,
            Projection::Linear(lin) => to_map(&lin.forward(&tokens)?)?,
        };
        out + xs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn attention_in_blocks_of_rows_equals_the_whole() -> candle_core::Result<()> {
        let d = &Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 10, 8), d)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), d)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), d)?;
        let whole = attention_in_rows(&q, &k, &v, 0.35, usize::MAX)?;
        for rows in [1, 3, 4, 9] {
            let blocked = attention_in_rows(&q, &k, &v, 0.35, rows)?;
            let diff = (&blocked - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{rows} rows: {diff}");
        }
        assert_eq!(whole.dims(), &[2, 3, 10, 8]);
        Ok(())
    }
}
