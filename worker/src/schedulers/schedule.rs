//! Noise-schedule arithmetic shared by the schedulers, reproducing diffusers' numbers exactly.
//!
//! diffusers builds its tables with a mix of torch float32 and numpy float64 operations, and the
//! images depend on those roundings, so each helper here states which library operation it mirrors:
//!
//! ```text
//! config ──► betas (torch f32) ──► alphas_cumprod (torch cumprod: f64 accumulator, f32 out)
//!                                     ├─► sigma table sqrt((1-a)/a) (torch f32)
//!                                     └─► per-step values picked at the inference timesteps
//! num_inference_steps ──► timesteps (numpy f64 linspace/arange, round half to even)
//! ```

use crate::error::WorkerError;

use super::config::{BetaSchedule, SchedulerConfig};

/// `alphas_cumprod` of a diffusers scheduler: betas from the config (optionally rescaled to zero
/// terminal SNR), `alphas = 1 - betas`, and their cumulative product.
pub(crate) fn alphas_cumprod(
    config: &SchedulerConfig,
    rescale_zero_snr: bool,
) -> Result<Vec<f32>, WorkerError> {
    let train = config.train_timesteps()?;
    let beta_start = config.beta_start.unwrap_or(0.0001);
    let beta_end = config.beta_end.unwrap_or(0.02);
    let mut betas = match config.beta_schedule()? {
        BetaSchedule::Linear => torch_linspace_f32(beta_start, beta_end, train),
        BetaSchedule::ScaledLinear => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), train)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        BetaSchedule::SquaredCos => cosine_betas(train),
        BetaSchedule::Trained(betas) => {
            if betas.len() != train {
                return Err(WorkerError::config(
                    "scheduler_config.trained_betas",
                    format!(
                        "has {} values but num_train_timesteps is {train}",
                        betas.len()
                    ),
                ));
            }
            betas.iter().map(|&b| b as f32).collect()
        }
    };
    if rescale_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    Ok(torch_cumprod(betas.iter().map(|b| 1.0 - b)))
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` bit for bit: torch's CPU kernel evaluates
/// `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the second, and the
/// compiler fuses each into one multiply-add.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// `torch.cumprod` of a float32 tensor on the CPU: the running product is kept in float64 and each
/// output rounded to float32.
fn torch_cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .map(|v| {
            acc *= f64::from(v);
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine ("squaredcos_cap_v2") alpha-bar, in float64.
fn cosine_betas(train: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..train)
        .map(|i| {
            let t1 = i as f64 / train as f64;
            let t2 = (i + 1) as f64 / train as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr` (arXiv:2305.08891, Algorithm 1), in torch float32.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let sqrt_bar: Vec<f32> = torch_cumprod(betas.iter().map(|b| 1.0 - b))
        .into_iter()
        .map(f32::sqrt)
        .collect();
    let (first, last) = match (sqrt_bar.first(), sqrt_bar.last()) {
        (Some(&f), Some(&l)) => (f, l),
        _ => return Vec::new(),
    };
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|&s| {
            let shifted = (s - last) * scale;
            shifted * shifted
        })
        .collect();
    std::iter::once(bar[0])
        .chain(bar.windows(2).map(|w| w[1] / w[0]))
        .map(|alpha| 1.0 - alpha)
        .collect()
}

/// The sigma table `((1 - a) / a) ** 0.5` over all training timesteps, in torch float32.
pub(crate) fn sigma_table(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `numpy.linspace(start, stop, num)`: `i * step + start`, with the end point exact.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num <= 1 {
        return vec![start; num];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `numpy.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values
/// `start + i * delta`, where numpy takes `delta = (start + step) - start`.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len as usize)
        .map(|i| start + i as f64 * delta)
        .collect()
}

/// `numpy.interp(x, arange(len(table)), table)` in float64; outside the table it clamps to the ends.
pub(crate) fn np_interp_index(x: f64, table: &[f32]) -> f64 {
    let Some(&last) = table.last() else {
        return f64::NAN;
    };
    if x <= 0.0 {
        return f64::from(table[0]);
    }
    let last_index = (table.len() - 1) as f64;
    if x >= last_index {
        return f64::from(last);
    }
    let j = x.floor() as usize;
    let (lo, hi) = (f64::from(table[j]), f64::from(table[j + 1]));
    // numpy: slope * (x - xp[j]) + fp[j], with the slope over a unit step.
    (hi - lo) * (x - j as f64) + lo
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma matches `sigma`,
/// interpolating linearly in log space; `log_sigmas` ascend with the timestep.
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let below = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - f64::from(l) >= 0.0)
        .count();
    // numpy: cumsum(dists >= 0).argmax() is the last index at or below, 0 when there is none,
    // clipped so that a `high` neighbour exists.
    let low_idx = below
        .saturating_sub(1)
        .min(log_sigmas.len().saturating_sub(2));
    let high_idx = low_idx + 1;
    let (low, high) = match (log_sigmas.get(low_idx), log_sigmas.get(high_idx)) {
        (Some(&l), Some(&h)) => (f64::from(l), f64::from(h)),
        _ => return 0.0,
    };
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `log` of the sigma table, as `np.log` of the float32 table.
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|&s| f64::from(s).ln() as f32).collect()
}

/// The Karras et al. (2022) schedule between `sigma_max` and `sigma_min`, rho = 7, in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    const RHO: f64 = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / RHO);
    let max_inv_rho = sigma_max.powf(1.0 / RHO);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(RHO))
        .collect()
}

