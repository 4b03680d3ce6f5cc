//! Access control through `router()` without sockets: API keys on the image endpoints and
//! `/v1/models`, open probes and image urls, signed image urls, the concurrency limit, and a
//! failing image store.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use common::{app_with_state, Access, Behaviour, FakePool, Reply, TestApp};
use fastfusion_gateway::auth::ApiKeys;
use fastfusion_gateway::concurrency::ConcurrencyLimit;
use fastfusion_gateway::config::Secret;
use fastfusion_gateway::image_urls::ImageUrls;
use fastfusion_gateway::openai::OutputFormat;
use fastfusion_gateway::storage::ObjectImageStore;
use tower::ServiceExt;

const KEY: &str = "sk-test-0123456789";
const PROMPT: &str = r#"{"prompt":"a harbour at dawn"}"#;

fn keys() -> ApiKeys {
    ApiKeys::new(&[Secret::new("sk-other"), Secret::new(KEY)])
}

fn app_with_access(behaviour: Behaviour, access: Access) -> TestApp {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ObjectImageStore::directory(dir.path()).expect("store");
    let pool = Arc::new(FakePool::new(behaviour));
    app_with_state(pool, None, 64 * 1024, access, Arc::new(store), dir)
}

/// `method path` with an optional bearer key and JSON body.
async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gateway.test:8123");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .expect("request");
    app.send(request).await
}

fn error_code(reply: &Reply, status: StatusCode) -> String {
    reply.error_param(status);
    reply.json()["error"]["code"]
        .as_str()
        .expect("code")
        .to_string()
}

/// The path and query of the first image url in a generation reply.
fn image_path(reply: &Reply) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let url = reply.json()["data"][0]["url"]
        .as_str()
        .expect("url")
        .to_string();
    url.strip_prefix("http://gateway.test:8123")
        .expect("absolute url")
        .to_string()
}

#[tokio::test]
async fn keyed_routes_need_a_valid_bearer_key() {
    let app = app_with_access(
        Behaviour::Succeed,
        Access {
            api_keys: keys(),
            ..Access::default()
        },
    );
    for (method, path, body) in [
        ("GET", "/v1/models", None),
        ("POST", "/v1/images/generations", Some(PROMPT)),
        ("POST", "/v1/images/edits", Some(PROMPT)),
        ("POST", "/v1/images/variations", Some("{}")),
    ] {
        let missing = call(&app, method, path, None, body).await;
        assert_eq!(
            error_code(&missing, StatusCode::UNAUTHORIZED),
            "missing_api_key",
            "{path}"
        );
        assert_eq!(missing.headers["www-authenticate"], "Bearer");
        let message = missing.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains("Authorization: Bearer"), "{message}");

        let wrong = call(&app, method, path, Some("sk-test-012345678"), body).await;
        assert_eq!(
            error_code(&wrong, StatusCode::UNAUTHORIZED),
            "invalid_api_key",
            "{path}"
        );
        assert_eq!(wrong.json()["error"]["type"], "invalid_request_error");
        assert!(!String::from_utf8_lossy(&wrong.body).contains("sk-test"));
    }
    assert!(
        app.pool.seen.lock().expect("lock").is_empty(),
        "nothing reached a worker"
    );

    let models = call(&app, "GET", "/v1/models", Some(KEY), None).await;
    assert_eq!(models.status, StatusCode::OK);
    assert_eq!(models.json()["data"][0]["id"], "tiny-sd");
    let generated = call(
        &app,
        "POST",
        "/v1/images/generations",
        Some(KEY),
        Some(PROMPT),
    )
    .await;
    let path = image_path(&generated);
    assert!(
        !path.contains('?'),
        "unsigned without a signing key: {path}"
    );

    // Image urls and probes need no key.
    let image = call(&app, "GET", &path, None, None).await;
    assert_eq!(image.status, StatusCode::OK);
    assert_eq!(
        image.body.as_ref(),
        common::encode_image(0, OutputFormat::Png)
    );
    for probe in ["/health", "/ready"] {
        assert_eq!(
            call(&app, "GET", probe, None, None).await.status,
            StatusCode::OK,
            "{probe}"
        );
    }
}

