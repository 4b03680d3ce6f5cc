//! OpenAI's current request values through `router()`: the ones that make sense here are
//! accepted (newer quality names fall back to the defaults, fields for OpenAI's own models are
//! ignored), the ones that cannot be honoured are a 400 naming the parameter, and clients that
//! hard-code a gpt-image model get their images inline as OpenAI sends them.

mod common;

use axum::http::StatusCode;
use base64::Engine;
use common::{app, png, Behaviour, Form};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[tokio::test]
async fn newer_quality_names_fall_back_to_the_defaults() {
    let app = app(Behaviour::Succeed);
    for quality in ["xhigh", "max", "medium", "auto"] {
        let reply = app
            .generate(&format!(r#"{{"prompt":"a kite","quality":"{quality}"}}"#))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{quality}: {:?}", reply.body);
        assert_eq!(reply.json()["quality"], quality);
        let sent = app.pool.last_request();
        // tiny_info's global defaults, not the `hd` preset.
        assert_eq!(
            (sent.num_inference_steps, sent.guidance_scale),
            (Some(20), Some(7.5)),
            "{quality}"
        );
    }
    let reply = app
        .generate(r#"{"prompt":"a kite","quality":"ultra"}"#)
        .await;
    assert_eq!(
        reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
        Some("quality")
    );
    let message = reply.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    // The model's preset `hd` is also an OpenAI name: listed once.
    assert_eq!(message.matches("hd").count(), 1, "{message}");
    assert!(
        message.contains("xhigh") && message.contains("max"),
        "{message}"
    );
}

#[tokio::test]
async fn fields_for_openais_own_models_are_accepted_and_ignored() {
    let app = app(Behaviour::Succeed);
    let plain = app.generate(r#"{"prompt":"a kite","seed":5}"#).await;
    assert_eq!(plain.status, StatusCode::OK);
    let plain_request = app.pool.last_request();
    let reply = app
        .generate(
            r#"{"prompt":"a kite","seed":5,"complexity":"high","safety_identifier":"user-42",
                "input_fidelity":"high","moderation":"low","user":"u"}"#,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let mut sent = app.pool.last_request();
    sent.request_id.clone_from(&plain_request.request_id);
    assert_eq!(sent, plain_request, "ignored fields changed the job");

    // Edits, as multipart text fields (complexity as any JSON value in the JSON form).
    let form = Form::new()
        .text("prompt", "a hat")
        .text("complexity", "low")
        .text("safety_identifier", "user-42")
        .text("input_fidelity", "high")
        .file("image", &png(64, 64, false));
    let reply = app.post_form("/v1/images/edits", form).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let body = format!(
        r#"{{"prompt":"a hat","complexity":{{"level":3}},"input_fidelity":"low",
            "images":[{{"image_url":"data:image/png;base64,{}"}}]}}"#,
        b64(&png(64, 64, false))
    );
    let reply = app.call("POST", "/v1/images/edits", Some(&body)).await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
}

#[tokio::test]
async fn gif_and_svg_output_formats_are_a_400_naming_output_format() {
    let app = app(Behaviour::Succeed);
    for format in ["gif", "svg"] {
        let reply = app
            .generate(&format!(
                r#"{{"prompt":"a kite","output_format":"{format}"}}"#
            ))
            .await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some("output_format"),
            "{format}"
        );
        let message = reply.json()["error"]["message"].to_string();
        assert!(
            message.contains(format) && message.contains("png, jpeg or webp"),
            "{message}"
        );
        let form = Form::new()
            .text("prompt", "a hat")
            .text("output_format", format)
            .file("image", &png(64, 64, false));
        let reply = app.post_form("/v1/images/edits", form).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some("output_format"),
            "edit {format}"
        );
    }
    assert!(app.pool.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn markup_on_edits_is_a_400_naming_markup() {
    let app = app(Behaviour::Succeed);
    let image = png(64, 64, false);
    // As a file part (before it is read), as a text part, and in the JSON form.
    let cases = [
        Form::new()
            .text("prompt", "a hat")
            .file("image", &image)
            .file("markup", &image),
        Form::new()
            .text("prompt", "a hat")
            .text("markup", r#"[{"type":"arrow"}]"#)
            .file("image", &image),
    ];
    for form in cases {
        let reply = app.post_form("/v1/images/edits", form).await;
        assert_eq!(
            reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
            Some("markup")
        );
    }
    let body = format!(
        r#"{{"prompt":"a hat","markup":{{"image_url":"data:image/png;base64,{}"}},
            "images":[{{"image_url":"data:image/png;base64,{}"}}]}}"#,
        b64(&image),
        b64(&image)
    );
    let reply = app.call("POST", "/v1/images/edits", Some(&body)).await;
    assert_eq!(
        reply.error_param(StatusCode::BAD_REQUEST).as_deref(),
        Some("markup")
    );
    assert!(app.pool.seen.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn gpt_image_model_names_get_b64_json_without_asking() {
    let app = app(Behaviour::Succeed);
    // n8n's body for gpt-image models: no response_format.
    let reply = app
        .generate(r#"{"prompt":"a kite","model":"gpt-image-1-mini"}"#)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let item = &reply.json()["data"][0];
    assert!(item["b64_json"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(item.get("url").is_none());
    // Other names keep OpenAI's default, a url.
    let reply = app
        .generate(r#"{"prompt":"a kite","model":"dall-e-2"}"#)
        .await;
    assert!(reply.json()["data"][0]["url"].is_string());
}
