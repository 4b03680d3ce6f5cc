//! Winograd convolution for 3×3, stride-1, padding-1 float32 convolutions (Lavin & Gray, "Fast
//! Algorithms for Convolutional Neural Networks", 2015): an m×m block of output pixels of one
//! channel pair is computed from an α×α block of input (α = m + 2) with α² multiplications
//! instead of 9·m², so a convolution becomes α² independent matrix products over channels
//! with (m + 2)²/(9·m²) of the direct method's multiply-adds: F(2×2, 3×3) 16/36 (2.25× fewer),
//! F(4×4, 3×3) 36/144 (4× fewer). The transforms are linear maps applied along x then y:
//!   U = G g Gᵀ (weights, 3×3 → α×α), V = Bᵀ d B (input block), Y = Aᵀ (Σ_c U ⊙ V) A (output).
//! F(4×4) evaluates at the points 0, ±1, ±2, ∞ (the usual choice): its transforms have entries
//! up to 8 and 1/24, so it loses about one decimal digit of float32 against the direct sum;
//! F(2×2) (points 0, ±1, ∞) is as accurate as the direct sum.
//!
//! Layouts (the worker's op does the matrix products with candle's gemm in between):
//! - weights: `[c_out][α²][c_in]` from the `(c_out, c_in, 3, 3)` weight;
//! - input blocks: `[c_in][α²][T]` for the T tiles of a chunk of tile rows;
//! - products: `[α²][c_out][T]` (for each of the α² points, weights × input blocks);
//! - output: the NCHW output, written block by block with the bias.
//!
//! Tiles are numbered over (image, tile row, tile column); a chunk is a range of global tile
//! rows (`image · tiles_y + tile_row`), so small feature maps of several images still fill one
//! matrix product. The last tile row and column of an odd-sized map read zeros past the edge and
//! write only the pixels inside.

use rayon::prelude::*;

/// The output block size of a Winograd convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    /// F(2×2, 3×3): 4×4 input blocks, 16 products.
    F2,
    /// F(4×4, 3×3): 6×6 input blocks, 36 products.
    F4,
}

impl Tile {
    /// Output pixels per block side (m).
    pub fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }

    /// Input pixels per block side (α = m + 2).
    pub fn alpha(self) -> usize {
        self.m() + 2
    }

    /// The number of matrix products (α²).
    pub fn points(self) -> usize {
        self.alpha() * self.alpha()
    }
}

/// Where the tiles of one convolution lie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub tile: Tile,
    pub batch: usize,
    pub height: usize,
    pub width: usize,
}

impl Geometry {
    pub fn tiles_x(&self) -> usize {
        self.width.div_ceil(self.tile.m())
    }

    pub fn tiles_y(&self) -> usize {
        self.height.div_ceil(self.tile.m())
    }

    /// Tile rows over all images.
    pub fn rows(&self) -> usize {
        self.batch * self.tiles_y()
    }
}

// --- The 1-D transforms (applied along x, then along y) ------------------------------------

#[inline(always)]
fn weight_f2(g: [f32; 3]) -> [f32; 4] {
    [
        g[0],
        0.5 * (g[0] + g[1] + g[2]),
        0.5 * (g[0] - g[1] + g[2]),
        g[2],
    ]
}

#[inline(always)]
fn input_f2(d: [f32; 4]) -> [f32; 4] {
    [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]
}

#[inline(always)]
fn output_f2(s: [f32; 4]) -> [f32; 2] {
    [s[0] + s[1] + s[2], s[1] - s[2] - s[3]]
}

#[inline(always)]
fn weight_f4(g: [f32; 3]) -> [f32; 6] {
    // Computed in float64: these are done once per weight, and the 1/6 and 1/24 do not round
    // exactly in float32.
    let [a, b, c] = g.map(f64::from);
    [
        a / 4.0,
        -(a + b + c) / 6.0,
        -(a - b + c) / 6.0,
        a / 24.0 + b / 12.0 + c / 6.0,
        a / 24.0 - b / 12.0 + c / 6.0,
        c,
    ]
    .map(|v| v as f32)
}

