//! End to end: the real gateway (with its embedded worker, and with a separate worker process)
//! on ephemeral ports, driven over HTTP as an OpenAI client would.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use fastfusion_tests::{
    binary, decode_image, fixture, max_pixel_diff, pixel_std, wait_http_ok, write_tiny_config,
    Process,
};
use reqwest::blocking::Client;
use serde_json::{json, Value};

const START: Duration = Duration::from_secs(60);

/// A gateway process with its own temp data dir and config.
struct Gateway {
    base: String,
    data_dir: tempfile::TempDir,
    _config_dir: tempfile::TempDir,
    process: Process,
    client: Client,
}

impl Gateway {
    fn start(workers: &[&str], envs: &[(&str, &str)]) -> Result<Gateway> {
        let config_dir = tempfile::tempdir()?;
        let config = write_tiny_config(config_dir.path(), json!({}))?;
        let data_dir = tempfile::tempdir()?;
        let config_s = config.display().to_string();
        let data_s = data_dir.path().display().to_string();
        let mut all_envs = vec![
            ("CONFIG_PATH", config_s.as_str()),
            ("IMAGE_DATA_PATH", data_s.as_str()),
            ("FASTFUSION_HOST", "127.0.0.1"),
            ("FASTFUSION_PORT", "0"),
        ];
        all_envs.extend_from_slice(envs);
        let mut args = Vec::new();
        for w in workers {
            args.push("--worker");
            args.push(w);
        }
        let mut process = Process::spawn(&binary("fastfusion-gateway")?, &args, &all_envs)?;
        let addr = process.wait_listening(START)?;
        let client = Client::builder()
            .timeout(Duration::from_secs(120))
            .build()?;
        Ok(Gateway {
            base: format!("http://{addr}"),
            data_dir,
            _config_dir: config_dir,
            process,
            client,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let url = format!("{}/ready", self.base);
        wait_http_ok(&self.client, &url, START).with_context(|| self.process.output())
    }

    fn generate(&self, body: Value) -> Result<(u16, Value)> {
        let response = self
            .client
            .post(format!("{}/v1/images/generations", self.base))
            .json(&body)
            .send()?;
        let status = response.status().as_u16();
        let text = response.text()?;
        let value = serde_json::from_str(&text).with_context(|| format!("not JSON: {text}"))?;
        Ok((status, value))
    }

    fn b64_image(&self, body: Value) -> Result<image::RgbImage> {
        let (status, value) = self.generate(body)?;
        ensure!(status == 200, "status {status}: {value}");
        let b64 = value["data"][0]["b64_json"]
            .as_str()
            .context("no b64_json")?;
        decode_image(&base64::engine::general_purpose::STANDARD.decode(b64)?)
    }
}

fn assert_error(status: u16, body: &Value, want_status: u16, want_param: &str) {
    assert_eq!(status, want_status, "body: {body}");
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert_eq!(error["type"], "invalid_request_error", "{body}");
    assert_eq!(error["param"], want_param, "{body}");
}

#[test]
fn embedded_gateway_serves_generations_in_both_formats() -> Result<()> {
    let mut gw = Gateway::start(&[], &[])?;
    // Liveness answers at once, even while the model loads.
    let health: Value = gw
        .client
        .get(format!("{}/health", gw.base))
        .send()?
        .json()?;
    assert_eq!(health["status"], "ok");
    gw.wait_ready()?;

    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.base))
        .send()?
        .json()?;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "tiny-sd");
    assert_eq!(models["data"][0]["object"], "model");

    // b64_json: a real 64x64 picture, the seed reported back.
    let (status, body) = gw.generate(json!({
        "prompt": "a red apple on a wooden table",
        "size": "64x64",
        "response_format": "b64_json",
        "seed": 42
    }))?;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["created"].as_u64().is_some_and(|t| t > 1_700_000_000),
        "{body}"
    );
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(body["size"], "64x64");
    assert_eq!(body["output_format"], "png");
    let b64 = body["data"][0]["b64_json"].as_str().context("b64_json")?;
    let first = decode_image(&base64::engine::general_purpose::STANDARD.decode(b64)?)?;
    assert_eq!(first.dimensions(), (64, 64));
    assert!(pixel_std(&first) > 2.0, "image is flat");
    assert_eq!(body["data"][0]["seed"], 42);

    // url: stored, then served with the right content type and the same pixels.
    let (status, body) = gw.generate(json!({
        "prompt": "a red apple on a wooden table",
        "size": "64x64",
        "seed": 42,
        "n": 2
    }))?;
    assert_eq!(status, 200, "{body}");
    let data = body["data"].as_array().context("data")?;
    assert_eq!(data.len(), 2);
    let mut urls = Vec::new();
    for item in data {
        let url = item["url"].as_str().context("url")?.to_string();
        assert!(
            url.starts_with(&format!("{}/v1/images/data/", gw.base)),
            "{url}"
        );
        let id = url.rsplit('/').next().unwrap_or_default();
        let stem = id.split('.').next().unwrap_or_default();
        assert!(stem.len() >= 32, "id {id} is too short to be unguessable");
        urls.push(url);
    }
    let response = gw.client.get(&urls[0]).send()?;
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("image/png")
    );
    let served = decode_image(&response.bytes()?)?;
    // n=2 draws both latents from one generator, so image 0 equals the n=1 image (up to the
    // float rounding of a batch-of-2 matmul).
    assert!(
        max_pixel_diff(&served, &first)? <= 2,
        "batched image 0 must match the n=1 image"
    );
    let second = decode_image(&gw.client.get(&urls[1]).send()?.bytes()?)?;
    assert!(
        max_pixel_diff(&served, &second)? > 10,
        "the two images of n=2 must differ"
    );
    // The files are really in IMAGE_DATA_PATH, with no temp files left over.
    let files: Vec<_> = std::fs::read_dir(gw.data_dir.path())?.collect::<Result<_, _>>()?;
    assert_eq!(files.len(), 2, "{files:?}");

    // Same seed, same image; another seed, another image.
    let again = gw.b64_image(
        json!({"prompt": "a red apple on a wooden table", "size": "64x64",
        "response_format": "b64_json", "seed": 42}),
    )?;
    assert_eq!(max_pixel_diff(&again, &first)?, 0);
    let other = gw.b64_image(
        json!({"prompt": "a red apple on a wooden table", "size": "64x64",
        "response_format": "b64_json", "seed": 43}),
    )?;
    assert!(max_pixel_diff(&other, &first)? > 10);

    // No seed: a random one is reported, and reusing it reproduces the image.
    let (status, body) = gw.generate(json!({"prompt": "a blue house", "size": "64x64",
        "response_format": "b64_json"}))?;
    assert_eq!(status, 200, "{body}");
    let seed = body["data"][0]["seed"].as_u64().context("seed reported")?;
    let b64 = body["data"][0]["b64_json"].as_str().context("b64_json")?;
    let random = decode_image(&base64::engine::general_purpose::STANDARD.decode(b64)?)?;
    let replay = gw.b64_image(json!({"prompt": "a blue house", "size": "64x64",
        "response_format": "b64_json", "seed": seed}))?;
    assert_eq!(max_pixel_diff(&random, &replay)?, 0);

    // Other output formats.
    for (format, mime) in [
        ("jpeg", image::ImageFormat::Jpeg),
        ("webp", image::ImageFormat::WebP),
    ] {
        let (status, body) = gw.generate(json!({"prompt": "a cat", "size": "64x64",
            "response_format": "b64_json", "output_format": format, "output_compression": 80}))?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["output_format"], format);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body["data"][0]["b64_json"].as_str().context("b64")?)?;
        assert_eq!(image::guess_format(&bytes)?, mime);
    }

    // Unknown image ids and traversal attempts are 404s in the OpenAI shape.
    for path in [
        "/v1/images/data/0123456789abcdef0123456789abcdef.png",
        "/v1/images/data/..%2Fetc%2Fpasswd",
    ] {
        let response = gw.client.get(format!("{}{path}", gw.base)).send()?;
        assert_eq!(response.status().as_u16(), 404, "{path}");
        let body: Value = response.json()?;
        assert!(body["error"]["message"].is_string(), "{body}");
    }
    Ok(())
}

