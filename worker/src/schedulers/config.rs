//! `scheduler/scheduler_config.json` as diffusers writes it, and the typed settings read from it.
//!
//! Every key is optional: a diffusers scheduler class built `from_config` takes the keys it knows and
//! applies its own default for each missing one (the defaults differ between classes, e.g.
//! `timestep_spacing` is "leading" for DDIM/PNDM and "linspace" for Euler/DPM-Solver). The scheduler
//! modules therefore resolve defaults themselves; this module only parses and offers typed readers
//! that name the offending key in their errors.

use std::path::Path;

use serde::Deserialize;

use crate::error::WorkerError;

/// The keys of a diffusers `scheduler_config.json` that the supported schedulers read.
/// Unknown keys are ignored, as `from_config` ignores keys a class does not take.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SchedulerConfig {
    /// The diffusers class that wrote the file, e.g. "PNDMScheduler".
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    pub beta_schedule: Option<String>,
    /// Explicit betas; override `beta_schedule` when present.
    pub trained_betas: Option<Vec<f64>>,
    /// "epsilon", "v_prediction" or "sample".
    pub prediction_type: Option<String>,
    /// "leading", "trailing" or "linspace".
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub rescale_betas_zero_snr: Option<bool>,
    // DDIM / PNDM
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    // Euler
    /// "linear" or "log_linear".
    pub interpolation_type: Option<String>,
    /// "discrete" or "continuous".
    pub timestep_type: Option<String>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    // Sigma schedules (Euler, DPM-Solver)
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    /// "zero" or "sigma_min".
    pub final_sigmas_type: Option<String>,
    // DPM-Solver
    pub algorithm_type: Option<String>,
    pub solver_order: Option<usize>,
    /// "midpoint" or "heun".
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    /// `None` (or JSON `-Infinity`, which diffusers writes) means no clipping.
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    // Flow matching (FlowMatchEulerDiscreteScheduler)
    pub shift: Option<f64>,
    pub use_dynamic_shifting: Option<bool>,
    pub base_shift: Option<f64>,
    pub max_shift: Option<f64>,
    pub base_image_seq_len: Option<usize>,
    pub max_image_seq_len: Option<usize>,
    /// "exponential" or "linear": how `mu` shifts the sigmas.
    pub time_shift_type: Option<String>,
    /// The last sigma the schedule is stretched to; `null` or 0 means none.
    pub shift_terminal: Option<f64>,
    pub invert_sigmas: Option<bool>,
    pub stochastic_sampling: Option<bool>,
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self, WorkerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| WorkerError::model_load(path.display().to_string(), path, e))?;
        Self::from_json(&text)
            .map_err(|e| WorkerError::model_load(path.display().to_string(), path, e))
    }

    /// Parses the text of a `scheduler_config.json`.
    ///
    /// Python's `json` writes non-finite floats as the bare tokens `NaN`, `Infinity` and `-Infinity`
    /// (diffusers' DPM-Solver configs hold `"lambda_min_clipped": -Infinity`), which strict JSON
    /// parsers reject; they are read as `null`, i.e. "use the class default", which is what they mean
    /// for every key that takes them.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(&null_non_finite(text))
    }

    /// The prediction type, or `default` when the key is missing.
    pub(crate) fn prediction_type(&self, default: &str) -> Result<PredictionType, WorkerError> {
        match self.prediction_type.as_deref().unwrap_or(default) {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" | "original_sample" => Ok(PredictionType::Sample),
            other => Err(unsupported("prediction_type", other)),
        }
    }

    /// The timestep spacing, or `default` when the key is missing.
    pub(crate) fn timestep_spacing(&self, default: &str) -> Result<TimestepSpacing, WorkerError> {
        match self.timestep_spacing.as_deref().unwrap_or(default) {
            "leading" => Ok(TimestepSpacing::Leading),
            "trailing" => Ok(TimestepSpacing::Trailing),
            "linspace" => Ok(TimestepSpacing::Linspace),
            other => Err(unsupported("timestep_spacing", other)),
        }
    }

    /// The beta schedule (default "linear", the same in every class).
    pub(crate) fn beta_schedule(&self) -> Result<BetaSchedule, WorkerError> {
        if let Some(betas) = &self.trained_betas {
            return Ok(BetaSchedule::Trained(betas.clone()));
        }
        match self.beta_schedule.as_deref().unwrap_or("linear") {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCos),
            other => Err(unsupported("beta_schedule", other)),
        }
    }

    /// Whether the last sigma is zero (`final_sigmas_type` "zero", the default) or sigma_min.
    pub(crate) fn final_sigma_zero(&self) -> Result<bool, WorkerError> {
        match self.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => Ok(true),
            "sigma_min" => Ok(false),
            other => Err(unsupported("final_sigmas_type", other)),
        }
    }

    /// `num_train_timesteps` (default 1000), which must be at least 2.
    pub(crate) fn train_timesteps(&self) -> Result<usize, WorkerError> {
        match self.num_train_timesteps.unwrap_or(1000) {
            n if n >= 2 => Ok(n),
            n => Err(WorkerError::config(
                "scheduler_config.num_train_timesteps",
                format!("must be at least 2, got {n}"),
            )),
        }
    }

    /// Fails when one of the named boolean options is on: they select algorithms not implemented here.
    pub(crate) fn reject_flags(&self, flags: &[(&str, Option<bool>)]) -> Result<(), WorkerError> {
        match flags.iter().find(|(_, value)| *value == Some(true)) {
            Some((key, _)) => Err(unsupported(key, "true")),
            None => Ok(()),
        }
    }
}