#[inline(always)]
fn input_f4(d: [f32; 6]) -> [f32; 6] {
    let [d0, d1, d2, d3, d4, d5] = d;
    // Shared sums, as in the standard factorisation of Bᵀ.
    let (t0, t1) = (d4 - 4.0 * d2, d3 - 4.0 * d1);
    let (t2, t3) = (d4 - d2, 2.0 * (d3 - d1));
    [
        4.0 * d0 - 5.0 * d2 + d4,
        t0 + t1,
        t0 - t1,
        t2 + t3,
        t2 - t3,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

#[inline(always)]
fn output_f4(s: [f32; 6]) -> [f32; 4] {
    let [s0, s1, s2, s3, s4, s5] = s;
    let (p12, m12) = (s1 + s2, s1 - s2);
    let (p34, m34) = (s3 + s4, s3 - s4);
    [
        s0 + p12 + p34,
        m12 + 2.0 * m34,
        p12 + 4.0 * p34,
        m12 + 8.0 * m34 + s5,
    ]
}

/// Lanes per step of [`planar`]: enough for LLVM to fill whole vector registers.
const LANES: usize = 16;

/// A 1-D transform applied lane-wise to planar data: for i < n,
/// `(out[base + k·stride + i])_k = f((src_j[i])_j)`. Loads and stores go through fixed-size
/// local blocks so that the transform vectorises across lanes (`f` is a handful of adds).
#[inline(always)]
fn planar<const N: usize, const K: usize>(
    src: [&[f32]; N],
    n: usize,
    out: &mut [f32],
    (base, stride): (usize, usize),
    f: impl Fn([f32; N]) -> [f32; K],
) {
    let mut i0 = 0;
    while i0 < n {
        let len = LANES.min(n - i0);
        let mut block = [[0f32; LANES]; N];
        if len == LANES {
            // Fixed-length copies: inlined moves rather than a memcpy call per row.
            for (b, s) in block.iter_mut().zip(&src) {
                *b = s[i0..i0 + LANES]
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("a slice of LANES values"));
            }
        } else {
            for (b, s) in block.iter_mut().zip(&src) {
                b[..len].copy_from_slice(&s[i0..i0 + len]);
            }
        }
        let mut result = [[0f32; LANES]; K];
        for l in 0..LANES {
            let v = f(std::array::from_fn(|j| block[j][l]));
            for (r, v) in result.iter_mut().zip(v) {
                r[l] = v;
            }
        }
        for (k, r) in result.iter().enumerate() {
            let at = base + k * stride + i0;
            if len == LANES {
                let dst: &mut [f32; LANES] = (&mut out[at..at + LANES])
                    .try_into()
                    .unwrap_or_else(|_| unreachable!("a slice of LANES values"));
                *dst = *r;
            } else {
                out[at..at + len].copy_from_slice(&r[..len]);
            }
        }
        i0 += len;
    }
}

// --- Weights ---------------------------------------------------------------------------------

/// The transformed weights `[c_out][α²][c_in]` of a `(c_out, c_in, 3, 3)` weight; parallel over
/// output channels, vectorised over input channels. Panics if `weight` is not
/// `c_out · c_in · 9` values.
pub fn weights(tile: Tile, weight: &[f32], c_out: usize, c_in: usize) -> Vec<f32> {
    assert_eq!(weight.len(), c_out * c_in * 9);
    let points = tile.points();
    let mut out = vec![0f32; c_out * points * c_in];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(points * c_in)
        .zip(weight.par_chunks(c_in * 9))
        .for_each(|(out, weight)| {
            crate::vectorised(
                #[inline(always)]
                || match tile {
                    Tile::F2 => weights_of::<4>(weight, c_in, out, weight_f2),
                    Tile::F4 => weights_of::<6>(weight, c_in, out, weight_f4),
                },
            )
        });
    out
}

/// One output channel: `weight` is (c_in, 3, 3), `out` is `[α²][c_in]`.
#[inline(always)]
fn weights_of<const A: usize>(
    weight: &[f32],
    c_in: usize,
    out: &mut [f32],
    f: impl Fn([f32; 3]) -> [f32; A] + Copy,
) {
    // Planar taps: taps[tap][ci].
    let mut taps = vec![0f32; 9 * c_in];
    for (ci, g) in weight.chunks_exact(9).enumerate() {
        for (tap, v) in g.iter().enumerate() {
            taps[tap * c_in + ci] = *v;
        }
    }
    let tap = |t: usize| &taps[t * c_in..(t + 1) * c_in];
    // Along x: rows[ky][kx'][ci].
    let mut rows = vec![0f32; 3 * A * c_in];
    for ky in 0..3 {
        let src = [tap(3 * ky), tap(3 * ky + 1), tap(3 * ky + 2)];
        planar(src, c_in, &mut rows, (ky * A * c_in, c_in), f);
    }
    // Along y: point (ky', kx') at out[(ky'·α + kx')·c_in + ci].
    for kx in 0..A {
        let row = |ky: usize| &rows[(ky * A + kx) * c_in..(ky * A + kx + 1) * c_in];
        planar(
            [row(0), row(1), row(2)],
            c_in,
            out,
            (kx * c_in, A * c_in),
            f,
        );
    }
}

// --- Input -----------------------------------------------------------------------------------

/// The transformed input blocks `[c_in][α²][T]` of the tile rows `first..first + rows` of a
/// contiguous `(batch, c_in, height, width)` input, T = rows · tiles_x; parallel over input
/// channels, vectorised over tile columns. Panics on slices that do not match the geometry.
pub fn input(
    geometry: &Geometry,
    input: &[f32],
    c_in: usize,
    (first, rows): (usize, usize),
    out: &mut [f32],
) {
    let Geometry {
        tile,
        batch,
        height,
        width,
    } = *geometry;
    let plane = height * width;
    assert_eq!(input.len(), batch * c_in * plane);
    assert!(first + rows <= geometry.rows());
    let tiles = rows * geometry.tiles_x();
    assert_eq!(out.len(), c_in * tile.points() * tiles);
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(tile.points() * tiles)
        .enumerate()
        .for_each(|(ci, out)| {
            crate::vectorised(
                #[inline(always)]
                || match tile {
                    Tile::F2 => {
                        input_channel::<4>(geometry, input, c_in, ci, first, rows, out, input_f2)
                    }
                    Tile::F4 => {
                        input_channel::<6>(geometry, input, c_in, ci, first, rows, out, input_f4)
                    }
                },
            )
        });
}

/// One input channel's blocks for the chunk. Per tile row: the α input rows it reads (zero
/// padded to x = −1 … m·tiles_x), transformed along y lane-wise over x; each result row split
/// into its m phases (x ≡ p mod m), so that the j-th pixel of every tile's window is one
/// contiguous run (phase j mod m, from tile j / m on); then transformed along x lane-wise over
/// the tiles, straight into the `[α²][T]` output.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn input_channel<const A: usize>(
    geometry: &Geometry,
    input: &[f32],
    c_in: usize,
    ci: usize,
    first: usize,
    rows: usize,
    out: &mut [f32],
    f: impl Fn([f32; A]) -> [f32; A] + Copy,
) {
    let (m, height, width) = (geometry.tile.m(), geometry.height, geometry.width);
    let (tiles_x, tiles_y) = (geometry.tiles_x(), geometry.tiles_y());
    let tiles = rows * tiles_x;
    let plane = height * width;
    // Padded row length: x = −1 … m·tiles_x (the last window ends at m·(tiles_x − 1) + m).
    let padded = m * tiles_x + 2;
    let mut lines = vec![0f32; A * padded];
    let mut transformed = vec![0f32; A * padded];
    // phases[k][p][tx] = transformed[k][m·tx + p]; one extra tile column for windows that
    // reach into the next tile.
    let phase_len = tiles_x + 1;
    let mut phases = vec![0f32; A * m * phase_len];
    for r in 0..rows {
        let (image, ty) = ((first + r) / tiles_y, (first + r) % tiles_y);
        let source = &input[(image * c_in + ci) * plane..(image * c_in + ci + 1) * plane];
        for (dy, line) in lines.chunks_exact_mut(padded).enumerate() {
            line.fill(0.0);
            if let Some(y) = (m * ty + dy).checked_sub(1).filter(|&y| y < height) {
                line[1..1 + width].copy_from_slice(&source[y * width..(y + 1) * width]);
            }
        }
        let line = |j: usize| &lines[j * padded..(j + 1) * padded];
        planar(
            std::array::from_fn(line),
            padded,
            &mut transformed,
            (0, padded),
            f,
        );
        for (k, row) in transformed.chunks_exact(padded).enumerate() {
            for p in 0..m {
                let dst = &mut phases[(k * m + p) * phase_len..(k * m + p + 1) * phase_len];
                dst.fill(0.0);
                for (d, v) in dst.iter_mut().zip(row[p..].iter().step_by(m)) {
                    *d = *v;
                }
            }
        }
        for ky in 0..A {
            let window = |j: usize| {
                let at = (ky * m + j % m) * phase_len + j / m;
                &phases[at..at + tiles_x]
            };
            planar(
                std::array::from_fn(window),
                tiles_x,
                out,
                (ky * A * tiles + r * tiles_x, tiles),
                f,
            );
        }
    }
}

