//! The HTTP API driven through `router()` without sockets, over a fake worker pool that answers
//! with real encoded images.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use base64::Engine;
use common::{app, app_with, Behaviour, FakePool, IMAGE_SIDE, RANDOM_SEED};
use fastfusion_gateway::openai::OutputFormat;

fn decode_b64(value: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(value.as_str().expect("b64_json string"))
        .expect("valid base64")
}

#[tokio::test]
async fn b64_json_returns_decodable_images_in_index_order() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(r#"{"prompt":"a red fox","n":2,"response_format":"b64_json","seed":42}"#)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = reply.json();
    assert!(body["created"].as_u64().is_some_and(|t| t > 1_700_000_000));
    assert_eq!(body["size"], "512x512");
    assert_eq!(body["output_format"], "png");
    assert_eq!(body["quality"], "auto");
    let data = body["data"].as_array().expect("data");
    assert_eq!(data.len(), 2);
    for (index, item) in data.iter().enumerate() {
        assert!(item.get("url").is_none());
        assert_eq!(item["seed"], 42);
        let bytes = decode_b64(&item["b64_json"]);
        assert_eq!(bytes, common::encode_image(index as u32, OutputFormat::Png));
        let image =
            image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).expect("a PNG");
        assert_eq!((image.width(), image.height()), (IMAGE_SIDE, IMAGE_SIDE));
    }
    let sent = app.pool.last_request();
    assert_eq!(
        (sent.n, sent.width, sent.height, sent.seed),
        (2, 512, 512, Some(42))
    );
    assert_eq!(sent.prompt, "a red fox");
    assert_eq!(sent.task, fastfusion_proto::Task::TextToImage as i32);
    assert_eq!(
        sent.endpoint,
        fastfusion_proto::Endpoint::Generations as i32
    );
    assert!(sent.images.is_empty() && sent.mask.is_none());
    assert_eq!(sent.num_inference_steps, Some(20));
    assert_eq!(sent.guidance_scale, Some(7.5));
    assert!(!sent.request_id.is_empty());
}

