//! Where `pipeline.loras` files come from: local files and folders, the Hugging Face cache, and
//! url downloads (atomic, re-used, size-limited, HTML and sha256 refused), against a local HTTP
//! server on an ephemeral port.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use fastfusion_worker::config::{LoraConfig, LoraSource};
use fastfusion_worker::hub::HubSettings;
use fastfusion_worker::lora::source::{resolve_with, MAX_DOWNLOAD_BYTES};
use sha2::{Digest, Sha256};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn fixture_adapter() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/loras/sd15_te.safetensors")
}

fn entry(source: LoraSource, address: &str) -> LoraConfig {
    LoraConfig {
        source,
        address: address.into(),
        weight_name: None,
        adapter_name: "style".into(),
        sha256: None,
    }
}

fn settings(cache: &Path) -> HubSettings {
    HubSettings {
        cache_dir: cache.to_path_buf(),
        endpoint: "http://127.0.0.1:9".into(),
        token: None,
        offline: true,
    }
}

fn error(entries: &[LoraConfig], cache: &Path, limit: u64) -> String {
    match resolve_with(entries, &settings(cache), limit) {
        Ok(files) => panic!("resolved {files:?}"),
        Err(e) => e.to_string(),
    }
}

/// Serves `/adapter.safetensors` (the fixture), `/flaky.safetensors` (the fixture, broken off
/// the first time), `/page` (HTML), `/broken` (500); counts hits and records Range headers.
struct Server {
    base: String,
    hits: Arc<AtomicUsize>,
    /// The Range header of each `/flaky` request ("" for none).
    ranges: Arc<std::sync::Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

fn serve() -> Result<Server, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Runtime::new()?;
    let bytes = std::fs::read(fixture_adapter())?;
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    // /flaky: the first answer breaks off halfway through the body; later ones honour a Range.
    let flaky_bytes = bytes.clone();
    let ranges = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = ranges.clone();
    let app = axum::Router::new()
        .route(
            "/flaky.safetensors",
            get(move |headers: axum::http::HeaderMap| {
                let bytes = flaky_bytes.clone();
                let seen = seen.clone();
                async move {
                    let range = headers
                        .get(header::RANGE)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let from = range
                        .as_deref()
                        .and_then(|r| r.strip_prefix("bytes="))
                        .and_then(|r| r.strip_suffix('-'))
                        .and_then(|r| r.parse::<usize>().ok());
                    let first = {
                        let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                        seen.push(range.clone().unwrap_or_default());
                        seen.len() == 1
                    };
                    if first {
                        let half = bytes[..bytes.len() / 2].to_vec();
                        // The half goes out first; the error a moment later cuts the connection.
                        let broken = futures::StreamExt::chain(
                            futures::stream::iter(vec![Ok(axum::body::Bytes::from(half))]),
                            futures::stream::once(async {
                                tokio::time::sleep(std::time::Duration::from_millis(300)).await;
                                Err::<axum::body::Bytes, _>(std::io::Error::other(
                                    "connection lost",
                                ))
                            }),
                        );
                        return (
                            [(header::CONTENT_LENGTH, bytes.len().to_string())],
                            axum::body::Body::from_stream(broken),
                        )
                            .into_response();
                    }
                    match from {
                        Some(from) if from < bytes.len() => (
                            StatusCode::PARTIAL_CONTENT,
                            [(
                                header::CONTENT_RANGE,
                                format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len()),
                            )],
                            bytes[from..].to_vec(),
                        )
                            .into_response(),
                        _ => bytes.into_response(),
                    }
                }
            }),
        )
        .route(
            "/adapter.safetensors",
            get(move || {
                counted.fetch_add(1, Ordering::SeqCst);
                let bytes = bytes.clone();
                async move { bytes }
            }),
        )
        .route(
            "/page",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/html")],
                    "<html>sign in</html>",
                )
            }),
        )
        .route(
            "/broken",
            get(|| async { StatusCode::INTERNAL_SERVER_ERROR.into_response() }),
        );
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let base = format!("http://{}", listener.local_addr()?);
    runtime.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(Server {
        base,
        hits,
        ranges,
        _runtime: runtime,
    })
}

/// A download that breaks off is retried from where it stopped (a `Range` request), and the
/// pieces make the whole file.
#[test]
fn a_broken_download_resumes_where_it_stopped() -> TestResult {
    let server = serve()?;
    let cache = tempfile::tempdir()?;
    let want = std::fs::read(fixture_adapter())?;
    let e = entry(
        LoraSource::Url,
        &format!("{}/flaky.safetensors", server.base),
    );
    let files = resolve_with(&[e], &settings(cache.path()), MAX_DOWNLOAD_BYTES)?;
    assert_eq!(std::fs::read(&files[0].path)?, want);
    let ranges = server.ranges.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], "", "the first request asks for everything");
    let resumed_at: usize = ranges[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .ok_or("no Range on the retry")?
        .parse()?;
    assert!(
        resumed_at > 0 && resumed_at <= want.len() / 2,
        "resumed at {resumed_at} of {}",
        want.len()
    );
    Ok(())
}

