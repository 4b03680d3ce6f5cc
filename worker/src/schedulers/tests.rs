//! Parity with diffusers: every scheduler kind against the reference data that
//! `tests/fixtures/scheduler_refs.py` dumps from diffusers for several repo configs and step counts
//! (timesteps, init_noise_sigma, a trajectory driven by a fake model, add_noise).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use super::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::rng::TorchRng;

/// One `tests/fixtures/schedulers/<config>.json`.
#[derive(Deserialize)]
struct Refs {
    config: serde_json::Value,
    shape: Vec<usize>,
    sample0: Vec<f32>,
    original: Vec<f32>,
    noise: Vec<f32>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    steps: usize,
    /// Set when diffusers cannot build this schedule; the worker must refuse it too.
    error: Option<String>,
    #[serde(default)]
    timesteps: Vec<f64>,
    #[serde(default)]
    init_noise_sigma: f64,
    #[serde(default)]
    scaled_sums: Vec<f64>,
    /// Every step's output (short runs).
    outputs: Option<Vec<Vec<f32>>>,
    /// Every step's output sum and the final sample (long runs).
    output_sums: Option<Vec<f64>>,
    #[serde(rename = "final")]
    final_sample: Option<Vec<f32>>,
    /// add_noise output by step index.
    add_noise: Option<BTreeMap<String, Vec<f32>>>,
}

const CONFIGS: [&str; 7] = [
    "sd15",
    "sd21",
    "sd_turbo",
    "options",
    "cosine",
    "euler_karras",
    "euler_log_linear",
];

