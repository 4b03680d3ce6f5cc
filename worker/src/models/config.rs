//! Serde mirrors of the diffusers/transformers `config.json` files of a Stable Diffusion repo, and
//! their mapping onto candle's model configs.
//!
//! Each `*File` struct is plain data read from the repo (never a hard-coded preset). `to_candle`
//! checks every key that changes the architecture: a value candle's blocks cannot represent is
//! rejected with [`WorkerError::ModelLoad`] naming the file and the key, instead of loading a model
//! that would silently compute something else.

use std::path::Path;

use candle_transformers::models::stable_diffusion::vae;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{Result, WorkerError};

/// Whether `divisor` is non-zero and divides `n` (a zero from a config file must not panic).
pub fn divides(divisor: usize, n: usize) -> bool {
    n.checked_rem(divisor) == Some(0)
}

/// Reads and parses one JSON config file; `source_name` is only used in errors.
pub fn read_json<T: DeserializeOwned>(source_name: &str, path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| WorkerError::model_load(source_name, path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text)
        .map_err(|e| WorkerError::model_load(source_name, path, format!("invalid JSON: {e}")))
}

/// A config value diffusers accepts either once for every block or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Copy> PerBlock<T> {
    /// The value for every one of `n` blocks, or `None` when a list has the wrong length.
    fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            PerBlock::One(v) => Some(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Some(v.clone()),
            PerBlock::Each(_) => None,
        }
    }
}

/// `unet/config.json` of a `UNet2DConditionModel`: the keys SD 1.x/2.x and SDXL use, plus the keys
/// of other architectures (class embeddings, LCM's time condition, ...) so that they can be rejected.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfigFile {
    #[serde(default = "default_latent_channels")]
    pub in_channels: usize,
    #[serde(default = "default_latent_channels")]
    pub out_channels: usize,
    /// Latent side length the model was trained at (an int for SD; a `[h, w]` pair is rejected,
    /// and so is a missing one: the default image size comes from it).
    pub sample_size: Option<serde_json::Value>,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: PerBlock<usize>,
    /// Despite its name diffusers uses this as the number of heads when `num_attention_heads`
    /// is absent (a historical misnaming kept for compatibility).
    #[serde(default = "default_attention_head_dim")]
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// An int, one int per block, or (asymmetric UNets) one list per block with a depth per
    /// layer; see [`UNetConfigFile::transformer_depths`].
    #[serde(default = "default_one_layer")]
    pub transformer_layers_per_block: serde_json::Value,
    /// The up blocks' depths, one entry (int or list per layer) per up block; when absent they
    /// are `transformer_layers_per_block` reversed.
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_unet_norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "default_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default = "default_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_three")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    #[serde(default = "default_resnet_time_scale_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// `transformer.rs` computes attention scores in f32 whatever the model dtype, which is what
    /// upcasting asks for: accepted either way.
    #[serde(default)]
    pub upcast_attention: bool,
    /// `"text_time"` for SDXL (pooled text embeddings + size/crop time ids); others are refused.
    pub addition_embed_type: Option<String>,
    /// Sinusoid width of each SDXL time id (256 for SDXL base).
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of SDXL's `add_embedding`: time ids × `addition_time_embed_dim` + the pooled
    /// text embedding's width (2816 = 6 × 256 + 1280 for SDXL base).
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
}

impl Default for PerBlock<bool> {
    fn default() -> Self {
        PerBlock::One(false)
    }
}

