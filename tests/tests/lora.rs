//! End to end: per-request LoRA through the real gateway (embedded worker) on the tiny SD 1.5
//! model with two local adapters. Two adapters at their own weights give diffusers' picture
//! (`load_lora_weights` + `set_adapters`, `references/lora/`) within 2/255; a request without
//! `lora_settings` right after gives the plain reference; the multipart JSON string form works on
//! variations; `/v1/models` lists the adapters; bad settings are 400s naming `lora_settings`.

use anyhow::{ensure, Result};
use fastfusion_tests::{encode_png, fixture, max_pixel_diff, FormPart, Gateway};
use serde_json::{json, Value};

const PROMPT: &str = "a photo of an astronaut riding a horse on the moon";

fn start() -> Result<Gateway> {
    let adapter = |name: &str| {
        json!({
            "type": "local",
            "address": fixture(&format!("loras/{name}.safetensors")).display().to_string(),
            "adapter_name": name
        })
    };
    Gateway::start_tiny(json!({
        "loras": [adapter("sd15_style"), adapter("sd15_detail")],
        "variations_config": {"enabled": true, "vision_model": ""}
    }))
}

fn generation(lora_settings: Option<Value>) -> Value {
    let mut body = json!({
        "prompt": PROMPT, "size": "64x64", "seed": 42, "num_inference_steps": 3,
        "guidance_scale": 7.5, "scheduler": "euler", "response_format": "b64_json"
    });
    if let Some(settings) = lora_settings {
        body["lora_settings"] = settings;
    }
    body
}

fn reference(name: &str) -> Result<image::RgbImage> {
    Ok(image::open(fixture(&format!("references/lora/{name}_0.png")))?.to_rgb8())
}

#[test]
fn adapters_apply_per_request_and_leave_no_trace() -> Result<()> {
    let mut gw = start()?;
    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.base))
        .send()?
        .json()?;
    let loras = &models["data"][0]["loras"];
    assert_eq!(loras, &json!(["sd15_style", "sd15_detail"]), "{models}");

    let two =
        json!([{"name": "sd15_style", "weight": 0.7}, {"name": "sd15_detail", "weight": 0.4}]);
    let (status, body) = gw.post_json("/v1/images/generations", &generation(Some(two)))?;
    let image = gw.first_image(status, &body)?;
    let diff = max_pixel_diff(&image, &reference("sd15_two")?)?;
    ensure!(diff <= 2, "two adapters: max diff {diff}/255");

    // The next request without adapters is the plain model's picture.
    let (status, body) = gw.post_json("/v1/images/generations", &generation(None))?;
    let plain = gw.first_image(status, &body)?;
    let diff = max_pixel_diff(&plain, &reference("sd15_plain")?)?;
    ensure!(diff <= 2, "plain after adapters: max diff {diff}/255");

    // Multipart: lora_settings as a JSON string, on a variation.
    let input = encode_png(&image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([(x * 4) as u8, (y * 4) as u8, 128])
    }))?;
    let variation = |gw: &mut Gateway, settings: Option<&str>| -> Result<image::RgbImage> {
        let mut parts = vec![
            FormPart::File("image", &input),
            FormPart::Text("prompt", PROMPT),
            FormPart::Text("seed", "3"),
            FormPart::Text("response_format", "b64_json"),
        ];
        if let Some(settings) = settings {
            parts.push(FormPart::Text("lora_settings", settings));
        }
        let (status, body) = gw.post_form("/v1/images/variations", &parts)?;
        gw.first_image(status, &body)
    };
    let plain_variation = variation(&mut gw, None)?;
    let styled = variation(&mut gw, Some(r#"[{"name": "sd15_style", "weight": 1.0}]"#))?;
    let diff = max_pixel_diff(&plain_variation, &styled)?;
    ensure!(
        diff > 5,
        "the adapter did not change the variation ({diff}/255)"
    );
    Ok(())
}

#[test]
fn bad_lora_settings_are_400s_naming_the_parameter() -> Result<()> {
    let gw = start()?;
    for (settings, says) in [
        (json!([{"name": "nope"}]), "sd15_style"),
        (
            json!([{"name": "sd15_style", "weight": 9.0}]),
            "lora_settings",
        ),
        (
            json!([{"name": "sd15_style"}, {"name": "sd15_style"}]),
            "lora_settings",
        ),
    ] {
        let (status, body) = gw.post_json(
            "/v1/images/generations",
            &generation(Some(settings.clone())),
        )?;
        ensure!(status == 400, "{settings}: status {status}: {body}");
        ensure!(
            body["error"]["param"]
                .as_str()
                .is_some_and(|p| p.starts_with("lora_settings")),
            "{settings}: {body}"
        );
        let message = body["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains(says), "{settings}: {message}");
    }
    // A multipart string that is not JSON.
    let input = encode_png(&image::RgbImage::new(64, 64))?;
    let (status, body) = gw.post_form(
        "/v1/images/variations",
        &[
            FormPart::File("image", &input),
            FormPart::Text("lora_settings", "[{name: style}"),
        ],
    )?;
    ensure!(status == 400, "malformed JSON string: {status} {body}");
    ensure!(
        body["error"]["param"]
            .as_str()
            .is_some_and(|p| p.starts_with("lora_settings")),
        "{body}"
    );
    Ok(())
}
