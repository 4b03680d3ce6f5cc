//! The Stable Diffusion VAE (diffusers' `AutoencoderKL`): an encoder for image-to-image and
//! inpainting, a decoder for every task.
//!
//! ```text
//! encode: pixels [-1,1] ─conv_in─▶ down blocks ─▶ mid block ─▶ norm·silu·conv_out ─(quant_conv)─▶
//!         [mean | logvar] ──▶ LatentDistribution { mean, std }      (the caller samples it)
//! decode: latents ─(post_quant_conv)─conv_in─▶ mid block ─▶ up blocks ─▶ norm·silu·conv_out ─▶ pixels
//! ```
//!
//! Built from our blocks (`vae_blocks.rs`: fused GroupNorm + SiLU, blocked attention). candle's own
//! `AutoEncoderKL` is not used because
//! its latent distribution hides the mean and standard deviation and samples with candle's RNG,
//! whereas diffusers samples `latent_dist` with the request's torch generator: the draw has to come
//! from [`TorchRng`] in the pipeline's order for a seed to reproduce diffusers' picture.
//!
//! Decoding is always sliced (one image at a time, see [`Vae::decode`]); tiling
//! ([`Vae::set_tiling`], `vae_tiling.rs`) is optional.

use candle_core::{DType, Module, Tensor};
use candle_nn as nn;
use candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig;

use crate::models::conv::Conv;
use crate::models::norm::{group_norm, GroupNorm};
use crate::models::vae_blocks::{DownEncoderBlock, MidBlock, UpDecoderBlock, VaeNorm};
use crate::models::vae_tiling::TileSizes;
use crate::rng::TorchRng;

/// diffusers' VAE blocks all use this epsilon in their group norms.
const NORM_EPS: f64 = 1e-6;

/// `DiagonalGaussianDistribution` of diffusers: what the encoder says about each latent.
#[derive(Debug)]
pub struct LatentDistribution {
    pub mean: Tensor,
    pub std: Tensor,
}

impl LatentDistribution {
    /// `latent_dist.sample(generator)`: one `randn` of the mean's shape from `rng`, in float32.
    pub fn sample(&self, rng: &mut TorchRng) -> candle_core::Result<Tensor> {
        let mean = self.mean.to_dtype(DType::F32)?;
        let std = self.std.to_dtype(DType::F32)?;
        let noise = rng.randn_tensor(mean.dims(), mean.device(), DType::F32)?;
        mean + (std * noise)?
    }
}

/// A loaded `AutoencoderKL`.
#[derive(Debug)]
pub struct Vae {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2d>,
    post_quant_conv: Option<nn::Conv2d>,
    /// Encode and decode pictures larger than one tile tile by tile (diffusers' VAE tiling).
    tiling: Option<TileSizes>,
}

impl Vae {
    /// Builds the VAE from the weights under `vb` (the repo's `vae/` directory).
    pub fn new(
        vb: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: &AutoEncoderKLConfig,
    ) -> candle_core::Result<Self> {
        let latent = config.latent_channels;
        // The encoder predicts a mean and a log-variance per latent channel.
        let encoder = Encoder::new(vb.pp("encoder"), in_channels, 2 * latent, config)?;
        let decoder = Decoder::new(vb.pp("decoder"), latent, out_channels, config)?;
        let one_by_one = |channels: usize, name: &str| {
            nn::conv2d(channels, channels, 1, Default::default(), vb.pp(name))
        };
        let quant_conv = config
            .use_quant_conv
            .then(|| one_by_one(2 * latent, "quant_conv"))
            .transpose()?;
        let post_quant_conv = config
            .use_post_quant_conv
            .then(|| one_by_one(latent, "post_quant_conv"))
            .transpose()?;
        Ok(Vae {
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
            tiling: None,
        })
    }

    /// Turns tiled encoding and decoding on (`Some`) or off (`None`, the default).
    pub fn set_tiling(&mut self, tiling: Option<TileSizes>) {
        self.tiling = tiling;
    }

    /// The latent distribution of `pixels` (batch, 3, h, w) in [-1, 1], in the weights' dtype.
    /// The log-variance is clamped to [-30, 20] as diffusers does. With tiling on, a picture
    /// wider or taller than one tile is encoded tile by tile.
    pub fn encode(&self, pixels: &Tensor) -> candle_core::Result<LatentDistribution> {
        let (_, _, height, width) = pixels.dims4()?;
        let moments = match self.tiling {
            Some(tiles) if height > tiles.sample() || width > tiles.sample() => {
                tiles.encode(pixels, |tile| self.moments(tile))?
            }
            _ => self.moments(pixels)?,
        };
        let halves = moments.chunk(2, 1)?;
        let (mean, logvar) = (&halves[0], &halves[1]);
        let std = (logvar.clamp(-30f32, 20f32)? * 0.5)?.exp()?;
        Ok(LatentDistribution {
            mean: mean.clone(),
            std,
        })
    }