fn default_latent_channels() -> usize {
    4
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_owned())
}
fn default_layers_per_block() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn default_attention_head_dim() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn default_one_layer() -> serde_json::Value {
    serde_json::Value::from(1)
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_unet_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_one_usize() -> usize {
    1
}
fn default_one_f64() -> f64 {
    1.0
}
fn default_three() -> usize {
    3
}
fn default_silu() -> String {
    "silu".to_owned()
}
fn default_positional() -> String {
    "positional".to_owned()
}
fn default_resnet_time_scale_shift() -> String {
    "default".to_owned()
}

/// One down or up block of the UNet, as `unet.rs` builds it.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetBlockSpec {
    pub out_channels: usize,
    /// Attention heads of the block's transformers (head width = channels / heads).
    pub heads: usize,
    /// Resnets in the block (`layers_per_block`, one more in up blocks).
    pub resnets: usize,
    /// Transformer depth after each resnet; `None` for a block without attention
    /// (`DownBlock2D` / `UpBlock2D`).
    pub depths: Option<Vec<usize>>,
}

/// SDXL's `text_time` addition embedding: pooled text embeddings and the time ids (original
/// size, crop, target size), each id through sinusoids of `time_embed_dim`, into an MLP whose
/// output is added to the timestep embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdditionEmbedSpec {
    /// `addition_time_embed_dim`.
    pub time_embed_dim: usize,
    /// `projection_class_embeddings_input_dim`: the MLP's input width.
    pub in_features: usize,
}

impl AdditionEmbedSpec {
    /// The pooled text embedding width the MLP expects next to `time_ids` ids.
    pub fn pooled_dim(&self, time_ids: usize) -> Option<usize> {
        self.in_features.checked_sub(time_ids * self.time_embed_dim)
    }
}

/// Everything needed to build the UNet, read from a [`UNetConfigFile`].
#[derive(Debug, Clone)]
pub struct UNetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Latent side length the model was trained at.
    pub sample_size: usize,
    /// In order from the input; the up blocks mirror them in reverse.
    pub down_blocks: Vec<UNetBlockSpec>,
    /// In order from the middle of the UNet to its output.
    pub up_blocks: Vec<UNetBlockSpec>,
    /// Transformer depth and heads of the mid block.
    pub mid_depth: usize,
    pub mid_heads: usize,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub center_input_sample: bool,
    /// SDXL's pooled-text + time-id conditioning; `None` for SD 1.x/2.x.
    pub addition: Option<AdditionEmbedSpec>,
}

/// Builds a `ModelLoad` error for an unsupported key of `file`.
fn unsupported(
    source_name: &str,
    file: &Path,
    key: &str,
    why: impl std::fmt::Display,
) -> WorkerError {
    WorkerError::model_load(source_name, file, format!("key '{key}': {why}"))
}

/// Transformer depths per layer of each down block and each up block, and the mid block's.
type Depths = (Vec<Vec<usize>>, Vec<Vec<usize>>, usize);

