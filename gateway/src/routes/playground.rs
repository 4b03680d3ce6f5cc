//! The web playground: `GET /` and `GET /playground` serve one page whose script talks to this
//! same API (`/v1/models`, the image endpoints with `stream: true`), with its stylesheet and
//! script beside it. The files live in `gateway/static/` and are compiled into the binary, so the
//! page needs no build step and no files at run time.
//!
//! Every url in the page is relative (`v1/models`, `playground/playground.js`), so it works behind
//! a proxy that serves the gateway under a path prefix (`https://host/ff/` → the gateway's `/`):
//! `/ff/` and `/ff/playground` both resolve them under `/ff/`. The page is open (no API key): it
//! holds nothing, and asks for a key itself when `/v1/models` says one is needed.

use axum::http::header;
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("../../static/playground/index.html");
const SCRIPT: &str = include_str!("../../static/playground/playground.js");
const STYLES: &str = include_str!("../../static/playground/playground.css");

/// What the page may load: only this origin, plus the images it makes itself (data: and blob:
/// urls of the streamed results and of the uploaded picture).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; \
     base-uri 'none'";

/// `GET /` and `GET /playground`.
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /playground/playground.js`.
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /playground/playground.css`.
pub async fn styles() -> Response {
    asset("text/css; charset=utf-8", STYLES)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Small files: always revalidated, so an upgraded gateway's page is the one shown.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        body,
    )
        .into_response()
}
