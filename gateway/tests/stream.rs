//! `stream: true` through the router with the fake worker pool: the server-sent events OpenAI's
//! SDKs parse, errors before and after the stream starts, the request timeout, and cancellation
//! of the worker call when the client goes away.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine as _;
use common::{app, png, Behaviour, Form, Reply, IMAGE_SIDE, RANDOM_SEED};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// One parsed server-sent event.
#[derive(Debug)]
struct Sse {
    event: String,
    data: Value,
}

/// Parses an SSE body as the SDKs' decoder does: blocks split by a blank line, `event:` and
/// `data:` fields, comments (keep-alives) skipped.
fn parse_events(reply: &Reply) -> Vec<Sse> {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    assert_eq!(
        reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    assert_eq!(
        reply
            .headers
            .get("x-accel-buffering")
            .and_then(|v| v.to_str().ok()),
        Some("no")
    );
    let text = std::str::from_utf8(&reply.body).expect("utf-8");
    text.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let mut event = String::new();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    event = value.trim().to_string();
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.trim_start());
                }
            }
            if data.is_empty() {
                return None;
            }
            let data = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
            Some(Sse { event, data })
        })
        .collect()
}

/// The PNG inside an image event, decoded.
fn decoded(event: &Sse) -> image::RgbImage {
    let b64 = event.data["b64_json"].as_str().expect("b64_json");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

#[tokio::test]
async fn generation_streams_partial_images_then_the_completed_image() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(r#"{"prompt":"a cat","stream":true,"partial_images":2,"quality":"hd"}"#)
        .await;
    let events = parse_events(&reply);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "image_generation.partial_image",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    for (i, event) in events.iter().enumerate() {
        // The SDKs read `type`; the `event:` line says the same.
        assert_eq!(event.data["type"], event.event.as_str());
        assert_eq!(event.data["size"], "512x512");
        assert_eq!(event.data["quality"], "hd");
        assert_eq!(event.data["background"], "auto");
        assert_eq!(event.data["output_format"], "png");
        assert_eq!(event.data["seed"], RANDOM_SEED);
        assert!(event.data["created_at"]
            .as_u64()
            .is_some_and(|t| t > 1_700_000_000));
        assert_eq!(decoded(event).dimensions(), (IMAGE_SIDE, IMAGE_SIDE));
        if i < 2 {
            assert_eq!(event.data["partial_image_index"], i);
            assert!(event.data.get("usage").is_none(), "{}", event.data);
        }
    }
    let completed = &events[2].data;
    assert!(completed.get("partial_image_index").is_none());
    assert_eq!(completed["usage"]["total_tokens"], 0);
    assert_eq!(completed["usage"]["input_tokens_details"]["text_tokens"], 0);
    // Previews and the final image are different pictures.
    assert_ne!(decoded(&events[0]), decoded(&events[2]));
    assert_eq!(app.pool.last_request().partial_images, 2);
}

#[tokio::test]
async fn stream_progress_adds_queue_and_step_events() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(
            r#"{"prompt":"a cat","stream":true,"stream_progress":true,"partial_images":1,
                "seed":7,"num_inference_steps":12}"#,
        )
        .await;
    let events = parse_events(&reply);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "fastfusion.progress",
            "fastfusion.progress",
            "fastfusion.progress",
            "image_generation.partial_image",
            "image_generation.completed"
        ]
    );
    let progress: Vec<&Value> = events[..3].iter().map(|e| &e.data).collect();
    assert_eq!(
        progress,
        [
            &serde_json::json!({"type": "fastfusion.progress", "stage": "queued", "position": 0}),
            &serde_json::json!({"type": "fastfusion.progress", "stage": "started", "total": 12,
                                "seed": 7}),
            &serde_json::json!({"type": "fastfusion.progress", "stage": "denoising", "step": 1,
                                "total": 1}),
        ]
    );
    // Without the flag, a stream carries only OpenAI's events.
    let reply = app
        .generate(r#"{"prompt":"a cat","stream":true,"partial_images":1}"#)
        .await;
    assert!(parse_events(&reply)
        .iter()
        .all(|e| e.event.starts_with("image_generation.")));
}

#[tokio::test]
async fn each_of_n_images_gets_a_completed_event() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(r#"{"prompt":"a cat","stream":true,"n":2,"output_format":"jpeg","seed":5}"#)
        .await;
    let events = parse_events(&reply);
    assert_eq!(events.len(), 2, "{events:?}");
    for event in &events {
        assert_eq!(event.event, "image_generation.completed");
        assert_eq!(event.data["output_format"], "jpeg");
        assert_eq!(event.data["seed"], 5);
    }
    assert_ne!(events[0].data["b64_json"], events[1].data["b64_json"]);
    // No previews were asked for, so the worker makes none.
    assert_eq!(app.pool.last_request().partial_images, 0);
}

#[tokio::test]
async fn partial_images_without_stream_are_accepted_and_not_asked_for() {
    let app = app(Behaviour::Succeed);
    let reply = app
        .generate(r#"{"prompt":"a cat","partial_images":3,"response_format":"b64_json"}"#)
        .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["data"].as_array().map(Vec::len), Some(1));
    assert_eq!(app.pool.last_request().partial_images, 0);
}

