//! GEGLU's gate (diffusers' `GEGLU`: `hidden, gate = proj(x).chunk(2, -1)`, `hidden · gelu(gate)`
//! with the exact erf GELU) on the projection's output: on the CPU in float32 one pass of
//! `fastfusion_kernels::geglu` (a vectorised erf), else candle's ops.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

/// `hidden · gelu_erf(gate)` of the two halves of `projected`'s last dimension.
pub fn geglu(projected: &Tensor) -> Result<Tensor> {
    let width = projected.dim(D::Minus1)?;
    if width % 2 != 0 {
        candle_core::bail!("GEGLU: the projection's width {width} is odd");
    }
    if projected.device().is_cpu() && projected.dtype() == DType::F32 {
        projected.contiguous()?.apply_op1_no_bwd(&Geglu)
    } else {
        let halves = projected.chunk(2, D::Minus1)?;
        &halves[0] * halves[1].gelu_erf()?
    }
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("GEGLU takes float32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("GEGLU takes a contiguous input");
        };
        let mut dims = layout.dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("GEGLU takes a tensor of rank ≥ 1");
        };
        *last /= 2;
        let inner = *last;
        let xs = &data[start..end];
        let mut out = vec![0f32; xs.len() / 2];
        fastfusion_kernels::geglu::geglu(xs, inner, &mut out);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn equals_candles_chunk_and_gelu_erf() -> Result<()> {
        let wider = Tensor::randn(0f32, 1.0, (2, 5, 2 * 24 + 3), &Device::Cpu)?;
        let projected = wider.narrow(D::Minus1, 0, 2 * 24)?.contiguous()?;
        let halves = projected.chunk(2, D::Minus1)?;
        let want = (&halves[0] * halves[1].gelu_erf()?)?;
        // Also through a non-contiguous view (made contiguous first).
        for input in [projected, wider.narrow(D::Minus1, 0, 2 * 24)?] {
            let got = geglu(&input)?;
            assert_eq!(got.dims(), &[2, 5, 24]);
            let diff: f32 = (&got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            assert!(diff < 1e-5, "differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn an_odd_width_is_an_error() -> Result<()> {
        let projected = Tensor::zeros((3, 7), DType::F32, &Device::Cpu)?;
        let err = geglu(&projected).err().map(|e| e.to_string());
        assert!(err.as_ref().is_some_and(|e| e.contains("odd")), "{err:?}");
        Ok(())
    }
}
