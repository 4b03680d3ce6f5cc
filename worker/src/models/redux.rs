//! FLUX.1 Redux: image prompts as extra text tokens (a `FluxPriorReduxPipeline` repo).
//!
//! ```text
//! RGB image ─feature_extractor (Pillow resize, /255, (x-mean)/std)─▶ pixels (1, 3, S, S)
//!   ─image_encoder (SigLIP vision tower, last_hidden_state after post_layernorm, no pooling head)─▶
//!   (1, (S/patch)², redux_dim) ─image_embedder: redux_down(silu(redux_up(x)))─▶ (1, tokens, joint_dim)
//! ```
//!
//! [`FluxRedux::conditioning`] then does what the prior pipeline does with those tokens: appends
//! them to the prompt's T5 states (or to zeros when there is no prompt, what FLUX.1-Redux-dev does
//! as it ships no text encoders), sums over several images, and returns the FluxPipeline
//! `prompt_embeds` / `pooled_prompt_embeds` pair. The SigLIP weights may carry transformers 4's
//! `vision_model.` prefix (Hub files) or not (transformers 5 saves); both load.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Linear;
use candle_transformers::models::siglip;
use image::RgbImage;
use serde::Deserialize;

use super::config::{divides, read_json};
use super::pil_resize::{self, Filter};
use super::weights;
use crate::error::{Result, WorkerError};

/// The `_class_name` of a Redux repo's `model_index.json`.
const PIPELINE_CLASS: &str = "FluxPriorReduxPipeline";
/// Text tokens the prior puts before the image tokens (its fixed `max_sequence_length`).
pub const PRIOR_TEXT_TOKENS: usize = 512;

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
}

/// `image_encoder/config.json` (a transformers `SiglipVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
struct SiglipVisionConfig {
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default = "default_channels")]
    num_channels: usize,
    image_size: usize,
    patch_size: usize,
    #[serde(default = "default_act")]
    hidden_act: String,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
}

fn default_channels() -> usize {
    3
}
fn default_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_eps() -> f64 {
    1e-6
}

