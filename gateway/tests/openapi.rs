//! The OpenAPI document: `docs/openapi.json` must be exactly what the code generates, and
//! `GET /openapi.json` serves it.
//!
//! After an API change, regenerate the committed copy with
//! `FASTFUSION_UPDATE_OPENAPI=1 cargo test -p fastfusion-gateway --test openapi`.

mod common;

use std::path::PathBuf;

use axum::http::StatusCode;
use common::{app, Behaviour};
use fastfusion_gateway::openapi::pretty_json;

fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
}

#[test]
fn committed_document_matches_the_code() {
    let generated = pretty_json();
    let path = committed_path();
    if std::env::var_os("FASTFUSION_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(
                || "at the end".to_string(),
                |i| format!("at line {}", i + 1),
            );
        panic!(
            "docs/openapi.json is out of date with the code (first difference {line}); regenerate \
             it with `FASTFUSION_UPDATE_OPENAPI=1 cargo test -p fastfusion-gateway --test openapi` \
             and commit it"
        );
    }
}

#[test]
fn document_covers_the_api() {
    let doc: serde_json::Value = serde_json::from_str(&pretty_json()).expect("JSON");
    let paths = doc["paths"].as_object().expect("paths");
    for (path, method) in [
        ("/v1/images/generations", "post"),
        ("/v1/images/edits", "post"),
        ("/v1/images/variations", "post"),
        ("/v1/images/data/{file_id}", "get"),
        ("/v1/models", "get"),
        ("/health", "get"),
        ("/ready", "get"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} missing");
    }
    let schemas = &doc["components"]["schemas"];
    let generation = properties(schemas, "ImageGenerationRequest");
    for field in [
        "prompt",
        "seed",
        "negative_prompt",
        "guidance_scale",
        "num_inference_steps",
        "scheduler",
        "lora_settings",
        "stream",
    ] {
        assert!(generation[field].is_object(), "generations field {field}");
    }
    let edit = properties(schemas, "ImageEditRequest");
    for field in ["strength", "prompt", "seed", "input_fidelity", "markup"] {
        assert!(edit[field].is_object(), "edits field {field}");
    }
    for field in ["safety_identifier", "complexity", "stream_progress"] {
        assert!(generation[field].is_object(), "generations field {field}");
    }
    let edit_body = &paths["/v1/images/edits"]["post"]["requestBody"]["content"];
    assert!(edit_body["multipart/form-data"].is_object());
    assert!(edit_body["application/json"].is_object());
    let created = &paths["/v1/images/generations"]["post"]["responses"]["200"]["content"];
    assert!(created["text/event-stream"].is_object());
    let error = &schemas["ErrorResponse"]["properties"]["error"];
    assert!(error.is_object(), "{}", schemas["ErrorResponse"]);
    for status in ["400", "401", "429", "503"] {
        assert!(
            paths["/v1/images/generations"]["post"]["responses"][status].is_object(),
            "status {status}"
        );
    }
}

/// The properties of schema `name`, those of its `allOf` parts included (flattened structs
/// become an `allOf` of a reference and the struct's own fields).
fn properties(
    schemas: &serde_json::Value,
    name: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let schema = &schemas[name];
    let mut found = schema["properties"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        let part = match part["$ref"].as_str() {
            Some(reference) => {
                let target = reference.trim_start_matches("#/components/schemas/");
                properties(schemas, target)
            }
            None => part["properties"].as_object().cloned().unwrap_or_default(),
        };
        found.extend(part);
    }
    found
}

#[tokio::test]
async fn served_at_openapi_json() {
    let app = app(Behaviour::Succeed);
    let reply = app.call("GET", "/openapi.json", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply
            .headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(reply.body, pretty_json().as_bytes());
}