#[test]
fn matches_the_diffusers_reference_end_to_end() -> Result<()> {
    // One manifest case rerun through HTTP: the whole path (validation, gRPC, pipeline, PNG) must
    // give diffusers' pixels.
    let manifest: Vec<Value> =
        serde_json::from_slice(&std::fs::read(fixture("references/manifest.json"))?)?;
    let case = manifest
        .iter()
        .find(|c| {
            c["model"] == "tiny-sd15"
                && c["task"].is_null()
                && c["n"] == 1
                && c["scheduler"] == "euler"
                && c["negative_prompt"].is_null()
                && c["width"] == 64
                && c["height"] == 64
        })
        .context("no plain euler case for tiny-sd15 in the manifest")?;
    let mut gw = Gateway::start(&[], &[])?;
    gw.wait_ready()?;
    let image = gw.b64_image(json!({
        "prompt": case["prompt"],
        "seed": case["seed"],
        "num_inference_steps": case["steps"],
        "guidance_scale": case["guidance_scale"],
        "scheduler": case["scheduler"],
        "size": "64x64",
        "response_format": "b64_json"
    }))?;
    let file = case["images"][0].as_str().context("image file")?;
    let reference = decode_image(&std::fs::read(fixture(&format!("references/{file}")))?)?;
    let diff = max_pixel_diff(&image, &reference)?;
    assert!(
        diff <= 2,
        "max pixel difference {diff} > 2/255 against {file}"
    );
    Ok(())
}

