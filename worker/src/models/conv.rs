//! 3×3 convolutions (stride 1, padding 1: nearly every convolution of a UNet and a VAE) on the
//! CPU in float32, without candle's per-call costs, by one of two methods chosen per call
//! ([`Method::choose`]): Winograd (`fastfusion_kernels::winograd`: 4× or 2.25× fewer
//! multiply-adds, for large maps) or tiles of im2col × one matrix product (small maps with many
//! channels, where Winograd's per-call weight transform costs more than it saves).
//!
//! candle's CPU conv2d copies the whole input to NHWC serially, re-flattens the weights on every
//! call and builds 512-pixel column blocks with strided writes (../shared/PERF-NOTES.md §1-2: 2-2.5×
//! torch at the VAE's and UNet's large levels). Here the weight tensor is used as it is laid out
//! (c_out × c_in·9), each tile of output pixels gets its column block from
//! `fastfusion_kernels::im2col_3x3` (parallel, contiguous runs) and one gemm (candle's CPU
//! matmul) gives that tile of the output, which is written into its place in the NCHW output
//! with the bias added. Other shapes, devices and dtypes take candle's conv2d.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Conv2d;
use fastfusion_kernels::winograd::{self, Geometry, Tile};

/// Most floats of one column tile (16 MiB): big enough for an efficient gemm, small enough to
/// stay out of the page-faulting sizes of fresh allocations.
const TILE_FLOATS: usize = 4 << 20;

/// `conv.forward(xs)`, through [`conv3x3`] when the layer and input allow it.
pub fn forward(conv: &Conv2d, xs: &Tensor) -> Result<Tensor> {
    let cfg = conv.config();
    let weight = conv.weight();
    let fast = cfg.stride == 1
        && cfg.padding == 1
        && cfg.dilation == 1
        && cfg.groups == 1
        && xs.device().is_cpu()
        && xs.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && xs.rank() == 4
        && matches!(weight.dims(), [_, _, 3, 3]);
    if fast {
        conv3x3(xs, weight, conv.bias())
    } else {
        conv.forward(xs)
    }
}

/// A 3×3, stride-1, padding-1 convolution of (b, c_in, h, w) float32 `xs` on the CPU.
pub fn conv3x3(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    conv3x3_with(xs, weight, bias, None)
}

/// [`conv3x3`] by a given method, or the one chosen from the shapes (`None`).
pub fn conv3x3_with(
    xs: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    method: Option<Method>,
) -> Result<Tensor> {
    let (_, c_in, _, _) = xs.dims4()?;
    let (c_out, w_in, _, _) = weight.dims4()?;
    if w_in != c_in {
        candle_core::bail!("conv3x3: input has {c_in} channels, the weight expects {w_in}");
    }
    if xs.elem_count() == 0 || weight.elem_count() == 0 {
        // The op below divides by c_in·9 and chunks by image size.
        candle_core::bail!(
            "conv3x3: empty input {:?} or weight {:?}",
            xs.dims(),
            weight.dims()
        );
    }
    let bias = match bias {
        Some(bias) => Some(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    if bias.as_ref().is_some_and(|b| b.len() != c_out) {
        candle_core::bail!("conv3x3: the bias does not have {c_out} values");
    }
    xs.contiguous()?
        .apply_op2_no_bwd(&weight.contiguous()?, &Conv3x3 { bias, method })
}

/// The whole convolution in one op: the output is allocated once and each tile's product is
/// written into its place with the bias added, so no tile concatenation, image stacking or
/// separate bias pass makes further output-sized copies (at the VAE's 512² level one output is
/// 128 MiB, and every fresh allocation of that size page-faults).
struct Conv3x3 {
    bias: Option<Vec<f32>>,
    /// Forced by tests; otherwise chosen per call from the shapes.
    method: Option<Method>,
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "conv3x3"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = xs else {
            candle_core::bail!("conv3x3 takes float32");
        };
        let (Some((start, end)), Some((w_start, _))) = (
            xs_layout.contiguous_offsets(),
            weight_layout.contiguous_offsets(),
        ) else {
            candle_core::bail!("conv3x3 takes contiguous tensors");
        };
        let [b, c_in, h, w] = *xs_layout.dims() else {
            candle_core::bail!("conv3x3 takes (b, c, h, w)");
        };
        let c_out = weight_layout.dims()[0];
        let input = &data[start..end];
        let weight_data = match weight {
            CpuStorage::F32(w) => w.get(w_start..w_start + c_out * c_in * 9),
            _ => None,
        };
        let Some(weight_data) = weight_data else {
            candle_core::bail!("conv3x3 takes a float32 (c_out, c_in, 3, 3) weight");
        };
        let method = self
            .method
            .unwrap_or_else(|| Method::choose(b, c_in, c_out, h, w));
        let out = match method {
            Method::Im2col => self.im2col(input, weight, w_start, (b, c_in, h, w), c_out)?,
            Method::Winograd(tile) => {
                let geometry = Geometry {
                    tile,
                    batch: b,
                    height: h,
                    width: w,
                };
                self.winograd(&geometry, input, weight_data, c_in, c_out)?
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))))
    }
}

