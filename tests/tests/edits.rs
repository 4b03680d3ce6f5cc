//! End to end: `/v1/images/edits` and `/v1/images/variations` on the real gateway with its
//! embedded worker and the tiny fixture model, driven with multipart bodies as curl sends them.

use anyhow::{Context, Result};
use fastfusion_tests::{decode_image, encode_png, pixel_std, FormPart};
use serde_json::{json, Value};

/// A gateway on the tiny model; `pipeline` is merged into its `pipeline` config.
struct Gateway(fastfusion_tests::Gateway);

impl Gateway {
    fn start(pipeline: Value) -> Result<Gateway> {
        Ok(Gateway(fastfusion_tests::Gateway::start_tiny(pipeline)?))
    }

    fn post_form(&self, path: &str, parts: &[FormPart<'_>]) -> Result<(u16, Value)> {
        self.0.post_form(path, parts)
    }

    /// The first image of a successful b64_json answer.
    fn image(&mut self, path: &str, parts: &[FormPart<'_>]) -> Result<image::RgbImage> {
        let (status, body) = self.0.post_form(path, parts)?;
        self.0.first_image(status, &body)
    }
}

impl std::ops::Deref for Gateway {
    type Target = fastfusion_tests::Gateway;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// Edits and variations on, no vision model (variations without a prompt use the default).
fn image_endpoints_on() -> Value {
    json!({
        "max_pixels": 65536,
        "edits_config": {"enabled": true},
        "variations_config": {
            "enabled": true,
            "vision_model": "",
            "vision_model_host": "http://127.0.0.1:9"
        }
    })
}

/// A 64x64 picture with structure (a diagonal gradient and a bright square).
fn input_png() -> Result<Vec<u8>> {
    let image = image::RgbImage::from_fn(64, 64, |x, y| {
        if (8..24).contains(&x) && (40..56).contains(&y) {
            image::Rgb([250, 250, 250])
        } else {
            image::Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
        }
    });
    encode_png(&image)
}

/// Mean absolute difference over the columns `columns` of two same-sized images.
fn mean_diff(a: &image::RgbImage, b: &image::RgbImage, columns: std::ops::Range<u32>) -> f64 {
    let mut total = 0.0;
    let mut count = 0.0;
    for y in 0..a.height() {
        for x in columns.clone() {
            for c in 0..3 {
                total += f64::from(a.get_pixel(x, y).0[c].abs_diff(b.get_pixel(x, y).0[c]));
                count += 1.0;
            }
        }
    }
    total / count
}

#[test]
fn a_masked_edit_repaints_only_inside_the_mask() -> Result<()> {
    let mut gw = Gateway::start(image_endpoints_on())?;
    let input = input_png()?;
    // No alpha channel: white (the left half) is repainted, black is kept.
    let mask = encode_png(&image::GrayImage::from_fn(64, 64, |x, _| {
        image::Luma([if x < 32 { 255 } else { 0 }])
    }))?;
    let mut edit = |seed: &str| {
        gw.image(
            "/v1/images/edits",
            &[
                FormPart::Text("prompt", "a bowl of fruit"),
                FormPart::File("image", &input),
                FormPart::File("mask", &mask),
                FormPart::Text("response_format", "b64_json"),
                FormPart::Text("strength", "1.0"),
                FormPart::Text("seed", seed),
            ],
        )
    };
    let first = edit("1")?;
    let second = edit("2")?;
    assert_eq!(first.dimensions(), (64, 64));
    assert!(pixel_std(&first) > 1.0, "a flat image");
    // The kept half comes from the input's latents whatever the seed; the repainted half is
    // drawn from the seed's noise. Columns near the mask edge see both, so they are left out.
    let kept = mean_diff(&first, &second, 48..64);
    let repainted = mean_diff(&first, &second, 0..16);
    assert!(
        kept * 2.0 < repainted,
        "kept region changed with the seed: kept {kept:.2} vs repainted {repainted:.2}"
    );
    Ok(())
}

#[test]
fn an_unmasked_edit_and_a_variation_return_pictures_of_the_requested_size() -> Result<()> {
    let mut gw = Gateway::start(image_endpoints_on())?;
    let input = input_png()?;
    let edited = gw.image(
        "/v1/images/edits",
        &[
            FormPart::Text("prompt", "in the style of a watercolour"),
            FormPart::File("image", &input),
            FormPart::Text("size", "64x32"),
            FormPart::Text("response_format", "b64_json"),
            FormPart::Text("strength", "0.7"),
            FormPart::Text("seed", "11"),
        ],
    )?;
    assert_eq!(edited.dimensions(), (64, 32));
    assert!(pixel_std(&edited) > 1.0, "a flat image");

    // Several images as the SDK sends them (`image[]`): the first is edited.
    let (status, body) = gw.post_form(
        "/v1/images/edits",
        &[
            FormPart::Text("prompt", "x"),
            FormPart::File("image[]", &input),
            FormPart::File("image[]", &input),
            FormPart::Text("n", "2"),
        ],
    )?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["size"], "64x64");
    let urls: Vec<&str> = body["data"]
        .as_array()
        .context("data")?
        .iter()
        .filter_map(|item| item["url"].as_str())
        .collect();
    assert_eq!(urls.len(), 2);
    let bytes = gw.client.get(urls[1]).send()?.bytes()?;
    assert_eq!(decode_image(&bytes)?.dimensions(), (64, 64));

    // A variation without a prompt or size: the input's size.
    let small = encode_png(&image::RgbImage::from_fn(48, 32, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, 90])
    }))?;
    let variation = gw.image(
        "/v1/images/variations",
        &[
            FormPart::File("image", &small),
            FormPart::Text("response_format", "b64_json"),
            FormPart::Text("seed", "5"),
        ],
    )?;
    assert_eq!(variation.dimensions(), (48, 32));
    assert!(pixel_std(&variation) > 1.0, "a flat image");
    Ok(())
}

#[test]
fn switched_off_endpoints_are_404_and_bad_uploads_400() -> Result<()> {
    // The tiny config has edits and variations off.
    let gw = Gateway::start(json!({}))?;
    let input = input_png()?;
    for path in ["/v1/images/edits", "/v1/images/variations"] {
        let (status, body) = gw.post_form(
            path,
            &[
                FormPart::Text("prompt", "x"),
                FormPart::File("image", &input),
            ],
        )?;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(path), "{message}");
    }
    drop(gw);

    let gw = Gateway::start(image_endpoints_on())?;
    let (status, body) = gw.post_form(
        "/v1/images/edits",
        &[
            FormPart::Text("prompt", "x"),
            FormPart::File("image", b"GIF89a not really"),
        ],
    )?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "image");
    let (status, body) = gw.post_form(
        "/v1/images/variations",
        &[FormPart::File("image", &input), FormPart::Text("n", "abc")],
    )?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "n");
    Ok(())
}