#[tokio::test]
async fn edits_stream_image_edit_events() {
    let app = app(Behaviour::Succeed);
    let form = Form::new()
        .file("image", &png(16, 16, false))
        .text("prompt", "a hat")
        .text("stream", "true")
        .text("partial_images", "1");
    let reply = app.post_form("/v1/images/edits", form).await;
    let events = parse_events(&reply);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["image_edit.partial_image", "image_edit.completed"]);
    assert_eq!(events[1].data["type"], "image_edit.completed");
    assert_eq!(events[1].data["size"], "16x16");
    assert_eq!(decoded(&events[1]).dimensions(), (IMAGE_SIDE, IMAGE_SIDE));

    let form = Form::new()
        .file("image", &png(16, 16, false))
        .text("stream", "true");
    let reply = app.post_form("/v1/images/variations", form).await;
    let events = parse_events(&reply);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, "image_edit.completed");
}

#[tokio::test]
async fn bad_stream_settings_name_their_param() {
    let app = app(Behaviour::Succeed);
    let cases = [
        (
            r#"{"prompt":"x","stream":true,"response_format":"url"}"#,
            "response_format",
        ),
        (
            r#"{"prompt":"x","stream":true,"partial_images":4}"#,
            "partial_images",
        ),
        (r#"{"prompt":"x","partial_images":-1}"#, "partial_images"),
        (r#"{"prompt":"x","stream":"yes"}"#, "stream"),
    ];
    for (body, param) in cases {
        let reply = app.generate(body).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some(param),
            "{body}"
        );
    }
    let form = Form::new()
        .file("image", &png(16, 16, false))
        .text("prompt", "a hat")
        .text("stream", "maybe");
    let reply = app.post_form("/v1/images/edits", form).await;
    assert_eq!(
        reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
        Some("stream")
    );
    assert!(app.pool.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn a_refusal_before_the_first_event_keeps_its_status() {
    let app = app(Behaviour::Fail(tonic::Status::resource_exhausted(
        "queue full",
    )));
    let reply = app.generate(r#"{"prompt":"x","stream":true}"#).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(reply.json()["error"]["code"], "rate_limit_exceeded");
    assert!(reply.headers.contains_key("retry-after"));

    // A worker that never answers: the timeout passes before anything is streamed.
    let app = common::app(Behaviour::Hang);
    let reply = app.generate(r#"{"prompt":"x","stream":true}"#).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["error"]["code"], "timeout");
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_mid_stream_is_an_error_event() {
    let mut status = tonic::Status::invalid_argument("unknown LoRA 'x'");
    status.metadata_mut().insert(
        fastfusion_proto::PARAM_METADATA_KEY,
        tonic::metadata::MetadataValue::from_static("lora_settings"),
    );
    let app = app(Behaviour::FailMidStream(status));
    let events = parse_events(&app.generate(r#"{"prompt":"x","stream":true}"#).await);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "error");
    let data = &events[0].data;
    assert_eq!(data["type"], "error");
    assert_eq!(data["error"]["type"], "invalid_request_error");
    assert_eq!(data["error"]["param"], "lora_settings");
    assert_eq!(data["error"]["message"], "unknown LoRA 'x'");

    // Internal details stay in the log, as in JSON errors.
    let app = common::app(Behaviour::FailMidStream(tonic::Status::internal(
        "/models/secret exploded",
    )));
    let events = parse_events(&app.generate(r#"{"prompt":"x","stream":true}"#).await);
    assert_eq!(events[0].data["error"]["type"], "server_error");
    assert!(!events[0].data.to_string().contains("secret"));
}

#[tokio::test]
async fn missing_images_are_an_error_event_after_the_ones_sent() {
    let app = app(Behaviour::ShortChange);
    let events = parse_events(&app.generate(r#"{"prompt":"x","stream":true,"n":2}"#).await);
    let kinds: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["image_generation.completed", "error"]);
    assert_eq!(events[1].data["error"]["code"], "internal_error");
}

#[tokio::test]
async fn the_request_timeout_ends_a_stream_with_an_error_event_and_cancels_the_job() {
    // The fake app's request timeout is 300 ms; the job starts and never finishes.
    let app = app(Behaviour::Stall);
    let events = parse_events(&app.generate(r#"{"prompt":"x","stream":true}"#).await);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].event, "error");
    assert_eq!(events[0].data["error"]["code"], "timeout");
    assert_eq!(events[0].data["error"]["type"], "server_error");
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn dropping_the_response_body_cancels_the_worker_stream() {
    let app = app(Behaviour::Stall);
    let request = Request::post("/v1/images/generations")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt":"x","stream":true}"#))
        .expect("request");
    let response = app.router.clone().oneshot(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    // Nothing to send yet (the job is denoising), and the call is still alive.
    let waited = tokio::time::timeout(Duration::from_millis(50), body.frame()).await;
    assert!(waited.is_err(), "no event expected yet");
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 0);
    // The client hangs up: hyper drops the body.
    drop(body);
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_client_leaving_a_json_request_cancels_the_worker_stream() {
    let app = app(Behaviour::Stall);
    let request = Request::post("/v1/images/generations")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt":"x"}"#))
        .expect("request");
    let call = tokio::spawn(app.router.clone().oneshot(request));
    // Wait until the call is on the worker, then go away as hyper does: drop the handler.
    while app.pool.seen.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 0);
    call.abort();
    assert!(call.await.is_err_and(|e| e.is_cancelled()));
    assert_eq!(app.pool.dropped.load(Ordering::SeqCst), 1);
}