/// What the denoising model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PredictionType {
    /// The added noise.
    Epsilon,
    /// The velocity `alpha * noise - sigma * sample` (SD 2.x 768-px models).
    VPrediction,
    /// The clean sample itself.
    Sample,
}

/// How inference timesteps are spread over the training range (Table 2 of arXiv:2305.08891).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// How the training betas are laid out.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCos,
    Trained(Vec<f64>),
}

/// The error for a config value this worker does not implement.
pub(crate) fn unsupported(key: &str, value: &str) -> WorkerError {
    WorkerError::config(
        format!("scheduler_config.{key}"),
        format!("unsupported value '{value}'"),
    )
}

/// Replaces the bare `NaN`, `Infinity` and `-Infinity` tokens Python's json module writes with `null`,
/// leaving string contents alone.
fn null_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|token| rest.starts_with(*token))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_python_non_finite_floats_as_missing() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "variance_type": "NaN-Infinity", "sigma_max": Infinity, "beta_end": 0.012}"#;
        let config = SchedulerConfig::from_json(text).expect("parses");
        assert_eq!(config.lambda_min_clipped, None);
        assert_eq!(config.sigma_max, None);
        assert_eq!(config.variance_type.as_deref(), Some("NaN-Infinity"));
        assert_eq!(config.beta_end, Some(0.012));
    }

    #[test]
    fn class_defaults_apply_only_to_missing_keys() {
        let config = SchedulerConfig {
            timestep_spacing: Some("trailing".into()),
            ..Default::default()
        };
        assert_eq!(
            config.timestep_spacing("leading").expect("valid"),
            TimestepSpacing::Trailing
        );
        let empty = SchedulerConfig::default();
        assert_eq!(
            empty.timestep_spacing("leading").expect("valid"),
            TimestepSpacing::Leading
        );
        assert_eq!(
            empty.prediction_type("epsilon").expect("valid"),
            PredictionType::Epsilon
        );
        let bad = SchedulerConfig {
            beta_schedule: Some("sigmoid".into()),
            ..Default::default()
        };
        let err = bad.beta_schedule().expect_err("unsupported");
        assert!(err.to_string().contains("scheduler_config.beta_schedule"));
    }

    #[test]
    fn from_file_reports_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scheduler_config.json");
        std::fs::write(&path, "{not json").expect("write");
        let err = SchedulerConfig::from_file(&path).expect_err("invalid json");
        assert_eq!(err.kind(), "model_load");
        assert!(err.to_string().contains("scheduler_config.json"));
    }
}
