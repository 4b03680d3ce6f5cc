//! The conditional UNet of Stable Diffusion 1.x/2.x and SDXL (diffusers `UNet2DConditionModel`).
//!
//! ```text
//! t ─sinusoids (f32)─▶ time MLP ─▶ temb ─(+ SDXL: add_embedding([pooled | sinusoids(time ids)]))
//! x ─conv_in─▶ down blocks (resnets [+ transformers], downsample) ──▶ mid (resnet, transformer,
//!   resnet) ──▶ up blocks (concat skip, resnets [+ transformers], upsample) ─▶ norm, silu, conv_out
//!                                   text embeds ─▶ every Transformer2D's cross-attention
//! ```
//!
//! Built from a [`UNetSpec`] (read from the repo's `unet/config.json` by `config.rs`): per-block
//! heads, per-layer transformer depths (SDXL's `transformer_layers_per_block`, asymmetric UNets'
//! reverse lists) and SDXL's `text_time` addition embedding. Every block is ours (resnets and time
//! embeddings in `resnet.rs`, with layers LoRA adapters reach): candle's transformer uses tanh-approximated
//! GELU, its plain down/up blocks ignore `norm_num_groups`, it computes the timestep sinusoids in
//! the model dtype where diffusers uses float32, and it has no addition embedding at all.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::Timesteps;

use super::config::{divides, AdditionEmbedSpec, UNetBlockSpec, UNetSpec};
use super::norm::{group_norm, GroupNorm};
use super::resnet::{ResnetBlock2D, ResnetConfig, TimestepEmbedding};
use super::transformer::{Transformer2D, Transformer2DConfig};
use crate::lora::{conv2d, LoraConv2d as Conv2d};

fn padded(padding: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        ..Default::default()
    }
}

/// Stride-2 3×3 convolution halving the feature map.
#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    /// With `downsample_padding = 0` diffusers pads only the right and bottom edges by one.
    pad_right_bottom: bool,
}

impl Downsample {
    fn new(vb: VarBuilder, channels: usize, padding: usize) -> candle_core::Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            pad_right_bottom: padding == 0,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour ×2 (or to the skip connection's size) then a 3×3 convolution.
#[derive(Debug)]
struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    fn new(vb: VarBuilder, channels: usize) -> candle_core::Result<Self> {
        Ok(Self {
            conv: conv2d(channels, channels, 3, padded(1), vb.pp("conv"))?,
        })
    }

    fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> candle_core::Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (h, w) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&xs.upsample_nearest2d(h, w)?)
    }
}

/// What every resnet and transformer of the UNet shares.
#[derive(Debug, Clone, Copy)]
struct Shared {
    temb_channels: usize,
    groups: usize,
    eps: f64,
    context_dim: usize,
    use_linear_projection: bool,
}

impl Shared {
    fn resnet(
        &self,
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        output_scale_factor: f64,
    ) -> candle_core::Result<ResnetBlock2D> {
        let cfg = ResnetConfig {
            out_channels,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor,
        };
        ResnetBlock2D::new(vb, in_channels, cfg)
    }

    /// One transformer of `depth` blocks.
    fn transformer(
        &self,
        vb: VarBuilder,
        channels: usize,
        heads: usize,
        depth: usize,
    ) -> candle_core::Result<Transformer2D> {
        let cfg = Transformer2DConfig {
            channels,
            heads,
            depth,
            context_dim: self.context_dim,
            groups: self.groups,
            use_linear_projection: self.use_linear_projection,
        };
        Transformer2D::new(vb, cfg)
    }

    /// The transformers of a block, one per resnet at the depths the spec gives; none for a
    /// block without attention.
    fn transformers(
        &self,
        vb: VarBuilder,
        block: &UNetBlockSpec,
    ) -> candle_core::Result<Vec<Transformer2D>> {
        let Some(depths) = &block.depths else {
            return Ok(Vec::new());
        };
        depths
            .iter()
            .enumerate()
            .map(|(i, &depth)| {
                self.transformer(vb.pp(i.to_string()), block.out_channels, block.heads, depth)
            })
            .collect()
    }
}

/// `DownBlock2D` (no transformers) or `CrossAttnDownBlock2D`.
#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    /// Empty for a plain block; else one per resnet.
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    /// Returns the block output and pushes every intermediate state onto `skips`.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsample {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

