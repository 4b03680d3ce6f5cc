//! Pseudo numerical methods (PLMS), with or without the Runge–Kutta warm-up: diffusers' `PNDMScheduler`.
//!
//! PLMS combines up to four past model outputs (linear multistep, Adams–Bashforth coefficients) and
//! applies the DDIM-like transfer `_get_prev_sample` from timestep `t` to `t - train // steps`.
//! With `skip_prk_steps` (Stable Diffusion's setting) the second timestep is repeated once: the first
//! two UNet calls form a Heun-like warm-up from the same sample. Without it, the first 12 calls are
//! pseudo Runge–Kutta steps over the last 4 timesteps (hence at least 4 inference steps).
//!
//! The step rule depends on how many steps have run (`counter`), not on the loop index; the loop index
//! only selects the timestep, exactly as diffusers uses `self.counter`.

use candle_core::Tensor;

use crate::error::WorkerError;
use crate::rng::TorchRng;

use super::config::{unsupported, PredictionType, SchedulerConfig, TimestepSpacing};
use super::{div, f32_of, index_error, mul, schedule, Scheduler};

/// A PNDM schedule and its multistep history.
pub(crate) struct Pndm {
    /// The UNet timesteps: the PRK ones (if any) followed by the PLMS ones.
    timesteps: Vec<f64>,
    /// How many leading entries of `timesteps` are Runge–Kutta steps (0 with `skip_prk_steps`).
    prk_len: usize,
    alphas_cumprod: Vec<f32>,
    /// The alpha used past the last step.
    final_alpha_cumprod: f32,
    /// `train // steps`.
    step_ratio: usize,
    prediction: PredictionType,
    /// Steps taken so far; selects the PRK stage or the PLMS order.
    counter: usize,
    /// Past (PRK: stage-one) model outputs, newest last; PLMS keeps at most 4.
    ets: Vec<Tensor>,
    /// The sample a multi-call step started from (PRK stages, the PLMS warm-up pair).
    cur_sample: Option<Tensor>,
    /// Runge–Kutta weighted sum of the current step's stage outputs.
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    /// `PNDMScheduler.from_config(config)` + `set_timesteps(steps)`.
    pub(crate) fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, WorkerError> {
        let train = config.train_timesteps()?;
        schedule::check_steps(steps, train)?;
        let prediction = match config.prediction_type("epsilon")? {
            PredictionType::Sample => return Err(unsupported("prediction_type", "sample")),
            p => p,
        };
        // PNDMScheduler takes no rescale_betas_zero_snr.
        let alphas_cumprod = schedule::alphas_cumprod(config, false)?;
        // Ascending, as diffusers' `_timesteps`.
        let base: Vec<usize> = match config.timestep_spacing("leading")? {
            TimestepSpacing::Linspace => schedule::np_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .map(|t| t.round_ties_even() as usize)
                .collect(),
            TimestepSpacing::Leading => {
                let mut t = schedule::leading(train, steps, config.steps_offset.unwrap_or(0));
                t.reverse();
                t.into_iter().map(|t| t as usize).collect()
            }
            TimestepSpacing::Trailing => {
                let t = schedule::trailing(train as f64, train as f64 / steps as f64);
                schedule::check_in_range(&t, train, steps)?;
                t.into_iter().rev().map(|t| t as usize).collect()
            }
        };
        let skip_prk = config.skip_prk_steps.unwrap_or(false);
        let (prk, plms): (Vec<usize>, Vec<usize>) = if skip_prk {
            // The second-to-last base timestep twice: [.., t1, t1, t0] once reversed.
            let n = base.len();
            let mut plms: Vec<usize> = base[..n - 1].to_vec();
            plms.extend_from_slice(&base[n.saturating_sub(2)..n - 1]);
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if steps < 4 {
                return Err(WorkerError::invalid(
                    "num_inference_steps",
                    format!("pndm with skip_prk_steps=false needs at least 4 steps, got {steps}"),
                ));
            }
            // Each of the last 4 timesteps and its midpoint, minus the final midpoint; every entry
            // twice except the outer two; then descending.
            let half = train / steps / 2;
            let mut pairs: Vec<usize> = base[base.len() - 4..]
                .iter()
                .flat_map(|&t| [t, t + half])
                .collect();
            pairs.pop();
            let doubled: Vec<usize> = pairs.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let plms = base[..base.len() - 3].iter().rev().copied().collect();
            (prk, plms)
        };
        let timesteps: Vec<f64> = prk.iter().chain(&plms).map(|&t| t as f64).collect();
        schedule::check_in_range(&timesteps, train, steps)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Pndm {
            timesteps,
            prk_len: prk.len(),
            alphas_cumprod,
            final_alpha_cumprod,
            step_ratio: train / steps,
            prediction,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    /// One pseudo Runge–Kutta stage (diffusers' `step_prk`).
    fn step_prk(
        &mut self,
        output: Tensor,
        t: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.step_ratio / 2
        };
        let prev_t = t as i64 - diff_to_prev as i64;
        // All four stages transfer from the stage's first timestep.
        let stage_t = self.timesteps[self.counter / 4 * 4] as usize;
        let accumulate = |acc: Option<Tensor>, term: Tensor| match acc {
            Some(acc) => acc + term,
            None => Ok(term),
        };
        let output = match self.counter % 4 {
            0 => {
                let weighted = mul(&output, 1.0 / 6.0)?;
                self.cur_model_output = Some(accumulate(self.cur_model_output.take(), weighted)?);
                self.ets.push(output.clone());
                self.cur_sample = Some(sample.clone());
                output
            }
            1 | 2 => {
                let weighted = mul(&output, 1.0 / 3.0)?;
                self.cur_model_output = Some(accumulate(self.cur_model_output.take(), weighted)?);
                output
            }
            _ => {
                let last = mul(&output, 1.0 / 6.0)?;
                accumulate(self.cur_model_output.take(), last)?
            }
        };
        let from = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        self.prev_sample(&from, stage_t, prev_t, &output)
    }

    /// One linear multistep step (diffusers' `step_plms`).
    fn step_plms(
        &mut self,
        output: Tensor,
        t: usize,
        sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (mut t, mut prev_t) = (t as i64, t as i64 - self.step_ratio as i64);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(output.clone());
        } else {
            // The repeated timestep: transfer from the original timestep again.
            prev_t = t;
            t += self.step_ratio as i64;
        }
        let mut from = sample.clone();
        let e = &self.ets;
        let n = e.len();
        let combined = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            output
        } else if n == 1 && self.counter == 1 {
            if let Some(start) = self.cur_sample.take() {
                from = start;
            }
            div(&(output + &e[0])?, 2.0)?
        } else if n == 2 {
            div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if n == 3 {
            let sum = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
            div(&sum, 12.0)?
        } else {
            let sum = (((mul(&e[n - 1], 55.0)? - mul(&e[n - 2], 59.0)?)?
                + mul(&e[n - 3], 37.0)?)?
                - mul(&e[n - 4], 9.0)?)?;
            mul(&sum, 1.0 / 24.0)?
        };
        self.prev_sample(&from, t as usize, prev_t, &combined)
    }

