//! A refusal that comes before the body is read (401 no key, 404 endpoint switched off or no such
//! route, 413 too large) must still reach a client that streams its body without
//! `Expect: 100-continue`, as the openai Node SDK does. Such a client is still sending when the
//! answer is ready; a server that closed the connection at once would make the kernel reset it,
//! and the client would see a broken pipe ("Connection error") instead of the status.
//!
//! The gateway is served over a real socket (the router over the fake pool) and the client is a
//! raw TCP connection that writes its body in small chunks with pauses, then reads the answer.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{app_with_state, png, Access, Behaviour, FakePool, Form, BOUNDARY};
use fastfusion_gateway::auth::ApiKeys;
use fastfusion_gateway::config::Secret;
use fastfusion_gateway::storage::ObjectImageStore;
use fastfusion_proto::Endpoint;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "sk-early-refusal-test";
/// The body limit of the gateway under test.
const LIMIT: usize = 256 * 1024;
/// Bytes per write and the pause after each, so the gateway answers long before the end.
const CHUNK: usize = 16 * 1024;
const PAUSE: Duration = Duration::from_millis(15);

/// Serves a gateway over `pool` on a free port; returns its address.
async fn serve(pool: FakePool, api_keys: ApiKeys) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ObjectImageStore::directory(dir.path()).expect("store");
    let access = Access {
        api_keys,
        ..Access::default()
    };
    let app = app_with_state(Arc::new(pool), None, LIMIT, access, Arc::new(store), dir);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(async move {
        // The app (and its image directory) lives as long as the server task.
        let router = app.router.clone();
        let _app = app;
        axum::serve(listener, router).await.expect("serve");
    });
    address
}

/// An edit upload of about `bytes` bytes: a PNG padded by a long text field the gateway ignores.
fn upload(bytes: usize) -> Vec<u8> {
    Form::new()
        .text("prompt", "a straw hat")
        .text("padding", &"x".repeat(bytes))
        .file("image", &png(64, 64, false))
        .finish()
}

/// POSTs `body` to `path` the way a streaming client does (no Expect header, the body in
/// paced chunks), then reads the whole answer. Returns (status, body); fails the test if a write
/// breaks, because that is what such a client reports as a connection error.
async fn post_streaming(
    address: &str,
    path: &str,
    key: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let auth = key.map_or_else(String::new, |key| {
        format!("Authorization: Bearer {key}\r\n")
    });
    let head = request_head(address, path, &auth, body.len());
    stream.write_all(head.as_bytes()).await.expect("write head");
    for (index, chunk) in body.chunks(CHUNK).enumerate() {
        if let Err(error) = stream.write_all(chunk).await {
            panic!(
                "{path}: the connection broke after {} of {} body bytes ({error}): the gateway \
                 closed it without reading what the client was still sending",
                index * CHUNK,
                body.len()
            );
        }
        tokio::time::sleep(PAUSE).await;
    }
    let mut answer = Vec::new();
    if let Err(error) = stream.read_to_end(&mut answer).await {
        panic!("{path}: reading the answer failed ({error}) after the whole body was sent");
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("{path}: not an HTTP answer: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The head of a multipart POST of `length` body bytes, with `extra` header lines.
fn request_head(address: &str, path: &str, extra: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\n{extra}\
         Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n\
         Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
}

/// The OpenAI error code of an answer's body.
fn code(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    value["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_string()
}

#[tokio::test]
async fn a_401_reaches_a_client_still_sending_its_upload() {
    let keys = ApiKeys::new(&[Secret::new(KEY)]);
    let address = serve(FakePool::new(Behaviour::Succeed), keys).await;
    let body = upload(200 * 1024);
    let (status, answer) = post_streaming(&address, "/v1/images/edits", None, &body).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(code(&answer), "missing_api_key");
    // With the key, the same streamed upload goes through.
    let (status, answer) = post_streaming(&address, "/v1/images/edits", Some(KEY), &body).await;
    assert_eq!(status, 200, "{answer}");
}

#[tokio::test]
async fn a_404_reaches_a_client_still_sending_its_upload() {
    let mut pool = FakePool::new(Behaviour::Succeed);
    let mut info = (*pool.info).clone();
    info.endpoints = vec![Endpoint::Generations as i32];
    pool.info = Arc::new(info);
    let address = serve(pool, ApiKeys::default()).await;
    let body = upload(200 * 1024);
    let (status, answer) = post_streaming(&address, "/v1/images/edits", None, &body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(code(&answer), "task_disabled");
    let (status, answer) = post_streaming(&address, "/v1/images/nothing", None, &body).await;
    assert_eq!(status, 404, "{answer}");
    assert_eq!(code(&answer), "not_found");
}

#[tokio::test]
async fn a_413_reaches_a_client_still_sending_its_upload() {
    let address = serve(FakePool::new(Behaviour::Succeed), ApiKeys::default()).await;
    // Over the limit by less than the limit: read up to the limit, refused, the rest drained.
    let body = upload(LIMIT + LIMIT / 2);
    let (status, answer) = post_streaming(&address, "/v1/images/edits", None, &body).await;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(code(&answer), "request_too_large");
}

#[tokio::test]
async fn a_client_expecting_100_continue_is_answered_before_it_sends() {
    let keys = ApiKeys::new(&[Secret::new(KEY)]);
    let address = serve(FakePool::new(Behaviour::Succeed), keys).await;
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    let head = request_head(
        &address,
        "/v1/images/edits",
        "Expect: 100-continue\r\n",
        500_000,
    );
    stream.write_all(head.as_bytes()).await.expect("write head");
    // Nothing of the body is sent: the refusal must come anyway, and no "100 Continue" first.
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answered without the body")
        .expect("read");
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    assert!(!text.contains("100 Continue"), "{text}");
}

#[tokio::test]
async fn a_client_that_stalls_mid_upload_still_gets_its_refusal() {
    let keys = ApiKeys::new(&[Secret::new(KEY)]);
    let address = serve(FakePool::new(Behaviour::Succeed), keys).await;
    let mut stream = TcpStream::connect(&address).await.expect("connect");
    let head = request_head(&address, "/v1/images/edits", "", 500_000);
    stream.write_all(head.as_bytes()).await.expect("write head");
    stream.write_all(&[b'x'; 1000]).await.expect("write some");
    // The client sends no more: the gateway stops waiting after its drain timeout.
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(
        fastfusion_gateway::drain::DRAIN_TIMEOUT + Duration::from_secs(5),
        stream.read_to_end(&mut answer),
    )
    .await
    .expect("answered after the drain timeout")
    .expect("read");
    assert!(started.elapsed() >= fastfusion_gateway::drain::DRAIN_TIMEOUT - Duration::from_secs(1));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
}