    /// Pixels (batch, 3, h, w), roughly in [-1, 1], from unscaled latents.
    ///
    /// Decodes one image at a time (diffusers' "VAE slicing"). Decoding a batch in one pass gave
    /// a wrong second image for some latents on the CPU (up to 0.1 off, against 0 for the same
    /// latents decoded alone; seen with inpainting at n = 2), and slicing also keeps the
    /// decoder's activation memory at one image's worth. That is why slicing is not an option
    /// here: the config's `enable_vae_slicing` is always in effect, and its output is what
    /// diffusers' sliced decode gives. With tiling on, latents wider or taller than one tile
    /// are decoded tile by tile.
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, height, width) = latents.dims4()?;
        let images = (0..latents.dim(0)?)
            .map(|i| {
                let latent = latents.narrow(0, i, 1)?.contiguous()?;
                match self.tiling {
                    Some(tiles) if height > tiles.latent() || width > tiles.latent() => {
                        tiles.decode(&latent, |tile| self.decode_one(tile))
                    }
                    _ => self.decode_one(&latent),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }

    /// Encoder and quant conv, untiled: pixels → [mean | logvar].
    fn moments(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let moments = self.encoder.forward(pixels)?;
        match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => Ok(moments),
        }
    }

    /// Post-quant conv and decoder, untiled: latents → pixels.
    fn decode_one(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(latents)?),
            None => self.decoder.forward(latents),
        }
    }
}

fn conv3x3(
    in_channels: usize,
    out_channels: usize,
    vb: nn::VarBuilder,
) -> candle_core::Result<Conv> {
    let cfg = nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Conv::new(nn::conv2d(
        in_channels,
        out_channels,
        3,
        cfg,
        vb,
    )?))
}

fn norm(config: &AutoEncoderKLConfig) -> VaeNorm {
    VaeNorm {
        groups: config.norm_num_groups,
        eps: NORM_EPS,
    }
}

/// The last channel count of `config.block_out_channels` (validated non-empty by the config).
fn widest(config: &AutoEncoderKLConfig) -> candle_core::Result<usize> {
    config
        .block_out_channels
        .last()
        .copied()
        .ok_or_else(|| candle_core::Error::Msg("VAE has no blocks".into()))
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(
        vb: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: &AutoEncoderKLConfig,
    ) -> candle_core::Result<Self> {
        let channels = &config.block_out_channels;
        let widest = widest(config)?;
        let conv_in = conv3x3(in_channels, channels[0], vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(channels.len());
        let mut previous = channels[0];
        for (index, &width) in channels.iter().enumerate() {
            // Every block but the last halves the resolution.
            down_blocks.push(DownEncoderBlock::new(
                vb.pp("down_blocks").pp(index.to_string()),
                config.layers_per_block,
                previous,
                width,
                index + 1 < channels.len(),
                norm(config),
            )?);
            previous = width;
        }
        Ok(Encoder {
            conv_in,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), widest, norm(config))?,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                widest,
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3(widest, out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(pixels)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv,
}

impl Decoder {
    fn new(
        vb: nn::VarBuilder,
        in_channels: usize,
        out_channels: usize,
        config: &AutoEncoderKLConfig,
    ) -> candle_core::Result<Self> {
        let channels = &config.block_out_channels;
        let widest = widest(config)?;
        let mut up_blocks = Vec::with_capacity(channels.len());
        let mut previous = widest;
        // The decoder mirrors the encoder: widest block first, one more resnet per block.
        for (index, &width) in channels.iter().rev().enumerate() {
            up_blocks.push(UpDecoderBlock::new(
                vb.pp("up_blocks").pp(index.to_string()),
                config.layers_per_block + 1,
                previous,
                width,
                index + 1 < channels.len(),
                norm(config),
            )?);
            previous = width;
        }
        Ok(Decoder {
            conv_in: conv3x3(in_channels, widest, vb.pp("conv_in"))?,
            mid_block: MidBlock::new(vb.pp("mid_block"), widest, norm(config))?,
            up_blocks,
            conv_norm_out: group_norm(
                config.norm_num_groups,
                channels[0],
                NORM_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3(channels[0], out_channels, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.mid_block.forward(&self.conv_in.forward(latents)?)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
