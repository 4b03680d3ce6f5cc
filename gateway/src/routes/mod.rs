//! HTTP handlers, one module per resource. Each takes `State<AppState>` and returns
//! `Result<_, ApiError>`, so every failure leaves in OpenAI's error shape.
//!
//! ```text
//! generations.rs  POST /v1/images/generations   JSON → validate → run
//! edits.rs        POST /v1/images/edits         multipart or JSON → inspect uploads → validate → run
//! variations.rs   POST /v1/images/variations    multipart → inspect upload → validate → run
//! run.rs          shared: endpoint switch, upload inspection, worker stream → store or inline
//! stream.rs       `stream: true`: worker stream → server-sent events
//! images.rs       GET  /v1/images/data/{id}     stored images for response_format=url
//! models.rs       GET  /v1/models               OpenAI's model list
//! probes.rs       GET  /health, /ready          liveness and worker readiness
//! playground.rs   GET  /, /playground           the web playground (page, script, styles)
//! ```
//! Unknown routes and methods are answered here too, in the same error shape.

pub mod edits;
pub mod generations;
pub mod images;
pub mod models;
pub mod playground;
pub mod probes;
pub mod run;
pub mod stream;
pub mod variations;

use axum::http::{Method, Uri};

use crate::error::ApiError;

/// Fallback for paths no route matches.
pub async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}

/// Fallback for a known path with a method it does not serve.
pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: uri.path().to_string(),
    }
}
