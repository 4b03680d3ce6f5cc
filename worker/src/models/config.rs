//! Serde mirrors of the diffusers/transformers `config.json` files of a Stable Diffusion repo, and
//! their mapping onto candle's model configs.
//!
//! Each `*File` struct is plain data read from the repo (never a hard-coded preset). `to_candle`
//! checks every key that changes the architecture: a value candle's blocks cannot represent is
//! rejected with [`WorkerError::ModelLoad`] naming the file and the key, instead of loading a model
//! that would silently compute something else.

use std::path::Path;

use candle_transformers::models::stable_diffusion::{unet_2d, vae};
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

/// `unet/config.json` of a `UNet2DConditionModel`: the keys SD 1.x/2.x use, plus the keys of
/// other architectures (SDXL additions, class embeddings, ...) so that they can be rejected.
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
    #[serde(default = "default_one_per_block")]
    pub transformer_layers_per_block: PerBlock<usize>,
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
    pub addition_embed_type: Option<String>,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
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
fn default_one_per_block() -> PerBlock<usize> {
    PerBlock::One(1)
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

/// Everything needed to build candle's UNet from a [`UNetConfigFile`].
#[derive(Debug, Clone)]
pub struct UNetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Latent side length the model was trained at.
    pub sample_size: usize,
    pub candle: unet_2d::UNet2DConditionModelConfig,
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

impl UNetConfigFile {
    /// Maps the file onto candle's config; `file` and `source_name` only name things in errors.
    pub fn to_candle(&self, source_name: &str, file: &Path) -> Result<UNetSpec> {
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
        // Keys whose non-default values select architecture features candle's UNet lacks.
        let absent = [
            ("addition_embed_type", self.addition_embed_type.is_some()),
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
            (
                "reverse_transformer_layers_per_block",
                self.reverse_transformer_layers_per_block
                    .as_ref()
                    .is_some_and(|v| !v.is_null()),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
        ];
        for (key, present) in absent {
            if present {
                return Err(bad(
                    key,
                    "is not supported for Stable Diffusion 1.x/2.x".into(),
                ));
            }
        }
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
        let layers_per_block = match self.layers_per_block.expand(n) {
            Some(v) if v.iter().all(|&l| l == v[0]) => v[0],
            _ => {
                return Err(bad(
                    "layers_per_block",
                    "must be one value for every block".into(),
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
        let transformer_layers = self
            .transformer_layers_per_block
            .expand(n)
            .ok_or_else(|| bad("transformer_layers_per_block", format!("needs {n} entries")))?;

        let mut blocks = Vec::with_capacity(n);
        for i in 0..n {
            let down = self.down_block_types[i].as_str();
            // candle builds the up blocks from the same per-block config in reverse order, so
            // the up block mirroring down block `i` must use cross-attention exactly when it does.
            let up = self.up_block_types[n - 1 - i].as_str();
            let cross_attn = match (down, up) {
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") => true,
                ("DownBlock2D", "UpBlock2D") => false,
                _ => {
                    return Err(bad(
                        "down_block_types",
                        format!("block {i} pairs {down} with {up}; only mirrored (CrossAttn)Down/UpBlock2D are supported"),
                    ))
                }
            };
            let out_channels = self.block_out_channels[i];
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
            blocks.push(unet_2d::BlockConfig {
                out_channels,
                use_cross_attn: cross_attn.then_some(transformer_layers[i]),
                attention_head_dim: heads[i],
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
            candle: unet_2d::UNet2DConditionModelConfig {
                center_input_sample: self.center_input_sample,
                flip_sin_to_cos: self.flip_sin_to_cos,
                freq_shift: self.freq_shift,
                blocks,
                layers_per_block,
                downsample_padding: self.downsample_padding,
                mid_block_scale_factor: self.mid_block_scale_factor,
                norm_num_groups: self.norm_num_groups,
                norm_eps: self.norm_eps,
                cross_attention_dim,
                sliced_attention_size: None,
                use_linear_projection: self.use_linear_projection,
            },
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
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<serde_json::Value>,
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
    /// Pixels per latent along each side: 2^(number of blocks - 1).
    pub scale_factor: usize,
    pub candle: vae::AutoEncoderKLConfig,
}

impl VaeConfigFile {
    /// Maps the file onto candle's config; `file` and `source_name` only name things in errors.
    pub fn to_candle(&self, source_name: &str, file: &Path) -> Result<VaeSpec> {
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
        if self.shift_factor.is_some() {
            return Err(bad(
                "shift_factor",
                "is not supported for Stable Diffusion 1.x/2.x".into(),
            ));
        }
        if self.latents_mean.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad(
                "latents_mean",
                "is not supported for Stable Diffusion 1.x/2.x".into(),
            ));
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
        cfg.to_candle("test", Path::new("unet/config.json"))
    }

    #[test]
    fn unet_maps_heads_per_block_and_cross_attention() -> Result<()> {
        let spec = map(&unet_json(
            r#","use_linear_projection":true,"transformer_layers_per_block":[1,3]"#,
        ))?;
        let blocks = &spec.candle.blocks;
        assert_eq!(blocks.len(), 2);
        assert_eq!(
            (
                blocks[0].out_channels,
                blocks[0].use_cross_attn,
                blocks[0].attention_head_dim
            ),
            (32, None, 2)
        );
        assert_eq!(
            (
                blocks[1].out_channels,
                blocks[1].use_cross_attn,
                blocks[1].attention_head_dim
            ),
            (64, Some(3), 4)
        );
        assert!(spec.candle.use_linear_projection);
        assert_eq!(spec.candle.cross_attention_dim, 32);
        assert_eq!(spec.sample_size, 32);
        Ok(())
    }

    #[test]
    fn num_attention_heads_wins_over_attention_head_dim() -> Result<()> {
        let spec = map(&unet_json(r#","num_attention_heads":8"#))?;
        assert!(spec.candle.blocks.iter().all(|b| b.attention_head_dim == 8));
        Ok(())
    }

    #[test]
    fn unet_rejects_sdxl_additions_naming_the_key() {
        let err = map(&unet_json(r#","addition_embed_type":"text_time""#)).err();
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("unet/config.json") && msg.contains("addition_embed_type"),
            "{msg}"
        );
    }

    #[test]
    fn unet_rejects_unmirrored_blocks() {
        let json = unet_json("").replace(
            r#"["CrossAttnUpBlock2D","UpBlock2D"]"#,
            r#"["UpBlock2D","UpBlock2D"]"#,
        );
        let msg = map(&json).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("down_block_types"), "{msg}");
    }

    #[test]
    fn vae_scale_factor_follows_block_count() -> Result<()> {
        let json = r#"{"block_out_channels":[128,256,512,512],"down_block_types":["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"],
            "up_block_types":["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"],"layers_per_block":2,"scaling_factor":0.13025,"use_post_quant_conv":false}"#;
        let cfg: VaeConfigFile =
            serde_json::from_str(json).map_err(|e| WorkerError::Internal(e.to_string()))?;
        let spec = cfg.to_candle("test", Path::new("vae/config.json"))?;
        assert_eq!(spec.scale_factor, 8);
        assert_eq!(spec.scaling_factor, 0.13025);
        assert!(spec.candle.use_quant_conv && !spec.candle.use_post_quant_conv);
        assert_eq!(spec.candle.layers_per_block, 2);
        Ok(())
    }

    #[test]
    fn vae_rejects_shift_factor() {
        let json = r#"{"block_out_channels":[32],"down_block_types":["DownEncoderBlock2D"],"up_block_types":["UpDecoderBlock2D"],"shift_factor":0.1}"#;
        let msg = serde_json::from_str::<VaeConfigFile>(json)
            .map_err(|e| WorkerError::Internal(e.to_string()))
            .and_then(|c| c.to_candle("test", Path::new("vae/config.json")))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("shift_factor"), "{msg}");
    }
}