#[test]
fn bad_input_gets_openai_errors_naming_the_parameter() -> Result<()> {
    let mut gw = Gateway::start(&[], &[])?;
    gw.wait_ready()?;
    let cases = [
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": "x", "n": 4}), "n"),
        (json!({"prompt": "x", "size": "big"}), "size"),
        (json!({"prompt": "x", "size": "63x64"}), "size"),
        (json!({"prompt": "x", "size": "4096x4096"}), "size"),
        (json!({"prompt": "x", "quality": "ultra"}), "quality"),
        (json!({"prompt": "   "}), "prompt"),
        (json!({"n": 1}), "prompt"),
        (json!({"prompt": "x", "n": "two"}), "n"),
        (json!({"prompt": "x", "scheduler": "lms"}), "scheduler"),
        (
            json!({"prompt": "x", "background": "transparent"}),
            "background",
        ),
        (
            json!({"prompt": "x", "response_format": "gif"}),
            "response_format",
        ),
        (
            json!({"prompt": "x", "num_inference_steps": 0}),
            "num_inference_steps",
        ),
        (
            json!({"prompt": "x", "guidance_scale": -1}),
            "guidance_scale",
        ),
        (
            json!({"prompt": "x", "output_compression": 101}),
            "output_compression",
        ),
    ];
    for (body, param) in cases {
        let (status, response) = gw.generate(body.clone())?;
        assert_error(status, &response, 400, param);
    }
    // Not JSON at all.
    let response = gw
        .client
        .post(format!("{}/v1/images/generations", gw.base))
        .header("content-type", "application/json")
        .body("{not json")
        .send()?;
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json()?;
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    // Unknown routes are 404 in the same shape.
    let response = gw.client.get(format!("{}/v1/nope", gw.base)).send()?;
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json()?;
    assert!(body["error"]["message"].is_string(), "{body}");
    // After all of that the service still works.
    assert_eq!(
        gw.generate(json!({"prompt": "still alive", "size": "64x64",
        "response_format": "b64_json"}))?
            .0,
        200
    );
    assert!(gw.process.try_wait()?.is_none(), "gateway exited");
    Ok(())
}

#[test]
fn quality_presets_and_openai_quality_values() -> Result<()> {
    let mut gw = Gateway::start(&[], &[])?;
    gw.wait_ready()?;
    // "fast" is a preset (guidance 1.0 = no CFG, 2 steps): same as giving those values directly.
    let preset = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "quality": "fast", "response_format": "b64_json"}))?;
    let explicit = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "guidance_scale": 1.0, "num_inference_steps": 2, "response_format": "b64_json"}))?;
    assert_eq!(max_pixel_diff(&preset, &explicit)?, 0);
    // An override of one value keeps the preset's other value.
    let mixed = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "quality": "fast", "num_inference_steps": 3, "response_format": "b64_json"}))?;
    let mixed_explicit = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "guidance_scale": 1.0, "num_inference_steps": 3, "response_format": "b64_json"}))?;
    assert_eq!(max_pixel_diff(&mixed, &mixed_explicit)?, 0);
    // OpenAI's own quality names without a preset of that name fall back to the global defaults.
    let high = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "quality": "high", "response_format": "b64_json"}))?;
    let defaults = gw.b64_image(json!({"prompt": "a tree", "size": "64x64", "seed": 7,
        "response_format": "b64_json"}))?;
    assert_eq!(max_pixel_diff(&high, &defaults)?, 0);
    assert!(max_pixel_diff(&high, &preset)? > 0);
    Ok(())
}

#[test]
fn separate_worker_process_over_grpc() -> Result<()> {
    let config_dir = tempfile::tempdir()?;
    let config = write_tiny_config(config_dir.path(), json!({}))?;
    let mut worker = Process::spawn(
        &binary("fastfusion-worker")?,
        &[
            "serve",
            "--config",
            &config.display().to_string(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    )?;
    let worker_addr = worker.wait_listening(START)?;
    let mut gw = Gateway::start(
        &[&worker_addr],
        &[("BASE_URL", "http://images.example.test/")],
    )?;
    gw.wait_ready()?;
    let (status, body) =
        gw.generate(json!({"prompt": "a lighthouse", "size": "64x64", "seed": 1}))?;
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().context("url")?;
    // BASE_URL decides the url (its trailing slash does not double up).
    assert!(
        url.starts_with("http://images.example.test/v1/images/data/"),
        "{url}"
    );
    let id = url.rsplit('/').next().context("id")?;
    let response = gw
        .client
        .get(format!("{}/v1/images/data/{id}", gw.base))
        .send()?;
    assert_eq!(response.status().as_u16(), 200);
    assert!(pixel_std(&decode_image(&response.bytes()?)?) > 2.0);

    // The worker goes away: readiness and requests say 503, never 500, and the gateway lives on.
    worker.kill();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = gw
            .client
            .get(format!("{}/ready", gw.base))
            .send()?
            .status()
            .as_u16();
        if status == 503 {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "/ready still {status} after the worker died"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = gw.generate(json!({"prompt": "a lighthouse", "size": "64x64"}))?;
    assert_eq!(status, 503, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(gw.process.try_wait()?.is_none(), "gateway exited");
    Ok(())
}
