//! Uploaded images and masks: bytes → pixels at the output size, safely.
//!
//! ```text
//! bytes ─sniff format (PNG, JPEG, WebP only)─▶ header dimensions ≤ pixel limit ─decode (allocation
//!        limit)─▶ image ─RGB / mask reading─▶ Lanczos resize to the output size (if it differs)
//! ```
//!
//! * Decompression bombs: the dimensions are read from the header and checked against the pixel
//!   limit before anything is decoded, and the decoder itself runs under `image`'s [`Limits`], so a
//!   lying header cannot make it allocate more either.
//! * Every failure is a [`WorkerError::InvalidArgument`] naming the parameter (`image` or `mask`),
//!   never a 500: an upload is the client's input.
//! * The input image drops any alpha channel (diffusers' VAE sees RGB only).
//! * Masks end up as 8-bit grey, white where the model repaints (diffusers' convention, which the
//!   pipeline binarizes at one half). How a mask is read ([`MaskMode`]):
//!   - `ALPHA`: OpenAI's convention, transparent = repaint: grey = 255 − alpha.
//!   - `LUMA`: diffusers' convention, white = repaint: grey = the luma (PIL's `convert("L")`
//!     weights, 299/587/114 per mille, rounded as PIL does). Any alpha channel is ignored.
//!   - `AUTO`: `ALPHA` when the mask has an alpha channel with at least one non-opaque pixel,
//!     else `LUMA`. An alpha channel that is opaque everywhere marks nothing as OpenAI reads it,
//!     so such masks (canvas exports painted black and white) are read by their luma.
//! * Resizing uses a Lanczos-3 filter, as diffusers' `VaeImageProcessor` (PIL's `LANCZOS`) does; a
//!   mask of another size than the image is resized to the output size the same way. The two
//!   implementations round differently, so resized inputs agree with diffusers closely but not
//!   bit for bit; inputs already at the output size are used as they are.

use std::io::Cursor;

use fastfusion_proto::MaskMode;
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageFormat, ImageReader, Limits, RgbImage};

use crate::error::{Result, WorkerError};

/// Largest uploaded image or mask accepted, in decoded pixels (32 Mi: a 24-megapixel photo fits,
/// 6000 × 6000 does not). An RGBA decode of this size takes 128 MiB.
pub const MAX_INPUT_PIXELS: u64 = 32 * 1024 * 1024;

/// Bytes the decoder may allocate per pixel: 16-bit RGBA, the widest layout the formats decode to.
const BYTES_PER_PIXEL: u64 = 8;

/// Decodes a PNG, JPEG or WebP upload of at most `max_pixels` pixels. `param` names the upload
/// in errors.
pub fn decode(bytes: &[u8], param: &str, max_pixels: u64) -> Result<DynamicImage> {
    let invalid = |message: String| WorkerError::invalid(param, message);
    if bytes.is_empty() {
        return Err(invalid("is empty".into()));
    }
    let reader = || {
        ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| invalid(format!("cannot be read: {e}")))
    };
    let format = reader()?.format();
    if !matches!(
        format,
        Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)
    ) {
        return Err(invalid("is not a PNG, JPEG or WebP image".into()));
    }
    let (width, height) = reader()?
        .into_dimensions()
        .map_err(|e| invalid(format!("is not a valid image: {e}")))?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels == 0 {
        return Err(invalid(format!("has no pixels ({width}x{height})")));
    }
    if pixels > max_pixels {
        return Err(invalid(format!(
            "is {width}x{height}, over the limit of {max_pixels} pixels"
        )));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    limits.max_alloc = Some(max_pixels.saturating_mul(BYTES_PER_PIXEL));
    let mut decoder = reader()?;
    decoder.limits(limits);
    decoder
        .decode()
        .map_err(|e| invalid(format!("is not a valid image: {e}")))
}

/// The input image as RGB at `width` × `height`.
pub fn load_image(bytes: &[u8], width: u32, height: u32, max_pixels: u64) -> Result<RgbImage> {
    let rgb = decode(bytes, "image", max_pixels)?.into_rgb8();
    Ok(resize(rgb, width, height))
}

