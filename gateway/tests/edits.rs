//! `POST /v1/images/edits` and `/v1/images/variations` through `router()` over the fake worker
//! pool: every field reaching the worker, the multipart quirks clients have (`image[]`, repeated
//! `image`, empty strings), the JSON form, every bad input, the upload limit and the endpoint
//! switches.

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use common::{app, app_with, png, Behaviour, FakePool, Form};
use fastfusion_gateway::openai::OutputFormat;
use fastfusion_proto::{Endpoint, MaskMode, Task};

const EDITS: &str = "/v1/images/edits";
const VARIATIONS: &str = "/v1/images/variations";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn data_url(bytes: &[u8]) -> String {
    format!("data:image/png;base64,{}", b64(bytes))
}

/// A fake pool whose model has one LoRA, so `lora_settings` can be checked end to end.
fn app_with_lora() -> common::TestApp {
    let mut pool = FakePool::new(Behaviour::Succeed);
    let mut info = common::tiny_info();
    info.loras = vec!["style".into()];
    pool.info = Arc::new(info);
    app_with(Arc::new(pool), None, 1024 * 1024)
}

#[tokio::test]
async fn every_edit_field_reaches_the_worker() {
    let app = app_with_lora();
    let image = png(64, 48, false);
    let mask = png(64, 48, true);
    let form = Form::new()
        .text("prompt", "a straw hat")
        .file("image", &image)
        .file("mask", &mask)
        .text("model", "gpt-image-1")
        .text("n", "2")
        .text("size", "128x64")
        .text("response_format", "b64_json")
        .text("output_format", "webp")
        .text("output_compression", "70")
        .text("quality", "hd")
        .text("user", "user-1")
        .text("background", "opaque")
        .text("input_fidelity", "high")
        .text("strength", "0.6")
        .text("guidance_scale", "3.5")
        .text("num_inference_steps", "7")
        .text("seed", "42")
        .text("negative_prompt", "blurry")
        .text("scheduler", "euler")
        .text("lora_settings", r#"[{"name": "style", "weight": 0.7}]"#);
    let reply = app.post_form(EDITS, form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["size"], "128x64");
    assert_eq!(body["output_format"], "webp");
    assert_eq!(body["quality"], "hd");
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for (index, item) in data.iter().enumerate() {
        assert_eq!(item["seed"], 42);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(item["b64_json"].as_str().expect("b64_json"))
            .expect("base64");
        assert_eq!(
            bytes,
            common::encode_image(index as u32, OutputFormat::Webp)
        );
    }

    let sent = app.pool.last_request();
    assert_eq!(sent.task, Task::Inpaint as i32);
    assert_eq!(sent.endpoint, Endpoint::Edits as i32);
    assert_eq!(sent.mask_mode, MaskMode::Auto as i32);
    assert_eq!(sent.prompt, "a straw hat");
    assert_eq!(sent.images, vec![image]);
    assert_eq!(sent.mask, Some(mask));
    assert_eq!((sent.n, sent.width, sent.height), (2, 128, 64));
    assert_eq!(
        sent.output_format,
        fastfusion_proto::OutputFormat::Webp as i32
    );
    assert_eq!(sent.output_compression, Some(70));
    assert_eq!(sent.strength, Some(0.6));
    assert_eq!(sent.guidance_scale, Some(3.5));
    assert_eq!(sent.num_inference_steps, Some(7));
    assert_eq!(sent.seed, Some(42));
    assert_eq!(sent.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(sent.scheduler, "euler");
    assert_eq!(sent.loras.len(), 1);
    assert_eq!(
        (sent.loras[0].name.as_str(), sent.loras[0].weight),
        ("style", 0.7)
    );
}

#[tokio::test]
async fn an_edit_without_mask_is_image_to_image_with_defaults_and_auto_size() {
    let app = app(Behaviour::Succeed);
    let image = png(100, 61, false);
    let form = Form::new()
        .text("prompt", "autumn colours")
        .file("image", &image);
    let reply = app.post_form(EDITS, form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    // No size: the input's, rounded to multiples of 8.
    assert_eq!(body["size"], "104x64");
    assert_eq!(body["quality"], "auto");
    let url = body["data"][0]["url"].as_str().expect("url");
    assert!(url.starts_with("http://gateway.test:8123/v1/images/data/"));
    let sent = app.pool.last_request();
    assert_eq!(sent.task, Task::ImageToImage as i32);
    assert_eq!(sent.mask, None);
    assert_eq!((sent.width, sent.height, sent.n), (104, 64, 1));
    // Defaults resolved by the gateway: the model's strength, steps and guidance.
    assert_eq!(sent.strength, Some(0.8));
    assert_eq!(sent.num_inference_steps, Some(20));
    assert_eq!(sent.guidance_scale, Some(7.5));
    assert!(!sent.request_id.is_empty());
}

#[tokio::test]
async fn several_images_as_image_brackets_or_repeated_image_keep_their_order() {
    let images = [png(16, 16, false), png(24, 16, false), png(32, 16, true)];
    for name in ["image[]", "image"] {
        let app = app(Behaviour::Succeed);
        let form = images
            .iter()
            .fold(Form::new().text("prompt", "combine"), |form, image| {
                form.file(name, image)
            });
        let reply = app.post_form(EDITS, form).await;
        assert_eq!(reply.status, StatusCode::OK, "{name}: {:?}", reply.body);
        let sent = app.pool.last_request();
        assert_eq!(sent.images, images.to_vec(), "{name}");
        // Size follows the first image.
        assert_eq!((sent.width, sent.height), (16, 16));
    }
}

#[tokio::test]
async fn empty_fields_count_as_absent_and_unknown_fields_are_ignored() {
    let app = app(Behaviour::Succeed);
    let form = Form::new()
        .text("prompt", "x")
        .file("image", &png(64, 64, false))
        .file("mask", b"")
        .text("n", "")
        .text("size", "")
        .text("seed", "")
        .text("strength", "")
        .text("lora_settings", "")
        .text("response_format", "")
        .text("some_future_field", "whatever")
        .file("attachment", b"not looked at");
    let reply = app.post_form(EDITS, form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let sent = app.pool.last_request();
    assert_eq!(sent.task, Task::ImageToImage as i32);
    assert_eq!((sent.n, sent.width, sent.seed), (1, 64, None));
    assert!(sent.loras.is_empty());
    assert!(reply.json()["data"][0]["url"].is_string());
}

#[tokio::test]
async fn the_json_form_takes_data_urls() {
    let app = app(Behaviour::Succeed);
    let image = png(64, 64, false);
    let second = png(32, 32, false);
    let mask = png(64, 64, true);
    let body = serde_json::json!({
        "prompt": "a lake",
        "images": [{"image_url": data_url(&image)}, {"image_url": data_url(&second)}],
        "mask": {"image_url": data_url(&mask)},
        "n": 2,
        "response_format": "b64_json",
        "strength": 0.5,
        "seed": 7,
        "lora_settings": [],
    });
    let reply = app.call("POST", EDITS, Some(&body.to_string())).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(reply.json()["data"].as_array().map(Vec::len), Some(2));
    let sent = app.pool.last_request();
    assert_eq!(sent.task, Task::Inpaint as i32);
    assert_eq!(sent.images, vec![image, second]);
    assert_eq!(sent.mask, Some(mask));
    assert_eq!((sent.n, sent.seed, sent.strength), (2, Some(7), Some(0.5)));
}

#[tokio::test]
async fn bad_json_edits_name_the_field() {
    let image = data_url(&png(8, 8, false));
    let cases = [
        (
            serde_json::json!({"prompt": "x", "images": [{"image_url": "https://example.com/a.png"}]}),
            "images[0].image_url",
        ),
        (
            serde_json::json!({"prompt": "x", "images": [{"image_url": image}, {"image_url": "http://10.0.0.1/"}]}),
            "images[1].image_url",
        ),
        (
            serde_json::json!({"prompt": "x", "images": [{"file_id": "file-abc"}]}),
            "images[0].file_id",
        ),
        (
            serde_json::json!({"prompt": "x", "images": [{"image_url": "data:image/png;base64,aGVsbG8="}]}),
            "images[0].image_url",
        ),
        (
            serde_json::json!({"prompt": "x", "images": [{"image_url": image}], "mask": {"image_url": "data:text/plain;base64,aGk="}}),
            "mask.image_url",
        ),
        (
            serde_json::json!({"prompt": "x", "images": "a.png"}),
            "images",
        ),
        (serde_json::json!({"prompt": "x"}), "image"),
        (
            serde_json::json!({"images": [{"image_url": image}]}),
            "prompt",
        ),
        (
            serde_json::json!({"prompt": "x", "images": [{"image_url": image}], "strength": 1.5}),
            "strength",
        ),
    ];
    let app = app(Behaviour::Succeed);
    for (body, param) in cases {
        let reply = app.call("POST", EDITS, Some(&body.to_string())).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some(param),
            "{body}"
        );
    }
    assert!(app.pool.seen.lock().expect("lock").is_empty());
}

/// A small PNG whose header declares a 50000x50000 canvas: a decompression bomb.
fn bomb() -> Vec<u8> {
    let mut bytes = png(1, 1, false);
    bytes[16..20].copy_from_slice(&50_000u32.to_be_bytes());
    bytes[20..24].copy_from_slice(&50_000u32.to_be_bytes());
    // IHDR's CRC-32 (over type and data), so the header itself is well formed.
    let mut crc = u32::MAX;
    for byte in &bytes[12..29] {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    bytes[29..33].copy_from_slice(&(!crc).to_be_bytes());
    bytes
}

#[tokio::test]
async fn decompression_bombs_are_refused_for_their_declared_size() {
    let app = app(Behaviour::Succeed);
    let form = Form::new().text("prompt", "x").file("image", &bomb());
    let reply = app.post_form(EDITS, form).await;
    assert_eq!(
        reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
        Some("image")
    );
    let message = reply.json()["error"]["message"].to_string();
    assert!(message.contains("50000x50000"), "{message}");
}

#[tokio::test]
async fn every_bad_multipart_input_is_a_400_naming_its_param() {
    let image = png(64, 64, false);
    let truncated = image[..image.len() - 16].to_vec();
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    let base = || Form::new().text("prompt", "x").file("image", &image);
    let mut cases: Vec<(Form, &str)> = vec![
        (Form::new().text("prompt", "x"), "image"),
        (Form::new().file("image", &image), "prompt"),
        (base().text("prompt", "again"), "prompt"),
        (
            Form::new().text("prompt", "x").file("image", b"hello"),
            "image",
        ),
        (Form::new().text("prompt", "x").file("image", &gif), "image"),
        (
            Form::new().text("prompt", "x").file("image", &truncated),
            "image",
        ),
        (
            Form::new().text("prompt", "x").file("image", &bomb()),
            "image",
        ),
        (base().file("mask", b"not a mask"), "mask"),
        (base().file("mask", &bomb()), "mask"),
        (base().file("mask", &image).file("mask", &image), "mask"),
        (base().text("n", "abc"), "n"),
        (base().text("n", "1.5"), "n"),
        (base().text("n", "0"), "n"),
        (base().text("n", "9"), "n"),
        (base().text("size", "big"), "size"),
        (base().text("size", "100x64"), "size"),
        (base().text("size", "4096x4096"), "size"),
        (base().text("strength", "0"), "strength"),
        (base().text("strength", "1.5"), "strength"),
        (base().text("strength", "strong"), "strength"),
        (base().text("guidance_scale", "high"), "guidance_scale"),
        (base().text("guidance_scale", "-1"), "guidance_scale"),
        (
            base().text("num_inference_steps", "0"),
            "num_inference_steps",
        ),
        (base().text("seed", "-1"), "seed"),
        (base().text("seed", "abc"), "seed"),
        (base().text("scheduler", "lms"), "scheduler"),
        (base().text("quality", "ultra"), "quality"),
        (base().text("lora_settings", "style:0.5"), "lora_settings"),
        (
            base().text("lora_settings", r#"[{"name":"nope"}]"#),
            "lora_settings",
        ),
        (
            base().text("lora_settings", r#"[{"name":"a","weight":"x"}]"#),
            "lora_settings[0].weight",
        ),
        (base().text("response_format", "file"), "response_format"),
        (base().text("output_format", "gif"), "output_format"),
        (
            base().text("output_compression", "101"),
            "output_compression",
        ),
        (base().text("background", "transparent"), "background"),
        (base().text("stream", "maybe"), "stream"),
        (base().text("partial_images", "4"), "partial_images"),
    ];
    let seventeen = (0..17).fold(Form::new().text("prompt", "x"), |form, _| {
        form.file("image[]", &image)
    });
    cases.push((seventeen, "image"));
    let app = app(Behaviour::Succeed);
    for (index, (form, param)) in cases.into_iter().enumerate() {
        let reply = app.post_form(EDITS, form).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some(param),
            "case {index}"
        );
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }
    assert!(
        app.pool.seen.lock().expect("lock").is_empty(),
        "no bad request reached a worker"
    );
}

#[tokio::test]
async fn malformed_multipart_is_a_400() {
    let app = app(Behaviour::Succeed);
    for content_type in ["multipart/form-data", "multipart/form-data; boundary=other"] {
        let request = Request::builder()
            .method("POST")
            .uri(EDITS)
            .header("content-type", content_type)
            .body(Body::from(
                Form::new()
                    .text("prompt", "x")
                    .file("image", &png(8, 8, false))
                    .finish(),
            ))
            .expect("request");
        let reply = app.send(request).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST),
            None,
            "{content_type}"
        );
    }
}

#[tokio::test]
async fn uploads_over_the_body_limit_are_413() {
    let pool = Arc::new(FakePool::new(Behaviour::Succeed));
    let app = app_with(pool, None, 4096);
    let big = vec![7u8; 8192];
    for path in [EDITS, VARIATIONS] {
        let form = Form::new().text("prompt", "x").file("image", &big);
        let reply = app.post_form(path, form).await;
        reply.error_param(StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(reply.json()["error"]["code"], "request_too_large");
    }
    let body = serde_json::json!({"prompt": "x", "images": [{"image_url": data_url(&big)}]});
    let reply = app.call("POST", EDITS, Some(&body.to_string())).await;
    reply.error_param(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn variations_are_image_to_image_with_an_optional_prompt() {
    let app = app(Behaviour::Succeed);
    let image = png(64, 32, false);
    let form = Form::new()
        .file("image", &image)
        .text("n", "3")
        .text("response_format", "b64_json")
        .text("strength", "0.35")
        .text("seed", "5")
        .text("prompt", "");
    let reply = app.post_form(VARIATIONS, form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert_eq!(body["size"], "64x32");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(3));
    let sent = app.pool.last_request();
    assert_eq!(sent.endpoint, Endpoint::Variations as i32);
    assert_eq!(sent.task, Task::ImageToImage as i32);
    // No prompt: the worker finds one.
    assert_eq!(sent.prompt, "");
    assert_eq!(sent.images, vec![image.clone()]);
    assert_eq!((sent.n, sent.seed, sent.strength), (3, Some(5), Some(0.35)));

    let form = Form::new()
        .file("image", &image)
        .text("prompt", "in winter")
        .text("model", "dall-e-2")
        .text("size", "32x32");
    let reply = app.post_form(VARIATIONS, form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let sent = app.pool.last_request();
    assert_eq!(sent.prompt, "in winter");
    assert_eq!((sent.width, sent.height), (32, 32));
    assert_eq!(sent.strength, Some(0.8));
}

#[tokio::test]
async fn bad_variations_name_the_param() {
    let image = png(16, 16, false);
    let cases = [
        (Form::new().text("prompt", "x"), "image"),
        (Form::new().file("image", b"plain text"), "image"),
        (
            Form::new().file("image", &image).file("image", &image),
            "image",
        ),
        (
            Form::new().file("image", &image).file("mask", &image),
            "mask",
        ),
        (
            Form::new().file("image", &image).text("strength", "2"),
            "strength",
        ),
        (Form::new().file("image", &image).text("n", "two"), "n"),
    ];
    let app = app(Behaviour::Succeed);
    for (index, (form, param)) in cases.into_iter().enumerate() {
        let reply = app.post_form(VARIATIONS, form).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some(param),
            "case {index}"
        );
    }
    assert!(app.pool.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn disabled_endpoints_are_404_before_the_upload_is_read() {
    let mut pool = FakePool::new(Behaviour::Succeed);
    let mut info = common::tiny_info();
    info.endpoints = vec![Endpoint::Generations as i32];
    pool.info = Arc::new(info);
    let app = app_with(Arc::new(pool), None, 1024 * 1024);
    for (path, key) in [(EDITS, "edits_config"), (VARIATIONS, "variations_config")] {
        let form = Form::new()
            .text("prompt", "x")
            .file("image", &png(8, 8, false));
        let reply = app.post_form(path, form).await;
        assert_eq!(reply.error_param(StatusCode::NOT_FOUND), None, "{path}");
        let body = reply.json();
        assert_eq!(body["error"]["code"], "task_disabled");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(path) && message.contains(key), "{message}");
        // A body that is not even multipart is not looked at: still the 404.
        let request = Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "multipart/form-data; boundary=x")
            .body(Body::from("garbage"))
            .expect("request");
        app.send(request).await.error_param(StatusCode::NOT_FOUND);
    }
    // Generations still work.
    let reply = app.generate(r#"{"prompt":"x"}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        app.pool.last_request().endpoint,
        Endpoint::Generations as i32
    );
}

#[tokio::test]
async fn a_worker_refusing_the_endpoint_is_a_404() {
    let app = app(Behaviour::Fail(tonic::Status::failed_precondition(
        "edits are disabled",
    )));
    let form = Form::new()
        .text("prompt", "x")
        .file("image", &png(8, 8, false));
    let reply = app.post_form(EDITS, form).await;
    reply.error_param(StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"]["code"], "task_disabled");
}

#[tokio::test]
async fn jpeg_and_webp_inputs_are_accepted() {
    let app = app(Behaviour::Succeed);
    for format in [image::ImageFormat::Jpeg, image::ImageFormat::WebP] {
        let mut out = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(40, 24, image::Rgb([1, 2, 3]))
            .write_to(&mut out, format)
            .expect("encode");
        let bytes = out.into_inner();
        let form = Form::new().text("prompt", "x").file("image", &bytes);
        let reply = app.post_form(EDITS, form).await;
        assert_eq!(reply.status, StatusCode::OK, "{format:?}: {:?}", reply.body);
        assert_eq!(reply.json()["size"], "40x24");
        assert_eq!(app.pool.last_request().images, vec![bytes]);
    }
}
