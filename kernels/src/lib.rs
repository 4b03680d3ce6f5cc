//! CPU kernels on plain `f32` slices for the worker's hot paths, where candle's generic ops
//! cost many memory passes (../shared/PERF-NOTES.md §2). The worker wraps them in candle custom
//! ops (`fastfusion_worker::models::{norm, conv, attention, geglu}`). This crate is built with
//! optimisations even in debug and test builds (the workspace's
//! `profile.dev.package.fastfusion-kernels`), since its loops are only fast once vectorised.
//! Safe Rust except for one module, [`matmul`], the bounds-checked front for the `gemm` crate's
//! raw-pointer product.

use rayon::prelude::*;

pub mod attention;
pub mod geglu;
pub mod matmul;
pub mod winograd;

/// Runs `f` compiled for the best vector instructions this CPU has (pulp's run-time dispatch:
/// AVX-512, else AVX2 + FMA, else baseline). Only code inlined into pulp's `#[target_feature]`
/// wrapper gets that width, so callers mark the closure `#[inline(always)]` (with inner
/// functions `#[inline(always)]` too): left to the inliner, a closure of any size stays a
/// separate SSE2 function (found in the disassembly: the attention softmax ran at SSE2 width
/// and 35 % of the kernel's time until it was forced). Called inside each rayon task, since a
/// task's closure is compiled apart from its caller. Rust never contracts `a * b + c` into an
/// FMA on its own, so results are the same on every path.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// Shapes and parameters of one GroupNorm call over an `(n, channels, spatial…)` tensor.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormSpec<'a> {
    pub channels: usize,
    pub groups: usize,
    /// Elements per channel (the product of the spatial dimensions).
    pub spatial: usize,
    pub eps: f64,
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    /// Apply SiLU to the result.
    pub silu: bool,
}

/// `out = [silu](group_norm(xs))` for a contiguous row-major input; parallel over (image, group).
/// Panics only on a spec that does not match the slices (callers check shapes first).
pub fn group_norm(xs: &[f32], out: &mut [f32], spec: &GroupNormSpec<'_>) {
    assert_eq!(xs.len(), out.len());
    assert!(spec.groups > 0 && spec.channels.is_multiple_of(spec.groups));
    assert!(spec.gamma.len() == spec.channels && spec.beta.len() == spec.channels);
    let per_group = spec.channels / spec.groups;
    let chunk = per_group * spec.spatial;
    if chunk == 0 {
        return;
    }
    assert!(xs.len().is_multiple_of(chunk * spec.groups));
    out.par_chunks_mut(chunk)
        .zip(xs.par_chunks(chunk))
        .enumerate()
        .for_each(|(index, (out, xs))| {
            vectorised(
                #[inline(always)]
                || {
                    let group = index % spec.groups;
                    let (mean, var) = moments(xs);
                    let rstd = 1.0 / (var + spec.eps).sqrt();
                    // (x − mean)·scale + β, as torch computes it: folding the mean into the shift
                    // (x·scale + shift) cancels badly when a group's variance is tiny and 1/σ large.
                    let mean = mean as f32;
                    for c in 0..per_group {
                        let channel = group * per_group + c;
                        let scale = (f64::from(spec.gamma[channel]) * rstd) as f32;
                        let shift = spec.beta[channel];
                        let range = c * spec.spatial..(c + 1) * spec.spatial;
                        let (src, dst) = (&xs[range.clone()], &mut out[range]);
                        if spec.silu {
                            affine_silu(src, dst, mean, scale, shift);
                        } else {
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d = (s - mean) * scale + shift;
                            }
                        }
                    }
                },
            )
        });
}

