//! The VAE's blocks (diffusers `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D` with
//! its single-head `Attention`), built from our resnet so that they take the fused GroupNorm +
//! SiLU (`models::norm`) and blocked attention (`models::transformer`): the decoder's last levels
//! run GroupNorm over 33 M values at 512², and the mid block's self-attention over 4 096 tokens at
//! 512² (16 384 at 1024², a 1 GB score matrix in one piece). Same computation as candle's blocks,
//! which these replace.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::attention::attention;
use super::norm::{group_norm, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::lora::{conv2d, linear, LoraConv2d, LoraLinear};

/// Group count and epsilon of every norm in a VAE.
#[derive(Debug, Clone, Copy)]
pub struct VaeNorm {
    pub groups: usize,
    pub eps: f64,
}

fn resnet(
    vb: VarBuilder,
    in_channels: usize,
    out_channels: usize,
    norm: VaeNorm,
) -> candle_core::Result<ResnetBlock2D> {
    let cfg = ResnetConfig {
        out_channels,
        temb_channels: 0,
        groups: norm.groups,
        eps: norm.eps,
        output_scale_factor: 1.0,
    };
    ResnetBlock2D::new(vb, in_channels, cfg)
}

fn resnets(
    vb: VarBuilder,
    layers: usize,
    in_channels: usize,
    out_channels: usize,
    norm: VaeNorm,
) -> candle_core::Result<Vec<ResnetBlock2D>> {
    (0..layers)
        .map(|i| {
            let input = if i == 0 { in_channels } else { out_channels };
            resnet(
                vb.pp("resnets").pp(i.to_string()),
                input,
                out_channels,
                norm,
            )
        })
        .collect()
}

fn conv(
    vb: VarBuilder,
    channels: usize,
    stride: usize,
    padding: usize,
) -> candle_core::Result<LoraConv2d> {
    let cfg = Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    conv2d(channels, channels, 3, cfg, vb)
}

/// Resnets, then (all blocks but the last) a stride-2 convolution after padding right and bottom
/// by one, as diffusers' `Downsample2D` does for `padding=0`.
#[derive(Debug)]
pub struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsample: Option<LoraConv2d>,
}

impl DownEncoderBlock {
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        in_channels: usize,
        out_channels: usize,
        downsample: bool,
        norm: VaeNorm,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            resnets: resnets(vb.clone(), layers, in_channels, out_channels, norm)?,
            downsample: downsample
                .then(|| conv(vb.pp("downsamplers.0.conv"), out_channels, 2, 0))
                .transpose()?,
        })
    }
}

impl Module for DownEncoderBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward_plain(&xs)?;
        }
        match &self.downsample {
            Some(conv) => {
                let padded = xs.pad_with_zeros(D::Minus1, 0, 1)?;
                conv.forward(&padded.pad_with_zeros(D::Minus2, 0, 1)?)
            }
            None => Ok(xs),
        }
    }
}

/// Resnets, then (all blocks but the last) nearest-neighbour 2× upsampling and a convolution.
#[derive(Debug)]
pub struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsample: Option<LoraConv2d>,
}

impl UpDecoderBlock {
    pub fn new(
        vb: VarBuilder,
        layers: usize,
        in_channels: usize,
        out_channels: usize,
        upsample: bool,
        norm: VaeNorm,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            resnets: resnets(vb.clone(), layers, in_channels, out_channels, norm)?,
            upsample: upsample
                .then(|| conv(vb.pp("upsamplers.0.conv"), out_channels, 1, 1))
                .transpose()?,
        })
    }
}

impl Module for UpDecoderBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for r in &self.resnets {
            xs = r.forward_plain(&xs)?;
        }
        match &self.upsample {
            Some(conv) => {
                let (_, _, h, w) = xs.dims4()?;
                conv.forward(&xs.upsample_nearest2d(2 * h, 2 * w)?)
            }
            None => Ok(xs),
        }
    }
}

/// Resnet, single-head self-attention over all pixels, resnet.
#[derive(Debug)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attention: PixelAttention,
    second: ResnetBlock2D,
}

impl MidBlock {
    pub fn new(vb: VarBuilder, channels: usize, norm: VaeNorm) -> candle_core::Result<Self> {
        Ok(Self {
            first: resnet(vb.pp("resnets.0"), channels, channels, norm)?,
            attention: PixelAttention::new(vb.pp("attentions.0"), channels, norm)?,
            second: resnet(vb.pp("resnets.1"), channels, channels, norm)?,
        })
    }
}

impl Module for MidBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.first.forward_plain(xs)?;
        let xs = self.attention.forward(&xs)?;
        self.second.forward_plain(&xs)
    }
}

/// diffusers' VAE `Attention`: group norm, one head over all channels, residual.
#[derive(Debug)]
struct PixelAttention {
    group_norm: GroupNorm,
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    channels: usize,
}

impl PixelAttention {
    fn new(vb: VarBuilder, channels: usize, norm: VaeNorm) -> candle_core::Result<Self> {
        // Repos saved before diffusers 0.14 name the projections query/key/value/proj_attn.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let projection = |name: &str| linear(channels, channels, vb.pp(name));
        Ok(Self {
            group_norm: group_norm(norm.groups, channels, norm.eps, vb.pp("group_norm"))?,
            to_q: projection(names[0])?,
            to_k: projection(names[1])?,
            to_v: projection(names[2])?,
            to_out: projection(names[3])?,
            channels,
        })
    }
}

impl Module for PixelAttention {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let in_dtype = xs.dtype();
        // (b, c, h, w) → (b, h·w, c): one token per pixel.
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // (b, 1 head, h·w, c) in float32, as the UNet's attention (diffusers upcasts it too).
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            t.unsqueeze(1)?.to_dtype(candle_core::DType::F32)
        };
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        let scale = (self.channels as f64).powf(-0.5);
        let out = attention(&q, &k, &v, scale)?.to_dtype(in_dtype)?;
        let out = self
            .to_out
            .forward(&out)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + xs
    }
}
