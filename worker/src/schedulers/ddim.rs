//! Deterministic DDIM (eta = 0): diffusers' `DDIMScheduler`.
//!
//! Each step estimates the clean sample x0 and the noise from the model output at `alphas_cumprod[t]`,
//! optionally clips x0, and re-noises it to the previous timestep `t - train // steps`:
//! `x ← sqrt(a_prev) · x0 + sqrt(1 - a_prev) · eps`. Below timestep 0 the "previous" alpha is
//! `final_alpha_cumprod` (1 with `set_alpha_to_one`, else `alphas_cumprod[0]`).

use candle_core::Tensor;

use crate::error::WorkerError;
use crate::rng::TorchRng;

use super::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div, f32_of, index_error, mul, schedule, Scheduler};

/// A DDIM schedule for a fixed step count.
pub(crate) struct Ddim {
    /// Integer training timesteps, descending.
    timesteps: Vec<f64>,
    alphas_cumprod: Vec<f32>,
    /// The alpha used past the last step.
    final_alpha_cumprod: f32,
    /// `train // steps`: the distance to the previous timestep.
    step_ratio: usize,
    prediction: PredictionType,
    /// Clamp x0 to ±this (`clip_sample`), or not at all.
    clip: Option<f32>,
}

impl Ddim {
    /// `DDIMScheduler.from_config(config)` + `set_timesteps(steps)`.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, WorkerError> {
        config.reject_flags(&[("thresholding", config.thresholding)])?;
        let train = config.train_timesteps()?;
        schedule::check_steps(steps, train)?;
        let prediction = config.prediction_type("epsilon")?;
        let alphas_cumprod =
            schedule::alphas_cumprod(config, config.rescale_betas_zero_snr == Some(true))?;
        let timesteps = match config.timestep_spacing("leading")? {
            TimestepSpacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect(),
            TimestepSpacing::Leading => {
                schedule::leading(train, steps, config.steps_offset.unwrap_or(0))
            }
            TimestepSpacing::Trailing => {
                schedule::trailing(train as f64, train as f64 / steps as f64)
            }
        };
        schedule::check_in_range(&timesteps, train, steps)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Ddim {
            timesteps,
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train / steps,
            prediction,
            clip,
        })
    }

    /// `alphas_cumprod` at loop step `i`'s timestep.
    fn alpha_at(&self, i: usize) -> candle_core::Result<(usize, f32)> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| index_error(i, self.timesteps.len()))? as usize;
        Ok((t, self.alphas_cumprod[t]))
    }
}

impl Scheduler for Ddim {
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
        let (t, alpha) = self.alpha_at(step_index)?;
        let alpha_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta = 1.0 - alpha;
        let x = f32_of(sample)?;
        let output = f32_of(model_output)?;
        let (x0, eps) = match self.prediction {
            PredictionType::Epsilon => (
                div(&(&x - mul(&output, beta.sqrt())?)?, alpha.sqrt())?,
                output,
            ),
            PredictionType::Sample => {
                let eps = div(&(&x - mul(&output, alpha.sqrt())?)?, beta.sqrt())?;
                (output, eps)
            }
            PredictionType::VPrediction => (
                (mul(&x, alpha.sqrt())? - mul(&output, beta.sqrt())?)?,
                (mul(&output, alpha.sqrt())? + mul(&x, beta.sqrt())?)?,
            ),
        };
        let x0 = match self.clip {
            Some(range) => x0.clamp(-range, range)?,
            None => x0,
        };
        // eta = 0: no variance term, so the direction keeps all of 1 - alpha_prev.
        let direction = mul(&eps, (1.0 - alpha_prev).sqrt())?;
        (mul(&x0, alpha_prev.sqrt())? + direction)?.to_dtype(sample.dtype())
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let (_, alpha) = self.alpha_at(step_index)?;
        let noisy =
            (mul(&f32_of(original)?, alpha.sqrt())? + mul(&f32_of(noise)?, (1.0 - alpha).sqrt())?)?;
        noisy.to_dtype(original.dtype())
    }
}