// --- Output ----------------------------------------------------------------------------------

/// Writes the output pixels of the tile rows `first..first + rows` into the contiguous
/// `(batch, c_out, height, width)` `out` from their `[α²][c_out][T]` products, adding
/// `bias[c]`; parallel over (image, output channel) planes, vectorised over tile columns.
/// Panics on slices that do not match.
pub fn output(
    geometry: &Geometry,
    product: &[f32],
    c_out: usize,
    (first, rows): (usize, usize),
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let Geometry {
        tile,
        batch,
        height,
        width,
    } = *geometry;
    let plane = height * width;
    assert_eq!(out.len(), batch * c_out * plane);
    assert!(first + rows <= geometry.rows());
    assert_eq!(
        product.len(),
        tile.points() * c_out * rows * geometry.tiles_x()
    );
    assert!(bias.is_none_or(|b| b.len() == c_out));
    if out.is_empty() {
        return;
    }
    let tiles_y = geometry.tiles_y();
    let images = first / tiles_y..(first + rows).div_ceil(tiles_y);
    out.par_chunks_mut(plane)
        .enumerate()
        .filter(|(index, _)| images.contains(&(index / c_out)))
        .for_each(|(index, out)| {
            let (image, co) = (index / c_out, index % c_out);
            let shift = bias.map_or(0.0, |b| b[co]);
            crate::vectorised(
                #[inline(always)]
                || match tile {
                    Tile::F2 => output_plane::<4, 2>(
                        geometry, product, c_out, image, co, first, rows, shift, out, output_f2,
                    ),
                    Tile::F4 => output_plane::<6, 4>(
                        geometry, product, c_out, image, co, first, rows, shift, out, output_f4,
                    ),
                },
            )
        });
}

