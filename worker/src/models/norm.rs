//! GroupNorm, optionally fused with the SiLU that follows it in every resnet block.
//!
//! candle's `GroupNorm` is about ten tensor ops (sums, broadcasts, a sqrt, a divide...), each a
//! fresh allocation and a pass over memory, and its SiLU another two with a scalar `exp`: on the
//! CPU the pair took 11× torch's time (../shared/PERF-NOTES.md §2). On the CPU in float32 this
//! module does it in one custom op over `fastfusion_kernels::group_norm`: per (image, group) a
//! vectorisable sum and sum of squared deviations (float64 lanes), then one pass writing
//! `x·scale + shift` per channel, with SiLU through a polynomial `exp` that vectorises. Other
//! devices and dtypes take candle's ops (the
//! GPU has its own fast elementwise kernels; a fused CUDA kernel is issue 13's GPU work).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use fastfusion_kernels::GroupNormSpec;

/// A GroupNorm layer (diffusers' `nn.GroupNorm` with affine weights).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    /// candle's layer, for devices and dtypes the fused op does not take.
    candle: candle_nn::GroupNorm,
    groups: usize,
    channels: usize,
    eps: f64,
    /// The affine parameters on the host, for the fused CPU op (present when the weights are
    /// float32 on the CPU).
    host: Option<Arc<(Vec<f32>, Vec<f32>)>>,
}

/// Loads `weight` and `bias` of a GroupNorm over `channels` in `groups`.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get(channels, "weight")?;
    let bias = vb.get(channels, "bias")?;
    GroupNorm::new(weight, bias, groups, eps)
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dims1()?;
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        let host = if weight.device().is_cpu() && weight.dtype() == DType::F32 {
            Some(Arc::new((weight.to_vec1()?, bias.to_vec1()?)))
        } else {
            None
        };
        Ok(Self {
            candle: candle_nn::GroupNorm::new(weight, bias, channels, groups, eps)?,
            groups,
            channels,
            eps,
            host,
        })
    }

    /// `silu(norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 3 || dims[1] != self.channels {
            candle_core::bail!(
                "GroupNorm over {} channels got an input of shape {dims:?}",
                self.channels
            );
        }
        match &self.host {
            Some(host) if x.device().is_cpu() && x.dtype() == DType::F32 => {
                let op = FusedGroupNorm {
                    host: host.clone(),
                    groups: self.groups,
                    eps: self.eps,
                    silu,
                };
                // A view (e.g. transposed) is copied once; activations are contiguous already.
                x.contiguous()?.apply_op1_no_bwd(&op)
            }
            _ => {
                let y = self.candle.forward(x)?;
                if silu {
                    candle_nn::ops::silu(&y)
                } else {
                    Ok(y)
                }
            }
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.run(x, false)
    }
}

struct FusedGroupNorm {
    host: Arc<(Vec<f32>, Vec<f32>)>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("fused GroupNorm takes float32");
        };
        let dims = layout.dims();
        let channels = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused GroupNorm takes a contiguous input");
        };
        let xs = &data[start..end];
        let mut out = vec![0f32; xs.len()];
        let spec = GroupNormSpec {
            channels,
            groups: self.groups,
            spatial,
            eps: self.eps,
            gamma: &self.host.0,
            beta: &self.host.1,
            silu: self.silu,
        };
        fastfusion_kernels::group_norm(xs, &mut out, &spec);
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn random(shape: &[usize], seed: u64) -> Result<Tensor> {
        // A spread of magnitudes and an offset, as activations have.
        let n: usize = shape.iter().product();
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0 + 0.7
            })
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar()
    }

    #[test]
    fn fused_equals_candles_group_norm_and_silu() -> Result<()> {
        for (shape, groups) in [
            (vec![2, 64, 8, 8], 32),
            (vec![1, 32, 5, 7], 8),
            (vec![3, 12, 3], 3),
            (vec![1, 16, 1, 1], 16),
        ] {
            let channels = shape[1];
            let weight = random(&[channels], 1)?;
            let bias = random(&[channels], 2)?;
            let x = random(&shape, 3)?;
            let fused = GroupNorm::new(weight.clone(), bias.clone(), groups, 1e-5)?;
            assert!(fused.host.is_some());
            let candle = candle_nn::GroupNorm::new(weight, bias, channels, groups, 1e-5)?;
            let want = candle.forward(&x)?;
            let diff = max_abs_diff(&fused.forward(&x)?, &want)?;
            assert!(diff < 1e-5, "{shape:?}: norm differs by {diff}");
            let want = candle_nn::ops::silu(&want)?;
            let diff = max_abs_diff(&fused.forward_silu(&x)?, &want)?;
            assert!(diff < 1e-5, "{shape:?}: norm + silu differs by {diff}");
            // A transposed (non-contiguous) view gives what its contiguous copy gives.
            if shape.len() == 4 && shape[2] == shape[3] {
                let t = x.transpose(2, 3)?;
                let diff = max_abs_diff(&fused.forward(&t)?, &fused.forward(&t.contiguous()?)?)?;
                assert_eq!(diff, 0.0);
            }
        }
        Ok(())
    }

    #[test]
    fn other_dtypes_take_candles_ops() -> Result<()> {
        let weight = random(&[8], 1)?;
        let bias = random(&[8], 2)?;
        let x = random(&[1, 8, 4, 4], 3)?;
        let norm = GroupNorm::new(weight.clone(), bias.clone(), 4, 1e-6)?;
        let f16 = |t: &Tensor| t.to_dtype(DType::F16);
        let norm16 = GroupNorm::new(f16(&weight)?, f16(&bias)?, 4, 1e-6)?;
        assert!(norm16.host.is_none());
        let half = norm16.forward_silu(&f16(&x)?)?;
        assert_eq!(half.dtype(), DType::F16);
        let diff = max_abs_diff(&half.to_dtype(DType::F32)?, &norm.forward_silu(&x)?)?;
        assert!(diff < 1e-2, "f16 differs by {diff}");
        Ok(())
    }

    #[test]
    fn a_bad_shape_is_an_error_not_a_panic() -> Result<()> {
        let norm = GroupNorm::new(random(&[8], 1)?, random(&[8], 2)?, 4, 1e-6)?;
        assert!(norm.forward(&random(&[1, 6, 4, 4], 3)?).is_err());
        assert!(norm.forward(&random(&[8, 4], 3)?).is_err());
        assert!(GroupNorm::new(random(&[8], 1)?, random(&[8], 2)?, 3, 1e-6).is_err());
        Ok(())
    }
}
