//! Attention's `softmax(scale · scores)` over the last dimension.
//!
//! candle computes it as a scale pass, then a softmax with a scalar libm `exp` per element: at
//! 256² the top-level self-attention's scores are 16 M floats per block, and those two passes
//! took 2.5× the time of the `q·kᵀ` matmul itself (../shared/PERF-NOTES.md §2). On the CPU in
//! float32 this does both in place in one custom op over `fastfusion_kernels::softmax_rows`
//! (three passes per row, vectorised `exp`); other devices and dtypes take candle's ops.

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};

/// `softmax(scale · scores)` over the last dimension. `scores` is consumed: on the CPU in
/// float32 its storage is overwritten, so it must be a fresh result (a matmul's) that no other
/// tensor, not even a reshaped clone, still reads.
pub(crate) fn scaled_softmax_last_dim(scores: Tensor, scale: f64) -> Result<Tensor> {
    if scores.device().is_cpu() && scores.dtype() == DType::F32 && scores.is_contiguous() {
        let row = scores.dims().last().copied().unwrap_or(1);
        scores.inplace_op1(&ScaledSoftmax {
            row,
            scale: scale as f32,
        })?;
        return Ok(scores);
    }
    candle_nn::ops::softmax_last_dim(&(scores * scale)?)
}

struct ScaledSoftmax {
    row: usize,
    scale: f32,
}

impl InplaceOp1 for ScaledSoftmax {
    fn name(&self) -> &'static str {
        "scaled-softmax"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("scaled softmax takes float32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("scaled softmax takes a contiguous input");
        };
        fastfusion_kernels::softmax_rows(&mut data[start..end], self.row, self.scale);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn equals_candles_scale_then_softmax() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, scale) in [
            ((2, 3, 5, 77), 0.158),
            ((1, 2, 4, 1024), 0.125),
            ((1, 1, 1, 3), 1.0),
        ] {
            let scores = (Tensor::randn(0f32, 4.0, shape, &dev)? + 2.0)?;
            let want = candle_nn::ops::softmax_last_dim(&(&scores * scale)?)?;
            let got = scaled_softmax_last_dim(scores.copy()?, scale)?;
            let diff = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{shape:?}: differs by {diff}");
            let sums = got.sum(3)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        }
        // A view that is not contiguous, and another dtype, take candle's path with the same result.
        let scores = Tensor::randn(0f32, 3.0, (2, 6, 6), &dev)?;
        let t = scores.t()?;
        let want = candle_nn::ops::softmax_last_dim(&(&t * 0.5)?)?;
        let diff = (scaled_softmax_last_dim(t, 0.5)? - &want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let half = scaled_softmax_last_dim(scores.to_dtype(DType::F64)?, 0.5)?;
        assert_eq!(half.dtype(), DType::F64);
        Ok(())
    }
}