#[tokio::test]
async fn url_images_round_trip_through_the_data_route() {
    let app = app(Behaviour::Succeed);
    let reply = app.generate(r#"{"prompt":"a lighthouse"}"#).await;
    assert_eq!(reply.status, StatusCode::OK);
    let body = reply.json();
    assert_eq!(body["data"][0]["seed"], RANDOM_SEED);
    let url = body["data"][0]["url"].as_str().expect("url");
    let prefix = "http://gateway.test:8123/v1/images/data/";
    assert!(url.starts_with(prefix), "{url}");
    let id = &url[prefix.len()..];
    assert_eq!(id.len(), 32 + ".png".len(), "{id}");

    let image = app
        .call("GET", &format!("/v1/images/data/{id}"), None)
        .await;
    assert_eq!(image.status, StatusCode::OK);
    assert_eq!(image.headers["content-type"], "image/png");
    assert_eq!(
        image.body.as_ref(),
        common::encode_image(0, OutputFormat::Png)
    );
}

#[tokio::test]
async fn jpeg_and_webp_keep_their_content_type() {
    for (format, extension, content_type) in [
        ("jpeg", ".jpg", "image/jpeg"),
        ("webp", ".webp", "image/webp"),
    ] {
        let app = app(Behaviour::Succeed);
        let reply = app
            .generate(&format!(
                r#"{{"prompt":"x","output_format":"{format}","output_compression":80}}"#
            ))
            .await;
        assert_eq!(reply.status, StatusCode::OK);
        let body = reply.json();
        assert_eq!(body["output_format"], format);
        let url = body["data"][0]["url"].as_str().expect("url");
        assert!(url.ends_with(extension), "{url}");
        let path = url.trim_start_matches("http://gateway.test:8123");
        let image = app.call("GET", path, None).await;
        assert_eq!(image.headers["content-type"], content_type);
        let sent = app.pool.last_request();
        assert_eq!(sent.output_compression, Some(80));
    }
}

#[tokio::test]
async fn base_url_builds_urls_and_trailing_slash_is_harmless() {
    let pool = Arc::new(FakePool::new(Behaviour::Succeed));
    let app = app_with(pool, Some("https://images.example/ff"), 64 * 1024);
    let reply = app.generate(r#"{"prompt":"x"}"#).await;
    let url = reply.json()["data"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    assert!(
        url.starts_with("https://images.example/ff/v1/images/data/"),
        "{url}"
    );
}

#[tokio::test]
async fn forwarded_headers_shape_urls_without_base_url() {
    let app = app(Behaviour::Succeed);
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/images/generations")
        .header("host", "10.0.0.7:8000")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "img.example.com")
        .body(axum::body::Body::from(r#"{"prompt":"x"}"#))
        .expect("request");
    let reply = app.send(request).await;
    let url = reply.json()["data"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    assert!(
        url.starts_with("https://img.example.com/v1/images/data/"),
        "{url}"
    );
}

#[tokio::test]
async fn every_validation_error_is_a_400_naming_its_param() {
    let cases = [
        (r#"{"prompt":""}"#, "prompt"),
        (r#"{"prompt":"   "}"#, "prompt"),
        (r#"{"n":1}"#, "prompt"),
        (r#"{"prompt":"x","n":0}"#, "n"),
        (r#"{"prompt":"x","n":4}"#, "n"),
        (r#"{"prompt":"x","n":-1}"#, "n"),
        (r#"{"prompt":"x","n":"2"}"#, "n"),
        (r#"{"prompt":"x","size":"big"}"#, "size"),
        (r#"{"prompt":"x","size":"500x512"}"#, "size"),
        (r#"{"prompt":"x","size":"0x512"}"#, "size"),
        (r#"{"prompt":"x","size":"2048x2048"}"#, "size"),
        (r#"{"prompt":"x","quality":"ultra"}"#, "quality"),
        (r#"{"prompt":"x","scheduler":"lms"}"#, "scheduler"),
        (r#"{"prompt":"x","guidance_scale":-1}"#, "guidance_scale"),
        (
            r#"{"prompt":"x","guidance_scale":"high"}"#,
            "guidance_scale",
        ),
        (
            r#"{"prompt":"x","num_inference_steps":0}"#,
            "num_inference_steps",
        ),
        (
            r#"{"prompt":"x","num_inference_steps":151}"#,
            "num_inference_steps",
        ),
        (r#"{"prompt":"x","seed":-5}"#, "seed"),
        (r#"{"prompt":"x","seed":1.5}"#, "seed"),
        (
            r#"{"prompt":"x","lora_settings":[{"name":"nope"}]}"#,
            "lora_settings",
        ),
        (
            r#"{"prompt":"x","lora_settings":{"name":"a"}}"#,
            "lora_settings",
        ),
        (
            r#"{"prompt":"x","response_format":"file"}"#,
            "response_format",
        ),
        (r#"{"prompt":"x","output_format":"gif"}"#, "output_format"),
        (
            r#"{"prompt":"x","output_compression":101}"#,
            "output_compression",
        ),
        (r#"{"prompt":"x","background":"transparent"}"#, "background"),
        (r#"{"prompt":"x","stream":"yes"}"#, "stream"),
        (r#"{"prompt":"x","style":"gothic"}"#, "style"),
        (r#"{"prompt":["x"]}"#, "prompt"),
    ];
    let app = app(Behaviour::Succeed);
    for (body, param) in cases {
        let reply = app.generate(body).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some(param),
            "{body}"
        );
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }
    assert!(
        app.pool.seen.lock().expect("lock").is_empty(),
        "no bad request reached a worker"
    );
}

#[tokio::test]
async fn malformed_json_is_a_400_in_openai_shape() {
    let app = app(Behaviour::Succeed);
    for body in [r#"{"prompt": "x""#, "", "null", r#""prompt""#] {
        let reply = app.generate(body).await;
        assert_eq!(reply.error_param(StatusCode::BAD_REQUEST), None, "{body}");
    }
}

#[tokio::test]
async fn accepted_openai_fields_and_unknown_fields_pass() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(
            r#"{"prompt":"x","model":"dall-e-3","size":"auto","style":"vivid","user":"u1",
                "moderation":"low","background":"opaque","stream":false,"partial_images":0,
                "negative_prompt":"blurry","scheduler":"euler","some_future_field":[1,2]}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let sent = app.pool.last_request();
    assert_eq!(sent.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!(sent.scheduler, "euler");
}

#[tokio::test]
async fn quality_selects_presets_then_falls_back_to_defaults() {
    let app = app(Behaviour::Succeed);
    let steps_and_guidance = |body: &'static str| {
        let app = &app;
        async move {
            let reply = app.generate(body).await;
            assert_eq!(reply.status, StatusCode::OK, "{body}");
            let sent = app.pool.last_request();
            (
                reply.json()["quality"].clone(),
                sent.num_inference_steps,
                sent.guidance_scale,
            )
        }
    };
    let (quality, steps, guidance) = steps_and_guidance(r#"{"prompt":"x","quality":"hd"}"#).await;
    assert_eq!(
        (quality.as_str(), steps, guidance),
        (Some("hd"), Some(50), Some(5.0))
    );
    let (quality, steps, guidance) =
        steps_and_guidance(r#"{"prompt":"x","quality":"standard"}"#).await;
    assert_eq!(
        (quality.as_str(), steps, guidance),
        (Some("standard"), Some(20), Some(7.5))
    );
    let (_, steps, guidance) =
        steps_and_guidance(r#"{"prompt":"x","quality":"hd","guidance_scale":3}"#).await;
    assert_eq!((steps, guidance), (Some(50), Some(3.0)));
    let (_, steps, guidance) =
        steps_and_guidance(r#"{"prompt":"x","quality":"high","num_inference_steps":7}"#).await;
    assert_eq!((steps, guidance), (Some(7), Some(7.5)));
}

#[tokio::test]
async fn unknown_routes_and_images_are_404_in_openai_shape() {
    let app = app(Behaviour::Succeed);
    for path in [
        "/v1/nothing",
        "/v1/images/data/0123456789abcdef0123456789abcdef.png",
        "/v1/images/data/..%2F..%2Fetc%2Fpasswd",
        "/v1/images/data/../../etc/passwd",
        "/v1/images/data/notanid.png",
    ] {
        let reply = app.call("GET", path, None).await;
        reply.error_param(StatusCode::NOT_FOUND);
    }
}

#[tokio::test]
async fn wrong_method_is_405_in_openai_shape() {
    let app = app(Behaviour::Succeed);
    let reply = app.call("GET", "/v1/images/generations", None).await;
    reply.error_param(StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn oversized_body_is_413_in_openai_shape() {
    let pool = Arc::new(FakePool::new(Behaviour::Succeed));
    let app = app_with(pool, None, 1024);
    let body = format!(r#"{{"prompt":"{}"}}"#, "x".repeat(2048));
    let reply = app.generate(&body).await;
    reply.error_param(StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn worker_statuses_become_openai_errors() {
    let mut invalid = tonic::Status::invalid_argument("prompt too odd");
    invalid.metadata_mut().insert(
        fastfusion_proto::PARAM_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static("prompt"),
    );
    let cases = [
        (invalid, StatusCode::BAD_REQUEST, Some("prompt"), false),
        (
            tonic::Status::resource_exhausted("queue full"),
            StatusCode::TOO_MANY_REQUESTS,
            None,
            true,
        ),
        (
            tonic::Status::unavailable("loading"),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            true,
        ),
        (
            tonic::Status::internal("CUDA /dev/nvidia0 oops"),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            false,
        ),
    ];
    for (status, http, param, retry_after) in cases {
        let app = app(Behaviour::Fail(status));
        let reply = app.generate(r#"{"prompt":"x"}"#).await;
        assert_eq!(reply.error_param(http).as_deref(), param);
        assert_eq!(
            reply.headers.contains_key("retry-after"),
            retry_after,
            "{http}"
        );
        assert!(!String::from_utf8_lossy(&reply.body).contains("nvidia0"));
    }
}

#[tokio::test]
async fn missing_images_and_timeouts_are_not_silent() {
    let short = app(Behaviour::ShortChange);
    let reply = short.generate(r#"{"prompt":"x","n":2}"#).await;
    reply.error_param(StatusCode::INTERNAL_SERVER_ERROR);

    let hanging = app(Behaviour::Hang);
    let reply = hanging.generate(r#"{"prompt":"x"}"#).await;
    reply.error_param(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], "timeout");
    assert!(reply.headers.contains_key("retry-after"));
}

#[tokio::test]
async fn health_ready_and_models() {
    let app = app(Behaviour::Succeed);
    let reply = app.call("GET", "/health", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"status": "ok"}));

    let reply = app.call("GET", "/ready", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), serde_json::json!({"status": "ready"}));

    let reply = app.call("GET", "/v1/models", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    // OpenAI's four fields, then what the worker reported (tiny_info), limits as enforced.
    assert_eq!(
        reply.json(),
        serde_json::json!({"object": "list", "data": [{
            "id": "tiny-sd", "object": "model", "created": 1_700_000_000, "owned_by": "fastfusion",
            "loaded": false,
            "endpoints": ["generations", "edits", "variations"],
            "native_size": "512x512", "size_multiple": 8, "max_pixels": 1024 * 1024,
            "max_n": 3, "max_steps": 150,
            "schedulers": ["pndm", "euler"], "default_scheduler": "pndm",
            "default_num_inference_steps": 20, "default_guidance_scale": 7.5,
            "default_strength": 0.8,
            "presets": [{"name": "hd", "guidance_scale": 5.0, "num_inference_steps": 50}],
            "loras": []
        }]})
    );
    let mut with_loras = FakePool::new(Behaviour::Succeed);
    let mut info = (*with_loras.info).clone();
    info.loras = vec!["ink".into(), "watercolour".into()];
    info.endpoints = vec![fastfusion_proto::Endpoint::Generations as i32];
    info.limits = None;
    with_loras.info = Arc::new(info);
    let app = app_with(Arc::new(with_loras), None, 1024);
    let entry = &app.call("GET", "/v1/models", None).await.json()["data"][0];
    assert_eq!(entry["loras"], serde_json::json!(["ink", "watercolour"]));
    assert_eq!(entry["endpoints"], serde_json::json!(["generations"]));
    // No limits reported: the fallbacks validation applies.
    assert_eq!(
        (
            &entry["size_multiple"],
            &entry["max_pixels"],
            &entry["max_steps"]
        ),
        (
            &serde_json::json!(8),
            &serde_json::json!(2048 * 2048),
            &serde_json::json!(500)
        )
    );

    let mut loading = FakePool::new(Behaviour::Succeed);
    loading.ready = false;
    let app = app_with(Arc::new(loading), None, 1024);
    let reply = app.call("GET", "/ready", None).await;
    reply.error_param(StatusCode::SERVICE_UNAVAILABLE);
    assert!(reply.headers.contains_key("retry-after"));
    // Liveness does not depend on the worker.
    assert_eq!(
        app.call("GET", "/health", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn request_ids_are_echoed_and_forwarded() {
    let app = app(Behaviour::Succeed);
    let request = axum::http::Request::builder()
        .method("POST")
        .uri("/v1/images/generations")
        .header("host", "h:1")
        .header("x-request-id", "abc-123")
        .body(axum::body::Body::from(r#"{"prompt":"x"}"#))
        .expect("request");
    let reply = app.send(request).await;
    assert_eq!(reply.headers["x-request-id"], "abc-123");
    assert_eq!(app.pool.last_request().request_id, "abc-123");
    let reply = app.call("GET", "/health", None).await;
    assert!(reply.headers.contains_key("x-request-id"));
}

#[tokio::test]
async fn disabled_generation_is_404() {
    let mut pool = FakePool::new(Behaviour::Succeed);
    let mut info = common::tiny_info();
    info.endpoints = vec![fastfusion_proto::Endpoint::Edits as i32];
    pool.info = Arc::new(info);
    let app = app_with(Arc::new(pool), None, 1024);
    let reply = app.generate(r#"{"prompt":"x"}"#).await;
    reply.error_param(StatusCode::NOT_FOUND);
    assert_eq!(reply.json()["error"]["code"], "task_disabled");
    let message = reply.json()["error"]["message"].to_string();
    assert!(message.contains("generations_config.enabled"), "{message}");
}