/// A depth entry of `transformer_layers_per_block`: one depth for every layer of the block, or
/// one per layer.
fn depths_of(value: &serde_json::Value, layers: usize) -> Option<Vec<usize>> {
    match value {
        serde_json::Value::Number(_) => Some(vec![usize::try_from(value.as_u64()?).ok()?; layers]),
        serde_json::Value::Array(items) if items.len() == layers => items
            .iter()
            .map(|v| v.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect(),
        _ => None,
    }
}

impl UNetConfigFile {
    /// The transformer depths per layer of each down block, each up block and the mid block,
    /// read as diffusers' `UNet2DConditionModel.__init__` reads them.
    fn transformer_depths(
        &self,
        n: usize,
        layers: usize,
        bad: &dyn Fn(&str, String) -> WorkerError,
    ) -> Result<Depths> {
        let key = "transformer_layers_per_block";
        let per_block: Vec<serde_json::Value> = match &self.transformer_layers_per_block {
            serde_json::Value::Array(items) if items.len() == n => items.clone(),
            v @ serde_json::Value::Number(_) => vec![v.clone(); n],
            _ => return Err(bad(key, format!("must be an int or a list of {n} entries"))),
        };
        let down = per_block
            .iter()
            .map(|v| depths_of(v, layers))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(key, format!("each entry must be an int or {layers} ints")))?;
        let asymmetric = per_block.iter().any(|v| v.is_array());
        let reverse = self
            .reverse_transformer_layers_per_block
            .as_ref()
            .filter(|v| !v.is_null());
        let up = match reverse {
            Some(serde_json::Value::Array(items)) if items.len() == n => items
                .iter()
                .map(|v| depths_of(v, layers + 1))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    bad(
                        "reverse_transformer_layers_per_block",
                        format!("each entry must be an int or {} ints", layers + 1),
                    )
                })?,
            Some(_) => {
                return Err(bad(
                    "reverse_transformer_layers_per_block",
                    format!("must be a list of {n} entries"),
                ))
            }
            None if asymmetric => {
                return Err(bad(
                    "reverse_transformer_layers_per_block",
                    format!("is required when {key} has per-layer lists (an asymmetric UNet)"),
                ))
            }
            None => per_block
                .iter()
                .rev()
                .map(|v| depths_of(v, layers + 1))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(key, "has a non-integer entry".into()))?,
        };
        // The mid block has one layer: an int, or the first of a per-layer list.
        let mid = down
            .last()
            .and_then(|d| d.first().copied())
            .ok_or_else(|| bad(key, "is empty".into()))?;
        Ok((down, up, mid))
    }

    /// Reads the architecture; `file` and `source_name` only name things in errors.
    pub fn to_spec(&self, source_name: &str, file: &Path) -> Result<UNetSpec> {
        let bad = |key: &str, why: String| unsupported(source_name, file, key, why);
        let n = self.block_out_channels.len();
        // Each block halves the resolution; more than 8 would be a corrupt file (and overflow).
        if n == 0 || n > 8 {
            return Err(bad(
                "block_out_channels",
                format!("has {n} entries (1 to 8 supported)"),
            ));
        }
        let lengths = [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ];
        for (key, len) in lengths {
            if len != n {
                return Err(bad(
                    key,
                    format!("has {len} entries, block_out_channels has {n}"),
                ));
            }
        }
        // Keys whose non-default values select architecture features this UNet lacks.
        let absent = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
        ];
        for (key, present) in absent {
            if present {
                return Err(bad(key, "is not supported yet".into()));
            }
        }
        let addition = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let time_embed_dim =
                    self.addition_time_embed_dim
                        .filter(|&d| d > 0)
                        .ok_or_else(|| {
                            bad(
                                "addition_time_embed_dim",
                                "must be a positive integer with addition_embed_type 'text_time'"
                                    .into(),
                            )
                        })?;
                let in_features = self
                    .projection_class_embeddings_input_dim
                    .filter(|&d| d > 0)
                    .ok_or_else(|| {
                        bad(
                            "projection_class_embeddings_input_dim",
                            "must be a positive integer with addition_embed_type 'text_time'"
                                .into(),
                        )
                    })?;
                Some(AdditionEmbedSpec {
                    time_embed_dim,
                    in_features,
                })
            }
            Some(other) => {
                return Err(bad(
                    "addition_embed_type",
                    format!("'{other}' is not supported (only 'text_time', SDXL's)"),
                ))
            }
        };
        let fixed = [
            ("act_fn", self.act_fn.as_str(), "silu"),
            (
                "time_embedding_type",
                self.time_embedding_type.as_str(),
                "positional",
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift.as_str(),
                "default",
            ),
        ];
        for (key, value, wanted) in fixed {
            if value != wanted {
                return Err(bad(
                    key,
                    format!("'{value}' is not supported (only '{wanted}')"),
                ));
            }
        }
        if self.conv_in_kernel != 3 || self.conv_out_kernel != 3 {
            return Err(bad(
                "conv_in_kernel",
                "only 3x3 conv_in/conv_out are supported".into(),
            ));
        }
        if self.resnet_out_scale_factor != 1.0 {
            return Err(bad(
                "resnet_out_scale_factor",
                "only 1.0 is supported".into(),
            ));
        }
        if self
            .only_cross_attention
            .expand(n)
            .is_none_or(|v| v.iter().any(|&b| b))
        {
            return Err(bad(
                "only_cross_attention",
                "only false is supported".into(),
            ));
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return Err(bad(
                "mid_block_type",
                format!(
                    "{:?} is not supported (only UNetMidBlock2DCrossAttn)",
                    self.mid_block_type
                ),
            ));
        }
        let layers = match self.layers_per_block.expand(n) {
            Some(v) if v.iter().all(|&l| l == v[0]) && v[0] > 0 => v[0],
            _ => {
                return Err(bad(
                    "layers_per_block",
                    "must be one positive value for every block".into(),
                ))
            }
        };
        let cross_attention_dim = match self.cross_attention_dim.expand(n) {
            Some(v) if v.iter().all(|&d| d == v[0]) => v[0],
            _ => {
                return Err(bad(
                    "cross_attention_dim",
                    "must be one value for every block".into(),
                ))
            }
        };
        let heads_key = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n)
            .ok_or_else(|| bad(heads_key, format!("needs {n} entries")))?;
        let (down_depths, up_depths, mid_depth) = self.transformer_depths(n, layers, &bad)?;

        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in self.down_block_types.iter().enumerate() {
            let out_channels = self.block_out_channels[i];
            let attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(bad(
                        "down_block_types",
                        format!("{other} is not supported (CrossAttnDownBlock2D, DownBlock2D)"),
                    ))
                }
            };
            if !divides(heads[i], out_channels) {
                return Err(bad(
                    heads_key,
                    format!("{} heads do not divide {out_channels} channels", heads[i]),
                ));
            }
            if !divides(self.norm_num_groups, out_channels) {
                return Err(bad(
                    "norm_num_groups",
                    format!("does not divide {out_channels}"),
                ));
            }
            down_blocks.push(UNetBlockSpec {
                out_channels,
                heads: heads[i],
                resnets: layers,
                depths: attention.then(|| down_depths[i].clone()),
            });
        }
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in self.up_block_types.iter().enumerate() {
            // Up block i mirrors down block n - 1 - i: its channels and heads.
            let mirror = n - 1 - i;
            let attention = match kind.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(bad(
                        "up_block_types",
                        format!("{other} is not supported (CrossAttnUpBlock2D, UpBlock2D)"),
                    ))
                }
            };
            up_blocks.push(UNetBlockSpec {
                out_channels: self.block_out_channels[mirror],
                heads: heads[mirror],
                resnets: layers + 1,
                depths: attention.then(|| up_depths[i].clone()),
            });
        }
        // diffusers' pipeline derives its default image size from this; it cannot do without.
        let sample_size = self
            .sample_size
            .as_ref()
            .and_then(|v| v.as_u64())
            .and_then(|s| usize::try_from(s).ok())
            .filter(|&s| s > 0)
            .ok_or_else(|| bad("sample_size", "must be a positive integer".into()))?;
        Ok(UNetSpec {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            sample_size,
            down_blocks,
            up_blocks,
            mid_depth,
            mid_heads: heads[n - 1],
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim,
            use_linear_projection: self.use_linear_projection,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            center_input_sample: self.center_input_sample,
            addition,
        })
    }
}

