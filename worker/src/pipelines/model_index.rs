//! A repo's `model_index.json`: which diffusers pipeline class it was saved as, and the pipeline
//! config flags stored beside the component list.
//!
//! The family of a model is chosen from `_class_name` (and then checked against the components'
//! configs), never from the repo's name, as diffusers' `DiffusionPipeline.from_pretrained` does.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, WorkerError};
use crate::models::config::read_json;

/// The pipeline classes this worker loads, by family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineClass {
    /// `StableDiffusionPipeline` and its image-to-image / inpainting siblings (SD 1.x, 2.x and
    /// SD-Turbo).
    StableDiffusion,
    /// `StableDiffusionXLPipeline` and its siblings (SDXL, SDXL-Turbo, fine-tunes).
    StableDiffusionXl,
    /// `FluxPipeline`, `FluxImg2ImgPipeline`, `FluxInpaintPipeline` and `FluxFillPipeline`
    /// (FLUX.1 dev, schnell, Fill): which transformer it is comes from its config, not the class.
    Flux,
}

/// `_class_name` values and what they load as.
const CLASSES: [(&str, PipelineClass); 10] = [
    ("StableDiffusionPipeline", PipelineClass::StableDiffusion),
    (
        "StableDiffusionImg2ImgPipeline",
        PipelineClass::StableDiffusion,
    ),
    (
        "StableDiffusionInpaintPipeline",
        PipelineClass::StableDiffusion,
    ),
    (
        "StableDiffusionXLPipeline",
        PipelineClass::StableDiffusionXl,
    ),
    (
        "StableDiffusionXLImg2ImgPipeline",
        PipelineClass::StableDiffusionXl,
    ),
    (
        "StableDiffusionXLInpaintPipeline",
        PipelineClass::StableDiffusionXl,
    ),
    ("FluxPipeline", PipelineClass::Flux),
    ("FluxImg2ImgPipeline", PipelineClass::Flux),
    ("FluxInpaintPipeline", PipelineClass::Flux),
    ("FluxFillPipeline", PipelineClass::Flux),
];

/// The parts of `model_index.json` the worker reads.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelIndex {
    #[serde(rename = "_class_name")]
    pub class_name: String,
    /// SDXL: an absent negative prompt gives zero negative embeddings (diffusers' default: true).
    #[serde(default = "default_true")]
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL refiner-style time ids (an aesthetic score instead of the target size).
    #[serde(default)]
    pub requires_aesthetics_score: bool,
}

fn default_true() -> bool {
    true
}

impl ModelIndex {
    /// Reads `dir/model_index.json`; a missing file is an error naming it (every diffusers
    /// pipeline repo has one).
    pub fn read(source_name: &str, dir: &Path) -> Result<Self> {
        read_json(source_name, &dir.join("model_index.json"))
    }

    /// The class to load, or an error naming the unsupported class and listing the supported
    /// ones.
    pub fn class(&self, source_name: &str, dir: &Path) -> Result<PipelineClass> {
        if let Some((_, class)) = CLASSES.iter().find(|(name, _)| *name == self.class_name) {
            return Ok(*class);
        }
        let supported: Vec<&str> = CLASSES.iter().map(|(name, _)| *name).collect();
        let hint = match self.class_name.as_str() {
            "FluxPriorReduxPipeline" => {
                " (a Redux prior is not a model on its own: set it as \
                 variations_config.flux_redux_model_id beside a FLUX model)"
            }
            "FluxControlPipeline" | "FluxControlImg2ImgPipeline" | "FluxControlInpaintPipeline" => {
                " (FLUX control models (Canny, Depth) are not supported yet)"
            }
            _ => "",
        };
        Err(WorkerError::model_load(
            source_name,
            dir.join("model_index.json"),
            format!(
                "key '_class_name': pipeline class '{}' is not supported{hint}; supported: {}",
                self.class_name,
                supported.join(", ")
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(json: &str) -> ModelIndex {
        serde_json::from_str(json).expect("a valid model_index.json")
    }

    #[test]
    fn classes_pick_the_family() -> Result<()> {
        let dir = Path::new("m");
        let sdxl = index(r#"{"_class_name":"StableDiffusionXLInpaintPipeline"}"#);
        assert_eq!(sdxl.class("m", dir)?, PipelineClass::StableDiffusionXl);
        assert!(sdxl.force_zeros_for_empty_prompt);
        let sd = index(
            r#"{"_class_name":"StableDiffusionPipeline","force_zeros_for_empty_prompt":false}"#,
        );
        assert_eq!(sd.class("m", dir)?, PipelineClass::StableDiffusion);
        assert!(!sd.force_zeros_for_empty_prompt);
        for flux in ["FluxPipeline", "FluxFillPipeline", "FluxImg2ImgPipeline"] {
            let json = format!(r#"{{"_class_name":"{flux}"}}"#);
            assert_eq!(index(&json).class("m", dir)?, PipelineClass::Flux);
        }
        Ok(())
    }

    #[test]
    fn unsupported_class_is_named_with_the_supported_list() {
        let msg = index(r#"{"_class_name":"KandinskyPipeline"}"#)
            .class("m", Path::new("m"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            msg.contains("model_index.json")
                && msg.contains("'KandinskyPipeline'")
                && msg.contains("StableDiffusionXLPipeline")
                && msg.contains("FluxFillPipeline"),
            "{msg}"
        );
        let redux = index(r#"{"_class_name":"FluxPriorReduxPipeline"}"#)
            .class("m", Path::new("m"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(redux.contains("flux_redux_model_id"), "{redux}");
    }
}