/// How one call is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Im2col,
    Winograd(Tile),
}

impl Method {
    pub const ALL: [Method; 3] = [
        Method::Im2col,
        Method::Winograd(Tile::F2),
        Method::Winograd(Tile::F4),
    ];

    /// The op's name in benchmark tables.
    pub fn name(self) -> &'static str {
        match self {
            Method::Im2col => "conv3x3/im2col",
            Method::Winograd(Tile::F2) => "conv3x3/wino-f2",
            Method::Winograd(Tile::F4) => "conv3x3/wino-f4",
        }
    }

    /// The method for a call's shapes: the cheapest by a cost model fitted to `bench --mode
    /// ops` on the 2-core development machine (AVX-512 gemm): im2col's products run at about
    /// 230 GFLOP/s, Winograd's α² thinner ones at about 170; Winograd also transforms its
    /// weights on every call (about 1.5 ns per transformed value, which is what rules it out
    /// for 1280 channels on small maps) and its input and output blocks (about 0.5 ns per
    /// value). `FASTFUSION_CONV3X3=im2col|f2|f4` forces one (for benchmarks).
    pub fn choose(batch: usize, c_in: usize, c_out: usize, h: usize, w: usize) -> Method {
        forced_method().unwrap_or_else(|| Method::cheapest(batch, c_in, c_out, h, w))
    }

    /// The cost model's choice (see [`Method::choose`]).
    fn cheapest(batch: usize, c_in: usize, c_out: usize, height: usize, width: usize) -> Method {
        let pairs = (c_in * c_out) as f64;
        let im2col_ns = 2.0 * 9.0 * (batch * height * width) as f64 * pairs / 230.0;
        let winograd_ns = |tile: Tile| {
            let geometry = Geometry {
                tile,
                batch,
                height,
                width,
            };
            let tiles = (geometry.rows() * geometry.tiles_x()) as f64;
            let points = tile.points() as f64;
            2.0 * points * tiles * pairs / 170.0
                + 1.5 * points * pairs
                + 0.5 * points * tiles * (c_in + c_out) as f64
        };
        [Tile::F4, Tile::F2]
            .into_iter()
            .map(|tile| (Method::Winograd(tile), winograd_ns(tile)))
            .chain([(Method::Im2col, im2col_ns)])
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or(Method::Im2col, |(method, _)| method)
    }
}