/// `vae/config.json` of an `AutoencoderKL`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfigFile {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    /// FLUX's VAE: latents are `(x - shift) * scale` (null or absent: no shift).
    pub shift_factor: Option<f64>,
    /// Per-channel latent statistics some SDXL fine-tunes ship; with both present, latents are
    /// `(x - mean) * scale / std`.
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    /// The VAE overflows in float16: diffusers runs it in float32 then (SDXL's VAE sets this).
    #[serde(default = "default_true")]
    pub force_upcast: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_silu")]
    pub act_fn: String,
}

fn default_image_channels() -> usize {
    3
}
fn default_scaling_factor() -> f64 {
    0.18215
}

/// Everything needed to build candle's VAE and to scale latents for it.
#[derive(Debug, Clone)]
pub struct VaeSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    /// Latents are divided by this before decoding.
    pub scaling_factor: f64,
    /// Added to latents after unscaling, before decoding (FLUX).
    pub shift_factor: Option<f64>,
    /// Per-channel (mean, std) of the latents, both or neither.
    pub latents_stats: Option<(Vec<f64>, Vec<f64>)>,
    /// Run the VAE in float32 when the model runs in float16.
    pub force_upcast: bool,
    /// Pixels per latent along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    pub candle: vae::AutoEncoderKLConfig,
}

