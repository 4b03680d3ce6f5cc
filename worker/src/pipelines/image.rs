//! Conversion of decoded VAE output to 8-bit RGB images.
//!
//! Same arithmetic as diffusers' `VaeImageProcessor.postprocess(output_type="pil")`: the VAE
//! output in [-1, 1] becomes `(x / 2 + 0.5).clamp(0, 1)`, then `x * 255` rounded half to even (numpy's `round`) as u8, in float32.

use candle_core::{DType, Tensor};
use image::RgbImage;

use crate::error::{Result, WorkerError};

/// `images`: (batch, 3, height, width) in [-1, 1], any dtype and device. One image per batch entry.
pub fn to_rgb_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, channels, height, width) = images.dims4()?;
    if channels != 3 {
        return Err(WorkerError::Internal(format!(
            "decoded images have {channels} channels, expected 3"
        )));
    }
    let pixels = ((images.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        // (batch, h, w, 3): the interleaved layout `RgbImage` stores.
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_device(&candle_core::Device::Cpu)?
        .to_vec1::<f32>()?;
    // numpy rounds halves to even; the value is already within [0, 255].
    let pixels: Vec<u8> = pixels.iter().map(|v| v.round_ties_even() as u8).collect();
    let per_image = height * width * 3;
    let (w, h) = (
        u32::try_from(width).map_err(|e| WorkerError::Internal(e.to_string()))?,
        u32::try_from(height).map_err(|e| WorkerError::Internal(e.to_string()))?,
    );
    (0..batch)
        .map(|i| {
            let chunk = pixels[i * per_image..(i + 1) * per_image].to_vec();
            RgbImage::from_raw(w, h, chunk)
                .ok_or_else(|| WorkerError::Internal("image buffer has the wrong size".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn maps_range_and_layout() -> Result<()> {
        // One 1x2 image: pixel (0,0) = (-1, 0, 1), pixel (0,1) = (2, -3, -0.01).
        let data = [-1f32, 2.0, 0.0, -3.0, 1.0, -0.01];
        let t = Tensor::from_slice(&data, (1, 3, 1, 2), &Device::Cpu)?;
        let images = to_rgb_images(&t)?;
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].dimensions(), (2, 1));
        assert_eq!(images[0].get_pixel(0, 0).0, [0, 128, 255]);
        // 0 -> 127.5 -> 128 (half to even); -0.01 -> 126.225 -> 126.
        assert_eq!(images[0].get_pixel(1, 0).0, [255, 0, 126]);
        Ok(())
    }
}
