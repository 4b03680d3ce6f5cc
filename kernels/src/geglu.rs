//! GEGLU's gate, `hidden · gelu(gate)` with the exact (erf) GELU, in one pass over the
//! projection's output: candle's path takes the two halves as strided views, runs a scalar erf
//! over one into a fresh tensor and multiplies the two into another.

use rayon::prelude::*;

/// Rows per rayon task (of `inner` values each): a few tasks per thread at SD's widths.
const TASK_FLOATS: usize = 1 << 16;

/// `out[r][j] = x[r][j] · gelu(x[r][inner + j])` for a contiguous (rows, 2·inner) `x` and a
/// (rows, inner) `out`; parallel over blocks of rows. Panics on slices that do not match.
pub fn geglu(x: &[f32], inner: usize, out: &mut [f32]) {
    assert_eq!(x.len(), 2 * out.len());
    if inner == 0 || out.is_empty() {
        return;
    }
    assert_eq!(out.len() % inner, 0);
    let rows = (TASK_FLOATS / inner).max(1);
    out.par_chunks_mut(rows * inner)
        .zip(x.par_chunks(2 * rows * inner))
        .for_each(|(out, x)| {
            crate::vectorised(
                #[inline(always)]
                || {
                    for (out, x) in out.chunks_exact_mut(inner).zip(x.chunks_exact(2 * inner)) {
                        let (hidden, gate) = x.split_at(inner);
                        for ((o, h), g) in out.iter_mut().zip(hidden).zip(gate) {
                            *o = h * gelu(*g);
                        }
                    }
                },
            )
        });
}

/// The exact GELU, `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// `erf(x)` for float32 within 7e-7 absolute (the form's own 1.5e-7 plus float32 rounding; the
/// GELU it feeds is off by at most |x|/2 times that), branch-free so that loops over it vectorise
/// (libm's `erff` is a call per element): Abramowitz & Stegun 7.1.26's form
/// `1 − t·P(t)·e^(−x²)` with `t = 1 / (1 + p·|x|)`, the sign put back from x. For |x| ≥ 4 the
/// result is ±1 in float32.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs().min(4.0);
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4f32;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_7;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let y = 1.0 - p * t * crate::exp(-a * a);
    y.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// erf by its Taylor series in float64 (converges to ~1e-11 for |x| ≤ 4).
    fn erf64(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_7e7_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -4.0f32;
        while x <= 4.0 {
            worst = worst.max((f64::from(erf(x)) - erf64(f64::from(x))).abs());
            x += 0.001_3;
        }
        // Measured: 6.0e-7.
        assert!(worst < 7e-7, "worst absolute error {worst:e}");
        // Not exactly 0 at 0 (the form's error there is 1.8e-7), which GELU's factor x/2 cancels.
        assert!(erf(0.0).abs() < 7e-7);
        assert_eq!(gelu(0.0), 0.0);
        assert_eq!(erf(9.0), 1.0);
        assert_eq!(erf(-9.0), -1.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
    }

    #[test]
    fn geglu_gates_each_row_by_its_second_half() {
        // Rows spanning several tasks, an inner width not a multiple of the vector width.
        let (rows, inner) = (3 * TASK_FLOATS / 37 + 5, 37);
        let x: Vec<f32> = (0..rows * 2 * inner)
            .map(|i| ((i * 7919 % 1000) as f32 / 125.0) - 4.0)
            .collect();
        let mut out = vec![f32::NAN; rows * inner];
        geglu(&x, inner, &mut out);
        let mut worst = 0f64;
        for (r, row) in out.chunks_exact(inner).enumerate() {
            for (j, got) in row.iter().enumerate() {
                let h = f64::from(x[r * 2 * inner + j]);
                let g = f64::from(x[r * 2 * inner + inner + j]);
                let want = h * 0.5 * g * (1.0 + erf64(g / 2f64.sqrt()));
                worst = worst.max((f64::from(*got) - want).abs());
            }
        }
        // |h|, |g| ≤ 4: erf's 7e-7 scaled by h·g/2 ≤ 8, plus float32 rounding of the products.
        assert!(worst < 7e-6, "worst absolute error {worst:e}");
        geglu(&[], 0, &mut []);
    }

    #[test]
    #[should_panic]
    fn geglu_refuses_mismatched_slices() {
        geglu(&[0.0; 6], 3, &mut [0.0; 2]);
    }
}
