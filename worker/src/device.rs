//! Device and precision selection: `pipeline.torch_device` and `torch_dtype_*` → candle.
//!
//! [`select_device`] opens the configured device. CUDA and Metal exist only in builds with the
//! cargo feature of that name (`cargo build --release --features cuda`, or `metal` on macOS);
//! asking for one in a build without it is a config error on `pipeline.torch_device` that says
//! which feature to build with, rather than a silent fall back to a CPU that would be hundreds of
//! times slower.
//!
//! [`select_precision`] picks the two precisions of the seed's config, as diffusers'
//! `from_pretrained(torch_dtype=init)` followed by `.to(run)` does: weights are converted to
//! `torch_dtype_init` as they are read, then to `torch_dtype_run` (default: the init dtype), which
//! the model runs in. So init float32 / run float16 gives the float16 model; init float16 / run
//! float32 runs in float32 on weights rounded to float16 (the log says so, naming the key). The
//! init dtype is only storage: every device converts to and from all three. The run precision is
//! probed with a small matmul and convolution on the device; one the device cannot run falls back
//! to float32 with a warning naming its key instead of failing:
//! - CPU: candle's CPU matmul has no bfloat16 kernel at all, so bfloat16 falls back. float16 runs
//!   as asked (it halves weight memory) but gains no speed: measured on this project's 2-core
//!   x86-64 machines (candle 0.11), a 1024³ matmul takes as long as in float32, a 320-channel 3×3
//!   conv2d at 64×64 1.4× as long and element-wise ops (exp, softmax) 9× as long — the log says so.
//! - CUDA and Metal: float16 always works; bfloat16 needs hardware support (CUDA compute
//!   capability 8.0+, recent Apple GPUs).

use candle_core::{DType, Device, Tensor};

use crate::config::{DTypeSpec, DeviceSpec};
use crate::error::{Result, WorkerError};

/// The config keys these functions report against.
const DEVICE_KEY: &str = "pipeline.torch_device";
const INIT_KEY: &str = "pipeline.torch_dtype_init";
const RUN_KEY: &str = "pipeline.torch_dtype_run";

/// Opens the device `spec` names, or explains why this build or machine cannot.
pub fn select_device(spec: DeviceSpec) -> Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(missing_feature(spec, "cuda"));
            }
            Device::new_cuda(ordinal)
                .map_err(|e| WorkerError::config(DEVICE_KEY, format!("cannot open {spec}: {e}")))
        }
        DeviceSpec::Metal(ordinal) => {
            if !candle_core::utils::metal_is_available() {
                return Err(missing_feature(spec, "metal"));
            }
            Device::new_metal(ordinal)
                .map_err(|e| WorkerError::config(DEVICE_KEY, format!("cannot open {spec}: {e}")))
        }
    }
}

fn missing_feature(spec: DeviceSpec, feature: &str) -> WorkerError {
    WorkerError::config(
        DEVICE_KEY,
        format!(
            "'{spec}' needs a worker built with the `{feature}` cargo feature \
             (cargo build --release --features {feature}); this build runs on cpu only: \
             set \"torch_device\": \"cpu\" to use it"
        ),
    )
}

/// The precisions a model is loaded with (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Weights are converted to this as they are read (`torch_dtype_init`).
    pub init: DType,
    /// Weights and activations of the model at run time (`torch_dtype_run`).
    pub run: DType,
}

/// The precisions for `init` and `run` (`None`: same as init) on `device`, and remarks for the
/// log, each starting with the config key it is about.
pub fn select_precision(
    init: DTypeSpec,
    run: Option<DTypeSpec>,
    device: &Device,
) -> (Precision, Vec<String>) {
    let mut notes = Vec::new();
    // An absent run dtype inherits the init one, so a fall-back is that key's doing.
    let (run_key, run) = match run {
        Some(run) => (RUN_KEY, run),
        None => (INIT_KEY, init),
    };
    let run_dtype = match probe(dtype_of(run), device) {
        Ok(()) => dtype_of(run),
        Err(e) => {
            notes.push(format!(
                "{run_key}: this device cannot run {run} ({e}): running in float32"
            ));
            DType::F32
        }
    };
    if device.is_cpu() && run_dtype != DType::F32 {
        notes.push(format!(
            "{run_key}: {run} on the CPU saves memory but runs slower than float32"
        ));
    }
    let init_dtype = dtype_of(init);
    // float32 holds float16 and bfloat16 values exactly; any other pair rounds on the way.
    if init_dtype != run_dtype && init_dtype != DType::F32 {
        notes.push(format!(
            "{INIT_KEY}: weights are rounded to {init} as they are read, then run in {}: \
             images match a {init} checkpoint, not a full-precision one",
            spec_name(run_dtype)
        ));
    }
    let precision = Precision {
        init: init_dtype,
        run: run_dtype,
    };
    (precision, notes)
}

fn dtype_of(spec: DTypeSpec) -> DType {
    match spec {
        DTypeSpec::F32 => DType::F32,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Bf16 => DType::BF16,
    }
}

