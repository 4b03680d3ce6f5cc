//! The UNet's spatial transformer (diffusers `Transformer2DModel` with continuous input).
//!
//! A feature map (b, c, h, w) is group-normed, projected in (1×1 conv, or linear when
//! `use_linear_projection`), flattened to h·w tokens, run through `BasicTransformerBlock`s
//! (self-attention, cross-attention on the text embeddings, GEGLU feed-forward, each pre-layer-
//! norm with a residual), projected back and added to the input.
//!
//! Ours rather than candle's because candle's feed-forward uses the tanh approximation of GELU
//! where diffusers' GEGLU uses the exact (erf) one; the difference is visible in the latents.

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::attention::attention;
use super::geglu::geglu;
use super::norm::{group_norm, GroupNorm};
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

    /// (b, t, heads·head_dim) → (b, heads, t, head_dim), a view (the attention reads strides).
    fn split_heads(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, inner) = xs.dims3()?;
        xs.reshape((b, t, self.heads, inner / self.heads))?
            .transpose(1, 2)
    }

    pub fn forward(&self, xs: &Tensor, context: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let context = context.unwrap_or(xs);
        let in_dtype = xs.dtype();
        // Scores and softmax in float32 whatever the model dtype (diffusers' upcast_attention),
        // so half-precision models do not overflow on large logits.
        let heads = |proj: &LoraLinear, x: &Tensor| -> candle_core::Result<Tensor> {
            self.split_heads(&proj.forward(x)?)?.to_dtype(DType::F32)
        };
        let out = attention(
            &heads(&self.to_q, xs)?,
            &heads(&self.to_k, context)?,
            &heads(&self.to_v, context)?,
            self.scale,
        )?
        .to_dtype(in_dtype)?;
        self.to_out.forward(&out)
    }
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
        let gated = geglu(&self.proj_in.forward(xs)?)?;
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