/// The mask as grey at `width` × `height`, white where the model repaints (see the module docs
/// for how `mode` reads it).
pub fn load_mask(
    bytes: &[u8],
    mode: MaskMode,
    width: u32,
    height: u32,
    max_pixels: u64,
) -> Result<GrayImage> {
    let decoded = decode(bytes, "mask", max_pixels)?;
    let grey = match mode {
        MaskMode::Alpha => {
            if !decoded.color().has_alpha() {
                return Err(WorkerError::invalid(
                    "mask",
                    "has no alpha channel to read (mask_mode alpha)",
                ));
            }
            transparency(&decoded)
        }
        MaskMode::Luma => luma(&decoded),
        MaskMode::Auto => {
            let grey = decoded.color().has_alpha().then(|| transparency(&decoded));
            match grey {
                // Opaque everywhere (255 − alpha = 0): the alpha channel says nothing.
                Some(grey) if grey.as_raw().iter().any(|&v| v != 0) => grey,
                _ => luma(&decoded),
            }
        }
    };
    Ok(resize(grey, width, height))
}

/// 255 − alpha: transparent pixels become white (repaint).
fn transparency(image: &DynamicImage) -> GrayImage {
    let rgba = image.to_rgba8();
    let (w, h) = rgba.dimensions();
    GrayImage::from_fn(w, h, |x, y| image::Luma([255 - rgba.get_pixel(x, y).0[3]]))
}

/// PIL's `convert("L")`: `(R·19595 + G·38470 + B·7471 + 2¹⁵) >> 16`, alpha ignored.
fn luma(image: &DynamicImage) -> GrayImage {
    if let DynamicImage::ImageLuma8(grey) = image {
        return grey.clone();
    }
    let rgb = image.to_rgb8();
    let (w, h) = rgb.dimensions();
    GrayImage::from_fn(w, h, |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0;
        let l = (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
        // The weights sum to 2¹⁶, so `l` is at most 255.
        image::Luma([l.min(255) as u8])
    })
}

