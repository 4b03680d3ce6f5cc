//! Device and precision selection: `pipeline.torch_device` and `torch_dtype_*` → candle.
//!
//! [`select_device`] opens the configured device. CUDA and Metal exist only in builds with the
//! cargo feature of that name (`cargo build --release --features cuda`, or `metal` on macOS);
//! asking for one in a build without it is a config error on `pipeline.torch_device` that says
//! which feature to build with, rather than a silent fall back to a CPU that would be hundreds of
//! times slower.
//!
//! [`select_dtype`] picks the precision tensors run in. A precision the device cannot run, or
//! runs far slower than float32, falls back to float32 with a warning instead of failing:
//! - CPU: candle's CPU matmul has no bfloat16 kernel at all, and float16 gains nothing: measured
//!   on this project's 2-core x86-64 machines (candle 0.11), a 1024³ matmul takes as long as in
//!   float32, a 320-channel 3×3 conv2d at 64×64 takes 1.4× as long and element-wise ops (exp,
//!   softmax) 9× as long, while precision drops. So both run as float32 — the numbers diffusers
//!   computes on a CPU in float32.
//! - CUDA and Metal: float16 always works; bfloat16 needs hardware support (CUDA compute
//!   capability 8.0+, recent Apple GPUs), so it is probed with a small matmul and convolution on
//!   the device, and falls back to float32 when the probe fails.

use candle_core::{DType, Device, Tensor};

use crate::config::{DTypeSpec, DeviceSpec};
use crate::error::{Result, WorkerError};

/// The config key both functions report against.
const DEVICE_KEY: &str = "pipeline.torch_device";

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

/// The precision to run in on `device` for the configured `spec` (see the module doc).
pub fn select_dtype(spec: DTypeSpec, device: &Device) -> DType {
    let wanted = match spec {
        DTypeSpec::F32 => return DType::F32,
        DTypeSpec::F16 => DType::F16,
        DTypeSpec::Bf16 => DType::BF16,
    };
    if device.is_cpu() {
        tracing::warn!(
            requested = %spec,
            "the CPU runs half precision far slower than float32 (and bfloat16 not at all): using float32"
        );
        return DType::F32;
    }
    match probe(wanted, device) {
        Ok(()) => wanted,
        Err(e) => {
            tracing::warn!(requested = %spec, error = %e, "this device cannot run the requested precision: using float32");
            DType::F32
        }
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
    fn cpu_runs_everything_in_float32() {
        for spec in [DTypeSpec::F32, DTypeSpec::F16, DTypeSpec::Bf16] {
            assert_eq!(select_dtype(spec, &Device::Cpu), DType::F32, "{spec}");
        }
    }

    #[test]
    fn probe_tells_what_the_cpu_can_run() {
        assert!(probe(DType::F32, &Device::Cpu).is_ok());
        assert!(probe(DType::F16, &Device::Cpu).is_ok());
        // candle's CPU matmul has no bfloat16 kernel: the probe must catch that.
        assert!(probe(DType::BF16, &Device::Cpu).is_err());
    }
}
