//! Fused scaled dot-product attention, `softmax(scale · q·kᵀ) · v`, for float32 on the CPU.
//!
//! Each rayon task takes one image's block of query rows and walks the heads: the block's
//! scores (rows × key tokens) go into a scratch buffer small enough to stay in the core's L2
//! cache, are turned into probabilities in place, and are multiplied by `v` straight into the
//! output. The scores never travel through main memory (the blocked candle path wrote, re-read
//! and re-wrote a 16 MiB block per step: at SD 1.5's 64×64 self-attention that traffic, not the
//! arithmetic, was the cost), and no per-head copies are made: q, k and v are read through their
//! strides and the output is written token-major, as the output projection wants it.

use rayon::prelude::*;

use crate::matmul::{matmul, Mat, MatMut};
use crate::{exp_row, vectorised};

/// Where a (batch, heads, tokens, head_dim) operand lies in its slice: element (b, h, t, i) is at
/// `b·batch + h·head + t·token + i` (the head dimension is contiguous).
#[derive(Debug, Clone, Copy)]
pub struct Strides {
    pub batch: usize,
    pub head: usize,
    pub token: usize,
}

/// The shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    pub batch: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub q_tokens: usize,
    pub kv_tokens: usize,
    pub scale: f32,
}

/// Bytes of scores a task keeps. Each task's products repack k and v (gemm packs its operands
/// per call), so larger blocks of rows amortise that: measured on SD 1.5's 512² self-attention
/// (before the softmax ran at full vector width), 16 rows 609 ms, 64 rows 377 ms, 256 rows (4 MiB
/// of scores, in L2 or L3) 318 ms.
const SCRATCH_BYTES: usize = 4 << 20;
/// Query rows per task at most.
const MAX_ROWS: usize = 256;
/// Fewer rows than this only when the scores would not fit [`SCRATCH_BYTES`].
const MIN_ROWS: usize = 16;

/// Query rows per task: as many as [`SCRATCH_BYTES`] of scores for `kv_tokens` keys allow, but
/// few enough that `batch · q_tokens` rows make four tasks per thread.
pub fn rows_per_task(batch: usize, q_tokens: usize, kv_tokens: usize) -> usize {
    let by_cache = SCRATCH_BYTES / (kv_tokens.max(1) * 4);
    let by_threads = (batch * q_tokens).div_ceil(4 * rayon::current_num_threads());
    by_cache.min(by_threads.max(MIN_ROWS)).clamp(1, MAX_ROWS)
}

/// `out[b, t, h, :] = softmax(scale · q[b, h, t, :]·k[b, h, :, :]ᵀ) · v[b, h, :, :]`, with `out`
/// a contiguous (batch, q_tokens, heads, head_dim) buffer. `rows`: query rows per task
/// ([`rows_per_task`] unless testing). Panics if an operand does not fit its slice.
pub fn attention(
    q: (&[f32], Strides),
    k: (&[f32], Strides),
    v: (&[f32], Strides),
    out: &mut [f32],
    spec: &AttentionSpec,
    rows: usize,
) {
    let AttentionSpec {
        batch,
        heads,
        head_dim: d,
        q_tokens,
        kv_tokens,
        ..
    } = *spec;
    let width = heads * d;
    assert_eq!(out.len(), batch * q_tokens * width, "attention output size");
    if out.is_empty() {
        return;
    }
    if kv_tokens == 0 {
        // Nothing to attend to: zeros (an empty operand's strides would point past its data).
        out.fill(0.0);
        return;
    }
    let rows = rows.max(1);
    out.par_chunks_mut(q_tokens * width)
        .enumerate()
        .for_each(|(b, image)| {
            image
                .par_chunks_mut(rows * width)
                .enumerate()
                .for_each_init(
                    || (Vec::new(), Vec::new()),
                    |(scores, sums), (block, out)| {
                        let len = out.len() / width;
                        scores.resize(len * kv_tokens, 0f32);
                        sums.resize(len, 0f32);
                        let rows = Rows {
                            start: block * rows,
                            len,
                        };
                        for h in 0..heads {
                            head(q, k, v, (b, h), rows, spec, scores, sums, out);
                        }
                    },
                );
        });
}

/// A task's block of query rows.
#[derive(Clone, Copy)]
struct Rows {
    start: usize,
    len: usize,
}

