//! diffusers' `FlowMatchEulerDiscreteScheduler` as the FLUX pipelines drive it.
//!
//! A flow-matching model predicts the velocity `noise - x0`; the sample moves linearly from noise
//! (sigma 1) to the image (sigma 0): `x ← x + (sigma_next - sigma) · v`. The schedule is the
//! pipeline's `sigmas = linspace(1, 1/steps, steps)`, shifted towards the noisy end either by a fixed
//! `shift` or, with `use_dynamic_shifting` (FLUX.1-dev), by `mu`, which grows linearly with the packed
//! image sequence length (FluxPipeline's `calculate_shift`); a 0 is appended. Timesteps are
//! `sigmas · num_train_timesteps`; the transformer receives `timestep / 1000`.
//!
//! Precision: diffusers does this in numpy float32 with Python-float scalars rounded to float32
//! (numpy 2's weak scalars), including `exp(mu)`. Every operation below is the same float32 operation
//! in the same order, so sigmas and timesteps are bit-identical to diffusers' (computing in float64
//! and rounding at the end differs in the last bit, e.g. for 28 and 50 steps at 1024²).

use candle_core::Tensor;

use crate::error::WorkerError;
use crate::rng::TorchRng;

use super::config::{unsupported, SchedulerConfig};
use super::{f32_of, index_error, ScheduleContext, Scheduler};

/// The diffusers class this scheduler mirrors, as `_class_name` spells it.
pub(crate) const CLASS_NAME: &str = "FlowMatchEulerDiscreteScheduler";

/// A flow-matching Euler schedule for a fixed step count.
pub(crate) struct FlowMatchEuler {
    /// `sigmas · num_train_timesteps` per loop step (float32 values).
    timesteps: Vec<f64>,
    /// Noise level per loop step plus the final 0 (float32, like diffusers' tensor).
    sigmas: Vec<f32>,
}

/// How `mu` shifts the sigmas when `use_dynamic_shifting` is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TimeShift {
    /// `e^mu / (e^mu + (1/s - 1))` (FLUX).
    Exponential,
    /// `mu / (mu + (1/s - 1))`.
    Linear,
}

impl FlowMatchEuler {
    /// `FlowMatchEulerDiscreteScheduler.from_config(config)` + FluxPipeline's
    /// `set_timesteps(steps, sigmas=linspace(1, 1/steps, steps), mu=calculate_shift(image_seq_len))`.
    pub(crate) fn new(
        config: &SchedulerConfig,
        steps: usize,
        context: &ScheduleContext,
    ) -> Result<Self, WorkerError> {
        config.reject_flags(&[
            ("use_karras_sigmas", config.use_karras_sigmas),
            ("use_exponential_sigmas", config.use_exponential_sigmas),
            ("use_beta_sigmas", config.use_beta_sigmas),
            ("invert_sigmas", config.invert_sigmas),
            ("stochastic_sampling", config.stochastic_sampling),
            // FluxPipeline then lets the scheduler make its own sigmas instead of the linspace above.
            ("use_flow_sigmas", config.use_flow_sigmas),
        ])?;
        let time_shift = match config.time_shift_type.as_deref().unwrap_or("exponential") {
            "exponential" => TimeShift::Exponential,
            "linear" => TimeShift::Linear,
            other => return Err(unsupported("time_shift_type", other)),
        };
        if steps == 0 {
            return Err(WorkerError::invalid(
                "num_inference_steps",
                "must be at least 1",
            ));
        }
        let train = config.train_timesteps()? as f32;
        let mut sigmas = pipeline_sigmas(steps);
        if config.use_dynamic_shifting == Some(true) {
            let mu = calculate_shift(config, context)?;
            shift_dynamic(&mut sigmas, mu, time_shift);
        } else {
            shift_static(&mut sigmas, config.shift.unwrap_or(1.0));
        }
        // diffusers treats 0 (like null) as "off".
        if let Some(terminal) = config.shift_terminal.filter(|t| *t != 0.0) {
            stretch_to_terminal(&mut sigmas, terminal)?;
        }
        let timesteps = sigmas.iter().map(|&s| f64::from(s * train)).collect();
        sigmas.push(0.0);
        Ok(Self { timesteps, sigmas })
    }

