//! Uploaded input images (edits and variations): where they came from, and the checks every one
//! passes before a worker sees it.
//!
//! An [`Upload`] is the raw bytes of one file part (multipart) or one decoded data URL (JSON
//! form), together with the parameter name to blame when it is bad (`image`, `mask`,
//! `images[1].image_url`). [`inspect`] turns it into an [`InputImage`]:
//!
//! 1. the format is sniffed from the bytes (not the file name or part Content-Type, which clients
//!    get wrong): PNG, JPEG and WebP pass, anything else is a 400;
//! 2. width and height are read from the header alone and checked against the input pixel limit,
//!    so a decompression bomb (a tiny file declaring a huge canvas) is refused before any pixel
//!    buffer is allocated;
//! 3. the whole image is decoded once, under allocation limits derived from that header, so a
//!    truncated or corrupt file is a 400 here instead of a failure deep in the worker.
//!
//! The decoded pixels are dropped: the worker decodes the original bytes itself (it needs them
//! as tensors, the gateway does not). Decoding is CPU work; callers run [`inspect`] off the async
//! runtime (`spawn_blocking`).

use std::io::Cursor;

use base64::Engine;
use bytes::Bytes;
use image::{ImageFormat, ImageReader};

use crate::error::ApiError;
use crate::openai::ImageReference;

/// Most input images one edit may carry (OpenAI's own limit for its image models).
pub const MAX_INPUT_IMAGES: usize = 16;

/// One uploaded image, not yet checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Upload {
    /// The parameter this came from, as clients spell it; errors about it name it.
    pub param: String,
    pub bytes: Bytes,
}

/// An upload that is a readable PNG, JPEG or WebP within the pixel limit.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    pub param: String,
    /// The bytes as uploaded; the worker decodes them again.
    pub bytes: Bytes,
    pub width: u32,
    pub height: u32,
}