/// One head of one block: `out[:, h·d..(h+1)·d] = softmax(scale · q·kᵀ) · v` for the block's rows.
#[allow(clippy::too_many_arguments)]
#[inline]
fn head(
    q: (&[f32], Strides),
    k: (&[f32], Strides),
    v: (&[f32], Strides),
    (b, h): (usize, usize),
    rows: Rows,
    spec: &AttentionSpec,
    scores: &mut [f32],
    sums: &mut [f32],
    out: &mut [f32],
) {
    let (d, n, width) = (spec.head_dim, spec.kv_tokens, spec.heads * spec.head_dim);
    let at = |x: Strides| b * x.batch + h * x.head;
    // scores = scale · q_block · kᵀ, kᵀ read through k's strides (a key per column).
    matmul(
        MatMut::rows(scores, rows.len, n, n),
        Mat::rows(
            &q.0[at(q.1) + rows.start * q.1.token..],
            rows.len,
            d,
            q.1.token,
        ),
        Mat {
            data: &k.0[at(k.1)..],
            rows: d,
            cols: n,
            row_stride: 1,
            col_stride: k.1.token,
        },
        spec.scale,
    );
    // Dispatched on its own (and forced inline into pulp's wrapper) so that the loops are
    // compiled at the CPU's vector width.
    vectorised(
        #[inline(always)]
        || {
            for (row, sum) in scores.chunks_exact_mut(n).zip(sums.iter_mut()) {
                *sum = exp_row(row, 1.0);
            }
        },
    );
    // out = e^scores · v, then each row divided by its sum: d values a row instead of n.
    let out = &mut out[h * d..];
    matmul(
        MatMut::rows(out, rows.len, d, width),
        Mat::rows(scores, rows.len, n, n),
        Mat::rows(&v.0[at(v.1)..], n, d, v.1.token),
        1.0,
    );
    for (t, sum) in sums.iter().enumerate() {
        let inv = 1.0 / sum;
        for o in &mut out[t * width..t * width + d] {
            *o *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The float64 reference for (batch, heads, tokens, d) operands laid out by `strides`.
    fn reference(
        q: (&[f32], Strides),
        k: (&[f32], Strides),
        v: (&[f32], Strides),
        spec: &AttentionSpec,
    ) -> Vec<f64> {
        let d = spec.head_dim;
        let at = |x: (&[f32], Strides), b: usize, h: usize, t: usize, i: usize| {
            f64::from(x.0[b * x.1.batch + h * x.1.head + t * x.1.token + i])
        };
        let mut out = vec![0f64; spec.batch * spec.q_tokens * spec.heads * d];
        for b in 0..spec.batch {
            for h in 0..spec.heads {
                for t in 0..spec.q_tokens {
                    let s: Vec<f64> = (0..spec.kv_tokens)
                        .map(|j| {
                            (0..d)
                                .map(|i| at(q, b, h, t, i) * at(k, b, h, j, i))
                                .sum::<f64>()
                                * f64::from(spec.scale)
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for i in 0..d {
                        let o = (0..spec.kv_tokens)
                            .map(|j| e[j] / sum * at(v, b, h, j, i))
                            .sum();
                        out[((b * spec.q_tokens + t) * spec.heads + h) * d + i] = o;
                    }
                }
            }
        }
        out
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0) * 1.5)
            .collect()
    }

    #[test]
    fn matches_the_float64_reference_for_every_layout_and_block() {
        let spec = AttentionSpec {
            batch: 2,
            heads: 3,
            head_dim: 8,
            q_tokens: 11,
            kv_tokens: 7,
            scale: 0.4,
        };
        let (b, h, d) = (spec.batch, spec.heads, spec.head_dim);
        // q token-major (b, t, h·d), as a projection gives it; k head-major contiguous
        // (b, h, t, d); v token-major inside a wider buffer (a fused k|v projection).
        let q = values(b * spec.q_tokens * h * d, 1);
        let qs = Strides {
            batch: spec.q_tokens * h * d,
            head: d,
            token: h * d,
        };
        let k = values(b * h * spec.kv_tokens * d, 2);
        let ks = Strides {
            batch: h * spec.kv_tokens * d,
            head: spec.kv_tokens * d,
            token: d,
        };
        let v = values(b * spec.kv_tokens * 2 * h * d, 3);
        let vs = Strides {
            batch: spec.kv_tokens * 2 * h * d,
            head: d,
            token: 2 * h * d,
        };
        let want = reference((&q, qs), (&k, ks), (&v, vs), &spec);
        // One row per task, a block that does not divide the tokens, and all rows at once.
        for rows in [1, 4, 11, 64] {
            let mut out = vec![f32::NAN; want.len()];
            attention((&q, qs), (&k, ks), (&v, vs), &mut out, &spec, rows);
            for (i, (g, w)) in out.iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*g) - w).abs() < 2e-6,
                    "rows {rows} [{i}]: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let spec = AttentionSpec {
            batch: 1,
            heads: 1,
            head_dim: 4,
            q_tokens: 3,
            kv_tokens: 5,
            scale: 1.0,
        };
        let s = Strides {
            batch: 0,
            head: 0,
            token: 4,
        };
        let q: Vec<f32> = values(12, 4).iter().map(|x| x * 100.0).collect();
        let k: Vec<f32> = values(20, 5).iter().map(|x| x * 100.0).collect();
        let v = values(20, 6);
        let want = reference((&q, s), (&k, s), (&v, s), &spec);
        let mut out = vec![0f32; 12];
        attention(
            (&q, s),
            (&k, s),
            (&v, s),
            &mut out,
            &spec,
            rows_per_task(1, 3, 5),
        );
        for (g, w) in out.iter().zip(&want) {
            assert!(
                g.is_finite() && (f64::from(*g) - w).abs() < 1e-5,
                "{g} vs {w}"
            );
        }
    }

    #[test]
    fn no_keys_give_zeros() {
        let spec = AttentionSpec {
            batch: 1,
            heads: 2,
            head_dim: 4,
            q_tokens: 3,
            kv_tokens: 0,
            scale: 1.0,
        };
        let s = Strides {
            batch: 0,
            head: 4,
            token: 8,
        };
        let q = values(24, 7);
        let mut out = vec![f32::NAN; 24];
        attention((&q, s), (&[], s), (&[], s), &mut out, &spec, 2);
        assert_eq!(out, vec![0f32; 24]);
    }

    #[test]
    fn blocks_keep_their_scores_within_the_scratch_budget() {
        let threads = rayon::current_num_threads();
        // Many rows: as many as the scratch holds, at most MAX_ROWS.
        let many = 4096 * threads;
        assert_eq!(rows_per_task(2, many, 4096), 256);
        assert_eq!(rows_per_task(2, many, 16_384), 64);
        assert_eq!(rows_per_task(2, many, 77), MAX_ROWS);
        assert_eq!(rows_per_task(1, many, 1 << 22), 1);
        // Few rows: split so every thread gets work, but not below MIN_ROWS.
        assert_eq!(rows_per_task(1, 64 * threads, 64), MIN_ROWS);
        assert_eq!(rows_per_task(1, 1, 64), MIN_ROWS);
    }
}