fn forced_method() -> Option<Method> {
    static FORCED: OnceLock<Option<Method>> = OnceLock::new();
    *FORCED.get_or_init(
        || match std::env::var("FASTFUSION_CONV3X3").ok().as_deref() {
            Some("im2col") => Some(Method::Im2col),
            Some("f2") => Some(Method::Winograd(Tile::F2)),
            Some("f4") => Some(Method::Winograd(Tile::F4)),
            None | Some("") => None,
            Some(other) => {
                tracing::warn!(
                    value = other,
                    "FASTFUSION_CONV3X3 is not one of im2col, f2, f4: ignored, the method is chosen per call"
                );
                None
            }
        },
    )
}

impl Conv3x3 {
    /// Tiles of output pixels, each one product of the weight (c_out × c_in·9, as laid out)
    /// with its im2col columns.
    fn im2col(
        &self,
        input: &[f32],
        weight: &CpuStorage,
        w_start: usize,
        (b, c_in, h, w): (usize, usize, usize, usize),
        c_out: usize,
    ) -> Result<Vec<f32>> {
        let (k, pixels) = (c_in * 9, h * w);
        let tile = (TILE_FLOATS / k).max(256).min(pixels.max(1));
        let matrix = Layout::contiguous_with_offset((c_out, k), w_start);
        let mut out = vec![0f32; b * c_out * pixels];
        let images = input.chunks_exact(c_in * pixels);
        for (one, out) in images.zip(out.chunks_exact_mut(c_out * pixels)) {
            let mut first = 0;
            while first < pixels {
                let len = tile.min(pixels - first);
                let mut columns = vec![0f32; k * len];
                fastfusion_kernels::im2col_3x3(one, (c_in, h, w), first, len, &mut columns);
                let product = weight.matmul(
                    &CpuStorage::F32(columns),
                    (1, c_out, len, k),
                    &matrix,
                    &Layout::contiguous((k, len)),
                )?;
                let CpuStorage::F32(product) = product else {
                    candle_core::bail!("conv3x3: the product is not float32");
                };
                fastfusion_kernels::place_tile(&product, out, pixels, first, self.bias.as_deref());
                first += len;
            }
        }
        Ok(out)
    }

    /// Chunks of tile rows: input blocks transformed, α² products with the transformed weights
    /// (one batched gemm), output blocks written into the NCHW output with the bias.
    fn winograd(
        &self,
        geometry: &Geometry,
        input: &[f32],
        weight: &[f32],
        c_in: usize,
        c_out: usize,
    ) -> Result<Vec<f32>> {
        let points = geometry.tile.points();
        let tiles_x = geometry.tiles_x();
        let transformed = CpuStorage::F32(winograd::weights(geometry.tile, weight, c_out, c_in));
        // Read as α² matrices (c_out × c_in) from the [c_out][α²][c_in] layout.
        let lhs = Layout::new(
            Shape::from((points, c_out, c_in)),
            vec![c_in, points * c_in, 1],
            0,
        );
        let chunk = (TILE_FLOATS / (points * tiles_x * c_in.max(c_out))).clamp(1, geometry.rows());
        let mut out = vec![0f32; geometry.batch * c_out * geometry.height * geometry.width];
        let mut first = 0;
        while first < geometry.rows() {
            let rows = chunk.min(geometry.rows() - first);
            let tiles = rows * tiles_x;
            let mut blocks = vec![0f32; c_in * points * tiles];
            winograd::input(geometry, input, c_in, (first, rows), &mut blocks);
            // Read as α² matrices (c_in × T) from the [c_in][α²][T] layout.
            let rhs = Layout::new(
                Shape::from((points, c_in, tiles)),
                vec![tiles, points * tiles, 1],
                0,
            );
            let product = transformed.matmul(
                &CpuStorage::F32(blocks),
                (points, c_out, tiles, c_in),
                &lhs,
                &rhs,
            )?;
            let CpuStorage::F32(product) = product else {
                candle_core::bail!("conv3x3: the product is not float32");
            };
            winograd::output(
                geometry,
                &product,
                c_out,
                (first, rows),
                self.bias.as_deref(),
                &mut out,
            );
            first += rows;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Conv2dConfig;

    /// Values spread like N(0, std²) (a sum of four uniform draws of a fixed LCG), reproducible.
    fn draws(shape: impl Into<candle_core::Shape>, seed: u64, std: f32) -> Result<Tensor> {
        let shape = shape.into();
        let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let mut uniform = || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        // Four uniforms on [-0.5, 0.5) have variance 1/3.
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| (uniform() + uniform() + uniform() + uniform()) * std * 3f32.sqrt())
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu)
    }

