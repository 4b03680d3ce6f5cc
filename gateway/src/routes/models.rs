//! `GET /v1/models`: the models the workers serve, in OpenAI's list format.

use axum::extract::State;
use axum::Json;

use crate::app::AppState;
use crate::openai::{Model, ModelList};

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "models",
    responses(
        (status = 200, description = "The served models", body = crate::openai::ModelList),
        (status = 401, description = "API key missing", body = crate::openapi::ErrorResponse),
        (status = 403, description = "API key not valid", body = crate::openapi::ErrorResponse),
    ),
    security((), ("api_key" = [])),
)]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    let data = state
        .workers
        .models()
        .into_iter()
        .map(|id| Model {
            id,
            object: "model".to_string(),
            created: state.http.started_at,
            owned_by: "fastfusion".to_string(),
        })
        .collect();
    Json(ModelList {
        object: "list".to_string(),
        data,
    })
}
