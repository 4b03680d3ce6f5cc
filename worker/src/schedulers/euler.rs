//! Euler samplers over Karras-style sigmas: diffusers' `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler`.
//!
//! Both turn the training `alphas_cumprod` into noise levels `sigma = sqrt((1 - a) / a)`, pick one per
//! inference timestep (linear interpolation in the table, or a Karras / log-linear ramp for the
//! discrete scheduler), append a final sigma (0, or sigma_min), and step
//! `x ← x + (x - x0) / sigma · (sigma_next - sigma)`. The ancestral variant steps down to
//! `sigma_down` and adds fresh noise of scale `sigma_up`, drawn from the request's generator.

use candle_core::Tensor;

use crate::error::WorkerError;
use crate::rng::TorchRng;

use super::config::{unsupported, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div, f32_of, index_error, mul, schedule, Scheduler};

/// An Euler or Euler-ancestral schedule for a fixed step count.
pub(crate) struct Euler {
    /// Timesteps for the UNet (float32 values; fractional for "linspace" spacing).
    timesteps: Vec<f64>,
    /// Noise level per loop step plus the final one; float32 like diffusers' tensor.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: PredictionType,
    /// Ancestral sampling: step to `sigma_down`, then add noise of scale `sigma_up`.
    ancestral: bool,
}

impl Euler {
    /// `EulerDiscreteScheduler.from_config(config)` + `set_timesteps(steps)`.
    pub(crate) fn discrete(config: &SchedulerConfig, steps: usize) -> Result<Self, WorkerError> {
        config.reject_flags(&[
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
        ])?;
        let prediction = config.prediction_type("epsilon")?;
        let log_linear = match config.interpolation_type.as_deref().unwrap_or("linear") {
            "linear" => false,
            "log_linear" => true,
            other => return Err(unsupported("interpolation_type", other)),
        };
        let continuous = match config.timestep_type.as_deref().unwrap_or("discrete") {
            "discrete" => false,
            "continuous" => true,
            other => return Err(unsupported("timestep_type", other)),
        };
        let base = Base::new(config, steps)?;
        let mut timesteps = base.timesteps.clone();
        let mut sigmas: Vec<f64> = if log_linear {
            // diffusers ramps log-sigma over steps + 1 points here (and still appends the final
            // sigma below), in torch float32.
            let table = &base.table;
            let (largest, smallest) = (table[table.len() - 1], table[0]);
            schedule::torch_linspace_f32(
                f64::from(f64::from(largest).ln() as f32),
                f64::from(f64::from(smallest).ln() as f32),
                steps + 1,
            )
            .into_iter()
            .map(|l| f64::from(l.exp()))
            .collect()
        } else {
            base.interpolated()
        };
        if config.use_karras_sigmas == Some(true) {
            let sigma_min = config
                .sigma_min
                .unwrap_or_else(|| sigmas.last().copied().unwrap_or(0.0));
            let sigma_max = config
                .sigma_max
                .unwrap_or_else(|| sigmas.first().copied().unwrap_or(0.0));
            sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = schedule::log_sigmas(&base.table);
            timesteps = sigmas
                .iter()
                .map(|&s| f64::from(schedule::sigma_to_t(s, &log_sigmas) as f32))
                .collect();
        }
        let last = if config.final_sigma_zero()? {
            0.0
        } else {
            f64::from(base.table[0])
        };
        sigmas.push(last);
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        if continuous && prediction == PredictionType::VPrediction {
            // EDM-style conditioning: the UNet sees 0.25 · ln(sigma), in float32.
            timesteps = sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| f64::from(0.25f32 * s.ln()))
                .collect();
        }
        Ok(Euler {
            init_noise_sigma: base.init_noise_sigma(&sigmas),
            timesteps,
            sigmas,
            prediction,
            ancestral: false,
        })
    }

    /// `EulerAncestralDiscreteScheduler.from_config(config)` + `set_timesteps(steps)`. That class
    /// takes none of the Euler-only keys (Karras sigmas, interpolation type, final sigma type).
    pub(crate) fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Self, WorkerError> {
        let prediction = match config.prediction_type("epsilon")? {
            PredictionType::Sample => return Err(unsupported("prediction_type", "sample")),
            p => p,
        };
        let base = Base::new(config, steps)?;
        let mut sigmas: Vec<f32> = base.interpolated().into_iter().map(|s| s as f32).collect();
        sigmas.push(0.0);
        Ok(Euler {
            init_noise_sigma: base.init_noise_sigma(&sigmas),
            timesteps: base.timesteps,
            sigmas,
            prediction,
            ancestral: true,
        })
    }

    /// `(sigma, sigma_next)` for loop step `i`.
    fn sigma_pair(&self, i: usize) -> candle_core::Result<(f32, f32)> {
        match (self.sigmas.get(i), self.sigmas.get(i + 1)) {
            (Some(&s), Some(&next)) if i < self.timesteps.len() => Ok((s, next)),
            _ => Err(index_error(i, self.timesteps.len())),
        }
    }

    /// The denoised estimate x0 from the model output at noise level `sigma` (float32 tensors).
    fn predict_x0(
        &self,
        output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> candle_core::Result<Tensor> {
        match self.prediction {
            PredictionType::Epsilon => sample - mul(output, sigma)?,
            PredictionType::VPrediction => {
                let var = sigma * sigma + 1.0;
                mul(output, -sigma / var.sqrt())? + div(sample, var)?
            }
            PredictionType::Sample => Ok(output.clone()),
        }
    }
}