/// One (image, output channel) plane: per tile row, the α² product rows (contiguous over the
/// tile columns) transformed along x, then along y, lane-wise over tiles; then the m×m pixels
/// of every tile interleaved into the picture's rows with the bias.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn output_plane<const A: usize, const M: usize>(
    geometry: &Geometry,
    product: &[f32],
    c_out: usize,
    image: usize,
    co: usize,
    first: usize,
    rows: usize,
    shift: f32,
    out: &mut [f32],
    f: impl Fn([f32; A]) -> [f32; M] + Copy,
) {
    let (height, width) = (geometry.height, geometry.width);
    let (tiles_x, tiles_y) = (geometry.tiles_x(), geometry.tiles_y());
    let tiles = rows * tiles_x;
    // along_x[ky][ox][tx], pixels[oy][ox][tx].
    let mut along_x = vec![0f32; A * M * tiles_x];
    let mut pixels = vec![0f32; M * M * tiles_x];
    // This image's tile rows within the chunk.
    let start = first.max(image * tiles_y);
    let end = (first + rows).min((image + 1) * tiles_y);
    for global in start..end {
        let (r, ty) = (global - first, global - image * tiles_y);
        for ky in 0..A {
            let point = |kx: usize| {
                let at = ((ky * A + kx) * c_out + co) * tiles + r * tiles_x;
                &product[at..at + tiles_x]
            };
            planar(
                std::array::from_fn(point),
                tiles_x,
                &mut along_x,
                (ky * M * tiles_x, tiles_x),
                f,
            );
        }
        for ox in 0..M {
            let row = |ky: usize| &along_x[(ky * M + ox) * tiles_x..(ky * M + ox + 1) * tiles_x];
            planar(
                std::array::from_fn(row),
                tiles_x,
                &mut pixels,
                (ox * tiles_x, M * tiles_x),
                f,
            );
        }
        let y0 = ty * M;
        for oy in 0..M.min(height - y0) {
            let line = &mut out[(y0 + oy) * width..(y0 + oy + 1) * width];
            for ox in 0..M {
                let values = &pixels[(oy * M + ox) * tiles_x..(oy * M + ox + 1) * tiles_x];
                for (o, v) in line.iter_mut().skip(ox).step_by(M).zip(values) {
                    *o = v + shift;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A direct 3×3 convolution with padding 1, in float64.
    fn direct(
        input: &[f32],
        weight: &[f32],
        (b, c_in, h, w): (usize, usize, usize, usize),
        c_out: usize,
    ) -> Vec<f64> {
        let mut out = vec![0f64; b * c_out * h * w];
        for n in 0..b {
            for o in 0..c_out {
                for y in 0..h {
                    for x in 0..w {
                        let mut sum = 0f64;
                        for c in 0..c_in {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (sy, sx) = (y + ky, x + kx);
                                    if sy == 0 || sx == 0 || sy > h || sx > w {
                                        continue;
                                    }
                                    let i = input[((n * c_in + c) * h + sy - 1) * w + sx - 1];
                                    let g = weight[(o * c_in + c) * 9 + ky * 3 + kx];
                                    sum += f64::from(i) * f64::from(g);
                                }
                            }
                        }
                        out[((n * c_out + o) * h + y) * w + x] = sum;
                    }
                }
            }
        }
        out
    }

    /// The whole Winograd convolution in chunks of `chunk` tile rows, with a naive product.
    fn winograd(
        tile: Tile,
        input_: &[f32],
        weight: &[f32],
        (b, c_in, h, w): (usize, usize, usize, usize),
        c_out: usize,
        chunk: usize,
        bias: &[f32],
    ) -> Vec<f32> {
        let geometry = Geometry {
            tile,
            batch: b,
            height: h,
            width: w,
        };
        let u = weights(tile, weight, c_out, c_in);
        let points = tile.points();
        let mut out = vec![f32::NAN; b * c_out * h * w];
        let mut first = 0;
        while first < geometry.rows() {
            let rows = chunk.min(geometry.rows() - first);
            let tiles = rows * geometry.tiles_x();
            let mut v = vec![f32::NAN; c_in * points * tiles];
            input(&geometry, input_, c_in, (first, rows), &mut v);
            let mut product = vec![0f32; points * c_out * tiles];
            for k in 0..points {
                for o in 0..c_out {
                    for t in 0..tiles {
                        let mut sum = 0f32;
                        for c in 0..c_in {
                            sum += u[(o * points + k) * c_in + c] * v[(c * points + k) * tiles + t];
                        }
                        product[(k * c_out + o) * tiles + t] = sum;
                    }
                }
            }
            output(
                &geometry,
                &product,
                c_out,
                (first, rows),
                Some(bias),
                &mut out,
            );
            first += rows;
        }
        out
    }

    #[test]
    fn both_tiles_equal_the_direct_convolution() {
        // Odd and even sizes (partial last tiles), one-pixel maps, chunks that split images.
        for (b, c_in, c_out, h, w, chunk) in [
            (1, 1, 1, 4, 4, 1),
            (2, 3, 2, 5, 7, 2),
            (1, 4, 3, 1, 1, 1),
            (3, 2, 4, 9, 6, 4),
            (2, 5, 2, 8, 8, 100),
        ] {
            let input: Vec<f32> = (0..b * c_in * h * w)
                .map(|i| ((i * 37) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let weight: Vec<f32> = (0..c_out * c_in * 9)
                .map(|i| ((i * 13) % 17) as f32 / 8.0 - 1.0)
                .collect();
            let bias: Vec<f32> = (0..c_out).map(|o| o as f32 * 0.25 - 0.5).collect();
            let want = direct(&input, &weight, (b, c_in, h, w), c_out);
            for tile in [Tile::F2, Tile::F4] {
                let got = winograd(tile, &input, &weight, (b, c_in, h, w), c_out, chunk, &bias);
                for (i, (g, d)) in got.iter().zip(&want).enumerate() {
                    let o = i / (h * w) % c_out;
                    let want = d + f64::from(bias[o]);
                    assert!(
                        (f64::from(*g) - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{tile:?} {b}x{c_in}x{h}x{w} → {c_out}, chunk {chunk}, [{i}]: {g} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_transforms_are_exact_on_integers() {
        // One channel, one 4×4 (F2) or 6×6 (F4) block inside the picture: the output block is
        // the direct sum exactly for small integers (F2 exactly; F4 within its 1/24 rounding).
        let (h, w) = (8, 8);
        let input: Vec<f32> = (0..h * w).map(|i| (i % 5) as f32).collect();
        let weight: Vec<f32> = (0..9).map(|i| i as f32 - 4.0).collect();
        let want = direct(&input, &weight, (1, 1, h, w), 1);
        let got = winograd(Tile::F2, &input, &weight, (1, 1, h, w), 1, 1, &[0.0]);
        for (g, d) in got.iter().zip(&want) {
            assert_eq!(f64::from(*g), *d);
        }
        let got = winograd(Tile::F4, &input, &weight, (1, 1, h, w), 1, 1, &[0.0]);
        for (g, d) in got.iter().zip(&want) {
            assert!((f64::from(*g) - d).abs() < 1e-4, "{g} vs {d}");
        }
    }
}
