//! The small layers every FLUX block is made of: linear projections, affine-free layer norms and
//! the per-head RMS norms of queries and keys.
//!
//! Every `nn.Linear` of the transformer is built by [`linear`], a layer LoRA adapters reach with
//! diffusers' module names (see `crate::lora`).

use candle_core::{DType, Module, Tensor, D};
use candle_nn::VarBuilder;

pub use crate::lora::LoraLinear as Linear;

/// `nn.Linear(in_dim, out_dim)` with a bias, weights `{prefix}.weight` (out × in) and `{prefix}.bias`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    crate::lora::linear(in_dim, out_dim, vb)
}

/// `nn.LayerNorm(dim, elementwise_affine=False, eps)` over the last dimension, computed in float32
/// with the mean subtracted before the variance is taken (FLUX's residual stream reaches values in
/// the thousands, where `E[x²] - E[x]²` loses the variance to rounding).
pub fn layer_norm(xs: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = xs.dtype();
    let xs = xs.to_dtype(DType::F32)?;
    let centred = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)
}

/// `x · (1 + scale) + shift` with per-sample `scale`, `shift` of shape (B, D) over (B, N, D).
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    xs.broadcast_mul(&(scale.unsqueeze(1)? + 1.0)?)?
        .broadcast_add(&shift.unsqueeze(1)?)
}

/// `torch.nn.RMSNorm(head_dim, eps)` on the last dimension: normalised in float32, cast back, then
/// scaled by the learnt weight (the order torch uses for half-precision inputs).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = xs.dtype();
        let x32 = xs.to_dtype(DType::F32)?;
        let rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        x32.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)
    }
}

/// `chunk(n, dim=1)` of a (B, n·D) modulation vector.
pub fn chunks(xs: &Tensor, n: usize) -> candle_core::Result<Vec<Tensor>> {
    xs.chunk(n, 1)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn layer_norm_keeps_precision_for_large_offsets() -> candle_core::Result<()> {
        // Values around 3000 with unit spread: a one-pass variance in float32 would be mostly noise.
        let values: Vec<f32> = (0..64).map(|i| 3000.0 + (i % 8) as f32 - 3.5).collect();
        let xs = Tensor::from_vec(values, (1, 1, 64), &Device::Cpu)?;
        let out = layer_norm(&xs, 1e-6)?.flatten_all()?.to_vec1::<f32>()?;
        // (i % 8) - 3.5 has variance 5.25.
        let want = -3.5 / 5.25f32.sqrt();
        assert!((out[0] - want).abs() < 1e-5, "{} vs {want}", out[0]);
        Ok(())
    }
}