    /// diffusers' `_get_prev_sample`: the PNDM transfer of `sample` from `t` to `prev_t`.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: usize,
        prev_t: i64,
        output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha = *self
            .alphas_cumprod
            .get(t)
            .ok_or_else(|| index_error(t, self.alphas_cumprod.len()))?;
        let alpha_prev = match usize::try_from(prev_t) {
            Ok(p) => *self
                .alphas_cumprod
                .get(p)
                .ok_or_else(|| index_error(p, self.alphas_cumprod.len()))?,
            Err(_) => self.final_alpha_cumprod,
        };
        let beta = 1.0 - alpha;
        let beta_prev = 1.0 - alpha_prev;
        let eps = match self.prediction {
            PredictionType::VPrediction => {
                (mul(output, alpha.sqrt())? + mul(sample, beta.sqrt())?)?
            }
            PredictionType::Epsilon | PredictionType::Sample => output.clone(),
        };
        let sample_coeff = (alpha_prev / alpha).sqrt();
        let denom = alpha * beta_prev.sqrt() + (alpha * beta * alpha_prev).sqrt();
        let correction = div(&mul(&eps, alpha_prev - alpha)?, denom)?;
        mul(sample, sample_coeff)? - correction
    }
}

impl Scheduler for Pndm {
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
        let t = *self
            .timesteps
            .get(step_index)
            .ok_or_else(|| index_error(step_index, self.timesteps.len()))? as usize;
        let output = f32_of(model_output)?;
        let x = f32_of(sample)?;
        let prev = if self.counter < self.prk_len {
            self.step_prk(output, t, &x)?
        } else {
            self.step_plms(output, t, &x)?
        };
        self.counter += 1;
        prev.to_dtype(sample.dtype())
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let t = *self
            .timesteps
            .get(step_index)
            .ok_or_else(|| index_error(step_index, self.timesteps.len()))? as usize;
        let alpha = self.alphas_cumprod[t];
        let noisy =
            (mul(&f32_of(original)?, alpha.sqrt())? + mul(&f32_of(noise)?, (1.0 - alpha).sqrt())?)?;
        noisy.to_dtype(original.dtype())
    }
}
