//! Pillow's `Image.resize` for 8-bit RGB images, bit for bit.
//!
//! transformers' PIL image processors (SigLIP's for Redux) and diffusers' `VaeImageProcessor` resize
//! with Pillow, whose convolution resampler is not what the `image` crate does: Pillow widens the
//! filter by the downscale factor (antialiasing), normalises each output pixel's weights, rounds
//! them to 22-bit fixed point, and resamples horizontally then vertically with 8-bit rounding in
//! between. This module does the same arithmetic (Pillow's `src/libImaging/Resample.c`), so the
//! resized pixels are identical, not merely close. A resize to the same size is a copy, as in
//! Pillow.

use image::RgbImage;

/// Pillow's resampling filters (the `resample` numbers of image processor configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `Image.BILINEAR` (2).
    Bilinear,
    /// `Image.BICUBIC` (3), a = -0.5.
    Bicubic,
    /// `Image.LANCZOS` (1), 3 lobes.
    Lanczos,
}

impl Filter {
    /// The filter of a PIL `resample` code, if it is one of these.
    pub fn from_pil(code: u32) -> Option<Self> {
        match code {
            1 => Some(Filter::Lanczos),
            2 => Some(Filter::Bilinear),
            3 => Some(Filter::Bicubic),
            _ => None,
        }
    }

    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling weights.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output pixel along one axis: the first source pixel and its fixed-point weights.
struct Coefficients {
    /// (first source index, weights) per output index.
    taps: Vec<(usize, Vec<i32>)>,
}

impl Coefficients {
    /// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for `in_size` → `out_size`.
    fn new(in_size: usize, out_size: usize, filter: Filter) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = filter.support() * filter_scale;
        let taps = (0..out_size)
            .map(|xx| {
                let center = (xx as f64 + 0.5) * scale;
                // C casts truncate towards zero.
                let xmin = ((center - support + 0.5) as i64).max(0) as usize;
                let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
                let weights: Vec<f64> = (xmin..xmax.max(xmin))
                    .map(|x| filter.weight((x as f64 - center + 0.5) / filter_scale))
                    .collect();
                let total: f64 = weights.iter().sum();
                let fixed = weights
                    .iter()
                    .map(|&w| {
                        let w = if total != 0.0 { w / total } else { w };
                        let scaled = w * f64::from(1u32 << PRECISION_BITS);
                        if w < 0.0 {
                            (scaled - 0.5) as i32
                        } else {
                            (scaled + 0.5) as i32
                        }
                    })
                    .collect();
                (xmin, fixed)
            })
            .collect();
        Self { taps }
    }
}

/// Pillow's `clip8`: fixed point back to a byte, saturating.
fn clip8(value: i32) -> u8 {
    if value >= (1 << PRECISION_BITS << 8) {
        255
    } else if value <= 0 {
        0
    } else {
        (value >> PRECISION_BITS) as u8
    }
}

/// One resampling pass over `(width, height)` RGB bytes along `horizontal` or the other axis.
fn pass(
    src: &[u8],
    (width, height): (usize, usize),
    out_len: usize,
    horizontal: bool,
    filter: Filter,
) -> Vec<u8> {
    let in_len = if horizontal { width } else { height };
    let coefficients = Coefficients::new(in_len, out_len, filter);
    let (out_w, out_h) = if horizontal {
        (out_len, height)
    } else {
        (width, out_len)
    };
    let mut out = vec![0u8; out_w * out_h * 3];
    for y in 0..out_h {
        for x in 0..out_w {
            let (first, weights) = &coefficients.taps[if horizontal { x } else { y }];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (i, &k) in weights.iter().enumerate() {
                let (sx, sy) = if horizontal {
                    (first + i, y)
                } else {
                    (x, first + i)
                };
                let at = (sy * width + sx) * 3;
                for c in 0..3 {
                    acc[c] += i32::from(src[at + c]) * k;
                }
            }
            let at = (y * out_w + x) * 3;
            for c in 0..3 {
                out[at + c] = clip8(acc[c]);
            }
        }
    }
    out
}

/// `image.resize((width, height), filter)` as Pillow computes it.
pub fn resize(image: &RgbImage, width: u32, height: u32, filter: Filter) -> RgbImage {
    let (in_w, in_h) = image.dimensions();
    if (in_w, in_h) == (width, height) {
        return image.clone();
    }
    if [in_w, in_h, width, height].contains(&0) {
        return RgbImage::new(width, height);
    }
    let (mut data, mut size) = (image.as_raw().clone(), (in_w as usize, in_h as usize));
    if in_w != width {
        data = pass(&data, size, width as usize, true, filter);
        size.0 = width as usize;
    }
    if in_h != height {
        data = pass(&data, size, height as usize, false, filter);
    }
    // The buffer has exactly width × height × 3 bytes by construction.
    RgbImage::from_raw(width, height, data).unwrap_or_else(|| RgbImage::new(width, height))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (input, output) in [(48, 32), (32, 48), (40, 32), (7, 3)] {
                for (_, weights) in Coefficients::new(input, output, filter).taps {
                    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
                    // Rounding each weight can move the sum by half a unit per tap.
                    assert!(
                        (total - (1 << PRECISION_BITS)).abs() <= weights.len() as i64,
                        "{filter:?} {input}->{output}: {total}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_same_size_is_a_copy() {
        let flat = RgbImage::from_pixel(9, 5, image::Rgb([200, 10, 77]));
        let out = resize(&flat, 4, 7, Filter::Bicubic);
        assert!(out.pixels().all(|p| p.0 == [200, 10, 77]));
        assert_eq!(resize(&flat, 9, 5, Filter::Lanczos), flat);
    }
}
