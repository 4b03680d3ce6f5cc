//! 3×3 convolutions (stride 1, padding 1: nearly every convolution of a UNet and a VAE) on the
//! CPU in float32 as tiles of im2col × one matrix product, without candle's per-call costs.
//!
//! candle's CPU conv2d copies the whole input to NHWC serially, re-flattens the weights on every
//! call and builds 512-pixel column blocks with strided writes (../shared/PERF-NOTES.md §1-2: 2-2.5×
//! torch at the VAE's and UNet's large levels). Here the weight tensor is used as it is laid out
//! (c_out × c_in·9), each tile of output pixels gets its column block from
//! `fastfusion_kernels::im2col_3x3` (parallel, contiguous runs) and one gemm (candle's CPU
//! matmul) gives that tile of the output, which is written into its place in the NCHW output
//! with the bias added. Other shapes, devices and dtypes take candle's conv2d.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
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
        .apply_op2_no_bwd(&weight.contiguous()?, &Conv3x3 { bias })
}

/// The whole convolution in one op: the output is allocated once and each tile's product is
/// written into its place with the bias added, so no tile concatenation, image stacking or
/// separate bias pass makes further output-sized copies (at the VAE's 512² level one output is
/// 128 MiB, and every fresh allocation of that size page-faults).
struct Conv3x3 {
    bias: Option<Vec<f32>>,
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
        let (k, pixels) = (c_in * 9, h * w);
        let tile = (TILE_FLOATS / k).max(256).min(pixels.max(1));
        // The weight as laid out, read as the (c_out, c_in·9) left-hand matrix.
        let matrix = Layout::contiguous_with_offset((c_out, k), w_start);
        let mut out = vec![0f32; b * c_out * pixels];
        let images = data[start..end].chunks_exact(c_in * pixels);
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
        Ok((CpuStorage::F32(out), Shape::from((b, c_out, h, w))))
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
