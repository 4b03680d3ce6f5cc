//! `GET /health` (liveness: the process answers, no worker needed) and `GET /ready` (a worker
//! for the default model answers its gRPC health check with SERVING).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/health",
    tag = "probes",
    responses((status = 200, description = "The process answers", body = crate::openapi::ProbeStatus)),
)]
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

#[utoipa::path(
    get,
    path = "/ready",
    tag = "probes",
    responses(
        (status = 200, description = "A worker for the default model is serving", body = crate::openapi::ProbeStatus),
        (status = 503, description = "No worker for the default model is serving yet", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.workers.ready().await {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::Unavailable(state.workers.unready_reason().await))
    }
}
