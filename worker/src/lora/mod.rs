//! LoRA adapters: loaded once at start-up, applied per request, several at once with their own
//! weights, as diffusers' `load_lora_weights` + `set_adapters(names, weights)` apply them.
//!
//! ```text
//! pipeline.loras[i] ─source.rs─▶ a .safetensors file (local, Hugging Face cache, url download)
//!                   ─file.rs───▶ Adapter: per model part (denoiser, text_encoder[_2]) a map
//!                                "format:module name" → (down, up, scale = alpha / rank); any
//!                                format (diffusers/PEFT, old diffusers, kohya, xlabs)
//! bank.rs    LoraBank: every adapter, in the run dtype on the device, plus the active weights
//! layers.rs  LoraLinear / LoraConv2d: base(x) + Σ weight·scale·up(down(x)) over active adapters;
//!            the models build them through `layers::{linear, conv2d}` and [`build_with`] hands
//!            each one the adapter parts whose names it answers to (names.rs)
//! ```
//!
//! Unfused on purpose: base weights are never touched, so switching sets is free, a request
//! without `lora_settings` gets the plain model whatever ran before, and memory is the adapters'
//! size only (a merged copy of FLUX's touched layers would be most of its 12B parameters). The
//! cost is two rank-r matmuls per adapted layer and active adapter; `fastfusion-worker bench
//! --mode lora` measures it. The pipeline sets the active weights for each batch it runs
//! ([`LoraBank::activate`]), and the engine batches only requests with the same set.
//!
//! A file whose keys are not all claimed by some layer of the model stops start-up naming the
//! keys; DoRA, LoHa/LoKr and FLUX control LoRAs (which widen the transformer's input and need a
//! control image) are refused by name.

mod bank;
mod file;
mod layers;
mod names;
pub mod source;

pub use bank::{ActiveGuard, ComponentLoras, LoraBank, Target};
pub use file::AdapterFile;
pub use layers::{build_with, conv2d, linear, linear_no_bias, LoraConv2d, LoraLinear};
pub use names::Naming;

/// The most adapters one request may combine.
pub const MAX_ADAPTERS_PER_REQUEST: usize = 8;
/// Weights must lie in `[-MAX_WEIGHT, MAX_WEIGHT]` (and be finite).
pub const MAX_WEIGHT: f32 = 8.0;

/// One entry of a request's `lora_settings`, validated: a loaded adapter and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeight {
    pub name: String,
    pub weight: f32,
}

/// A request's `lora_settings` as (name, weight) pairs, checked against the adapters `loaded`:
/// at most [`MAX_ADAPTERS_PER_REQUEST`], each name loaded and listed once, each weight finite and
/// within ±[`MAX_WEIGHT`]. Entries of weight 0 are dropped (they change nothing), so that such a
/// request batches with plain ones. Errors name `lora_settings`.
pub fn validate_settings(
    settings: impl IntoIterator<Item = (String, f32)>,
    loaded: &[String],
) -> crate::error::Result<Vec<LoraWeight>> {
    use crate::error::WorkerError;
    let invalid = |message: String| WorkerError::invalid("lora_settings", message);
    let settings: Vec<(String, f32)> = settings.into_iter().collect();
    if settings.len() > MAX_ADAPTERS_PER_REQUEST {
        return Err(invalid(format!(
            "at most {MAX_ADAPTERS_PER_REQUEST} adapters per request, got {}",
            settings.len()
        )));
    }
    let mut valid: Vec<LoraWeight> = Vec::new();
    for (name, weight) in settings {
        if !loaded.contains(&name) {
            let loaded = if loaded.is_empty() {
                "none are loaded".to_string()
            } else {
                format!("loaded: {}", loaded.join(", "))
            };
            return Err(invalid(format!("unknown LoRA '{name}'; {loaded}")));
        }
        if !weight.is_finite() || weight.abs() > MAX_WEIGHT {
            return Err(invalid(format!(
                "weight of LoRA '{name}' must be a number between -{MAX_WEIGHT} and {MAX_WEIGHT}, got {weight}"
            )));
        }
        if valid.iter().any(|w| w.name == name) {
            return Err(invalid(format!("LoRA '{name}' is listed twice")));
        }
        valid.push(LoraWeight { name, weight });
    }
    valid.retain(|w| w.weight != 0.0);
    Ok(valid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(settings: &[(&str, f32)]) -> Result<Vec<LoraWeight>, String> {
        let loaded = vec!["a".to_string(), "b".to_string()];
        validate_settings(settings.iter().map(|(n, w)| (n.to_string(), *w)), &loaded)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn settings_are_checked_and_named() {
        assert_eq!(check(&[("a", 0.5), ("b", 0.0)]).unwrap().len(), 1);
        let err = check(&[("c", 1.0)]).unwrap_err();
        assert!(
            err.contains("lora_settings") && err.contains("loaded: a, b"),
            "{err}"
        );
        for bad in [f32::NAN, f32::INFINITY, 8.5, -9.0] {
            let err = check(&[("a", bad)]).unwrap_err();
            assert!(err.contains("between -8 and 8"), "{err}");
        }
        assert!(check(&[("a", 1.0), ("a", 1.0)])
            .unwrap_err()
            .contains("twice"));
        let many: Vec<(&str, f32)> = (0..9).map(|_| ("a", 1.0)).collect();
        assert!(check(&many).unwrap_err().contains("at most 8"));
    }
}
