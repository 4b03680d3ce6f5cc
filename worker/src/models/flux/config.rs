//! `transformer/config.json` of a `FluxTransformer2DModel`, and what kind of FLUX model it is.
//!
//! The input width tells the model kind apart, derived from the VAE (never a fixed number or a repo
//! name): with `L` latent channels and VAE scale factor `s`, a base model takes the packed latents
//! (`4L`, 64 for FLUX.1), a Fill model also the packed masked-image latents and the packed pixel
//! mask (`4L + 4L + 4s²`, 384), a control model (Canny/Depth) the packed control-image latents
//! (`8L`, 128). Every model outputs `4L`.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, WorkerError};
use crate::models::config::read_json;

/// The keys diffusers' `FluxTransformer2DModel.__init__` takes, with its defaults.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FluxTransformerConfig {
    /// Must be 1: FLUX packs 2×2 latent patches itself, before the transformer.
    #[serde(default = "one")]
    pub patch_size: usize,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    /// `null` (the usual value) means `in_channels`.
    pub out_channels: Option<usize>,
    /// Double-stream blocks.
    #[serde(default = "default_num_layers")]
    pub num_layers: usize,
    /// Single-stream blocks.
    #[serde(default = "default_num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    /// Width of the T5 hidden states fed in (`context_embedder` input).
    #[serde(default = "default_joint_dim")]
    pub joint_attention_dim: usize,
    /// Width of the pooled CLIP prompt embedding.
    #[serde(default = "default_pooled_dim")]
    pub pooled_projection_dim: usize,
    /// FLUX.1-dev and Fill: a guidance embedding (distilled guidance); schnell: none.
    #[serde(default)]
    pub guidance_embeds: bool,
    /// Head channels rotated by each of the 3 position-id columns.
    #[serde(default = "default_axes")]
    pub axes_dims_rope: Vec<usize>,
}

fn one() -> usize {
    1
}
fn default_in_channels() -> usize {
    64
}
fn default_num_layers() -> usize {
    19
}
fn default_num_single_layers() -> usize {
    38
}
fn default_head_dim() -> usize {
    128
}
fn default_heads() -> usize {
    24
}
fn default_joint_dim() -> usize {
    4096
}
fn default_pooled_dim() -> usize {
    768
}
fn default_axes() -> Vec<usize> {
    vec![16, 56, 56]
}

/// What a FLUX transformer's input width makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FluxVariant {
    /// Text-to-image (and img2img, inpainting by latent blending): packed latents in.
    Base,
    /// FluxFillPipeline: latents + masked-image latents + packed mask in.
    Fill,
    /// FluxControlPipeline (Canny, Depth): latents + control-image latents in.
    Control,
    /// Anything else; the message says what was found and what each kind would need.
    Unknown(String),
}

impl FluxVariant {
    pub fn name(&self) -> &'static str {
        match self {
            FluxVariant::Base => "a base (text-to-image) model",
            FluxVariant::Fill => "a Fill model",
            FluxVariant::Control => "a control (Canny/Depth) model",
            FluxVariant::Unknown(_) => "an unknown kind of FLUX model",
        }
    }
}

impl FluxTransformerConfig {
    /// Reads and checks `transformer/config.json`; `source_name` names the repo in errors.
    pub fn load(source_name: &str, path: &Path) -> Result<Self> {
        let config: Self = read_json(source_name, path)?;
        config.validate(source_name, path)?;
        Ok(config)
    }