/// The im2col tile of a 3×3, stride-1, padding-1 convolution over one image `input` (channels ×
/// height × width, row-major): row `c·9 + ky·3 + kx` of `out` (rows of `len` values) holds, for
/// the output pixels `first..first + len` (row-major over height × width), the input value at
/// (y + ky − 1, x + kx − 1) of channel c, or 0 outside the picture. A convolution is then one
/// matrix product: weight (c_out × c_in·9, as the weight tensor is laid out) × this tile.
/// Parallel over rows; each row is copied as runs of contiguous input.
pub fn im2col_3x3(
    input: &[f32],
    (channels, height, width): (usize, usize, usize),
    first: usize,
    len: usize,
    out: &mut [f32],
) {
    assert_eq!(input.len(), channels * height * width);
    assert_eq!(out.len(), channels * 9 * len);
    assert!(first + len <= height * width);
    if len == 0 {
        return;
    }
    out.par_chunks_mut(len).enumerate().for_each(|(row, dst)| {
        let (c, ky, kx) = (row / 9, row % 9 / 3, row % 3);
        let plane = &input[c * height * width..(c + 1) * height * width];
        let mut p = first;
        let end = first + len;
        while p < end {
            let (y, x0) = (p / width, p % width);
            let x1 = width.min(x0 + (end - p));
            let run = &mut dst[p - first..p - first + (x1 - x0)];
            // Source row y + ky − 1 (outside the picture: zeros).
            match (y + ky).checked_sub(1).filter(|&sy| sy < height) {
                None => run.fill(0.0),
                Some(sy) => {
                    let src = &plane[sy * width..(sy + 1) * width];
                    // Output x reads source x + kx − 1: a shifted copy, with a zero where the
                    // shift leaves the picture (the first column for kx = 0, the last for 2).
                    let n = run.len();
                    match kx {
                        0 if x0 == 0 => {
                            run[0] = 0.0;
                            run[1..].copy_from_slice(&src[..n - 1]);
                        }
                        0 => run.copy_from_slice(&src[x0 - 1..x1 - 1]),
                        1 => run.copy_from_slice(&src[x0..x1]),
                        _ if x1 == width => {
                            run[..n - 1].copy_from_slice(&src[x0 + 1..]);
                            run[n - 1] = 0.0;
                        }
                        _ => run.copy_from_slice(&src[x0 + 1..x1 + 1]),
                    }
                }
            }
            p += x1 - x0;
        }
    });
}

/// Writes a (c_out, len) tile of output pixels `first..first + len` into its place in one
/// image's (c_out, pixels) NCHW output, adding `bias[c]` to channel c; parallel over channels.
/// Panics on sizes that do not match (callers derive them from one shape).
pub fn place_tile(
    tile: &[f32],
    out: &mut [f32],
    pixels: usize,
    first: usize,
    bias: Option<&[f32]>,
) {
    let c_out = out.len() / pixels.max(1);
    let len = tile.len() / c_out.max(1);
    assert!(tile.len() == c_out * len && first + len <= pixels);
    assert!(bias.is_none_or(|b| b.len() == c_out));
    out.par_chunks_mut(pixels)
        .zip(tile.par_chunks(len.max(1)))
        .enumerate()
        .for_each(|(c, (out, tile))| {
            vectorised(
                #[inline(always)]
                || {
                    let shift = bias.map_or(0.0, |b| b[c]);
                    for (o, t) in out[first..first + len].iter_mut().zip(tile) {
                        *o = t + shift;
                    }
                },
            )
        });
}

const LANES: usize = 8;

/// Mean and (biased) variance, accumulated in float64 over independent lanes so that the loops
/// vectorise; two passes (mean, then squared deviations) as torch's GroupNorm is accurate.
#[inline(always)]
pub fn moments(xs: &[f32]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mut lanes = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += f64::from(*v);
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| f64::from(*v)).sum();
    let mean = (lanes.iter().sum::<f64>() + tail) / n;
    let mut lanes = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            let d = f64::from(*v) - mean;
            *l += d * d;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|v| (f64::from(*v) - mean).powi(2))
        .sum();
    (mean, (lanes.iter().sum::<f64>() + tail) / n)
}

/// `dst = silu((src − mean)·scale + shift)`.
#[inline(always)]
pub fn affine_silu(src: &[f32], dst: &mut [f32], mean: f32, scale: f32, shift: f32) {
    for (d, s) in dst.iter_mut().zip(src) {
        let y = (s - mean) * scale + shift;
        *d = y / (1.0 + exp(-y));
    }
}

/// Independent accumulators of the row loops: two AVX-512 vectors (four AVX2 ones), so that the
/// loop-carried max and sum chains do not limit the loops to one vector per add's latency.
const ROW_LANES: usize = 32;

