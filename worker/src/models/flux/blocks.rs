//! The two kinds of FLUX transformer block, with diffusers' weight names.
//!
//! * [`DoubleBlock`] (`transformer_blocks.i`): image and text tokens keep separate weights
//!   (`norm1`/`attn.to_*`/`ff` vs `norm1_context`/`attn.add_*_proj`/`ff_context`) but attend
//!   jointly, text first. adaLN-Zero modulation from `temb`: shift, scale and gate for the attention
//!   and for the MLP of each stream.
//! * [`SingleBlock`] (`single_transformer_blocks.j`): one stream over the concatenated tokens;
//!   attention and a GELU MLP run in parallel on the same normalised input and one `proj_out` maps
//!   their concatenation back.
//!
//! float16 activations are clipped to ±65504 where diffusers clips them (the text stream after a
//! double block, everything after a single block) so that overflows saturate instead of
//! becoming inf.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use super::attention::{apply_rope, joint_attention, split_heads, Rope};
use super::layers::{chunks, layer_norm, linear, modulate, Linear, RmsNorm};

/// LayerNorm epsilon of every norm in the blocks.
const NORM_EPS: f64 = 1e-6;
/// MLP width over the hidden width (fixed in FLUX.1).
const MLP_RATIO: usize = 4;

/// Queries, keys and values of one token stream, with their per-head norms.
#[derive(Debug, Clone)]
struct Qkv {
    q: Linear,
    k: Linear,
    v: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
}

impl Qkv {
    /// `names`: the q, k, v projections and the q, k norms under `vb`.
    fn new(
        dim: usize,
        head_dim: usize,
        names: [&str; 5],
        vb: &VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            q: linear(dim, dim, vb.pp(names[0]))?,
            k: linear(dim, dim, vb.pp(names[1]))?,
            v: linear(dim, dim, vb.pp(names[2]))?,
            norm_q: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[3]))?,
            norm_k: RmsNorm::new(head_dim, NORM_EPS, vb.pp(names[4]))?,
        })
    }

    /// (B, N, D) → q, k, v as (B, heads, N, head_dim), q and k normalised.
    fn forward(&self, xs: &Tensor, heads: usize) -> candle_core::Result<[Tensor; 3]> {
        let q = self
            .norm_q
            .forward(&split_heads(&self.q.forward(xs)?, heads)?)?;
        let k = self
            .norm_k
            .forward(&split_heads(&self.k.forward(xs)?, heads)?)?;
        let v = split_heads(&self.v.forward(xs)?, heads)?;
        Ok([q, k, v])
    }
}

/// `FeedForward(dim, activation_fn="gelu-approximate")`: `net.2(gelu_tanh(net.0.proj(x)))`.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            proj_in: linear(dim, dim * MLP_RATIO, vb.pp("net.0.proj"))?,
            proj_out: linear(dim * MLP_RATIO, dim, vb.pp("net.2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.proj_out.forward(&self.proj_in.forward(xs)?.gelu()?)
    }
}

/// `x + gate · y` with a per-sample (B, D) gate over (B, N, D).
fn gated_add(xs: &Tensor, gate: &Tensor, ys: &Tensor) -> candle_core::Result<Tensor> {
    xs + ys.broadcast_mul(&gate.unsqueeze(1)?)?
}

/// Saturates float16 activations at the largest finite value, as diffusers does.
fn clip_f16(xs: Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() == DType::F16 {
        xs.clamp(-65504f32, 65504f32)
    } else {
        Ok(xs)
    }
}

/// One double-stream block (`FluxTransformerBlock`).
#[derive(Debug, Clone)]
pub struct DoubleBlock {
    norm1: Linear,
    norm1_context: Linear,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
    heads: usize,
}

