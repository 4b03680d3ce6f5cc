//! Encoding finished images into the bytes clients receive: PNG, JPEG or WebP.
//!
//! `output_compression` follows OpenAI: 0–100 for JPEG and WebP, where 100 is best quality.
//! The `image` crate's WebP encoder is lossless only, so WebP ignores the compression level
//! (documented in the README); JPEG maps it to the encoder's quality.

use std::io::Cursor;

use fastfusion_proto::OutputFormat;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

use crate::error::{Result, WorkerError};

/// JPEG quality when the request gives no `output_compression` (OpenAI's default for jpeg is 100).
const DEFAULT_JPEG_QUALITY: u8 = 100;

/// Encodes `image` as `format`; `compression` is OpenAI's `output_compression` (0..=100).
pub fn encode(image: &RgbImage, format: OutputFormat, compression: Option<u32>) -> Result<Vec<u8>> {
    if let Some(c) = compression {
        if c > 100 {
            return Err(WorkerError::invalid(
                "output_compression",
                format!("must be between 0 and 100, got {c}"),
            ));
        }
    }
    let mut out = Vec::with_capacity(image.as_raw().len() / 2);
    let (w, h) = image.dimensions();
    let pixels = image.as_raw();
    let result = match format {
        OutputFormat::Png => {
            PngEncoder::new(&mut out).write_image(pixels, w, h, ExtendedColorType::Rgb8)
        }
        OutputFormat::Jpeg => {
            // JPEG quality 0 is invalid for the encoder; OpenAI's 0 means "smallest".
            let quality = compression.map_or(DEFAULT_JPEG_QUALITY, |c| c.clamp(1, 100) as u8);
            JpegEncoder::new_with_quality(Cursor::new(&mut out), quality).write_image(
                pixels,
                w,
                h,
                ExtendedColorType::Rgb8,
            )
        }
        OutputFormat::Webp => {
            WebPEncoder::new_lossless(&mut out).write_image(pixels, w, h, ExtendedColorType::Rgb8)
        }
    };
    result.map_err(|e| WorkerError::Internal(format!("encoding {format:?}: {e}")))?;
    Ok(out)
}

/// The MIME type of `format`.
pub fn content_type(format: OutputFormat) -> &'static str {
    match format {
        OutputFormat::Png => "image/png",
        OutputFormat::Jpeg => "image/jpeg",
        OutputFormat::Webp => "image/webp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient() -> RgbImage {
        RgbImage::from_fn(24, 16, |x, y| {
            image::Rgb([(x * 10) as u8, (y * 15) as u8, 128])
        })
    }

    #[test]
    fn png_and_webp_round_trip_exactly() -> Result<()> {
        let img = gradient();
        for (format, expected) in [
            (OutputFormat::Png, image::ImageFormat::Png),
            (OutputFormat::Webp, image::ImageFormat::WebP),
        ] {
            let bytes = encode(&img, format, None)?;
            assert_eq!(image::guess_format(&bytes).ok(), Some(expected));
            let decoded = image::load_from_memory(&bytes)
                .map_err(|e| WorkerError::Internal(e.to_string()))?
                .to_rgb8();
            assert_eq!(decoded, img, "{format:?} must be lossless");
        }
        Ok(())
    }

    #[test]
    fn jpeg_compression_changes_size_and_stays_close() -> Result<()> {
        let img = gradient();
        let best = encode(&img, OutputFormat::Jpeg, Some(100))?;
        let worst = encode(&img, OutputFormat::Jpeg, Some(0))?;
        assert_eq!(
            image::guess_format(&best).ok(),
            Some(image::ImageFormat::Jpeg)
        );
        assert!(
            worst.len() < best.len(),
            "{} !< {}",
            worst.len(),
            best.len()
        );
        let decoded = image::load_from_memory(&best)
            .map_err(|e| WorkerError::Internal(e.to_string()))?
            .to_rgb8();
        let max_diff = decoded
            .as_raw()
            .iter()
            .zip(img.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max();
        assert!(max_diff.unwrap_or(255) < 12, "max diff {max_diff:?}");
        Ok(())
    }

    #[test]
    fn compression_over_100_names_the_parameter() {
        let err = encode(&gradient(), OutputFormat::Jpeg, Some(101));
        assert!(
            matches!(err, Err(WorkerError::InvalidArgument { ref param, .. }) if param == "output_compression")
        );
    }
}
