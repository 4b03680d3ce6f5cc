//! Scaled dot-product attention, `softmax(scale · q·kᵀ) · v`, for every model family: the
//! UNet's and the VAE's attention and FLUX's joint attention all come here.
//!
//! On the CPU in float32 it is one custom op over `fastfusion_kernels::attention`, which reads
//! q, k and v through their strides (no per-head copies), keeps each block of scores in cache
//! and writes the output token-major. Elsewhere (CUDA, Metal, half precision) the scores are
//! computed for blocks of query rows in float32, so the whole (b, heads, tokens, tokens) tensor
//! never exists: SDXL's 64×64 self-attention at 1024² would take 1.3 GB, FLUX's at 1024² 2 GB.
//! Each softmax row only needs its own scores, so blocking changes nothing.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use fastfusion_kernels::attention::{self as kernel, AttentionSpec, Strides};

/// Most bytes of float32 scores one block of query rows may take on the blocked path.
// 16 MiB rather than more: glibc serves blocks up to 32 MiB from its heap once freed blocks of
// that size exist, so the blocks' memory is reused; larger ones are fresh mappings that fault
// in every page again.
const SCORE_BLOCK_BYTES: usize = 16 << 20;

/// `softmax(scale · q·kᵀ) · v` for (b, heads, tokens, head_dim) q, k and v (any strides; k and v
/// with the same number of tokens), as (b, q_tokens, heads·head_dim): the heads merged, ready
/// for the output projection. Scores and softmax are float32 whatever the dtype (diffusers'
/// `upcast_attention`), the result is in v's dtype.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, tokens, head_dim) = q.dims4()?;
    let (kb, kh, kv_tokens, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, heads, head_dim) || v.dims4()? != (b, heads, kv_tokens, head_dim) {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let fused = q.device().is_cpu() && [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if fused {
        // The kernel wants the head dimension contiguous; a projection's output already is.
        let inner = |t: &Tensor| -> Result<Tensor> {
            if t.stride()[3] == 1 {
                Ok(t.clone())
            } else {
                t.contiguous()
            }
        };
        return inner(q)?.apply_op3_no_bwd(
            &inner(k)?,
            &inner(v)?,
            &Fused {
                scale: scale as f32,
            },
        );
    }
    let row_bytes = b * heads * kv_tokens * DType::F32.size_in_bytes();
    blocked(q, k, v, scale, SCORE_BLOCK_BYTES / row_bytes.max(1))?
        .transpose(1, 2)?
        .reshape((b, tokens, heads * head_dim))
}

/// The blocked path, for blocks of `rows` query rows: (b, heads, tokens, head_dim) out.
fn blocked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, rows: usize) -> Result<Tensor> {
    let tokens = q.dim(2)?;
    let rows = rows.clamp(1, tokens.max(1));
    let kt = k.t()?.contiguous()?;
    let v = v.contiguous()?;
    let mut blocks = Vec::with_capacity(tokens.div_ceil(rows));
    let mut start = 0;
    while start < tokens {
        let len = rows.min(tokens - start);
        // The scaled copy of the block is contiguous, as the matmul wants it.
        let scores = (q.narrow(2, start, len)? * scale)?
            .matmul(&kt)?
            .to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        blocks.push(probs.matmul(&v)?);
        start += len;
    }
    if blocks.len() == 1 {
        return blocks
            .pop()
            .ok_or_else(|| candle_core::Error::Msg("no block".into()));
    }
    Tensor::cat(&blocks, 2)
}

struct Fused {
    scale: f32,
}

/// The slice and strides of a float32 (b, heads, tokens, head_dim) operand.
fn operand<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<(&'a [f32], Strides)> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("fused attention takes float32");
    };
    let s = layout.stride();
    if s.len() != 4 || s[3] != 1 {
        candle_core::bail!("fused attention needs a contiguous head dimension, got strides {s:?}");
    }
    let data = data
        .get(layout.start_offset()..)
        .ok_or_else(|| candle_core::Error::Msg("fused attention: offset past the data".into()))?;
    Ok((
        data,
        Strides {
            batch: s[0],
            head: s[1],
            token: s[2],
        },
    ))
}

impl CustomOp3 for Fused {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, q_tokens, head_dim) = ql.shape().dims4()?;
        let kv_tokens = kl.shape().dims4()?.2;
        let spec = AttentionSpec {
            batch,
            heads,
            head_dim,
            q_tokens,
            kv_tokens,
            scale: self.scale,
        };
        let mut out = vec![0f32; batch * q_tokens * heads * head_dim];
        kernel::attention(
            operand(q, ql)?,
            operand(k, kl)?,
            operand(v, vl)?,
            &mut out,
            &spec,
            kernel::rows_per_task(batch, q_tokens, kv_tokens),
        );
        Ok((
            CpuStorage::F32(out),
            Shape::from((batch, q_tokens, heads * head_dim)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// The plain, unblocked attention, merged to (b, tokens, heads·head_dim).
    fn whole(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (b, heads, tokens, d) = q.dims4()?;
        let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&scores)?
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, tokens, heads * d))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn fused_and_blocked_paths_equal_the_whole_attention() -> Result<()> {
        let dev = &Device::Cpu;
        // q as a projection gives it: (b, tokens, heads·d) viewed as (b, heads, tokens, d).
        let q = Tensor::randn(0f32, 1.0, (2, 10, 3 * 8), dev)?
            .reshape((2, 10, 3, 8))?
            .transpose(1, 2)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), dev)?;
        let want = whole(&q, &k, &v, 0.35)?;
        let fused = attention(&q, &k, &v, 0.35)?;
        assert_eq!(fused.dims(), &[2, 10, 24]);
        assert!(max_diff(&fused, &want)? < 1e-5);
        // A head dimension that is not contiguous is copied first.
        let kt = k.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        assert!(max_diff(&attention(&q, &kt, &v, 0.35)?, &want)? < 1e-5);
        for rows in [1, 3, 4, 9, usize::MAX] {
            let got = blocked(&q, &k, &v, 0.35, rows)?
                .transpose(1, 2)?
                .reshape((2, 10, 24))?;
            assert!(max_diff(&got, &want)? < 1e-5, "{rows} rows");
        }
        // Half precision takes the blocked path, scores in float32.
        let half = |t: &Tensor| t.to_dtype(DType::F16);
        let got = attention(&half(&q)?, &half(&k)?, &half(&v)?, 0.35)?;
        assert_eq!(got.dtype(), DType::F16);
        assert!(max_diff(&got.to_dtype(DType::F32)?, &want)? < 1e-2);
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error_and_no_keys_give_zeros() -> Result<()> {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), DType::F32, dev)?;
        let k = Tensor::zeros((1, 2, 5, 8), DType::F32, dev)?;
        let v = Tensor::zeros((1, 2, 6, 8), DType::F32, dev)?;
        let err = attention(&q, &k, &v, 1.0).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("do not match")));
        // No keys at all (an empty context) is zeros, not a panic in the kernel.
        let q = Tensor::ones((1, 2, 4, 8), DType::F32, dev)?;
        let none = Tensor::zeros((1, 2, 0, 8), DType::F32, dev)?;
        let out = attention(&q, &none, &none, 1.0)?;
        assert_eq!(out.dims(), &[1, 4, 16]);
        assert_eq!(out.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