/// `feature_extractor/preprocessor_config.json` (a `SiglipImageProcessor`).
#[derive(Debug, Clone, Deserialize)]
struct ProcessorConfig {
    #[serde(default = "yes")]
    do_resize: bool,
    size: Option<ImageSize>,
    /// A PIL resampling code (3 = bicubic).
    #[serde(default = "bicubic")]
    resample: u32,
    #[serde(default = "yes")]
    do_rescale: bool,
    #[serde(default = "default_rescale")]
    rescale_factor: f64,
    #[serde(default = "yes")]
    do_normalize: bool,
    #[serde(default = "half")]
    image_mean: Vec<f64>,
    #[serde(default = "half")]
    image_std: Vec<f64>,
    #[serde(default)]
    do_center_crop: bool,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct ImageSize {
    height: u32,
    width: u32,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u32 {
    3
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn half() -> Vec<f64> {
    vec![0.5; 3]
}

/// `image_embedder/config.json` (diffusers' `ReduxImageEncoder`).
#[derive(Debug, Clone, Deserialize)]
struct EmbedderConfig {
    #[serde(default = "default_redux_dim")]
    redux_dim: usize,
    #[serde(default = "default_txt_in")]
    txt_in_features: usize,
}

fn default_redux_dim() -> usize {
    1152
}
fn default_txt_in() -> usize {
    4096
}

/// The image preprocessing, as plain numbers.
#[derive(Debug, Clone)]
struct Preprocess {
    /// Output (width, height) and filter; `None` when `do_resize` is off.
    resize: Option<(u32, u32, Filter)>,
    rescale: Option<f64>,
    /// Per-channel mean and std, float32 like transformers' arrays.
    normalize: Option<([f32; 3], [f32; 3])>,
}

/// A loaded Redux prior: SigLIP vision tower and the Redux embedder.
#[derive(Debug, Clone)]
pub struct FluxRedux {
    preprocess: Preprocess,
    vision: siglip::VisionModel,
    redux_up: Linear,
    redux_down: Linear,
    joint_dim: usize,
    dtype: DType,
    device: Device,
}

impl FluxRedux {
    /// Loads a FluxPriorReduxPipeline repo directory in `dtype` on `device`.
    pub fn load(source_name: &str, dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let bad =
            |file: &Path, message: String| WorkerError::model_load(source_name, file, message);
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(source_name, &index_path)?;
        match index.class_name.as_deref() {
            Some(PIPELINE_CLASS) => {}
            other => {
                return Err(bad(
                    &index_path,
                    format!(
                        "key '_class_name': {} is not a Redux prior ({PIPELINE_CLASS})",
                        other.unwrap_or("(missing)")
                    ),
                ))
            }
        }
        let encoder_dir = dir.join("image_encoder");
        let vision_path = encoder_dir.join("config.json");
        let vision: SiglipVisionConfig = read_json(source_name, &vision_path)?;
        let processor_path = dir.join("feature_extractor/preprocessor_config.json");
        let processor: ProcessorConfig = read_json(source_name, &processor_path)?;
        let preprocess = Preprocess::new(&processor, &vision)
            .map_err(|message| bad(&processor_path, message))?;
        let embedder_dir = dir.join("image_embedder");
        let embedder_path = embedder_dir.join("config.json");
        let embedder: EmbedderConfig = read_json(source_name, &embedder_path)?;
        if embedder.redux_dim != vision.hidden_size {
            return Err(bad(
                &embedder_path,
                format!(
                    "key 'redux_dim': {} differs from the image encoder's hidden_size {}",
                    embedder.redux_dim, vision.hidden_size
                ),
            ));
        }
        let candle_config = vision
            .to_candle()
            .map_err(|message| bad(&vision_path, message))?;

        let vb = weights::load_var_builder(source_name, &encoder_dir, "model", dtype, device)?;
        let vb = if vb.contains_tensor("vision_model.embeddings.patch_embedding.weight") {
            vb.pp("vision_model")
        } else {
            vb
        };
        let vision = siglip::VisionModel::new(&candle_config, false, vb)
            .map_err(|e| bad(&encoder_dir.join("model.safetensors"), e.to_string()))?;
        let vb = weights::load_var_builder(
            source_name,
            &embedder_dir,
            "diffusion_pytorch_model",
            dtype,
            device,
        )?;
        let width = 3 * embedder.txt_in_features;
        let build = || -> candle_core::Result<(Linear, Linear)> {
            Ok((
                candle_nn::linear(embedder.redux_dim, width, vb.pp("redux_up"))?,
                candle_nn::linear(width, embedder.txt_in_features, vb.pp("redux_down"))?,
            ))
        };
        let (redux_up, redux_down) = build().map_err(|e| {
            bad(
                &embedder_dir.join("diffusion_pytorch_model.safetensors"),
                e.to_string(),
            )
        })?;
        Ok(Self {
            preprocess,
            vision,
            redux_up,
            redux_down,
            joint_dim: embedder.txt_in_features,
            dtype,
            device: device.clone(),
        })
    }

    /// Width of the tokens made (`txt_in_features`): must be the transformer's
    /// `joint_attention_dim`.
    pub fn joint_dim(&self) -> usize {
        self.joint_dim
    }

    /// The feature extractor: (1, 3, H, W) float32 pixels on the model's device.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Tensor> {
        let p = &self.preprocess;
        let resized;
        let image = match p.resize {
            Some((w, h, filter)) => {
                resized = pil_resize::resize(image, w, h, filter);
                &resized
            }
            None => image,
        };
        let (w, h) = image.dimensions();
        let (w, h) = (w as usize, h as usize);
        let mut planes = vec![0f32; 3 * w * h];
        for (i, pixel) in image.pixels().enumerate() {
            for c in 0..3 {
                // transformers: u8 → float64 × factor → float32, then (x - mean) / std in float32.
                let mut x = match p.rescale {
                    Some(factor) => (f64::from(pixel.0[c]) * factor) as f32,
                    None => f32::from(pixel.0[c]),
                };
                if let Some((mean, std)) = &p.normalize {
                    x = (x - mean[c]) / std[c];
                }
                planes[c * w * h + i] = x;
            }
        }
        Ok(Tensor::from_vec(planes, (1, 3, h, w), &self.device)?)
    }

    /// SigLIP's `last_hidden_state` for preprocessed pixels: (B, patches, redux_dim).
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(&pixels.to_dtype(self.dtype)?)?)
    }

    /// The Redux image tokens for one image: (1, patches, joint_dim).
    pub fn embed(&self, image: &RgbImage) -> Result<Tensor> {
        let hidden = self.encode_pixels(&self.preprocess(image)?)?;
        Ok(self
            .redux_down
            .forward(&self.redux_up.forward(&hidden)?.silu()?)?)
    }