/// Checks one upload; see the module docs for the steps. `max_pixels` bounds width × height.
pub fn inspect(upload: Upload, max_pixels: u64) -> Result<InputImage, ApiError> {
    let Upload { param, bytes } = upload;
    let format = image::guess_format(&bytes)
        .ok()
        .filter(|format| {
            matches!(
                format,
                ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
            )
        })
        .ok_or_else(|| {
            ApiError::invalid(
                param.as_str(),
                format!("{param} must be a PNG, JPEG or WebP image"),
            )
        })?;
    let corrupt = |error: image::ImageError| {
        ApiError::invalid(
            param.as_str(),
            format!("{param} is not a readable {format:?} image: {error}"),
        )
    };
    let (width, height) = ImageReader::with_format(Cursor::new(&bytes), format)
        .into_dimensions()
        .map_err(corrupt)?;
    if width == 0 || height == 0 {
        return Err(ApiError::invalid(
            param.as_str(),
            format!("{param} has no pixels ({width}x{height})"),
        ));
    }
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ApiError::invalid(
            param.as_str(),
            format!(
                "{param} is {width}x{height} ({pixels} pixels); the most accepted is {max_pixels} \
                 pixels (FASTFUSION_MAX_INPUT_PIXELS)"
            ),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(&bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // 16-bit RGBA is the widest buffer these decoders produce; twice that leaves room for their
    // scratch space while still refusing anything the header did not announce.
    limits.max_alloc = Some(pixels.saturating_mul(8 * 2));
    reader.limits(limits);
    reader.decode().map_err(corrupt)?;
    Ok(InputImage {
        param,
        bytes,
        width,
        height,
    })
}

/// The JSON form's `{"image_url": "data:...;base64,..."}` → an upload named `param`
/// (`images[0]`, `mask`). Remote urls and OpenAI file ids are refused: the gateway fetches
/// nothing on a client's behalf (that would let clients make it reach internal hosts).
pub fn from_reference(reference: ImageReference, param: &str) -> Result<Upload, ApiError> {
    let url_param = format!("{param}.image_url");
    if reference.file_id.is_some() {
        return Err(ApiError::invalid(
            format!("{param}.file_id"),
            "file ids are not supported (this server has no Files API); send the image as a \
             data URL in image_url or as a multipart upload",
        ));
    }
    let Some(url) = reference.image_url.filter(|url| !url.is_empty()) else {
        return Err(ApiError::invalid(
            url_param,
            format!("{param} needs an image_url (a data:image/...;base64,... URL)"),
        ));
    };
    let bytes = decode_data_url(&url).map_err(|message| ApiError::invalid(&url_param, message))?;
    Ok(Upload {
        param: url_param,
        bytes,
    })
}

/// `data:[<media type>][;params];base64,<data>` → the bytes. The media type is not trusted:
/// [`inspect`] sniffs the format from the bytes.
fn decode_data_url(url: &str) -> Result<Bytes, String> {
    let scheme_end = url.find(':').unwrap_or(0);
    let scheme = url[..scheme_end].to_ascii_lowercase();
    if scheme == "http" || scheme == "https" {
        return Err(
            "remote image urls are not fetched by this server; send the image as a data URL \
             (data:image/png;base64,...) or as a multipart upload"
                .to_string(),
        );
    }
    let Some(rest) = url.get(5..).filter(|_| scheme == "data") else {
        return Err("image_url must be a data URL (data:image/png;base64,...)".to_string());
    };
    let Some((header, data)) = rest.split_once(',') else {
        return Err("the data URL has no ',' before its data".to_string());
    };
    if !header
        .split(';')
        .any(|part| part.eq_ignore_ascii_case("base64"))
    {
        return Err("the data URL must be base64-encoded (data:image/png;base64,...)".to_string());
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map(Bytes::from)
        .map_err(|error| format!("the data URL's base64 is invalid: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Bytes {
        let image = image::RgbaImage::from_pixel(width, height, image::Rgba([10, 20, 30, 255]));
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).expect("encode");
        Bytes::from(out.into_inner())
    }

    fn upload(bytes: Bytes) -> Upload {
        Upload {
            param: "image".into(),
            bytes,
        }
    }

    fn param_of<T: std::fmt::Debug>(result: Result<T, ApiError>) -> String {
        match result {
            Err(ApiError::InvalidRequest {
                param: Some(param), ..
            }) => param,
            other => panic!("expected a 400 naming a param, got {other:?}"),
        }
    }

    #[test]
    fn readable_images_report_their_size() {
        let image = inspect(upload(png(24, 16)), 1 << 20).expect("valid");
        assert_eq!((image.width, image.height), (24, 16));
        assert_eq!(image.param, "image");
    }

    #[test]
    fn other_formats_and_corrupt_files_are_refused() {
        assert_eq!(
            param_of(inspect(
                upload(Bytes::from_static(b"GIF89a......")),
                1 << 20
            )),
            "image"
        );
        assert_eq!(
            param_of(inspect(upload(Bytes::from_static(b"hello")), 1 << 20)),
            "image"
        );
        let whole = png(32, 32);
        let truncated = whole.slice(..whole.len() - 20);
        assert_eq!(param_of(inspect(upload(truncated), 1 << 20)), "image");
        let mask = Upload {
            param: "mask".into(),
            bytes: Bytes::from_static(b"\x89PNG\r\n\x1a\n"),
        };
        assert_eq!(param_of(inspect(mask, 1 << 20)), "mask");
    }

    #[test]
    fn the_pixel_limit_is_checked_from_the_header() {
        // A 1x1 PNG whose header declares 60000x60000: refused for its size (decoding it would
        // fail differently), so nothing was decoded.
        let mut header = png(1, 1).to_vec();
        header[16..20].copy_from_slice(&60_000u32.to_be_bytes());
        header[20..24].copy_from_slice(&60_000u32.to_be_bytes());
        let crc = crc32(&header[12..29]);
        header[29..33].copy_from_slice(&crc.to_be_bytes());
        match inspect(upload(Bytes::from(header)), 1 << 20) {
            Err(ApiError::InvalidRequest { param, message }) => {
                assert_eq!(param.as_deref(), Some("image"));
                assert!(message.contains("60000x60000"), "{message}");
            }
            other => panic!("expected a 400, got {other:?}"),
        }
        assert_eq!(param_of(inspect(upload(png(64, 64)), 64 * 63)), "image");
    }

    /// PNG's chunk checksum (CRC-32, polynomial 0xEDB88320), so a forged header stays valid.
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = u32::MAX;
        for byte in bytes {
            crc ^= u32::from(*byte);
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
    fn data_urls_decode_and_remote_urls_are_refused() {
        let bytes = png(8, 8);
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        let reference = |url: String| ImageReference {
            image_url: Some(url),
            file_id: None,
        };
        let upload = from_reference(
            reference(format!("data:image/png;base64,{b64}")),
            "images[0]",
        )
        .expect("data URL");
        assert_eq!(upload.bytes, bytes);
        assert_eq!(upload.param, "images[0].image_url");
        for bad in [
            "https://example.com/cat.png".to_string(),
            "HTTP://example.com/cat.png".to_string(),
            "file:///etc/passwd".to_string(),
            format!("data:image/png,{b64}"),
            "data:image/png;base64".to_string(),
            "data:image/png;base64,@@@".to_string(),
            String::new(),
        ] {
            assert_eq!(
                param_of(from_reference(reference(bad.clone()), "images[0]")),
                "images[0].image_url",
                "{bad}"
            );
        }
        let by_id = ImageReference {
            image_url: None,
            file_id: Some("file-123".into()),
        };
        assert_eq!(param_of(from_reference(by_id, "mask")), "mask.file_id");
    }
}
