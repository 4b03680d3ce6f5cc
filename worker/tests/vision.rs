//! The vision-model client against a local HTTP server that records what it receives: the path,
//! the Authorization header and the chat completions body (model, roles, and a data URL that must
//! decode to the exact PNG sent), then replies as scripted. Every address is 127.0.0.1.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::Router;
use base64::Engine as _;
use fastfusion_worker::config::VariationsConfig;
use fastfusion_worker::vision::{
    chat_completions_url, describe_image, VisionError, VisionSettings, DEFAULT_TIMEOUT,
    DEFAULT_VARIATION_PROMPT,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: Method,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

#[derive(Clone)]
struct Script {
    status: StatusCode,
    body: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A server on 127.0.0.1:0 that answers every path with `status` and `body` and records requests.
struct Server {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start(status: StatusCode, body: impl Into<String>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Script {
            status,
            body: body.into(),
            seen: seen.clone(),
        };
        // A fallback rather than a route: a request to a wrong path must be recorded, not 404ed.
        let app = Router::new().fallback(record).with_state(script);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("test server") });
        Server { addr, seen }
    }

    /// A server replying 200 with a chat completion whose message content is `content`.
    async fn completion(content: Value) -> Self {
        let body = json!({
            "id": "chatcmpl-test",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content },
                "finish_reason": "stop"
            }]
        });
        Self::start(StatusCode::OK, body.to_string()).await
    }

    fn host(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen lock").clone()
    }
}

async fn record(
    State(script): State<Script>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let text = |name| {
        headers
            .get(name)
            .map(|value: &header::HeaderValue| value.to_str().expect("header is ASCII").to_owned())
    };
    script.seen.lock().expect("seen lock").push(Seen {
        method,
        path: uri.path().to_owned(),
        authorization: text(header::AUTHORIZATION),
        content_type: text(header::CONTENT_TYPE),
        body: body.to_vec(),
    });
    (
        script.status,
        [(header::CONTENT_TYPE, "application/json")],
        script.body,
    )
}

/// A real 8×6 PNG, different in every pixel, so a data URL that loses a byte is caught.
fn png() -> Vec<u8> {
    let image = image::RgbImage::from_fn(8, 6, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 7]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("encode PNG");
    bytes.into_inner()
}

fn config(fields: Value) -> VariationsConfig {
    serde_json::from_value(fields).expect("valid variations_config")
}

fn settings(host: &str, api_key: Option<&str>) -> VisionSettings {
    VisionSettings {
        model: "gpt-4o".to_owned(),
        endpoint_url: chat_completions_url(host),
        api_key: api_key.map(str::to_owned),
        timeout: Duration::from_secs(10),
    }
}

/// Checks the one request the server got: route, key, JSON body, roles, model and image.
fn assert_one_request(server: &Server, model: &str, key: Option<&str>, image: &[u8]) {
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "expected exactly one request: {seen:?}");
    let request = &seen[0];
    assert_eq!(request.method, Method::POST);
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(
        request.authorization.as_deref(),
        key.map(|key| format!("Bearer {key}")).as_deref()
    );
    assert_eq!(request.content_type.as_deref(), Some("application/json"));

    let body: Value = serde_json::from_slice(&request.body).expect("request body is JSON");
    assert_eq!(body["model"], model);
    let temperature = body["temperature"]
        .as_f64()
        .expect("temperature is a number");
    assert!((0.0..=0.3).contains(&temperature), "{temperature}");
    let max_tokens = body["max_tokens"]
        .as_u64()
        .expect("max_tokens is an integer");
    assert!((100..=300).contains(&max_tokens), "{max_tokens}");

    let messages = body["messages"].as_array().expect("messages is an array");
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["role"], "system");
    assert!(!messages[0]["content"]
        .as_str()
        .expect("system content is a string")
        .trim()
        .is_empty());
    assert_eq!(messages[1]["role"], "user");
    let parts = messages[1]["content"]
        .as_array()
        .expect("user content is an array of parts");
    assert_eq!(parts.len(), 2);
    assert_eq!(parts[0]["type"], "text");
    assert!(parts[0]["text"]
        .as_str()
        .expect("instruction text is a string")
        .contains("recreate"));
    assert_eq!(parts[1]["type"], "image_url");
    let url = parts[1]["image_url"]["url"]
        .as_str()
        .expect("image_url.url is a string");
    let encoded = url
        .strip_prefix("data:image/png;base64,")
        .expect("a base64 data URL of a PNG");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("valid base64");
    assert_eq!(decoded, image, "the data URL must hold the exact PNG bytes");
}