    /// The checks `load` makes, naming `file` and the key in errors.
    pub fn validate(&self, source_name: &str, file: &Path) -> Result<()> {
        let bad = |key: &str, why: String| {
            WorkerError::model_load(source_name, file, format!("key '{key}': {why}"))
        };
        if self.patch_size != 1 {
            return Err(bad(
                "patch_size",
                format!(
                    "is {}; only 1 is supported (FLUX packs 2x2 patches before the transformer)",
                    self.patch_size
                ),
            ));
        }
        let positive = [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels()),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(bad(key, "must be positive".into()));
            }
        }
        let axes = &self.axes_dims_rope;
        if axes.len() != 3 || axes.iter().any(|d| d % 2 != 0) {
            return Err(bad(
                "axes_dims_rope",
                format!("is {axes:?}; needs 3 even entries (one per position-id column)"),
            ));
        }
        if axes.iter().sum::<usize>() != self.attention_head_dim {
            return Err(bad(
                "axes_dims_rope",
                format!(
                    "{axes:?} sums to {}, attention_head_dim is {}",
                    axes.iter().sum::<usize>(),
                    self.attention_head_dim
                ),
            ));
        }
        Ok(())
    }

    /// Channels per output token (`out_channels`, or `in_channels` when null).
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The hidden width: heads × head dim (3072 for FLUX.1).
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// The kind of model this is next to a VAE with `latent_channels` and `vae_scale_factor`
    /// (2^(len(block_out_channels) - 1)).
    pub fn variant(&self, latent_channels: usize, vae_scale_factor: usize) -> FluxVariant {
        let packed = 4 * latent_channels;
        let fill = 8 * latent_channels + 4 * vae_scale_factor * vae_scale_factor;
        let (input, output) = (self.in_channels, self.out_channels());
        if output == packed {
            if input == packed {
                return FluxVariant::Base;
            }
            if input == fill {
                return FluxVariant::Fill;
            }
            if input == 2 * packed {
                return FluxVariant::Control;
            }
        }
        FluxVariant::Unknown(format!(
            "in_channels {input} / out_channels {output}; with {latent_channels} latent channels and \
             VAE scale factor {vae_scale_factor} a base model has {packed}/{packed}, a Fill model \
             {fill}/{packed}, a control model {}/{packed}",
            2 * packed
        ))
    }

    /// Fails unless the model is `expected`, naming `file` (the transformer's config.json) and
    /// the key `in_channels`.
    pub fn require(
        &self,
        expected: &FluxVariant,
        latent_channels: usize,
        vae_scale_factor: usize,
        source_name: &str,
        file: &Path,
    ) -> Result<()> {
        let found = self.variant(latent_channels, vae_scale_factor);
        if &found == expected {
            return Ok(());
        }
        let detail = match &found {
            FluxVariant::Unknown(message) => message.clone(),
            _ => format!("in_channels {}", self.in_channels),
        };
        Err(WorkerError::model_load(
            source_name,
            file,
            format!(
                "key 'in_channels': {} is needed here, this is {} ({detail})",
                expected.name(),
                found.name()
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> FluxTransformerConfig {
        serde_json::from_str(json).expect("parses")
    }

    #[test]
    fn defaults_are_flux1_and_null_out_channels_means_in_channels() {
        let c = parse(r#"{"out_channels": null}"#);
        assert_eq!(c.inner_dim(), 3072);
        assert_eq!(c.out_channels(), 64);
        assert_eq!((c.num_layers, c.num_single_layers), (19, 38));
        assert_eq!(c.variant(16, 8), FluxVariant::Base);
        assert!(c.validate("repo", Path::new("config.json")).is_ok());
    }

    #[test]
    fn variants_follow_the_vae() {
        let fill = parse(r#"{"in_channels": 384, "out_channels": 64, "guidance_embeds": true}"#);
        assert_eq!(fill.variant(16, 8), FluxVariant::Fill);
        // The same width is not a Fill model beside a VAE of another scale factor.
        assert!(matches!(fill.variant(16, 4), FluxVariant::Unknown(_)));
        let control = parse(r#"{"in_channels": 128, "out_channels": 64}"#);
        assert_eq!(control.variant(16, 8), FluxVariant::Control);
        // Tiny fixture: 16 latent channels, scale factor 2 -> Fill is 64 + 64 + 16.
        let tiny = parse(r#"{"in_channels": 144, "out_channels": 64}"#);
        assert_eq!(tiny.variant(16, 2), FluxVariant::Fill);
        let odd = parse(r#"{"in_channels": 100}"#);
        match odd.variant(16, 8) {
            FluxVariant::Unknown(message) => assert!(message.contains("384/64"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn require_names_the_file_and_key() {
        let fill = parse(r#"{"in_channels": 384, "out_channels": 64}"#);
        let err = fill
            .require(
                &FluxVariant::Base,
                16,
                8,
                "repo",
                Path::new("transformer/config.json"),
            )
            .expect_err("a Fill model is not a base model");
        let text = err.to_string();
        assert!(text.contains("transformer/config.json"), "{text}");
        assert!(
            text.contains("in_channels") && text.contains("a Fill model"),
            "{text}"
        );
        assert!(fill
            .require(&FluxVariant::Fill, 16, 8, "repo", Path::new("c"))
            .is_ok());
    }

    #[test]
    fn validate_rejects_what_the_model_cannot_be() {
        let file = Path::new("transformer/config.json");
        for (json, key) in [
            (r#"{"patch_size": 2}"#, "patch_size"),
            (r#"{"axes_dims_rope": [16, 56]}"#, "axes_dims_rope"),
            (r#"{"axes_dims_rope": [16, 56, 54]}"#, "axes_dims_rope"),
            (r#"{"num_attention_heads": 0}"#, "num_attention_heads"),
        ] {
            let err = parse(json).validate("repo", file).expect_err(json);
            assert!(err.to_string().contains(&format!("'{key}'")), "{err}");
        }
    }
}