/// Lanczos-3 resize to `width` × `height`; the image itself when it already has that size.
fn resize<P>(
    image: image::ImageBuffer<P, Vec<u8>>,
    width: u32,
    height: u32,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    if image.dimensions() == (width, height) {
        image
    } else {
        image::imageops::resize(&image, width, height, FilterType::Lanczos3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgba, RgbaImage};

    fn png(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image
            .write_to(&mut out, ImageFormat::Png)
            .expect("encode png");
        out.into_inner()
    }

    fn param_of(e: WorkerError) -> String {
        match e {
            WorkerError::InvalidArgument { param, .. } => param,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    /// An 8×8 RGBA picture: the left half transparent, the right half opaque; colours black on
    /// the left, white on the right (so luma and alpha readings disagree).
    fn rgba_mask() -> RgbaImage {
        RgbaImage::from_fn(8, 8, |x, _| {
            if x < 4 {
                Rgba([0, 0, 0, 0])
            } else {
                Rgba([255, 255, 255, 255])
            }
        })
    }

    #[test]
    fn alpha_masks_repaint_where_transparent_and_luma_masks_where_white() {
        let bytes = png(DynamicImage::ImageRgba8(rgba_mask()));
        let auto = load_mask(&bytes, MaskMode::Auto, 8, 8, MAX_INPUT_PIXELS).expect("auto");
        assert_eq!(auto.get_pixel(0, 0).0, [255], "transparent = repaint");
        assert_eq!(auto.get_pixel(7, 0).0, [0], "opaque = keep");
        let alpha = load_mask(&bytes, MaskMode::Alpha, 8, 8, MAX_INPUT_PIXELS).expect("alpha");
        assert_eq!(alpha, auto);
        let luma = load_mask(&bytes, MaskMode::Luma, 8, 8, MAX_INPUT_PIXELS).expect("luma");
        assert_eq!(luma.get_pixel(0, 0).0, [0], "black = keep");
        assert_eq!(luma.get_pixel(7, 0).0, [255], "white = repaint");

        // Without alpha, AUTO reads the luma.
        let rgb = png(DynamicImage::ImageRgba8(rgba_mask()).to_rgb8().into());
        let auto = load_mask(&rgb, MaskMode::Auto, 8, 8, MAX_INPUT_PIXELS).expect("rgb");
        assert_eq!(auto, luma);
        let err = load_mask(&rgb, MaskMode::Alpha, 8, 8, MAX_INPUT_PIXELS).expect_err("no alpha");
        assert_eq!(param_of(err), "mask");

        // An alpha channel that is opaque everywhere carries no mask: the luma counts.
        let opaque = RgbaImage::from_fn(8, 8, |x, _| {
            let v = if x < 4 { 255 } else { 0 };
            Rgba([v, v, v, 255])
        });
        let auto = load_mask(
            &png(DynamicImage::ImageRgba8(opaque)),
            MaskMode::Auto,
            8,
            8,
            MAX_INPUT_PIXELS,
        )
        .expect("opaque");
        assert_eq!(auto.get_pixel(0, 0).0, [255]);
        assert_eq!(auto.get_pixel(7, 0).0, [0]);
    }

    #[test]
    fn luma_uses_pil_weights() {
        let pixel = RgbaImage::from_pixel(1, 1, Rgba([200, 100, 50, 255]));
        let grey = luma(&DynamicImage::ImageRgba8(pixel));
        // PIL: (200·19595 + 100·38470 + 50·7471 + 32768) >> 16 = 124.
        assert_eq!(grey.get_pixel(0, 0).0, [124]);
    }

    #[test]
    fn masks_and_images_of_another_size_are_resized() {
        let bytes = png(DynamicImage::ImageRgba8(rgba_mask()));
        let mask = load_mask(&bytes, MaskMode::Auto, 16, 4, MAX_INPUT_PIXELS).expect("mask");
        assert_eq!(mask.dimensions(), (16, 4));
        assert!(mask.get_pixel(0, 2).0[0] > 200 && mask.get_pixel(15, 2).0[0] < 50);
        let image = load_image(&bytes, 4, 12, MAX_INPUT_PIXELS).expect("image");
        assert_eq!(image.dimensions(), (4, 12));
    }

    #[test]
    fn anything_but_a_valid_png_jpeg_or_webp_names_its_parameter() {
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
        let mut truncated = png(DynamicImage::ImageRgba8(rgba_mask()));
        truncated.truncate(truncated.len() / 2);
        for bytes in [Vec::new(), b"not an image".to_vec(), gif, truncated] {
            let err = load_image(&bytes, 8, 8, MAX_INPUT_PIXELS).expect_err("image");
            assert_eq!(param_of(err), "image");
            let err = load_mask(&bytes, MaskMode::Auto, 8, 8, MAX_INPUT_PIXELS).expect_err("mask");
            assert_eq!(param_of(err), "mask");
        }
        let jpeg = {
            let mut out = Cursor::new(Vec::new());
            DynamicImage::ImageRgb8(RgbImage::from_pixel(8, 8, image::Rgb([9, 9, 9])))
                .write_to(&mut out, ImageFormat::Jpeg)
                .expect("jpeg");
            out.into_inner()
        };
        assert_eq!(
            load_image(&jpeg, 8, 8, MAX_INPUT_PIXELS)
                .expect("jpeg decodes")
                .dimensions(),
            (8, 8)
        );
    }

    /// PNG's CRC-32 (reflected, polynomial 0xEDB88320).
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for &byte in bytes {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn oversized_uploads_are_refused_from_their_header() {
        // A PNG header claiming 100000 × 100000 pixels followed by garbage: refused on the
        // dimensions, before any decoding could allocate 40 GB.
        let mut bomb = png(DynamicImage::ImageLuma8(GrayImage::new(1, 1)));
        // IHDR's width and height live at bytes 16..24, its CRC (over type and data) at 29..33.
        bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bomb[12..29]);
        bomb[29..33].copy_from_slice(&crc.to_be_bytes());
        let err = decode(&bomb, "image", MAX_INPUT_PIXELS).expect_err("bomb");
        assert!(err.to_string().contains("100000x100000"), "{err}");
        assert_eq!(param_of(err), "image");
        // A real image over a small limit is refused too, and one within it decodes.
        let bytes = png(DynamicImage::ImageRgba8(rgba_mask()));
        let err = decode(&bytes, "mask", 63).expect_err("64 > 63 pixels");
        assert!(err.to_string().contains("over the limit"), "{err}");
        assert!(decode(&bytes, "mask", 64).is_ok());
    }
}