#[tokio::test]
async fn success_returns_the_trimmed_reply_and_sends_the_image() {
    let server = Server::completion(json!("  A red fox in fresh snow, watercolor  \n")).await;
    let image = png();
    let prompt = describe_image(&settings(&server.host(), Some("sk-inline")), &image)
        .await
        .unwrap();
    assert_eq!(prompt, "A red fox in fresh snow, watercolor");
    assert_one_request(&server, "gpt-4o", Some("sk-inline"), &image);
}

#[tokio::test]
async fn content_as_an_array_of_text_parts_is_joined() {
    let server = Server::completion(json!([
        { "type": "text", "text": "a tabby cat," },
        { "type": "text", "text": "on a green sofa" }
    ]))
    .await;
    let prompt = describe_image(&settings(&server.host(), None), &png())
        .await
        .unwrap();
    assert_eq!(prompt, "a tabby cat, on a green sofa");
}

#[tokio::test]
async fn a_prompt_label_quotes_and_line_breaks_are_removed() {
    let server =
        Server::completion(json!("Prompt: \"a lighthouse at dusk,\n oil painting\"")).await;
    let prompt = describe_image(&settings(&server.host(), None), &png())
        .await
        .unwrap();
    assert_eq!(prompt, "a lighthouse at dusk, oil painting");
}

#[tokio::test]
async fn every_host_form_posts_to_v1_chat_completions_once() {
    for form in [
        "http://{addr}",
        "http://{addr}/",
        "http://{addr}/v1",
        "http://{addr}/v1/",
        "  http://{addr}/v1//  ",
        "http://{addr}/v1/chat/completions",
    ] {
        let server = Server::completion(json!("a bowl of pears")).await;
        let host = form.replace("{addr}", &server.addr.to_string());
        let image = png();
        let prompt = describe_image(&settings(&host, None), &image).await;
        assert_eq!(prompt.unwrap(), "a bowl of pears", "host {host:?}");
        assert_one_request(&server, "gpt-4o", None, &image);
    }
}

#[test]
fn chat_completions_url_resolves_openai_and_compatible_hosts() {
    let want = "https://api.openai.com/v1/chat/completions";
    for host in [
        "https://api.openai.com",
        "https://api.openai.com/",
        "https://api.openai.com/v1",
        "https://api.openai.com/v1/",
        "",
    ] {
        assert_eq!(chat_completions_url(host), want, "{host:?}");
    }
    assert_eq!(
        chat_completions_url("http://localhost:11434/v1"),
        "http://localhost:11434/v1/chat/completions"
    );
    assert_eq!(
        chat_completions_url("http://gpu-box:8000"),
        "http://gpu-box:8000/v1/chat/completions"
    );
    // A path prefix (a gateway in front of the model server) is kept.
    assert_eq!(
        chat_completions_url("https://proxy.example/openai/v1/"),
        "https://proxy.example/openai/v1/chat/completions"
    );
}

#[tokio::test]
async fn the_key_comes_from_the_named_variable_before_the_inline_key() {
    let server = Server::completion(json!("a red barn")).await;
    let config = config(json!({
        "vision_model": "llava-hf/llava-1.5-7b-hf",
        "vision_model_host": server.host(),
        "vision_model_api_key_variable": "VISION_KEY",
        "vision_model_api_key": "sk-inline",
    }));
    let settings = VisionSettings::from_config_with_env(&config, |name| {
        (name == "VISION_KEY").then(|| "sk-from-env".to_owned())
    })
    .unwrap();
    assert_eq!(settings.timeout, DEFAULT_TIMEOUT);
    let image = png();
    describe_image(&settings, &image).await.unwrap();
    assert_one_request(
        &server,
        "llava-hf/llava-1.5-7b-hf",
        Some("sk-from-env"),
        &image,
    );
}

