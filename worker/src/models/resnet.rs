//! The UNet's resnet block and time-embedding MLP (diffusers `ResnetBlock2D`, `TimestepEmbedding`),
//! with their convolutions and linears built through `crate::lora` so that LoCon and PEFT conv
//! adapters reach them. Same computation as candle's versions of these blocks.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::models::norm::{group_norm, GroupNorm};

use crate::lora::{conv2d, linear, LoraConv2d, LoraLinear};

/// What a resnet needs besides its input width.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub out_channels: usize,
    /// Width of the time embedding; 0 for a resnet without one (the VAE's).
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

/// norm → silu → conv1 (+ time embedding) → norm → silu → conv2, plus the (1×1 conv when the
/// width changes) shortcut.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: LoraConv2d,
    time_emb_proj: Option<LoraLinear>,
    norm2: GroupNorm,
    conv2: LoraConv2d,
    conv_shortcut: Option<LoraConv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: ResnetConfig) -> candle_core::Result<Self> {
        let out = cfg.out_channels;
        let padded = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_shortcut = if in_channels != out {
            Some(conv2d(
                in_channels,
                out,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out, 3, padded, vb.pp("conv1"))?,
            time_emb_proj: (cfg.temb_channels > 0)
                .then(|| linear(cfg.temb_channels, out, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(cfg.groups, out, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(out, out, 3, padded, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, xs: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, Some(temb))
    }

    /// A resnet without a time embedding (the VAE's).
    pub fn forward_plain(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, None)
    }

    fn run(&self, xs: &Tensor, temb: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let h = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => proj
                .forward(&candle_nn::ops::silu(temb)?)?
                .unsqueeze(D::Minus1)?
                .unsqueeze(D::Minus1)?
                .broadcast_add(&h)?,
            (None, None) => h,
            _ => candle_core::bail!("resnet: the time embedding does not match its config"),
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        (shortcut + h)? / self.output_scale_factor
    }
}

/// `linear_1 → silu → linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: LoraLinear,
    linear_2: LoraLinear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, channels: usize, dim: usize) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(channels, dim, vb.pp("linear_1"))?,
            linear_2: linear(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2
            .forward(&candle_nn::ops::silu(&self.linear_1.forward(xs)?)?)
    }
}