    /// The noise level of loop step `step_index`.
    fn sigma(&self, step_index: usize) -> candle_core::Result<f32> {
        if step_index >= self.timesteps.len() {
            return Err(index_error(step_index, self.timesteps.len()));
        }
        Ok(self.sigmas[step_index])
    }
}

/// `np.linspace(1.0, 1 / steps, steps)` in float64 (numpy: `start + i · step`, the end point set
/// exactly), then cast to float32 as `set_timesteps` does.
fn pipeline_sigmas(steps: usize) -> Vec<f32> {
    let end = 1.0 / steps as f64;
    if steps == 1 {
        return vec![1.0];
    }
    let step = (end - 1.0) / (steps - 1) as f64;
    (0..steps)
        .map(|i| {
            if i == steps - 1 {
                end as f32
            } else {
                (i as f64 * step + 1.0) as f32
            }
        })
        .collect()
}

/// FluxPipeline's `calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len,
/// base_shift, max_shift)`, in Python floats (float64), with the config's values or the pipeline's
/// defaults (256, 4096, 0.5, 1.15).
fn calculate_shift(
    config: &SchedulerConfig,
    context: &ScheduleContext,
) -> Result<f64, WorkerError> {
    let seq = context.image_seq_len.ok_or_else(|| {
        WorkerError::Internal(
            "use_dynamic_shifting needs the packed image sequence length to compute mu".into(),
        )
    })?;
    let base_seq = config.base_image_seq_len.unwrap_or(256);
    let max_seq = config.max_image_seq_len.unwrap_or(4096);
    if max_seq == base_seq {
        return Err(WorkerError::config(
            "scheduler_config.max_image_seq_len",
            "must differ from base_image_seq_len",
        ));
    }
    let base_shift = config.base_shift.unwrap_or(0.5);
    let max_shift = config.max_shift.unwrap_or(1.15);
    let m = (max_shift - base_shift) / (max_seq as f64 - base_seq as f64);
    let b = base_shift - m * base_seq as f64;
    Ok(seq as f64 * m + b)
}

/// `time_shift(mu, 1.0, sigmas)`: `mu` (and `exp(mu)`) rounded to float32 first, everything else
/// float32.
fn shift_dynamic(sigmas: &mut [f32], mu: f64, kind: TimeShift) {
    let scale = match kind {
        TimeShift::Exponential => mu.exp() as f32,
        TimeShift::Linear => mu as f32,
    };
    for s in sigmas {
        // `(1 / t - 1) ** 1.0` is the value itself.
        *s = scale / (scale + (1.0 / *s - 1.0));
    }
}

/// `shift * s / (1 + (shift - 1) * s)`; `shift - 1` is a Python subtraction, then float32.
fn shift_static(sigmas: &mut [f32], shift: f64) {
    let (shift32, minus_one) = (shift as f32, (shift - 1.0) as f32);
    for s in sigmas {
        *s = shift32 * *s / (1.0 + minus_one * *s);
    }
}

/// `stretch_shift_to_terminal`: rescales `1 - s` so that the last sigma becomes `terminal`.
fn stretch_to_terminal(sigmas: &mut [f32], terminal: f64) -> Result<(), WorkerError> {
    let last = sigmas.last().copied().unwrap_or(1.0);
    let scale = (1.0 - last) / (1.0 - terminal) as f32;
    // With one step the only sigma is 1: diffusers divides by zero and returns NaN sigmas.
    if scale == 0.0 || !scale.is_finite() {
        return Err(WorkerError::invalid(
            "num_inference_steps",
            "the model's shift_terminal schedule needs at least 2 steps",
        ));
    }
    for s in sigmas {
        *s = 1.0 - (1.0 - *s) / scale;
    }
    Ok(())
}