#[tokio::test]
async fn from_config_reads_the_process_environment() {
    // Tests cannot set variables (unsafe, and racy across test threads), so read one cargo sets
    // for every test run.
    let expected = std::env::var("CARGO_PKG_NAME").unwrap();
    let server = Server::completion(json!("a red barn")).await;
    let config = config(json!({
        "vision_model": "gpt-4o",
        "vision_model_host": server.host(),
        "vision_model_api_key_variable": "CARGO_PKG_NAME",
    }));
    let settings = VisionSettings::from_config(&config).unwrap();
    let image = png();
    describe_image(&settings, &image).await.unwrap();
    assert_one_request(&server, "gpt-4o", Some(&expected), &image);
}

#[tokio::test]
async fn an_unset_or_empty_variable_falls_back_to_the_inline_key() {
    for value in [None, Some("  ")] {
        let server = Server::completion(json!("a red barn")).await;
        let config = config(json!({
            "vision_model": "gpt-4o",
            "vision_model_host": format!("{}/v1/", server.host()),
            "vision_model_api_key_variable": "VISION_KEY",
            "vision_model_api_key": "sk-inline",
        }));
        let settings =
            VisionSettings::from_config_with_env(&config, |_| value.map(str::to_owned)).unwrap();
        let image = png();
        describe_image(&settings, &image).await.unwrap();
        assert_one_request(&server, "gpt-4o", Some("sk-inline"), &image);
    }
}

#[tokio::test]
async fn without_any_key_no_authorization_header_is_sent() {
    let server = Server::completion(json!("a red barn")).await;
    let config = config(json!({
        "vision_model": "llava",
        "vision_model_host": format!("{}/v1", server.host()),
        "vision_model_api_key_variable": "VISION_KEY",
    }));
    let settings = VisionSettings::from_config_with_env(&config, |_| None).unwrap();
    assert_eq!(settings.api_key, None);
    let image = png();
    describe_image(&settings, &image).await.unwrap();
    assert_one_request(&server, "llava", None, &image);
}

#[test]
fn an_empty_vision_model_turns_the_feature_off() {
    for model in ["", "   "] {
        let config = config(json!({ "vision_model": model }));
        assert_eq!(
            VisionSettings::from_config_with_env(&config, |_| None),
            None
        );
    }
    // The seed's defaults (gpt-4o at OpenAI) without a key: off, since every call would be a 401.
    assert_eq!(
        VisionSettings::from_config_with_env(&config(json!({})), |_| None),
        None
    );
    // The same defaults with the key variable set: on.
    let with_key = config(json!({ "vision_model_api_key_variable": "OPENAI_API_KEY" }));
    let defaults = VisionSettings::from_config_with_env(&with_key, |name| {
        (name == "OPENAI_API_KEY").then(|| "sk-test".to_string())
    })
    .unwrap();
    assert_eq!(defaults.model, "gpt-4o");
    assert_eq!(
        defaults.endpoint_url,
        "https://api.openai.com/v1/chat/completions"
    );
    assert_eq!(defaults.api_key.as_deref(), Some("sk-test"));
}

#[test]
fn debug_output_never_shows_the_key() {
    let shown = format!("{:?}", settings("http://127.0.0.1:9", Some("sk-secret")));
    assert!(!shown.contains("sk-secret"), "{shown}");
    assert!(shown.contains("redacted"), "{shown}");
}