/// torch's name of the dtypes [`dtype_of`] gives.
fn spec_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Whether `device` runs matmuls and convolutions in `dtype` (CPU: not bfloat16).
pub fn supports(dtype: DType, device: &Device) -> bool {
    probe(dtype, device).is_ok()
}

/// The dtype for a part that overflows in float16 (T5, and the Redux prior run beside it) when
/// the model runs in `run`: bfloat16 where the device has it, else float32; other dtypes stay.
pub fn without_float16(run: DType, device: &Device) -> DType {
    match run {
        DType::F16 if supports(DType::BF16, device) => DType::BF16,
        DType::F16 => DType::F32,
        other => other,
    }
}

/// Runs the two operations a diffusion model is made of (matmul, conv2d) in `dtype` on `device`.
fn probe(dtype: DType, device: &Device) -> candle_core::Result<()> {
    let x = Tensor::ones((1, 4, 8, 8), dtype, device)?;
    let kernel = Tensor::ones((4, 4, 3, 3), dtype, device)?;
    let conv = x.conv2d(&kernel, 1, 1, 1, 1)?;
    let m = conv.reshape((32, 8))?;
    let product = m.matmul(&m.t()?)?;
    // Reading the result back forces asynchronous devices to actually run the kernels.
    product
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(())
}

#[cfg(test)]
// A failed setup step should fail the test: that is what unwrap does here.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn cpu_is_always_available() {
        assert!(select_device(DeviceSpec::Cpu).unwrap().is_cpu());
    }

    #[test]
    fn gpu_without_its_feature_names_the_feature() {
        // Tests run in the default (cpu-only) build.
        for (spec, feature) in [
            (DeviceSpec::Cuda(0), "--features cuda"),
            (DeviceSpec::Metal(1), "--features metal"),
        ] {
            match select_device(spec) {
                Err(WorkerError::Config { key, message }) => {
                    assert_eq!(key, DEVICE_KEY);
                    assert!(message.contains(feature), "{message}");
                    assert!(message.contains(&spec.to_string()), "{message}");
                }
                other => panic!("expected a config error for {spec}, got {other:?}"),
            }
        }
    }

    #[test]
    fn cpu_runs_float32_and_float16_and_falls_back_from_bfloat16() {
        let run = |spec| {
            select_precision(DTypeSpec::F32, Some(spec), &Device::Cpu)
                .0
                .run
        };
        assert_eq!(run(DTypeSpec::F32), DType::F32);
        assert_eq!(run(DTypeSpec::F16), DType::F16);
        assert_eq!(run(DTypeSpec::Bf16), DType::F32);
    }

    #[test]
    fn init_is_storage_only_and_run_defaults_to_it() {
        let (p, notes) = select_precision(DTypeSpec::F32, None, &Device::Cpu);
        assert_eq!((p.init, p.run), (DType::F32, DType::F32));
        assert!(notes.is_empty(), "{notes:?}");
        // bfloat16 cannot run on the CPU but can be stored: init keeps it, run falls back.
        let (p, _) = select_precision(DTypeSpec::Bf16, Some(DTypeSpec::F32), &Device::Cpu);
        assert_eq!((p.init, p.run), (DType::BF16, DType::F32));
        let (p, _) = select_precision(DTypeSpec::F16, None, &Device::Cpu);
        assert_eq!((p.init, p.run), (DType::F16, DType::F16));
    }

    #[test]
    fn notes_name_the_key_responsible() {
        // A fall-back is blamed on torch_dtype_run when given, else on torch_dtype_init.
        let (_, notes) = select_precision(DTypeSpec::F32, Some(DTypeSpec::Bf16), &Device::Cpu);
        assert!(
            notes[0].starts_with("pipeline.torch_dtype_run: "),
            "{notes:?}"
        );
        assert!(notes[0].contains("bfloat16"), "{notes:?}");
        let (_, notes) = select_precision(DTypeSpec::Bf16, None, &Device::Cpu);
        assert!(
            notes[0].starts_with("pipeline.torch_dtype_init: "),
            "{notes:?}"
        );
        // Rounding to a narrower init dtype before running wider is worth a remark.
        let (_, notes) = select_precision(DTypeSpec::F16, Some(DTypeSpec::F32), &Device::Cpu);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with("pipeline.torch_dtype_init: weights are rounded to float16"),
            "{notes:?}"
        );
        // Half precision on the CPU runs, with a remark on speed.
        let (_, notes) = select_precision(DTypeSpec::F32, Some(DTypeSpec::F16), &Device::Cpu);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].starts_with("pipeline.torch_dtype_run: float16 on the CPU"));
    }

    #[test]
    fn probe_tells_what_the_cpu_can_run() {
        assert!(probe(DType::F32, &Device::Cpu).is_ok());
        assert!(probe(DType::F16, &Device::Cpu).is_ok());
        // candle's CPU matmul has no bfloat16 kernel: the probe must catch that.
        assert!(probe(DType::BF16, &Device::Cpu).is_err());
    }
}