impl DoubleBlock {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        let attn = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1.linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context.linear"))?,
            img: Qkv::new(
                dim,
                head_dim,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &attn,
            )?,
            txt: Qkv::new(
                dim,
                head_dim,
                [
                    "add_q_proj",
                    "add_k_proj",
                    "add_v_proj",
                    "norm_added_q",
                    "norm_added_k",
                ],
                &attn,
            )?,
            to_out: linear(dim, dim, attn.pp("to_out.0"))?,
            to_add_out: linear(dim, dim, attn.pp("to_add_out"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
            ff_context: FeedForward::new(dim, vb.pp("ff_context"))?,
            heads,
        })
    }

    /// `img` (B, L, D), `txt` (B, S, D), `temb` (B, D); `rope` covers the S + L tokens, text first.
    /// Returns the new (img, txt).
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &Rope,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let act = temb.silu()?;
        let m = chunks(&self.norm1.forward(&act)?, 6)?;
        let c = chunks(&self.norm1_context.forward(&act)?, 6)?;
        // diffusers' order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
        let img_in = modulate(&layer_norm(img, NORM_EPS)?, &m[0], &m[1])?;
        let txt_in = modulate(&layer_norm(txt, NORM_EPS)?, &c[0], &c[1])?;

        let [iq, ik, iv] = self.img.forward(&img_in, self.heads)?;
        let [tq, tk, tv] = self.txt.forward(&txt_in, self.heads)?;
        let q = apply_rope(&Tensor::cat(&[tq, iq], 2)?, rope)?;
        let k = apply_rope(&Tensor::cat(&[tk, ik], 2)?, rope)?;
        let v = Tensor::cat(&[tv, iv], 2)?;
        let joint = joint_attention(&q, &k, &v)?;
        let text_len = txt.dim(1)?;
        let txt_attn = self.to_add_out.forward(&joint.narrow(1, 0, text_len)?)?;
        let img_attn = self
            .to_out
            .forward(&joint.narrow(1, text_len, img.dim(1)?)?)?;

        let img = gated_add(img, &m[2], &img_attn)?;
        let img_mlp = modulate(&layer_norm(&img, NORM_EPS)?, &m[3], &m[4])?;
        let img = gated_add(&img, &m[5], &self.ff.forward(&img_mlp)?)?;

        let txt = gated_add(txt, &c[2], &txt_attn)?;
        let txt_mlp = modulate(&layer_norm(&txt, NORM_EPS)?, &c[3], &c[4])?;
        let txt = gated_add(&txt, &c[5], &self.ff_context.forward(&txt_mlp)?)?;
        Ok((img, clip_f16(txt)?))
    }
}

/// One single-stream block (`FluxSingleTransformerBlock`).
#[derive(Debug, Clone)]
pub struct SingleBlock {
    norm: Linear,
    qkv: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
    heads: usize,
}

impl SingleBlock {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let mlp = dim * MLP_RATIO;
        Ok(Self {
            norm: linear(dim, 3 * dim, vb.pp("norm.linear"))?,
            qkv: Qkv::new(
                dim,
                dim / heads,
                ["to_q", "to_k", "to_v", "norm_q", "norm_k"],
                &vb.pp("attn"),
            )?,
            proj_mlp: linear(dim, mlp, vb.pp("proj_mlp"))?,
            proj_out: linear(dim + mlp, dim, vb.pp("proj_out"))?,
            heads,
        })
    }

    /// `xs`: (B, S + L, D), text tokens first.
    pub fn forward(&self, xs: &Tensor, temb: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
        let m = chunks(&self.norm.forward(&temb.silu()?)?, 3)?;
        // shift, scale, gate
        let normed = modulate(&layer_norm(xs, NORM_EPS)?, &m[0], &m[1])?;
        let mlp = self.proj_mlp.forward(&normed)?.gelu()?;
        let [q, k, v] = self.qkv.forward(&normed, self.heads)?;
        let attn = joint_attention(&apply_rope(&q, rope)?, &apply_rope(&k, rope)?, &v)?;
        let out = self.proj_out.forward(&Tensor::cat(&[attn, mlp], 2)?)?;
        clip_f16(gated_add(xs, &m[2], &out)?)
    }
}