#[tokio::test]
async fn a_401_is_a_status_error_with_the_servers_message() {
    let body = json!({ "error": {
        "message": "Incorrect API key provided: sk-bad.",
        "type": "invalid_request_error",
        "code": "invalid_api_key"
    }});
    let server = Server::start(StatusCode::UNAUTHORIZED, body.to_string()).await;
    let image = png();
    let err = describe_image(&settings(&server.host(), Some("sk-bad")), &image)
        .await
        .unwrap_err();
    match &err {
        VisionError::Status { status, message } => {
            assert_eq!(*status, 401);
            assert_eq!(message, "Incorrect API key provided: sk-bad.");
        }
        other => panic!("expected a status error, got {other:?}"),
    }
    assert_eq!(err.kind(), "status");
    assert!(err.to_string().contains("401"), "{err}");
    assert_one_request(&server, "gpt-4o", Some("sk-bad"), &image);
}

#[tokio::test]
async fn a_500_quotes_a_plain_body_or_names_the_status() {
    for (body, want) in [
        ("upstream model crashed", "upstream model crashed"),
        (
            r#"{"error": "model 'llava' not found"}"#,
            "model 'llava' not found",
        ),
        ("", "Internal Server Error"),
    ] {
        let server = Server::start(StatusCode::INTERNAL_SERVER_ERROR, body).await;
        let err = describe_image(&settings(&server.host(), None), &png())
            .await
            .unwrap_err();
        match err {
            VisionError::Status { status, message } => {
                assert_eq!(status, 500);
                assert_eq!(message, want);
            }
            other => panic!("expected a status error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_reply_that_is_not_a_chat_completion_is_invalid() {
    for body in [
        "this is not json {",
        r#"{"object": "chat.completion"}"#,
        r#"{"choices": []}"#,
        r#"{"choices": [{"message": {"content": 42}}]}"#,
    ] {
        let server = Server::start(StatusCode::OK, body).await;
        let err = describe_image(&settings(&server.host(), None), &png())
            .await
            .unwrap_err();
        assert!(
            matches!(err, VisionError::InvalidReply(_)),
            "{body}: {err:?}"
        );
        assert_eq!(err.kind(), "invalid_reply");
    }
}

#[tokio::test]
async fn an_empty_reply_is_an_error() {
    for content in [
        json!(""),
        json!(" \n\t "),
        json!(null),
        json!([]),
        json!("\"\""),
    ] {
        let server = Server::completion(content.clone()).await;
        let err = describe_image(&settings(&server.host(), None), &png())
            .await
            .unwrap_err();
        assert!(matches!(err, VisionError::EmptyReply), "{content}: {err:?}");
    }
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Accept connections and hold them open without ever writing a byte.
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        loop {
            let (socket, _) = listener.accept().await.unwrap();
            sockets.push(socket);
        }
    });
    let mut settings = settings(&format!("http://{addr}"), None);
    settings.timeout = Duration::from_millis(300);
    let started = Instant::now();
    let err = describe_image(&settings, &png()).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(
        matches!(err, VisionError::Timeout { .. }),
        "expected a timeout, got {err:?}"
    );
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
    assert!(err.to_string().contains("300ms"), "{err}");
    held.abort();
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    // Bind to learn a free port, then close it so nothing listens there.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let err = describe_image(&settings(&format!("http://{addr}"), None), &png())
        .await
        .unwrap_err();
    assert!(
        matches!(err, VisionError::Connect { .. }),
        "expected a connect error, got {err:?}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}

#[tokio::test]
async fn a_host_that_is_not_an_http_url_is_refused_before_any_request() {
    for host in ["ftp://127.0.0.1/v1", "127.0.0.1:8000", "not a url"] {
        let err = describe_image(&settings(host, None), &png())
            .await
            .unwrap_err();
        assert!(
            matches!(err, VisionError::InvalidHost { .. }),
            "{host}: {err:?}"
        );
    }
}

#[test]
fn the_default_prompt_is_a_description_not_an_instruction() {
    assert!(!DEFAULT_VARIATION_PROMPT.trim().is_empty());
    // CLIP embeds descriptions; the original's imperative sentence gave it nothing to draw.
    assert!(!DEFAULT_VARIATION_PROMPT
        .to_lowercase()
        .contains("variation"));
    assert!(DEFAULT_VARIATION_PROMPT.split_whitespace().count() < 40);
}
