//! DPM-Solver++(2M): diffusers' `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"` and
//! `solver_order=2`, optionally with Karras sigmas.
//!
//! The model output is first converted to a clean-sample prediction x0 at the step's sigma. The update
//! works in log-SNR `lambda = ln(alpha / sigma)`: a first-order (DDIM-like) step
//! `x ← (sigma_t / sigma_s) · x - alpha_t · (e^-h - 1) · x0`, or, once a previous x0 exists, the
//! second-order multistep correction with `D1 = (x0 - x0_prev) / r` (midpoint or Heun form).
//! `lower_order_final` drops to lower order for the last steps of short schedules, and a final sigma
//! of zero always ends with a first-order step (it returns x0).
//!
//! Scalar coefficients are computed in float32, as diffusers does with 0-dim float32 tensors.

use candle_core::Tensor;

use crate::error::WorkerError;
use crate::rng::TorchRng;

use super::config::{unsupported, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div, f32_of, index_error, mul, schedule, Scheduler};

/// A DPM-Solver++(2M) schedule and its one-step history.
pub(crate) struct DpmSolver {
    /// Integer timesteps for the UNet, descending.
    timesteps: Vec<f64>,
    /// Noise level per loop step plus the final one (float32).
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// Second-order update form: Heun (`solver_type="heun"`) or midpoint.
    heun: bool,
    /// Whether the last sigma is 0 (then the last step is always first order).
    final_sigma_zero: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    /// x0 prediction of the previous step (the multistep history); set by `step`. Until the first
    /// step has run only a first-order update is possible (diffusers' `lower_order_nums < 1`).
    previous_x0: Option<Tensor>,
}

impl DpmSolver {
    /// `DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
    /// use_karras_sigmas=karras)` + `set_timesteps(steps)`.
    pub(crate) fn new(
        config: &SchedulerConfig,
        steps: usize,
        karras: bool,
    ) -> Result<Self, WorkerError> {
        config.reject_flags(&[
            ("thresholding", config.thresholding),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("use_lu_lambdas", config.use_lu_lambdas),
            ("use_flow_sigmas", config.use_flow_sigmas),
        ])?;
        if let Some(variance) = config.variance_type.as_deref() {
            return Err(unsupported("variance_type", variance));
        }
        let heun = match config.solver_type.as_deref().unwrap_or("midpoint") {
            // diffusers maps the UniPC/DEIS solver types to midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(unsupported("solver_type", other)),
        };
        let train = config.train_timesteps()?;
        schedule::check_steps(steps, train)?;
        let prediction = config.prediction_type("epsilon")?;
        let zero_snr = config.rescale_betas_zero_snr == Some(true);
        let mut alphas_cumprod = schedule::alphas_cumprod(config, zero_snr)?;
        if zero_snr {
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let last_timestep = train - clipped_count(&alphas_cumprod, config.lambda_min_clipped);
        let mut timesteps: Vec<f64> = match config.timestep_spacing("linspace")? {
            TimestepSpacing::Linspace => {
                let mut t: Vec<f64> =
                    schedule::np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1)
                        .into_iter()
                        .map(f64::round_ties_even)
                        .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                let offset = config.steps_offset.unwrap_or(0);
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio + offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                schedule::trailing(last_timestep as f64, train as f64 / steps as f64)
            }
        };
        let table = schedule::sigma_table(&alphas_cumprod);
        let mut sigmas: Vec<f64> = if karras {
            // The table ascends with the timestep: its ends are sigma_min and sigma_max.
            let sigma_min = f64::from(table[0]);
            let sigma_max = f64::from(table[table.len() - 1]);
            let sigmas = schedule::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = schedule::log_sigmas(&table);
            let round = config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let t = schedule::sigma_to_t(s, &log_sigmas);
                    // Rounded, except for the cosine schedule; the int64 cast then truncates.
                    if round {
                        t.round_ties_even()
                    } else {
                        t.trunc()
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| schedule::np_interp_index(t, &table))
                .collect()
        };
        schedule::check_in_range(&timesteps, train, steps)?;
        let final_sigma_zero = config.final_sigma_zero()?;
        sigmas.push(if final_sigma_zero {
            0.0
        } else {
            f64::from(table[0])
        });
        Ok(DpmSolver {
            timesteps,
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            heun,
            final_sigma_zero,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            previous_x0: None,
        })
    }

    fn sigma(&self, i: usize) -> candle_core::Result<f32> {
        self.sigmas
            .get(i)
            .copied()
            .ok_or_else(|| index_error(i, self.timesteps.len()))
    }

    /// diffusers' `convert_model_output` for DPM-Solver++: the x0 prediction.
    fn convert(&self, output: Tensor, sample: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction {
            PredictionType::Epsilon => div(&(sample - mul(&output, sigma_t)?)?, alpha_t),
            PredictionType::Sample => Ok(output),
            PredictionType::VPrediction => mul(sample, alpha_t)? - mul(&output, sigma_t)?,
        }
    }
}

/// `(alpha_t, sigma_t)` of a VP schedule at noise level `sigma`, in float32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `lambda = ln(alpha) - ln(sigma)`, in float32.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// How many training timesteps have `lambda` below `lambda_min_clipped` (diffusers' searchsorted over
/// the flipped lambdas); 0 without clipping.
fn clipped_count(alphas_cumprod: &[f32], lambda_min_clipped: Option<f64>) -> usize {
    let Some(min) = lambda_min_clipped else {
        return 0;
    };
    alphas_cumprod
        .iter()
        .filter(|&&a| f64::from(lambda(a.sqrt(), (1.0 - a).sqrt())) < min)
        .count()
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _rng: &mut TorchRng,
    ) -> candle_core::Result<Tensor> {
        let n = self.timesteps.len();
        if step_index >= n {
            return Err(index_error(step_index, n));
        }
        // diffusers' `lower_order_second` only matters for third order; at order 2 every step after
        // the first is second order unless it is a lower-order final step.
        let lower_order_final = step_index == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);
        let x = f32_of(sample)?;
        let sigma_s0 = self.sigma(step_index)?;
        let x0 = self.convert(f32_of(model_output)?, &x, sigma_s0)?;
        let previous = self.previous_x0.replace(x0.clone());

        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index + 1)?);
        let (alpha_s0, sigma_s0) = alpha_sigma(sigma_s0);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let first_coeff = alpha_t * ((-h).exp() - 1.0);
        let base = (mul(&x, sigma_t / sigma_s0)? - mul(&x0, first_coeff)?)?;
        let prev = match previous {
            Some(x0_prev) if !lower_order_final => {
                let prev_index = step_index
                    .checked_sub(1)
                    .ok_or_else(|| index_error(step_index, n))?;
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigma(prev_index)?);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let r0 = h_0 / h;
                let d1 = mul(&(&x0 - x0_prev)?, 1.0 / r0)?;
                let correction = if self.heun {
                    mul(&d1, alpha_t * (((-h).exp() - 1.0) / h + 1.0))?
                } else {
                    mul(&d1, -(0.5 * first_coeff))?
                };
                (base + correction)?
            }
            _ => base,
        };
        prev.to_dtype(sample.dtype())
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        if step_index >= self.timesteps.len() {
            return Err(index_error(step_index, self.timesteps.len()));
        }
        let (alpha_t, sigma_t) = alpha_sigma(self.sigma(step_index)?);
        let noisy = (mul(&f32_of(original)?, alpha_t)? + mul(&f32_of(noise)?, sigma_t)?)?;
        noisy.to_dtype(original.dtype())
    }
}