impl Scheduler for FlowMatchEuler {
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
        let sigma = self.sigma(step_index)?;
        let dt = self.sigmas[step_index + 1] - sigma;
        // torch: a 0-dim float32 `dt` times the output keeps the output's dtype; the sum is float32
        // (the sample is upcast) and the result takes the output's dtype again.
        let delta = model_output.affine(f64::from(dt), 0.0)?;
        (f32_of(sample)? + f32_of(&delta)?)?.to_dtype(model_output.dtype())
    }

    /// `scale_noise`: `sigma · noise + (1 - sigma) · original` at the sigma of `step_index`.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let sigma = self.sigma(step_index)?;
        noise.affine(f64::from(sigma), 0.0)? + original.affine(f64::from(1.0 - sigma), 0.0)?
    }
}

#[cfg(test)]
mod tests {
    //! Against `tests/fixtures/schedulers/flow_match.json` (make_flux_fixtures.py): every config ×
    //! step count × sequence length must give diffusers' sigmas and timesteps bit for bit.

    use candle_core::{Device, Tensor};
    use serde::Deserialize;

    use super::super::{ScheduleContext, SchedulerKind};
    use super::*;

    #[derive(Deserialize)]
    struct Refs {
        shape: Vec<usize>,
        sample0: Vec<f32>,
        original: Vec<f32>,
        noise: Vec<f32>,
        configs: std::collections::BTreeMap<String, ConfigRefs>,
    }

    #[derive(Deserialize)]
    struct ConfigRefs {
        config: serde_json::Value,
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        steps: usize,
        image_seq_len: usize,
        error: Option<String>,
        #[serde(default)]
        timesteps: Vec<f64>,
        #[serde(default)]
        sigmas: Vec<f64>,
        outputs: Option<Vec<Vec<f32>>>,
        scale_noise: Option<std::collections::BTreeMap<String, Vec<f32>>>,
    }