/// `r = e^(scale·r − max(scale·r))` in place, returning the row's sum: a softmax row short of its
/// normalisation, which the attention kernel applies to the (far smaller) output rows instead.
/// Two passes (max, then exp and sum) with the vectorised [`exp`]. Subtracting the maximum keeps
/// every exponent ≤ 0 (no overflow).
#[inline(always)]
pub(crate) fn exp_row(r: &mut [f32], scale: f32) -> f32 {
    // `if x > m` rather than f32::max, whose NaN rule costs a compare and a blend per vector.
    let larger = |m: f32, x: f32| if x > m { x } else { m };
    let mut lanes = [f32::NEG_INFINITY; ROW_LANES];
    let mut chunks = r.chunks_exact(ROW_LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l = larger(*l, v * scale);
        }
    }
    let max = chunks.remainder().iter().fold(
        lanes.iter().fold(f32::NEG_INFINITY, |a, b| larger(a, *b)),
        |a, v| larger(a, v * scale),
    );
    let mut lanes = [0f32; ROW_LANES];
    let mut chunks = r.chunks_exact_mut(ROW_LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *v = exp(*v * scale - max);
            *l += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp(*v * scale - max);
        tail += *v;
    }
    lanes.iter().sum::<f32>() + tail
}

/// `e^x` for float32 within 2 ulp on [−87.3, 88.3] (the input is clamped to that range, so the
/// result saturates instead of reaching 0 or infinity), branch-free so that loops over it vectorise (`f32::exp` is a libm call per element).
/// Cody–Waite range reduction x = n·ln2 + r with |r| ≤ ln2/2, then a degree-6 polynomial for
/// e^r (Cephes' `expf` coefficients), scaled by 2^n through the exponent bits.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer in float32 arithmetic.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 5e-1;
    let p = p * r * r + r + 1.0;
    // 2^n from the bits of n + 127 + 2^23, whose low mantissa bits are the integer n + 127
    // (n ∈ [−126, 127] after the clamp): shifted into the exponent field, the rest falls off.
    // No float-to-int conversion, which (saturating in Rust) would keep the loop scalar.
    let bits = (n + 8_388_735.0).to_bits() << 23;
    p * f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = f64::from(exp(x));
            let want = f64::from(x).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        // 2 ulp of float32 is 2.4e-7 relative.
        assert!(worst < 2.4e-7, "worst relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), exp(-87.3));
        assert!(exp(-87.3) > 1.2e-38 && exp(-87.3) < 1.3e-38);
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn moments_are_exact_for_a_known_sequence() {
        // 1..=19: mean 10, variance (19² − 1) / 12 = 30; odd length exercises the tail.
        let xs: Vec<f32> = (1..=19).map(|v| v as f32).collect();
        let (mean, var) = moments(&xs);
        assert!((mean - 10.0).abs() < 1e-12 && (var - 30.0).abs() < 1e-12);
        // A large offset does not swamp the variance (two passes in float64).
        let xs: Vec<f32> = (0..1000).map(|i| 10_000.0 + (i % 2) as f32).collect();
        let (_, var) = moments(&xs);
        assert!((var - 0.25).abs() < 1e-9, "variance {var}");
    }

    #[test]
    fn im2col_tiles_equal_a_direct_convolution() {
        // A direct 3×3 convolution (padding 1) against weight × im2col, for a tile split that
        // crosses row boundaries.
        let (c, h, w, c_out) = (3, 5, 7, 2);
        let input: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        let weight: Vec<f32> = (0..c_out * c * 9)
            .map(|i| ((i * 13) % 7) as f32 - 3.0)
            .collect();
        let at = |ch: usize, y: isize, x: isize| -> f32 {
            if y < 0 || x < 0 || y >= h as isize || x >= w as isize {
                0.0
            } else {
                input[ch * h * w + y as usize * w + x as usize]
            }
        };
        for (first, len) in [(0, h * w), (0, 9), (9, 17), (26, 9)] {
            let mut col = vec![f32::NAN; c * 9 * len];
            im2col_3x3(&input, (c, h, w), first, len, &mut col);
            for o in 0..c_out {
                for j in 0..len {
                    let p = first + j;
                    let (y, x) = ((p / w) as isize, (p % w) as isize);
                    let mut direct = 0.0;
                    let mut product = 0.0;
                    for ch in 0..c {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let k = ch * 9 + ky * 3 + kx;
                                let wv = weight[o * c * 9 + k];
                                direct += wv * at(ch, y + ky as isize - 1, x + kx as isize - 1);
                                product += wv * col[k * len + j];
                            }
                        }
                    }
                    assert_eq!(direct, product, "tile {first}+{len}, out {o}, pixel {p}");
                }
            }
        }
    }

    #[test]
    fn place_tile_writes_its_pixels_of_every_channel_with_the_bias() {
        // 2 channels of 5 pixels; a tile of pixels 1..4.
        let mut out = [9f32; 10];
        let tile = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        place_tile(&tile, &mut out, 5, 1, Some(&[0.5, -1.0]));
        assert_eq!(out, [9.0, 1.5, 2.5, 3.5, 9.0, 9.0, 3.0, 4.0, 5.0, 9.0]);
        place_tile(&tile[..2], &mut out, 5, 4, None);
        assert_eq!((out[4], out[9]), (1.0, 2.0));
    }

    #[test]
    fn exp_row_over_its_sum_is_the_float64_softmax() {
        // Rows of several lengths (shorter than, equal to and longer than the lanes, with a
        // tail), large logits that would overflow a naive exp, and a negative scale.
        for (row, scale) in [(3, 1.0), (8, 0.5), (77, 0.125), (1030, -0.3)] {
            let rows = 5;
            let xs: Vec<f32> = (0..rows * row)
                .map(|i| {
                    ((i * 7919) % 1000) as f32 / 10.0 - 50.0 + if i % 13 == 0 { 300.0 } else { 0.0 }
                })
                .collect();
            let mut got = xs.clone();
            for r in got.chunks_exact_mut(row) {
                let inv = 1.0 / exp_row(r, scale);
                r.iter_mut().for_each(|v| *v *= inv);
            }
            for (r, (got, xs)) in got.chunks(row).zip(xs.chunks(row)).enumerate() {
                let scaled: Vec<f64> = xs
                    .iter()
                    .map(|v| f64::from(*v) * f64::from(scale))
                    .collect();
                let max = scaled.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scaled.iter().map(|v| (v - max).exp()).sum();
                for (j, (g, v)) in got.iter().zip(&scaled).enumerate() {
                    let want = (v - max).exp() / sum;
                    assert!(
                        (f64::from(*g) - want).abs() <= 4e-6 * want + 1e-37,
                        "row {row}, scale {scale}, [{r}][{j}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn group_norm_normalises_each_group_and_applies_the_affine_parameters() {
        // 1 image, 4 channels in 2 groups, 3 elements per channel.
        let xs = [
            1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 10.0, 10.0, 20.0, 20.0, 20.0,
        ];
        let gamma = [1.0, 2.0, 1.0, 1.0];
        let beta = [0.0, 0.0, 0.5, -0.5];
        let mut out = [0f32; 12];
        let spec = GroupNormSpec {
            channels: 4,
            groups: 2,
            spatial: 3,
            eps: 0.0,
            gamma: &gamma,
            beta: &beta,
            silu: false,
        };
        group_norm(&xs, &mut out, &spec);
        // Group 0: 1..6, mean 3.5, std sqrt(35/12).
        let std = (35.0f64 / 12.0).sqrt();
        for (i, x) in xs[..6].iter().enumerate() {
            let want = (f64::from(*x) - 3.5) / std * f64::from(gamma[i / 3]);
            assert!(
                (f64::from(out[i]) - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                out[i]
            );
        }
        // Group 1: two levels 10 and 20 → −1 and +1, then the channel's shift.
        assert_eq!(&out[6..], &[-0.5, -0.5, -0.5, 0.5, 0.5, 0.5]);
        let spec = GroupNormSpec { silu: true, ..spec };
        group_norm(&xs, &mut out, &spec);
        let silu = |v: f32| v / (1.0 + (-v).exp());
        assert!((out[11] - silu(0.5)).abs() < 1e-7 && (out[6] - silu(-0.5)).abs() < 1e-7);
    }
}