/// `UpBlock2D` (no transformers) or `CrossAttnUpBlock2D`.
#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    /// Consumes one skip connection per resnet from the end of `skips`.
    fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        upsample_size: Option<(usize, usize)>,
    ) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet ran out of skip connections".into())
            })?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, temb)?;
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context)?;
            }
        }
        match &self.upsample {
            Some(up) => up.forward(&xs, upsample_size),
            None => Ok(xs),
        }
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) once.
#[derive(Debug)]
struct MidBlock {
    first: ResnetBlock2D,
    attention: Transformer2D,
    second: ResnetBlock2D,
}

/// SDXL's `text_time` addition embedding (diffusers' `add_time_proj` + `add_embedding`).
#[derive(Debug)]
struct AdditionEmbedding {
    time_proj: Timesteps,
    embedding: TimestepEmbedding,
}

impl AdditionEmbedding {
    /// `text_embeds` (b, pooled) and `time_ids` (b, k): each id through sinusoids (float32),
    /// concatenated after the pooled embeddings, through the MLP; in `dtype`.
    fn forward(
        &self,
        text_embeds: &Tensor,
        time_ids: &Tensor,
        dtype: candle_core::DType,
    ) -> candle_core::Result<Tensor> {
        let (b, _) = time_ids.dims2()?;
        let time = self
            .time_proj
            .forward(&time_ids.flatten_all()?.to_dtype(candle_core::DType::F32)?)?
            .reshape((b, ()))?;
        let added = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &time.to_dtype(dtype)?], 1)?;
        self.embedding.forward(&added)
    }
}

/// What SDXL's UNet takes besides the text embeddings.
#[derive(Debug, Clone, Copy)]
pub struct AddedConditions<'a> {
    /// (b, pooled width): the second text encoder's projected pooled output.
    pub text_embeds: &'a Tensor,
    /// (b, 6): original size, crop top-left and target size (height, width each).
    pub time_ids: &'a Tensor,
}

/// Stable Diffusion's denoising UNet.
#[derive(Debug)]
pub struct UNet {
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    addition: Option<AdditionEmbedding>,
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    center_input_sample: bool,
}

