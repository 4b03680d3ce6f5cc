//! The playground page through `router()`: served at `/` and `/playground` without an API key,
//! its script and stylesheet beside it with their content types, every url in it relative (so it
//! works under a path prefix), and a content security policy that keeps it to this origin.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{app_with_state, Access, Behaviour, FakePool, Reply};
use fastfusion_gateway::auth::ApiKeys;
use fastfusion_gateway::config::Secret;
use fastfusion_gateway::storage::ObjectImageStore;

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_page_and_its_files_are_served_without_a_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = ObjectImageStore::directory(dir.path()).expect("store");
    let access = Access {
        api_keys: ApiKeys::new(&[Secret::new("sk-playground")]),
        ..Access::default()
    };
    let pool = Arc::new(FakePool::new(Behaviour::Succeed));
    let app = app_with_state(pool, None, 1024, access, Arc::new(store), dir);

    let root = app.call("GET", "/", None).await;
    let page = app.call("GET", "/playground", None).await;
    for reply in [&root, &page] {
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header(reply, "content-type"), "text/html; charset=utf-8");
        let policy = header(reply, "content-security-policy");
        assert!(policy.contains("script-src 'self'"), "{policy}");
        assert!(policy.contains("connect-src 'self'"), "{policy}");
        assert_eq!(header(reply, "x-content-type-options"), "nosniff");
    }
    assert_eq!(root.body, page.body);
    let html = String::from_utf8(page.body.to_vec()).expect("utf-8");
    for element in [
        "id=\"prompt\"",
        "id=\"model\"",
        "id=\"mask-canvas\"",
        "id=\"stop\"",
    ] {
        assert!(html.contains(element), "{element} missing");
    }
    // Relative urls only: under /ff/ they resolve to /ff/playground/...
    assert!(html.contains("src=\"playground/playground.js\""));
    assert!(html.contains("href=\"playground/playground.css\""));
    assert!(!html.contains("src=\"/") && !html.contains("href=\"/"));

    let script = app.call("GET", "/playground/playground.js", None).await;
    assert_eq!(script.status, StatusCode::OK);
    assert_eq!(
        header(&script, "content-type"),
        "text/javascript; charset=utf-8"
    );
    let text = String::from_utf8(script.body.to_vec()).expect("utf-8");
    assert!(text.contains("'v1/models'") && !text.contains("'/v1/"));
    let styles = app.call("GET", "/playground/playground.css", None).await;
    assert_eq!(styles.status, StatusCode::OK);
    assert_eq!(header(&styles, "content-type"), "text/css; charset=utf-8");

    // The API itself still wants the key.
    let models = app.call("GET", "/v1/models", None).await;
    assert_eq!(models.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        app.call("GET", "/playground/other.js", None).await.status,
        StatusCode::NOT_FOUND
    );
}