impl VaeConfigFile {
    /// Reads the architecture and latent scaling; `file` and `source_name` only name things in
    /// errors.
    pub fn to_spec(&self, source_name: &str, file: &Path) -> Result<VaeSpec> {
        let bad = |key: &str, why: String| unsupported(source_name, file, key, why);
        let n = self.block_out_channels.len();
        // Each block halves the resolution; more than 8 would be a corrupt file (and overflow).
        if n == 0 || n > 8 {
            return Err(bad(
                "block_out_channels",
                format!("has {n} entries (1 to 8 supported)"),
            ));
        }
        for (key, types, wanted) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n || types.iter().any(|t| t != wanted) {
                return Err(bad(key, format!("must be {n} x {wanted}")));
            }
        }
        if self.out_channels != 3 {
            return Err(bad(
                "out_channels",
                format!("{} is not 3 (RGB)", self.out_channels),
            ));
        }
        let latents_stats = match (&self.latents_mean, &self.latents_std) {
            (None, None) => None,
            (Some(mean), Some(std)) => {
                let latent = self.latent_channels;
                for (key, values) in [("latents_mean", mean), ("latents_std", std)] {
                    if values.len() != latent {
                        return Err(bad(
                            key,
                            format!("has {} values for {latent} latent channels", values.len()),
                        ));
                    }
                }
                if std.iter().any(|&s| !(s.is_finite() && s > 0.0)) {
                    return Err(bad("latents_std", "must be positive".into()));
                }
                Some((mean.clone(), std.clone()))
            }
            // diffusers uses the statistics only when both are there.
            (Some(_), None) | (None, Some(_)) => None,
        };
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(bad("scaling_factor", "must be positive".into()));
        }
        if !self.mid_block_add_attention {
            return Err(bad(
                "mid_block_add_attention",
                "only true is supported".into(),
            ));
        }
        if self.act_fn != "silu" {
            return Err(bad(
                "act_fn",
                format!("'{}' is not supported (only 'silu')", self.act_fn),
            ));
        }
        if self
            .block_out_channels
            .iter()
            .any(|&c| !divides(self.norm_num_groups, c))
        {
            return Err(bad(
                "norm_num_groups",
                "does not divide every block's channels".into(),
            ));
        }
        Ok(VaeSpec {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            latent_channels: self.latent_channels,
            scaling_factor: self.scaling_factor,
            shift_factor: self.shift_factor,
            latents_stats,
            force_upcast: self.force_upcast,
            scale_factor: 1 << (n - 1),
            candle: vae::AutoEncoderKLConfig {
                block_out_channels: self.block_out_channels.clone(),
                layers_per_block: self.layers_per_block,
                latent_channels: self.latent_channels,
                norm_num_groups: self.norm_num_groups,
                use_quant_conv: self.use_quant_conv,
                use_post_quant_conv: self.use_post_quant_conv,
            },
        })
    }
}

/// The activation of a CLIP text encoder's MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP (Stable Diffusion 1.x).
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP (Stable Diffusion 2.x).
    Gelu,
}