    #[test]
    fn every_method_equals_candles_conv2d() -> Result<()> {
        // One tile, several tiles (TILE_FLOATS / (c_in·9) < h·w, and for Winograd several
        // chunks of tile rows), odd sizes (partial blocks), a 1×1 map, no bias.
        for (b, c_in, c_out, h, w, bias) in [
            (2, 4, 6, 5, 7, true),
            (1, 3, 2, 1, 1, true),
            (1, 512, 8, 40, 30, false),
            (2, 64, 16, 66, 33, true),
        ] {
            // Fixed pseudo-random values (candle's CPU normal draws cannot be seeded), so the
            // rounding differences measured below are the same on every run.
            let xs = draws((b, c_in, h, w), 1, 1.0)?;
            let weight = draws((c_out, c_in, 3, 3), 2, 0.2)?;
            let bias = bias.then(|| draws(c_out, 3, 1.0)).transpose()?;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let conv = Conv2d::new(weight.clone(), bias.clone(), cfg);
            let want = conv.forward(&xs)?;
            let scale: f32 = want.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            for method in [
                Method::Im2col,
                Method::Winograd(Tile::F2),
                Method::Winograd(Tile::F4),
            ] {
                let got = conv3x3_with(&xs, &weight, bias.as_ref(), Some(method))?;
                assert_eq!(got.dims(), want.dims());
                let diff: f32 = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
                // F(4×4) loses about a decimal digit of float32 (module docs of the kernel), more
                // with more input channels: 1.4e-5 of the largest value at 512 channels on these
                // draws (with unseeded normal draws it once reached 2.2e-5). gemm's kernel, and so
                // its summation order, differs between CPUs, hence the margin.
                let tolerance = if method == Method::Winograd(Tile::F4) {
                    3e-5
                } else {
                    1e-5
                };
                assert!(
                    diff <= tolerance * scale.max(1.0),
                    "{method:?} {b}x{c_in}x{h}x{w}: differs by {diff} (largest value {scale})"
                );
            }
            assert_eq!(forward(&conv, &xs)?.dims(), want.dims());
        }
        Ok(())
    }

    #[test]
    fn the_choice_follows_the_map_and_channel_sizes() {
        // The VAE's large levels and SD's top level: Winograd F(4×4); SD's 1280-channel levels
        // on small maps: im2col (the per-call weight transform would outweigh the savings).
        assert_eq!(
            Method::cheapest(1, 128, 128, 512, 512),
            Method::Winograd(Tile::F4)
        );
        assert_eq!(
            Method::cheapest(2, 320, 320, 32, 32),
            Method::Winograd(Tile::F4)
        );
        assert_eq!(Method::cheapest(2, 1280, 1280, 8, 8), Method::Im2col);
        assert_eq!(Method::cheapest(2, 1280, 1280, 16, 16), Method::Im2col);
        assert_eq!(Method::cheapest(1, 4, 4, 1, 1), Method::Im2col);
    }

    #[test]
    fn other_convolutions_take_candles_path() -> Result<()> {
        let device = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &device)?;
        let weight = Tensor::randn(0f32, 0.2, (4, 4, 3, 3), &device)?;
        let strided = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let conv = Conv2d::new(weight, None, strided);
        assert_eq!(forward(&conv, &xs)?.dims(), &[1, 4, 3, 3]);
        Ok(())
    }
}
