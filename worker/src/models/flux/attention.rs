//! Joint attention over text and image tokens, exact and in bounded memory.
//!
//! Queries and keys get RoPE in float32 (diffusers' `apply_rotary_emb`), then
//! `softmax(q·kᵀ / sqrt(head_dim)) · v` without a mask. The scores are computed for blocks of query
//! rows at a time, each block's (B, heads, rows, tokens) scores in float32, so the full
//! (heads × L × L) tensor never exists: at 1024² (L = 4096 + 512 tokens, 24 heads) it would be
//! 2 GB in float32. Each softmax row only needs its own scores, so blocking changes nothing.

use candle_core::{DType, Tensor};

use crate::models::softmax::scaled_softmax_last_dim;

/// Scores per query block are kept under this many bytes (float32).
// 16 MiB rather than more: glibc serves blocks up to 32 MiB from its heap once freed blocks of
// that size exist, so the blocks' memory is reused; larger ones are fresh mappings that fault
// in every page again (2.5 M faults per SD 1.5 512² step at 64 MiB, 0.5 M at 16 MiB).
const SCORE_BLOCK_BYTES: usize = 16 << 20;

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

/// Scaled dot-product attention of (B, heads, tokens, head_dim) tensors, blocked over query rows.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, heads, _, _) = q.dims4()?;
    let row_bytes = b * heads * k.dim(2)? * DType::F32.size_in_bytes();
    attention_in_blocks(q, k, v, SCORE_BLOCK_BYTES / row_bytes.max(1))
}

/// [`attention`] for blocks of at most `rows` query rows.
fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rows: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, tokens, head_dim) = q.dims4()?;
    let rows = rows.clamp(1, tokens.max(1));
    let scale = 1.0 / (head_dim as f64).sqrt();
    let fused = q.device().is_cpu() && q.dtype() == DType::F32;
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let mut blocks = Vec::with_capacity(tokens.div_ceil(rows));
    let mut start = 0;
    while start < tokens {
        let len = rows.min(tokens - start);
        let qb = q.narrow(2, start, len)?;
        let probs = if fused {
            // float32 on the CPU: the scale goes into the fused softmax (one pass fewer).
            scaled_softmax_last_dim(qb.matmul(&kt)?, scale)?
        } else {
            let scores = (qb * scale)?.matmul(&kt)?.to_dtype(DType::F32)?;
            candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?
        };
        blocks.push(probs.matmul(&v)?);
        start += len;
    }
    Tensor::cat(&blocks, 2)
}

/// (B, tokens, heads·head_dim) → (B, heads, tokens, head_dim).
pub fn split_heads(xs: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, n, width) = xs.dims3()?;
    xs.reshape((b, n, heads, width / heads))?.transpose(1, 2)
}

/// (B, heads, tokens, head_dim) → (B, tokens, heads·head_dim).
pub fn merge_heads(xs: &Tensor) -> candle_core::Result<Tensor> {
    let (b, heads, n, head_dim) = xs.dims4()?;
    xs.transpose(1, 2)?.reshape((b, n, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn blocks_give_the_unblocked_result() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 30, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 2, 30, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 2, 30, 8), &dev)?;
        let scores = (q.matmul(&k.t()?)? / 8f64.sqrt())?;
        let whole = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        // 7 rows per block: 5 blocks, the last one short.
        let blocked = attention_in_blocks(&q, &k, &v, 7)?;
        let diff = (whole - blocked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

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
