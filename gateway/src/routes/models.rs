//! `GET /v1/models`: the models the workers serve, in OpenAI's list format.

use axum::extract::State;
use axum::Json;

use crate::app::AppState;
use crate::openai::{Model, ModelList};

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