#[test]
fn url_downloads_land_in_the_cache_once_and_are_checked() -> TestResult {
    let server = serve()?;
    let cache = tempfile::tempdir()?;
    let want = std::fs::read(fixture_adapter())?;
    let sha: String = Sha256::digest(&want)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut e = entry(
        LoraSource::Url,
        &format!("{}/adapter.safetensors", server.base),
    );
    e.sha256 = Some(sha.clone());
    let files = resolve_with(
        std::slice::from_ref(&e),
        &settings(cache.path()),
        MAX_DOWNLOAD_BYTES,
    )?;
    assert_eq!(files[0].name, "style");
    assert_eq!(files[0].key, "pipeline.loras[0]");
    assert!(files[0]
        .path
        .starts_with(cache.path().join("fastfusion-loras")));
    assert_eq!(std::fs::read(&files[0].path)?, want);
    let folder = files[0].path.parent().ok_or("no folder")?;
    let leftovers: Vec<_> = std::fs::read_dir(folder)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "a .part file was left behind");

    // The next start re-uses the file without asking the server.
    let again = resolve_with(&[e.clone()], &settings(cache.path()), MAX_DOWNLOAD_BYTES)?;
    assert_eq!(again[0].path, files[0].path);
    assert_eq!(server.hits.load(Ordering::SeqCst), 1);

    // weight_name names the download.
    let mut named = e.clone();
    named.weight_name = Some("mine".into());
    let files = resolve_with(&[named], &settings(cache.path()), MAX_DOWNLOAD_BYTES)?;
    assert!(files[0].path.ends_with("mine.safetensors"));

    // A sha256 that does not match fails, also for the cached copy.
    e.sha256 = Some("0".repeat(64));
    let err = error(&[e], cache.path(), MAX_DOWNLOAD_BYTES);
    assert!(
        err.contains("pipeline.loras[0]") && err.contains("style") && err.contains("sha256"),
        "{err}"
    );
    Ok(())
}

#[test]
fn bad_downloads_fail_naming_the_entry_and_leave_nothing() -> TestResult {
    let server = serve()?;
    let cache = tempfile::tempdir()?;
    let url = |path: &str| entry(LoraSource::Url, &format!("{}{path}", server.base));

    let err = error(&[url("/page")], cache.path(), MAX_DOWNLOAD_BYTES);
    assert!(err.contains("style") && err.contains("HTML"), "{err}");
    let err = error(
        &[url("/missing.safetensors")],
        cache.path(),
        MAX_DOWNLOAD_BYTES,
    );
    assert!(err.contains("404"), "{err}");
    let err = error(&[url("/broken")], cache.path(), MAX_DOWNLOAD_BYTES);
    assert!(
        err.contains("after 3 attempts") && err.contains("500"),
        "{err}"
    );
    let err = error(&[url("/adapter.safetensors")], cache.path(), 1000);
    assert!(err.contains("1000-byte limit"), "{err}");
    let err = error(
        &[entry(LoraSource::Url, "ftp://example.com/a.safetensors")],
        cache.path(),
        10,
    );
    assert!(err.contains("not http"), "{err}");

    // Nothing that looks finished is left in the cache.
    let finished: Vec<PathBuf> = walk(cache.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    assert!(finished.is_empty(), "{finished:?}");
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn local_folders_pick_the_file_as_diffusers_does() -> TestResult {
    let dir = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let address = dir.path().to_string_lossy().into_owned();
    std::fs::copy(fixture_adapter(), dir.path().join("one.safetensors"))?;
    let files = resolve_with(
        &[entry(LoraSource::Local, &address)],
        &settings(cache.path()),
        0,
    )?;
    assert!(files[0].path.ends_with("one.safetensors"));

    std::fs::copy(fixture_adapter(), dir.path().join("two.safetensors"))?;
    let err = error(&[entry(LoraSource::Local, &address)], cache.path(), 0);
    assert!(err.contains("weight_name"), "{err}");
    std::fs::copy(
        fixture_adapter(),
        dir.path().join("pytorch_lora_weights.safetensors"),
    )?;
    let files = resolve_with(
        &[entry(LoraSource::Local, &address)],
        &settings(cache.path()),
        0,
    )?;
    assert!(files[0].path.ends_with("pytorch_lora_weights.safetensors"));
    let mut named = entry(LoraSource::Local, &address);
    named.weight_name = Some("two.safetensors".into());
    let files = resolve_with(&[named], &settings(cache.path()), 0)?;
    assert!(files[0].path.ends_with("two.safetensors"));

    let err = error(
        &[entry(LoraSource::Local, "/no/such/lora.safetensors")],
        cache.path(),
        0,
    );
    assert!(
        err.contains("pipeline.loras[0]") && err.contains("no file"),
        "{err}"
    );
    Ok(())
}

#[test]
fn hub_adapters_come_from_the_cache_when_offline() -> TestResult {
    let cache = tempfile::tempdir()?;
    let repo = cache.path().join("models--org--style-lora");
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), "abc123")?;
    let snapshot = repo.join("snapshots/abc123");
    std::fs::create_dir_all(&snapshot)?;
    std::fs::copy(fixture_adapter(), snapshot.join("style.safetensors"))?;
    std::fs::write(snapshot.join("README.md"), "card")?;
    let files = resolve_with(
        &[entry(LoraSource::Hub, "org/style-lora")],
        &settings(cache.path()),
        0,
    )?;
    assert_eq!(files[0].path, snapshot.join("style.safetensors"));

    let err = error(&[entry(LoraSource::Hub, "org/other")], cache.path(), 0);
    assert!(
        err.contains("not in the Hugging Face cache") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    Ok(())
}
