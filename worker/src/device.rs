//! Device and precision selection: `pipeline.torch_device` and `torch_dtype_*` → candle.
//!
//! [`select_device`] opens the configured device. CUDA and Metal exist only in builds with the
//! cargo feature of that name (`cargo build --release --features cuda`, or `metal` on macOS);
//! asking for one in a build without it is a config error on `pipeline.torch_device` that says
//! which feature to build with, rather than a silent fall back to a CPU that would be hundreds of
//! times slower.
//!
//! [`select_dtype`] picks the precision tensors run in. The requested precision is probed with a
//! small matmul and convolution on the device; one the device cannot run falls back to float32
//! with a warning instead of failing:
//! - CPU: candle's CPU matmul has no bfloat16 kernel at all, so bfloat16 falls back. float16 runs
//!   as asked (it halves weight memory) but gains no speed: measured on this project's 2-core
//!   x86-64 machines (candle 0.11), a 1024³ matmul takes as long as in float32, a 320-channel 3×3
//!   conv2d at 64×64 1.4× as long and element-wise ops (exp, softmax) 9× as long — the log says so.
//! - CUDA and Metal: float16 always works; bfloat16 needs hardware support (CUDA compute
//!   capability 8.0+, recent Apple GPUs).

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
    match probe(wanted, device) {
        Ok(()) => {
            if device.is_cpu() {
                tracing::info!(
                    requested = %spec,
                    "half precision on the CPU saves memory but runs slower than float32"
                );
            }
            wanted
        }
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
    fn cpu_runs_float32_and_float16_and_falls_back_from_bfloat16() {
        assert_eq!(select_dtype(DTypeSpec::F32, &Device::Cpu), DType::F32);
        assert_eq!(select_dtype(DTypeSpec::F16, &Device::Cpu), DType::F16);
        assert_eq!(select_dtype(DTypeSpec::Bf16, &Device::Cpu), DType::F32);
    }

    #[test]
    fn probe_tells_what_the_cpu_can_run() {
        assert!(probe(DType::F32, &Device::Cpu).is_ok());
        assert!(probe(DType::F16, &Device::Cpu).is_ok());
        // candle's CPU matmul has no bfloat16 kernel: the probe must catch that.
        assert!(probe(DType::BF16, &Device::Cpu).is_err());
    }
}
