//! `GET /health` (liveness: the process answers, no worker needed) and `GET /ready` (a worker
//! for the default model answers its gRPC health check with SERVING).

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::app::AppState;
use crate::error::ApiError;

pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn ready(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    if state.workers.ready().await {
        Ok(Json(json!({ "status": "ready" })))
    } else {
        Err(ApiError::Unavailable(
            "no worker for the default model is serving yet (still loading or unreachable)"
                .to_string(),
        ))
    }
}