/// `text_encoder/config.json` of a transformers `CLIPTextModel`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: ClipActivation,
    #[serde(default = "default_clip_eps")]
    pub layer_norm_eps: f64,
    /// Where the pooled output is taken: the first token with this id, or (2, the value of
    /// legacy configs, transformers' default) the highest id, as transformers decides.
    #[serde(default = "default_clip_eos")]
    pub eos_token_id: u32,
    /// Width of `text_projection` (CLIPTextModelWithProjection: SDXL's second encoder).
    pub projection_dim: Option<usize>,
}

fn default_max_positions() -> usize {
    77
}
fn default_hidden_act() -> ClipActivation {
    ClipActivation::QuickGelu
}
fn default_clip_eps() -> f64 {
    1e-5
}
fn default_clip_eos() -> u32 {
    2
}

impl ClipTextConfig {
    /// Checks the values the encoder's shapes depend on.
    pub fn validate(&self, source_name: &str, file: &Path) -> Result<()> {
        if !divides(self.num_attention_heads, self.hidden_size) {
            return Err(unsupported(
                source_name,
                file,
                "num_attention_heads",
                format!("does not divide hidden_size {}", self.hidden_size),
            ));
        }
        if self.max_position_embeddings < 2 {
            return Err(unsupported(
                source_name,
                file,
                "max_position_embeddings",
                "must be at least 2",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unet_json(extra: &str) -> String {
        format!(
            r#"{{"block_out_channels":[32,64],"down_block_types":["DownBlock2D","CrossAttnDownBlock2D"],
            "up_block_types":["CrossAttnUpBlock2D","UpBlock2D"],"cross_attention_dim":32,
            "attention_head_dim":[2,4],"sample_size":32{extra}}}"#
        )
    }

    fn map(json: &str) -> Result<UNetSpec> {
        let cfg: UNetConfigFile =
            serde_json::from_str(json).map_err(|e| WorkerError::Internal(e.to_string()))?;
        cfg.to_spec("test", Path::new("unet/config.json"))
    }

    fn error_of(json: &str) -> String {
        map(json).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn unet_maps_heads_per_block_and_cross_attention() -> Result<()> {
        let spec = map(&unet_json(
            r#","use_linear_projection":true,"transformer_layers_per_block":[1,3]"#,
        ))?;
        let down = &spec.down_blocks;
        assert_eq!(down.len(), 2);
        assert_eq!(
            (down[0].out_channels, down[0].heads, &down[0].depths),
            (32, 2, &None)
        );
        assert_eq!((down[1].out_channels, down[1].heads), (64, 4));
        assert_eq!(down[1].depths, Some(vec![3, 3]));
        // Up blocks mirror the down blocks, with one more resnet each.
        let up = &spec.up_blocks;
        assert_eq!((up[0].out_channels, up[0].heads, up[0].resnets), (64, 4, 3));
        assert_eq!(up[0].depths, Some(vec![3, 3, 3]));
        assert_eq!(up[1].depths, None);
        assert_eq!((spec.mid_depth, spec.mid_heads), (3, 4));
        assert!(spec.use_linear_projection);
        assert_eq!(spec.cross_attention_dim, 32);
        assert_eq!(spec.sample_size, 32);
        assert_eq!(spec.addition, None);
        Ok(())
    }

    #[test]
    fn num_attention_heads_wins_over_attention_head_dim() -> Result<()> {
        let spec = map(&unet_json(r#","num_attention_heads":8"#))?;
        assert!(spec.down_blocks.iter().all(|b| b.heads == 8));
        Ok(())
    }

    #[test]
    fn unet_reads_sdxl_additions() -> Result<()> {
        let spec = map(&unet_json(
            r#","addition_embed_type":"text_time","addition_time_embed_dim":8,
            "projection_class_embeddings_input_dim":80"#,
        ))?;
        let addition = spec
            .addition
            .ok_or("no addition embedding")
            .map_err(|e| WorkerError::Internal(e.into()))?;
        assert_eq!((addition.time_embed_dim, addition.in_features), (8, 80));
        assert_eq!(addition.pooled_dim(6), Some(32));
        let msg = error_of(&unet_json(r#","addition_embed_type":"text_time""#));
        assert!(msg.contains("addition_time_embed_dim"), "{msg}");
        let msg = error_of(&unet_json(r#","addition_embed_type":"image""#));
        assert!(
            msg.contains("addition_embed_type") && msg.contains("'image'"),
            "{msg}"
        );
        Ok(())
    }

    #[test]
    fn asymmetric_depths_need_the_reverse_list() -> Result<()> {
        let msg = error_of(&unet_json(r#","transformer_layers_per_block":[1,[2,3]]"#));
        assert!(
            msg.contains("reverse_transformer_layers_per_block"),
            "{msg}"
        );
        let spec = map(&unet_json(
            r#","transformer_layers_per_block":[1,[2,3]],
            "reverse_transformer_layers_per_block":[[4,5,6],1]"#,
        ))?;
        assert_eq!(spec.down_blocks[1].depths, Some(vec![2, 3]));
        assert_eq!(spec.up_blocks[0].depths, Some(vec![4, 5, 6]));
        assert_eq!(spec.mid_depth, 2);
        Ok(())
    }

    #[test]
    fn unet_refuses_time_cond_proj_dim_by_name() {
        let msg = error_of(&unet_json(r#","time_cond_proj_dim":256"#));
        assert!(
            msg.contains("unet/config.json") && msg.contains("time_cond_proj_dim"),
            "{msg}"
        );
    }

    #[test]
    fn unet_rejects_unknown_block_types() {
        let json = unet_json("").replace(
            r#"["CrossAttnUpBlock2D","UpBlock2D"]"#,
            r#"["SimpleCrossAttnUpBlock2D","UpBlock2D"]"#,
        );
        assert!(error_of(&json).contains("up_block_types"));
    }

    fn vae(json: &str) -> Result<VaeSpec> {
        let cfg: VaeConfigFile =
            serde_json::from_str(json).map_err(|e| WorkerError::Internal(e.to_string()))?;
        cfg.to_spec("test", Path::new("vae/config.json"))
    }

    #[test]
    fn vae_scale_factor_follows_block_count() -> Result<()> {
        let spec = vae(
            r#"{"block_out_channels":[128,256,512,512],"down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
            "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],"layers_per_block":2,"scaling_factor":0.13025,"use_post_quant_conv":false}"#,
        )?;
        assert_eq!(spec.scale_factor, 8);
        assert_eq!(spec.scaling_factor, 0.13025);
        assert!(spec.force_upcast && spec.shift_factor.is_none() && spec.latents_stats.is_none());
        assert!(spec.candle.use_quant_conv && !spec.candle.use_post_quant_conv);
        assert_eq!(spec.candle.layers_per_block, 2);
        Ok(())
    }

    #[test]
    fn vae_reads_shift_and_latent_statistics() -> Result<()> {
        let one = r#"{"block_out_channels":[32],"down_block_types":["DownEncoderBlock2D"],"up_block_types":["UpDecoderBlock2D"],"latent_channels":2"#;
        let spec = vae(&format!(
            r#"{one},"shift_factor":0.1,"force_upcast":false}}"#
        ))?;
        assert_eq!(spec.shift_factor, Some(0.1));
        assert!(!spec.force_upcast);
        let spec = vae(&format!(
            r#"{one},"latents_mean":[0.5,-1],"latents_std":[2,4]}}"#
        ))?;
        assert_eq!(spec.latents_stats, Some((vec![0.5, -1.0], vec![2.0, 4.0])));
        let msg = vae(&format!(
            r#"{one},"latents_mean":[0.5],"latents_std":[2]}}"#
        ))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(msg.contains("latents_mean"), "{msg}");
        Ok(())
    }
}