/// "leading" timesteps, descending: `arange(0, steps) * (train // steps) + offset`.
pub(crate) fn leading(train: usize, steps: usize, offset: usize) -> Vec<f64> {
    let ratio = train / steps;
    (0..steps)
        .rev()
        .map(|i| (i * ratio + offset) as f64)
        .collect()
}

/// "trailing" timesteps, descending: `round(arange(start, 0, -ratio)) - 1`.
pub(crate) fn trailing(start: f64, ratio: f64) -> Vec<f64> {
    np_arange(start, 0.0, -ratio)
        .into_iter()
        .map(|t| t.round_ties_even() - 1.0)
        .collect()
}

/// Checks that integer timesteps index the training tables. diffusers' trailing spacing yields a
/// `-1` for some step counts (numpy's arange overshoots), which Python silently wraps around.
pub(crate) fn check_in_range(
    timesteps: &[f64],
    train: usize,
    steps: usize,
) -> Result<(), WorkerError> {
    match timesteps.iter().find(|&&t| t < 0.0 || t >= train as f64) {
        Some(t) => Err(WorkerError::invalid(
            "num_inference_steps",
            format!("{steps} steps give timestep {t}, outside the scheduler's 0..{train} range"),
        )),
        None => Ok(()),
    }
}

/// Validates `num_inference_steps` against the training range, as diffusers' `set_timesteps` needs.
pub(crate) fn check_steps(steps: usize, train: usize) -> Result<(), WorkerError> {
    if steps == 0 || steps > train {
        return Err(WorkerError::invalid(
            "num_inference_steps",
            format!("must be between 1 and {train}, got {steps}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_uses_fused_multiply_add_like_torch() {
        // torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=float32)[[1, 2, 500, 998]]
        let v = torch_linspace_f32(0.00085f64.sqrt(), 0.012f64.sqrt(), 1000);
        assert_eq!(v.len(), 1000);
        assert_eq!(v[0], 0.00085f64.sqrt() as f32);
        assert_eq!(v[999], 0.012f64.sqrt() as f32);
        let step = (v[999] - v[0]) / 999.0;
        assert_eq!(v[2], step.mul_add(2.0, v[0]));
        assert_eq!(v[998], (-step).mul_add(1.0, v[999]));
    }

    #[test]
    fn numpy_helpers_match_numpy() {
        assert_eq!(np_linspace(0.0, 999.0, 3), vec![0.0, 499.5, 999.0]);
        assert_eq!(np_linspace(0.0, 999.0, 1), vec![0.0]);
        // np.arange(1000, 0, -1000/61) has 62 elements: the overshoot the range check guards.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 3.0).len(), 3);
        assert_eq!(trailing(1000.0, 250.0), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(leading(1000, 4, 1), vec![751.0, 501.0, 251.0, 1.0]);
        let table = [1.0f32, 3.0, 7.0];
        assert_eq!(np_interp_index(0.5, &table), 2.0);
        assert_eq!(np_interp_index(-1.0, &table), 1.0);
        assert_eq!(np_interp_index(5.0, &table), 7.0);
    }

    #[test]
    fn sigma_to_t_inverts_the_table() {
        let sigmas = [0.1f32, 0.2, 0.4, 0.8];
        let logs = log_sigmas(&sigmas);
        assert!((sigma_to_t(0.4, &logs) - 2.0).abs() < 1e-6);
        assert!((sigma_to_t(0.2f64 * 2f64.sqrt(), &logs) - 1.5).abs() < 1e-6);
        assert_eq!(sigma_to_t(10.0, &logs), 3.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }
}