#[tokio::test]
async fn without_keys_the_api_is_open() {
    let app = app_with_access(Behaviour::Succeed, Access::default());
    let reply = call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await;
    assert_eq!(reply.status, StatusCode::OK);
    // A client that sends a key anyway (the SDKs always do) is not refused.
    let reply = call(&app, "GET", "/v1/models", Some("whatever"), None).await;
    assert_eq!(reply.status, StatusCode::OK);
}

#[tokio::test]
async fn signed_urls_serve_only_with_their_signature() {
    let app = app_with_access(
        Behaviour::Succeed,
        Access {
            urls: ImageUrls::signed(b"a-signing-key-of-some-length", Duration::from_secs(600))
                .expect("any key length"),
            ..Access::default()
        },
    );
    let reply = call(
        &app,
        "POST",
        "/v1/images/generations",
        None,
        Some(r#"{"prompt":"x","n":2}"#),
    )
    .await;
    let signed = image_path(&reply);
    let (path, query) = signed.split_once('?').expect("signed url");
    assert!(
        query.starts_with("expires=") && query.contains("&sig="),
        "{query}"
    );

    let image = call(&app, "GET", &signed, None, None).await;
    assert_eq!(image.status, StatusCode::OK);
    let decoded =
        image::load_from_memory_with_format(&image.body, image::ImageFormat::Png).expect("a PNG");
    assert_eq!(decoded.width(), common::IMAGE_SIDE);
    let cache = image.headers["cache-control"].to_str().expect("ascii");
    assert!(cache.starts_with("private, max-age="), "{cache}");

    let second = reply.json()["data"][1]["url"]
        .as_str()
        .expect("url")
        .to_string();
    let second_path = second
        .strip_prefix("http://gateway.test:8123")
        .and_then(|url| url.split_once('?'))
        .map(|(path, _)| path.to_string())
        .expect("signed url");
    let tampered_sig = {
        let last = signed.chars().last().expect("non-empty");
        let swapped = if last == '0' { '1' } else { '0' };
        format!("{}{swapped}", &signed[..signed.len() - 1])
    };
    let sig = query.split('&').nth(1).expect("sig parameter");
    for bad in [
        path.to_string(),
        tampered_sig,
        // One image's signature does not open another, nor does a later expiry.
        format!("{second_path}?{query}"),
        format!("{path}?expires=99999999999&{sig}"),
        format!("{path}?expires=1&sig=%zz"),
    ] {
        let reply = call(&app, "GET", &bad, None, None).await;
        assert_eq!(
            error_code(&reply, StatusCode::FORBIDDEN),
            "invalid_signature",
            "{bad}"
        );
    }

    // A url whose lifetime is over.
    let expired = app_with_access(
        Behaviour::Succeed,
        Access {
            urls: ImageUrls::signed(b"a-signing-key-of-some-length", Duration::ZERO)
                .expect("any key length"),
            ..Access::default()
        },
    );
    let reply = call(
        &expired,
        "POST",
        "/v1/images/generations",
        None,
        Some(PROMPT),
    )
    .await;
    let reply = call(&expired, "GET", &image_path(&reply), None, None).await;
    assert_eq!(error_code(&reply, StatusCode::FORBIDDEN), "url_expired");
}

#[tokio::test]
async fn generation_beyond_the_limit_is_refused_at_once() {
    let app = Arc::new(app_with_access(
        Behaviour::Hang,
        Access {
            api_keys: keys(),
            concurrency: ConcurrencyLimit::new(Some(1)),
            ..Access::default()
        },
    ));
    // The fake hangs, so this request holds the only permit until the 300 ms request timeout.
    let holder = {
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            call(
                &app,
                "POST",
                "/v1/images/generations",
                Some(KEY),
                Some(PROMPT),
            )
            .await
        })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.pool.seen.lock().expect("lock").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first request never reached the pool"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }

    let refused = call(&app, "POST", "/v1/images/edits", Some(KEY), Some(PROMPT)).await;
    assert_eq!(
        error_code(&refused, StatusCode::TOO_MANY_REQUESTS),
        "rate_limit_exceeded"
    );
    assert_eq!(refused.headers["retry-after"], "1");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    // The key is checked first; other routes are not limited.
    let anonymous = call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let models = call(&app, "GET", "/v1/models", Some(KEY), None).await;
    assert_eq!(models.status, StatusCode::OK);
    assert_eq!(app.pool.seen.lock().expect("lock").len(), 1);

    let held = holder.await.expect("task");
    assert_eq!(held.status, StatusCode::SERVICE_UNAVAILABLE, "timed out");
    // The permit came back: the next request reaches the worker (and times out in turn).
    let next = call(
        &app,
        "POST",
        "/v1/images/generations",
        Some(KEY),
        Some(PROMPT),
    )
    .await;
    assert_eq!(next.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.pool.seen.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn a_stream_holds_its_permit_until_the_client_is_gone() {
    let app = app_with_access(
        Behaviour::Stall,
        Access {
            concurrency: ConcurrencyLimit::new(Some(1)),
            ..Access::default()
        },
    );
    let request = Request::post("/v1/images/generations")
        .header("content-type", "application/json")
        .body(Body::from(r#"{"prompt":"x","stream":true}"#))
        .expect("request");
    let streaming = app.router.clone().oneshot(request).await.expect("response");
    assert_eq!(streaming.status(), StatusCode::OK);
    // The handler has returned but the stream (and its worker job) goes on: no second request.
    let refused = call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await;
    assert_eq!(
        error_code(&refused, StatusCode::TOO_MANY_REQUESTS),
        "rate_limit_exceeded"
    );
    // The client hangs up: the permit comes back with the dropped body.
    drop(streaming);
    let next = call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await;
    assert_ne!(
        next.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        next.body
    );
    assert_eq!(app.pool.seen.lock().expect("lock").len(), 2);
}

#[tokio::test]
async fn a_failing_store_is_a_500_that_names_nothing_inside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let images = dir.path().join("secret-volume");
    let store = ObjectImageStore::directory(&images).expect("store");
    let app = app_with_state(
        Arc::new(FakePool::new(Behaviour::Succeed)),
        None,
        64 * 1024,
        Access::default(),
        Arc::new(store),
        tempfile::tempdir().expect("tempdir"),
    );
    let stored =
        image_path(&call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await);
    // The volume goes away: writes and reads now fail inside the store.
    std::fs::remove_dir_all(&images).expect("remove");
    std::fs::write(&images, b"not a directory").expect("write");

    for reply in [
        call(&app, "POST", "/v1/images/generations", None, Some(PROMPT)).await,
        call(&app, "GET", &stored, None, None).await,
    ] {
        assert_eq!(
            error_code(&reply, StatusCode::INTERNAL_SERVER_ERROR),
            "internal_error"
        );
        let text = String::from_utf8_lossy(&reply.body);
        assert!(!text.contains("secret-volume"), "{text}");
    }
    // b64_json needs no store and still works.
    let inline = call(
        &app,
        "POST",
        "/v1/images/generations",
        None,
        Some(r#"{"prompt":"x","response_format":"b64_json"}"#),
    )
    .await;
    assert_eq!(inline.status, StatusCode::OK);
}

#[tokio::test]
async fn an_image_stored_by_one_replica_is_served_by_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replica = |dir: &std::path::Path| {
        let store = ObjectImageStore::directory(dir).expect("store");
        app_with_state(
            Arc::new(FakePool::new(Behaviour::Succeed)),
            None,
            64 * 1024,
            Access {
                urls: ImageUrls::signed(b"shared-signing-key!", Duration::from_secs(60))
                    .expect("any key length"),
                ..Access::default()
            },
            Arc::new(store),
            tempfile::tempdir().expect("tempdir"),
        )
    };
    let (a, b) = (replica(dir.path()), replica(dir.path()));
    let path = image_path(&call(&a, "POST", "/v1/images/generations", None, Some(PROMPT)).await);
    let image = call(&b, "GET", &path, None, None).await;
    assert_eq!(image.status, StatusCode::OK);
    assert_eq!(
        image.body.as_ref(),
        common::encode_image(0, OutputFormat::Png)
    );
}
