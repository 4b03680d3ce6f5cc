//! What FLUX's joint attention over text and image tokens adds to the shared
//! [`crate::models::attention`]: queries and keys get RoPE in float32 (diffusers'
//! `apply_rotary_emb`) before `softmax(q·kᵀ / sqrt(head_dim)) · v`, without a mask.

use candle_core::{DType, Tensor};

use crate::models::attention::attention;

/// The float32 rotary tables of every token, text tokens first: (tokens, head_dim / 2) each.
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Rotates (B, heads, tokens, head_dim) queries or keys: pairs `(x₀, x₁)` of each head become
/// `(x₀ cos − x₁ sin, x₀ sin + x₁ cos)`, computed in float32 and cast back.
pub fn apply_rope(xs: &Tensor, rope: &Rope) -> candle_core::Result<Tensor> {
    let dtype = xs.dtype();
    let x32 = xs.to_dtype(DType::F32)?.contiguous()?;
    candle_nn::rotary_emb::rope_i(&x32, &rope.cos, &rope.sin)?.to_dtype(dtype)
}

/// `softmax(q·kᵀ / sqrt(head_dim)) · v` of (B, heads, tokens, head_dim) tensors, as
/// (B, tokens, heads·head_dim).
pub fn joint_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let head_dim = q.dim(3)?;
    attention(q, k, v, 1.0 / (head_dim as f64).sqrt())
}

/// (B, tokens, heads·head_dim) → (B, heads, tokens, head_dim).
pub fn split_heads(xs: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, n, width) = xs.dims3()?;
    xs.reshape((b, n, heads, width / heads))?.transpose(1, 2)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn rope_rotates_pairs() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &dev)?.reshape((1, 1, 1, 4))?;
        let angle = 0.5f32;
        let rope = Rope {
            cos: Tensor::new(&[[angle.cos(), 1.0]], &dev)?,
            sin: Tensor::new(&[[angle.sin(), 0.0]], &dev)?,
        };
        let out = apply_rope(&x, &rope)?.flatten_all()?.to_vec1::<f32>()?;
        let (c, s) = (angle.cos(), angle.sin());
        assert_eq!(out, vec![c - 2.0 * s, s + 2.0 * c, 3.0, 4.0]);
        Ok(())
    }
}