impl UNet {
    /// Builds the UNet; the spec's block lists must not be empty (`config.rs` guarantees it).
    pub fn new(vb: VarBuilder, spec: &UNetSpec) -> candle_core::Result<Self> {
        let (Some(first), Some(last)) = (spec.down_blocks.first(), spec.down_blocks.last()) else {
            return Err(candle_core::Error::Msg("UNet config has no blocks".into()));
        };
        let n = spec.down_blocks.len();
        if spec.up_blocks.len() != n {
            return Err(candle_core::Error::Msg(
                "UNet config has as many up blocks as down blocks".into(),
            ));
        }
        let base = first.out_channels;
        let temb_channels = base * 4;
        let shared = Shared {
            temb_channels,
            groups: spec.norm_num_groups,
            eps: spec.norm_eps,
            context_dim: spec.cross_attention_dim,
            use_linear_projection: spec.use_linear_projection,
        };

        let down_vb = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        let mut channels = base;
        for (i, block) in spec.down_blocks.iter().enumerate() {
            let vb = down_vb.pp(i.to_string());
            let out = block.out_channels;
            let resnets = (0..block.resnets)
                .map(|j| {
                    let inp = if j == 0 { channels } else { out };
                    shared.resnet(vb.pp("resnets").pp(j.to_string()), inp, out, 1.0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = shared.transformers(vb.pp("attentions"), block)?;
            let downsample = if i + 1 < n {
                Some(Downsample::new(
                    vb.pp("downsamplers.0"),
                    out,
                    spec.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
            channels = out;
        }

        let mid_vb = vb.pp("mid_block");
        let mid_channels = last.out_channels;
        let mid_block = MidBlock {
            first: shared.resnet(
                mid_vb.pp("resnets.0"),
                mid_channels,
                mid_channels,
                spec.mid_block_scale_factor,
            )?,
            attention: shared.transformer(
                mid_vb.pp("attentions.0"),
                mid_channels,
                spec.mid_heads,
                spec.mid_depth,
            )?,
            second: shared.resnet(
                mid_vb.pp("resnets.1"),
                mid_channels,
                mid_channels,
                spec.mid_block_scale_factor,
            )?,
        };

        let up_vb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = mid_channels;
        for (i, block) in spec.up_blocks.iter().enumerate() {
            let out = block.out_channels;
            // The channels of the down block one level further in, i.e. of this block's last
            // skip connection (the outermost block's own for the last up block).
            let skip_in = spec.down_blocks[(n - 1 - i).saturating_sub(1)].out_channels;
            let vb = up_vb.pp(i.to_string());
            let layers = block.resnets;
            let resnets = (0..layers)
                .map(|j| {
                    let skip = if j + 1 == layers { skip_in } else { out };
                    let inp = if j == 0 { prev_out } else { out };
                    shared.resnet(vb.pp("resnets").pp(j.to_string()), inp + skip, out, 1.0)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let attentions = shared.transformers(vb.pp("attentions"), block)?;
            let upsample = if i + 1 < n {
                Some(Upsample::new(vb.pp("upsamplers.0"), out)?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = out;
        }

        let addition = spec
            .addition
            .map(
                |AdditionEmbedSpec {
                     time_embed_dim,
                     in_features,
                 }| {
                    Ok::<_, candle_core::Error>(AdditionEmbedding {
                        time_proj: Timesteps::new(
                            time_embed_dim,
                            spec.flip_sin_to_cos,
                            spec.freq_shift,
                        ),
                        embedding: TimestepEmbedding::new(
                            vb.pp("add_embedding"),
                            in_features,
                            temb_channels,
                        )?,
                    })
                },
            )
            .transpose()?;

        Ok(Self {
            time_proj: Timesteps::new(base, spec.flip_sin_to_cos, spec.freq_shift),
            time_embedding: TimestepEmbedding::new(vb.pp("time_embedding"), base, temb_channels)?,
            addition,
            conv_in: conv2d(spec.in_channels, base, 3, padded(1), vb.pp("conv_in"))?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                spec.norm_num_groups,
                base,
                spec.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv2d(base, spec.out_channels, 3, padded(1), vb.pp("conv_out"))?,
            center_input_sample: spec.center_input_sample,
        })
    }

    /// True for SDXL's UNet, which needs [`AddedConditions`].
    pub fn needs_added_conditions(&self) -> bool {
        self.addition.is_some()
    }

    /// Predicts the noise (or v) for `xs` (b, c, h, w) at `timestep`, conditioned on
    /// `context` (b, seq, dim) and, for SDXL, `added`. Runs in `xs`'s dtype.
    pub fn forward(
        &self,
        xs: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<AddedConditions<'_>>,
    ) -> candle_core::Result<Tensor> {
        let (batch, _, h, w) = xs.dims4()?;
        let dtype = xs.dtype();
        let xs = if self.center_input_sample {
            xs.affine(2.0, -1.0)?
        } else {
            xs.clone()
        };
        // The sinusoids in float32 like diffusers, then the MLP in the model dtype.
        let t = Tensor::full(timestep as f32, batch, xs.device())?;
        let temb = self.time_proj.forward(&t)?.to_dtype(dtype)?;
        let mut temb = self.time_embedding.forward(&temb)?;
        match (&self.addition, added) {
            (Some(addition), Some(added)) => {
                temb = (temb + addition.forward(added.text_embeds, added.time_ids, dtype)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(candle_core::Error::Msg(
                    "this UNet needs pooled text embeddings and time ids".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(candle_core::Error::Msg(
                    "this UNet takes no pooled text embeddings or time ids".into(),
                ))
            }
        }
        let context = context.to_dtype(dtype)?;

        let mut xs = self.conv_in.forward(&xs)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb, &context, &mut skips)?;
        }

        let mid = &self.mid_block;
        xs = mid.first.forward(&xs, &temb)?;
        xs = mid.attention.forward(&xs, &context)?;
        xs = mid.second.forward(&xs, &temb)?;

        // When h or w is not a multiple of 2^(upsamplers), each upsample must land exactly on the
        // size of the skip connection it is concatenated with next.
        let factor = 1usize << self.up_blocks.len().saturating_sub(1);
        let exact_sizes = !divides(factor, h) || !divides(factor, w);
        for block in &self.up_blocks {
            let remaining = skips.len().saturating_sub(block.resnets.len());
            let upsample_size = match (exact_sizes, remaining.checked_sub(1).map(|i| &skips[i])) {
                (true, Some(next)) => {
                    let (_, _, sh, sw) = next.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            xs = block.forward(&xs, &temb, &context, &mut skips, upsample_size)?;
        }

        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }
}