fn load(name: &str) -> Refs {
    let path = format!(
        "{}/../tests/fixtures/schedulers/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).expect("scheduler reference data is committed");
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

/// Largest magnitude in a tensor's values.
fn max_abs(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Element-wise closeness: 1e-5 of the reference tensor's largest magnitude, plus one float32 ulp of
/// the largest input magnitude `input_scale`. The second term matters when a step cancels a large
/// sample down to a small one (zero-terminal-SNR starts at sigma 4096): there float32 rounding in
/// diffusers itself is of that size, and torch's float32 sqrt is not always correctly rounded.
fn assert_close(got: &[f32], want: &[f32], input_scale: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let tolerance = 1e-5 * max_abs(want).max(1e-6) + input_scale * f32::EPSILON;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tolerance,
            "{what}[{i}]: got {g}, diffusers {w}"
        );
    }
}

fn assert_close_scalar(got: f64, want: f64, tolerance: f64, what: &str) {
    assert!(
        (got - want).abs() <= tolerance * want.abs().max(1.0),
        "{what}: got {got}, diffusers {want}"
    );
}

/// The fake UNet of scheduler_refs.py: `0.5 * scaled + (k - 8) * 0.01 * (i + 1)`, in float32.
fn fake_model(scaled: &Tensor, i: usize) -> Tensor {
    let factor = (0.01 * (i + 1) as f64) as f32;
    let bias: Vec<f32> = (0..scaled.elem_count())
        .map(|k| (k as f32 - 8.0) * factor)
        .collect();
    let bias = tensor(&bias, scaled.dims());
    (scaled.affine(0.5, 0.0).expect("affine") + bias).expect("add")
}

fn check_case(config: &SchedulerConfig, refs: &Refs, case: &Case, name: &str) {
    let kind = SchedulerKind::from_name(&case.kind).expect("known kind");
    let what = format!("{name}/{}/{} steps", case.kind, case.steps);
    if case.error.is_some() {
        assert!(kind.build(config, case.steps).is_err(), "{what}: must fail");
        return;
    }
    let mut scheduler: Box<dyn Scheduler> = kind.build(config, case.steps).expect("builds");
    // Integer timesteps must match exactly; fractional ones (Karras sigmas mapped back to time through
    // numpy's float32 log, which is not always correctly rounded) to 2e-3.
    assert_eq!(
        scheduler.timesteps().len(),
        case.timesteps.len(),
        "{what}: timesteps"
    );
    for (got, want) in scheduler.timesteps().iter().zip(&case.timesteps) {
        assert!(
            (got - want).abs() <= 2e-3,
            "{what}: timestep {got}, diffusers {want}"
        );
    }
    assert_close_scalar(
        scheduler.init_noise_sigma(),
        case.init_noise_sigma,
        1e-6,
        &format!("{what}: init_noise_sigma"),
    );

    let mut rng = TorchRng::new(0);
    let sigma = scheduler.init_noise_sigma() as f32;
    let mut sample = tensor(&refs.sample0, &refs.shape)
        .affine(f64::from(sigma), 0.0)
        .expect("affine");
    let mut largest_input = 0f32;
    for i in 0..scheduler.timesteps().len() {
        // Errors carry over from earlier steps: tolerances scale with the largest sample so far.
        largest_input = largest_input.max(max_abs(&values(&sample)));
        let scaled = scheduler.scale_model_input(&sample, i).expect("scale");
        let sum: f32 = values(&scaled).iter().sum();
        assert!(
            (f64::from(sum) - case.scaled_sums[i]).abs()
                <= 1e-5 * case.scaled_sums[i].abs().max(1.0)
                    + 16.0 * f64::from(largest_input * f32::EPSILON),
            "{what}: scaled sum {i}: got {sum}, diffusers {}",
            case.scaled_sums[i]
        );
        let output = fake_model(&scaled, i);
        sample = scheduler.step(&output, i, &sample, &mut rng).expect("step");
        let got = values(&sample);
        if let Some(outputs) = &case.outputs {
            assert_close(
                &got,
                &outputs[i],
                largest_input,
                &format!("{what}: step {i}"),
            );
        }
        if let Some(sums) = &case.output_sums {
            let sum: f32 = got.iter().sum();
            let tolerance = 16.0 * (1e-5 * max_abs(&got) + largest_input * f32::EPSILON);
            assert!(
                (f64::from(sum) - sums[i]).abs() <= f64::from(tolerance),
                "{what}: output sum {i}: got {sum}, diffusers {}",
                sums[i]
            );
        }
    }
    if let Some(final_sample) = &case.final_sample {
        assert_close(
            &values(&sample),
            final_sample,
            largest_input,
            &format!("{what}: final"),
        );
    }
    let original = tensor(&refs.original, &refs.shape);
    let noise = tensor(&refs.noise, &refs.shape);
    for (index, want) in case.add_noise.iter().flatten() {
        let index: usize = index.parse().expect("index key");
        let got = scheduler
            .add_noise(&original, &noise, index)
            .expect("add_noise");
        assert_close(
            &values(&got),
            want,
            0.0,
            &format!("{what}: add_noise {index}"),
        );
    }
}

#[test]
fn schedulers_match_diffusers() {
    let mut checked = 0;
    for name in CONFIGS {
        let refs = load(name);
        let config = SchedulerConfig::from_json(&refs.config.to_string()).expect("config parses");
        for case in &refs.cases {
            check_case(&config, &refs, case, name);
            checked += 1;
        }
    }
    // 5 configs × 6 kinds × 4 step counts, and 2 Euler-only configs × 4 step counts.
    assert_eq!(checked, 128);
}

#[test]
fn kinds_round_trip_names_and_configs() {
    for kind in SchedulerKind::ALL {
        assert_eq!(SchedulerKind::from_name(kind.name()), Some(kind));
    }
    assert_eq!(SchedulerKind::from_name("lms"), None);
    let named = |class: &str| SchedulerConfig {
        class_name: Some(class.into()),
        ..Default::default()
    };
    assert_eq!(
        SchedulerKind::from_config(&named("PNDMScheduler")),
        Some(SchedulerKind::Pndm)
    );
    assert_eq!(
        SchedulerKind::from_config(&named("EulerDiscreteScheduler")),
        Some(SchedulerKind::Euler)
    );
    let karras = SchedulerConfig {
        use_karras_sigmas: Some(true),
        ..named("DPMSolverMultistepScheduler")
    };
    assert_eq!(
        SchedulerKind::from_config(&karras),
        Some(SchedulerKind::DpmPp2mKarras)
    );
    let sde = SchedulerConfig {
        algorithm_type: Some("sde-dpmsolver++".into()),
        ..named("DPMSolverMultistepScheduler")
    };
    assert_eq!(SchedulerKind::from_config(&sde), None);
    assert_eq!(
        SchedulerKind::from_config(&named("LMSDiscreteScheduler")),
        None
    );
    assert_eq!(
        SchedulerKind::from_config(&named("FlowMatchEulerDiscreteScheduler")),
        Some(SchedulerKind::FlowMatchEuler)
    );
}

#[test]
fn families_do_not_mix() {
    let flow = SchedulerConfig {
        class_name: Some("FlowMatchEulerDiscreteScheduler".into()),
        ..Default::default()
    };
    let discrete = SchedulerConfig {
        class_name: Some("PNDMScheduler".into()),
        ..Default::default()
    };
    for kind in SchedulerKind::ALL {
        let (own, other) = if kind.is_flow_matching() {
            (&flow, &discrete)
        } else {
            (&discrete, &flow)
        };
        assert!(kind.build(own, 4).is_ok(), "{}", kind.name());
        match kind.build(other, 4) {
            Err(crate::error::WorkerError::InvalidArgument { param, .. }) => {
                assert_eq!(param, "scheduler", "{}", kind.name())
            }
            Err(e) => panic!("{}: {e}", kind.name()),
            Ok(_) => panic!("{} built for the other family", kind.name()),
        }
    }
}

#[test]
fn invalid_step_counts_and_indices_are_errors() {
    let config = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        assert!(
            kind.build(&config, 0).is_err(),
            "{} with 0 steps",
            kind.name()
        );
        // Discrete schedules cannot have more steps than training timesteps; flow matching can.
        assert!(
            kind.is_flow_matching() || kind.build(&config, 1001).is_err(),
            "{} with 1001 steps",
            kind.name()
        );
        let mut s = kind.build(&config, 4).expect("builds");
        let x = tensor(&[0.5; 16], &[1, 4, 2, 2]);
        let past = s.timesteps().len();
        assert!(s.step(&x, past, &x, &mut TorchRng::new(0)).is_err());
        assert!(s.add_noise(&x, &x, past).is_err());
    }
    // Trailing spacing overshoots for 61 steps (a timestep of -1): refused, not wrapped around.
    let trailing = SchedulerConfig {
        timestep_spacing: Some("trailing".into()),
        ..Default::default()
    };
    assert!(SchedulerKind::Ddim.build(&trailing, 61).is_err());
    assert!(SchedulerKind::Ddim.build(&trailing, 60).is_ok());
}

#[test]
fn step_keeps_the_latents_dtype() {
    let config = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let mut s = kind.build(&config, 4).expect("builds");
        let x = tensor(&[0.25; 16], &[1, 4, 2, 2])
            .to_dtype(candle_core::DType::F16)
            .expect("f16");
        let out = s.step(&x, 0, &x, &mut TorchRng::new(0)).expect("step");
        assert_eq!(out.dtype(), candle_core::DType::F16, "{}", kind.name());
    }
}
