//! 3×3 convolutions (stride 1, padding 1: nearly every convolution of a UNet and a VAE) on the
//! CPU in float32 as tiles of im2col × one matrix product, without candle's per-call costs.
//!
//! candle's CPU conv2d copies the whole input to NHWC serially, re-flattens the weights on every
//! call and builds 512-pixel column blocks with strided writes (../shared/PERF-NOTES.md §1-2: 2-2.5×
//! torch at the VAE's and UNet's large levels). Here the weight tensor is used as it is laid out
//! (c_out × c_in·9), each tile of output pixels gets its column block from
//! `fastfusion_kernels::im2col_3x3` (parallel, contiguous runs) and one gemm gives that tile of
//! the output directly in NCHW order. Other shapes, devices and dtypes take candle's conv2d.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::Conv2d;

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
    let (b, c_in, h, w) = xs.dims4()?;
    let (c_out, w_in, _, _) = weight.dims4()?;
    if w_in != c_in {
        candle_core::bail!("conv3x3: input has {c_in} channels, the weight expects {w_in}");
    }
    let k = c_in * 9;
    let matrix = weight.reshape((c_out, k))?;
    let pixels = h * w;
    let tile = (TILE_FLOATS / k).max(256).min(pixels.max(1));
    let xs = xs.contiguous()?;
    let mut images = Vec::with_capacity(b);
    for image in 0..b {
        let one = xs.get(image)?;
        let mut tiles = Vec::with_capacity(pixels.div_ceil(tile));
        let mut first = 0;
        while first < pixels {
            let len = tile.min(pixels - first);
            let op = Im2Col {
                height: h,
                width: w,
                first,
                len,
            };
            let columns = one.apply_op1_no_bwd(&op)?;
            tiles.push(matrix.matmul(&columns)?);
            first += len;
        }
        let out = if tiles.len() == 1 {
            tiles.remove(0)
        } else {
            Tensor::cat(&tiles, 1)?
        };
        images.push(out.reshape((c_out, h, w))?);
    }
    // One image (the VAE, or a UNet without guidance) needs no stacking copy.
    let out = match images.as_slice() {
        [one] => one.unsqueeze(0)?,
        _ => Tensor::stack(&images, 0)?,
    };
    match bias {
        Some(bias) => out.broadcast_add(&bias.reshape((1, c_out, 1, 1))?),
        None => Ok(out),
    }
}

/// The (c_in·9, len) column block of output pixels `first..first + len` of one (c_in, h, w) image.
struct Im2Col {
    height: usize,
    width: usize,
    first: usize,
    len: usize,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col-3x3"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("im2col takes float32");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("im2col takes a contiguous input");
        };
        let channels = layout.dims()[0];
        let mut out = vec![0f32; channels * 9 * self.len];
        fastfusion_kernels::im2col_3x3(
            &data[start..end],
            (channels, self.height, self.width),
            self.first,
            self.len,
            &mut out,
        );
        Ok((CpuStorage::F32(out), Shape::from((channels * 9, self.len))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::Conv2dConfig;

    #[test]
    fn equals_candles_conv2d() -> Result<()> {
        let device = Device::Cpu;
        // One tile, several tiles (TILE_FLOATS / (c_in·9) < h·w), odd sizes, no bias.
        for (b, c_in, c_out, h, w, bias) in [
            (2, 4, 6, 5, 7, true),
            (1, 3, 2, 1, 1, true),
            (1, 512, 8, 40, 30, false),
        ] {
            let xs = Tensor::randn(0f32, 1.0, (b, c_in, h, w), &device)?;
            let weight = Tensor::randn(0f32, 0.2, (c_out, c_in, 3, 3), &device)?;
            let bias = bias
                .then(|| Tensor::randn(0f32, 1.0, c_out, &device))
                .transpose()?;
            let cfg = Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let conv = Conv2d::new(weight.clone(), bias.clone(), cfg);
            let want = conv.forward(&xs)?;
            let got = forward(&conv, &xs)?;
            assert_eq!(got.dims(), want.dims());
            let diff: f32 = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            let scale: f32 = want.abs()?.flatten_all()?.max(0)?.to_scalar()?;
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{b}x{c_in}x{h}x{w}: differs by {diff}"
            );
        }
        Ok(())
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