/// What both Euler classes share: the cumulative alphas' sigma table and the spaced timesteps.
struct Base {
    /// `sqrt((1 - a) / a)` for every training timestep, ascending with the timestep.
    table: Vec<f32>,
    /// Inference timesteps, descending, as float32 values.
    timesteps: Vec<f64>,
    spacing: TimestepSpacing,
}

impl Base {
    fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, WorkerError> {
        let train = config.train_timesteps()?;
        schedule::check_steps(steps, train)?;
        let zero_snr = config.rescale_betas_zero_snr == Some(true);
        let mut alphas_cumprod = schedule::alphas_cumprod(config, zero_snr)?;
        if zero_snr {
            // diffusers: close to 0 without being 0, so the first sigma is finite (fp16's smallest
            // subnormal).
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let spacing = config.timestep_spacing("linspace")?;
        let timesteps: Vec<f64> = match spacing {
            TimestepSpacing::Linspace => {
                let mut t = schedule::np_linspace(0.0, (train - 1) as f64, steps);
                t.reverse();
                t
            }
            TimestepSpacing::Leading => {
                schedule::leading(train, steps, config.steps_offset.unwrap_or(0))
            }
            TimestepSpacing::Trailing => {
                schedule::trailing(train as f64, train as f64 / steps as f64)
            }
        };
        Ok(Base {
            table: schedule::sigma_table(&alphas_cumprod),
            timesteps: timesteps.into_iter().map(|t| f64::from(t as f32)).collect(),
            spacing,
        })
    }

    /// Sigmas at the timesteps by linear interpolation in the table (numpy float64).
    fn interpolated(&self) -> Vec<f64> {
        self.timesteps
            .iter()
            .map(|&t| schedule::np_interp_index(t, &self.table))
            .collect()
    }

    /// diffusers' `init_noise_sigma`: the largest sigma, or `sqrt(max² + 1)` for "leading" spacing.
    fn init_noise_sigma(&self, sigmas: &[f32]) -> f64 {
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max),
            TimestepSpacing::Leading => f64::from((max * max + 1.0).sqrt()),
        }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> candle_core::Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        div(&f32_of(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(sample.dtype())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> candle_core::Result<Tensor> {
        let (sigma, sigma_next) = self.sigma_pair(step_index)?;
        let x = f32_of(sample)?;
        let output = f32_of(model_output)?;
        let x0 = self.predict_x0(&output, &x, sigma)?;
        let derivative = div(&(&x - x0)?, sigma)?;
        let prev = if self.ancestral {
            let sigma_up = (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
                / (sigma * sigma))
                .sqrt();
            let sigma_down = (sigma_next * sigma_next - sigma_up * sigma_up).sqrt();
            let prev = (&x + mul(&derivative, sigma_down - sigma)?)?;
            // Drawn even on the last step (where sigma_up is 0), as diffusers does: the generator's
            // position matters to anything drawn after.
            let noise = rng.randn_tensor(x.dims(), x.device(), candle_core::DType::F32)?;
            (prev + mul(&noise, sigma_up)?)?
        } else {
            // s_churn = 0: sigma_hat is sigma.
            (&x + mul(&derivative, sigma_next - sigma)?)?
        };
        prev.to_dtype(sample.dtype())
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let (sigma, _) = self.sigma_pair(step_index)?;
        (f32_of(original)? + mul(&f32_of(noise)?, sigma)?)?.to_dtype(original.dtype())
    }
}