    fn refs() -> Refs {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/schedulers/flow_match.json"
        );
        let text = std::fs::read_to_string(path).expect("flow-match reference data is committed");
        serde_json::from_str(&text).expect("reference data parses")
    }

    fn tensor(values: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(values.to_vec(), shape, &Device::Cpu).expect("shape matches")
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("f32 tensor")
    }

    /// Within one float32 rounding of the largest magnitude involved (torch may fuse a multiply-add
    /// where we round twice).
    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 2.0 * f32::EPSILON * scale,
                "{what}[{i}]: got {g}, diffusers {w}"
            );
        }
    }

    #[test]
    fn schedules_match_diffusers_bit_for_bit() {
        let refs = refs();
        let mut checked = 0;
        for (name, data) in &refs.configs {
            let config =
                SchedulerConfig::from_json(&data.config.to_string()).expect("config parses");
            assert_eq!(
                SchedulerKind::from_config(&config),
                Some(SchedulerKind::FlowMatchEuler)
            );
            for case in &data.cases {
                let what = format!("{name}/{} steps/seq {}", case.steps, case.image_seq_len);
                let context = ScheduleContext {
                    image_seq_len: Some(case.image_seq_len),
                };
                let built = SchedulerKind::FlowMatchEuler.build_with(&config, case.steps, &context);
                if case.error.is_some() {
                    assert!(
                        built.is_err(),
                        "{what}: diffusers gives NaN, must be refused"
                    );
                    continue;
                }
                let mut scheduler = built.expect("builds");
                // The reference values are float32 numbers; serde_json's float parsing can be one
                // float64 ulp off, which vanishes when rounding to float32.
                let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                assert_eq!(
                    f32s(scheduler.timesteps()),
                    f32s(&case.timesteps),
                    "{what}: timesteps"
                );
                assert_eq!(scheduler.init_noise_sigma(), 1.0);
                let direct = FlowMatchEuler::new(&config, case.steps, &context).expect("builds");
                assert_eq!(direct.sigmas, f32s(&case.sigmas), "{what}: sigmas");
                if let Some(outputs) = &case.outputs {
                    let mut x = tensor(&refs.sample0, &refs.shape);
                    for (i, want) in outputs.iter().enumerate() {
                        let factor = (0.01 * (i + 1) as f64) as f32;
                        let bias: Vec<f32> = (0..x.elem_count())
                            .map(|k| (k as f32 - 8.0) * factor)
                            .collect();
                        let output = (x.affine(0.5, 0.0).expect("affine")
                            + tensor(&bias, &refs.shape))
                        .expect("add");
                        x = scheduler
                            .step(&output, i, &x, &mut TorchRng::new(0))
                            .expect("step");
                        assert_close(&values(&x), want, &format!("{what}: step {i}"));
                    }
                }
                for (index, want) in case.scale_noise.iter().flatten() {
                    let index: usize = index.parse().expect("index");
                    let got = scheduler
                        .add_noise(
                            &tensor(&refs.original, &refs.shape),
                            &tensor(&refs.noise, &refs.shape),
                            index,
                        )
                        .expect("scale_noise");
                    assert_close(&values(&got), want, &format!("{what}: scale_noise {index}"));
                }
                checked += 1;
            }
        }
        // 5 configs × 6 step counts × 6 sequence lengths, less shift_terminal's 6 one-step cases.
        assert_eq!(checked, 174);
    }

    #[test]
    fn schnell_four_steps_are_quarters() {
        let config = SchedulerConfig {
            class_name: Some(CLASS_NAME.into()),
            shift: Some(1.0),
            ..Default::default()
        };
        let s = SchedulerKind::FlowMatchEuler
            .build(&config, 4)
            .expect("builds");
        assert_eq!(s.timesteps(), &[1000.0, 750.0, 500.0, 250.0]);
    }

    #[test]
    fn refuses_what_it_does_not_implement_by_name() {
        let flow = |edit: fn(&mut SchedulerConfig)| {
            let mut config = SchedulerConfig {
                class_name: Some(CLASS_NAME.into()),
                ..Default::default()
            };
            edit(&mut config);
            let context = ScheduleContext {
                image_seq_len: None,
            };
            SchedulerKind::FlowMatchEuler
                .build_with(&config, 4, &context)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(flow(|c| c.use_karras_sigmas = Some(true)).contains("use_karras_sigmas"));
        assert!(flow(|c| c.use_beta_sigmas = Some(true)).contains("use_beta_sigmas"));
        assert!(flow(|c| c.use_exponential_sigmas = Some(true)).contains("use_exponential_sigmas"));
        assert!(flow(|c| c.invert_sigmas = Some(true)).contains("invert_sigmas"));
        assert!(flow(|c| c.stochastic_sampling = Some(true)).contains("stochastic_sampling"));
        assert!(flow(|c| c.use_flow_sigmas = Some(true)).contains("use_flow_sigmas"));
        assert!(flow(|c| c.time_shift_type = Some("cosine".into())).contains("time_shift_type"));
        // Dynamic shifting without the sequence length is the caller's bug, said as such.
        assert!(flow(|c| c.use_dynamic_shifting = Some(true)).contains("sequence length"));
        assert!(flow(|_| ()).is_empty());
    }

    #[test]
    fn step_and_scale_noise_check_the_index_and_keep_the_dtype() {
        let config = SchedulerConfig::default();
        let mut s = SchedulerKind::FlowMatchEuler
            .build(&config, 2)
            .expect("builds");
        let x = tensor(&[0.5; 4], &[1, 4])
            .to_dtype(candle_core::DType::BF16)
            .expect("bf16");
        let out = s.step(&x, 1, &x, &mut TorchRng::new(0)).expect("step");
        assert_eq!(out.dtype(), candle_core::DType::BF16);
        assert!(s.step(&x, 2, &x, &mut TorchRng::new(0)).is_err());
        assert!(s.add_noise(&x, &x, 2).is_err());
        assert!(SchedulerKind::FlowMatchEuler.build(&config, 0).is_err());
    }
}