    /// FluxPriorReduxPipeline's output for `images` (scales 1): `prompt_embeds` (1, S + patches,
    /// joint_dim) and `pooled_prompt_embeds` (1, pooled_dim).
    ///
    /// `prompt` is the prompt's (T5 hidden states (1, S, joint_dim), pooled CLIP (1, pooled_dim)),
    /// encoded with S = [`PRIOR_TEXT_TOKENS`]; without one the text part is zeros of
    /// [`PRIOR_TEXT_TOKENS`] × joint_dim and the pooled part zeros of `pooled_dim`. As in diffusers,
    /// each image gets its own copy of the text part and the copies are summed with the images.
    pub fn conditioning(
        &self,
        images: &[RgbImage],
        prompt: Option<(&Tensor, &Tensor)>,
        pooled_dim: usize,
    ) -> Result<(Tensor, Tensor)> {
        if images.is_empty() {
            return Err(WorkerError::invalid(
                "image",
                "Redux needs at least one image",
            ));
        }
        let (text, pooled) = match prompt {
            Some((text, pooled)) => (text.to_dtype(self.dtype)?, pooled.to_dtype(self.dtype)?),
            None => (
                Tensor::zeros(
                    (1, PRIOR_TEXT_TOKENS, self.joint_dim),
                    self.dtype,
                    &self.device,
                )?,
                Tensor::zeros((1, pooled_dim), self.dtype, &self.device)?,
            ),
        };
        let mut sum: Option<Tensor> = None;
        for image in images {
            let joint = Tensor::cat(&[&text, &self.embed(image)?], 1)?;
            sum = Some(match sum {
                Some(s) => (s + joint)?,
                None => joint,
            });
        }
        let count = images.len() as f64;
        let prompt_embeds = sum.ok_or_else(|| WorkerError::Internal("no image".into()))?;
        Ok((prompt_embeds, pooled.affine(count, 0.0)?))
    }
}

impl SiglipVisionConfig {
    fn to_candle(&self) -> std::result::Result<siglip::VisionConfig, String> {
        let hidden_act = match self.hidden_act.as_str() {
            "gelu_pytorch_tanh" | "gelu_new" => candle_nn::Activation::GeluPytorchTanh,
            "gelu" => candle_nn::Activation::Gelu,
            other => return Err(format!("key 'hidden_act': '{other}' is not supported")),
        };
        if !divides(self.patch_size, self.image_size) {
            return Err(format!(
                "key 'patch_size': {} does not divide image_size {}",
                self.patch_size, self.image_size
            ));
        }
        if !divides(self.num_attention_heads, self.hidden_size) {
            return Err("key 'num_attention_heads': does not divide hidden_size".into());
        }
        Ok(siglip::VisionConfig {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_channels: self.num_channels,
            image_size: self.image_size,
            patch_size: self.patch_size,
            hidden_act,
            layer_norm_eps: self.layer_norm_eps,
        })
    }
}

impl Preprocess {
    /// Checks the processor config against the encoder (its position table has a fixed size).
    fn new(p: &ProcessorConfig, vision: &SiglipVisionConfig) -> std::result::Result<Self, String> {
        if p.do_center_crop {
            return Err(
                "key 'do_center_crop': cropping is not supported (SigLIP does not crop)".into(),
            );
        }
        let resize = if p.do_resize {
            let size = p.size.ok_or("key 'size': missing (height and width)")?;
            if size.height as usize != vision.image_size || size.width as usize != vision.image_size
            {
                return Err(format!(
                    "key 'size': {}x{} differs from the image encoder's image_size {}",
                    size.width, size.height, vision.image_size
                ));
            }
            let filter = Filter::from_pil(p.resample).ok_or_else(|| {
                format!(
                    "key 'resample': PIL filter {} is not supported (1 lanczos, 2 bilinear, 3 bicubic)",
                    p.resample
                )
            })?;
            Some((size.width, size.height, filter))
        } else {
            None
        };
        let normalize = if p.do_normalize {
            let three = |key: &str, v: &[f64]| -> std::result::Result<[f32; 3], String> {
                match v {
                    [a, b, c] => Ok([*a as f32, *b as f32, *c as f32]),
                    _ => Err(format!("key '{key}': needs 3 values, has {}", v.len())),
                }
            };
            Some((
                three("image_mean", &p.image_mean)?,
                three("image_std", &p.image_std)?,
            ))
        } else {
            None
        };
        Ok(Self {
            resize,
            rescale: p.do_rescale.then_some(p.rescale_factor),
            normalize,
        })
    }
}
