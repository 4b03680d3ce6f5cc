//! `GET /v1/models`: the models the workers serve, in OpenAI's list format, each entry with what
//! its workers report (endpoints, sizes, steps, schedulers, presets, LoRAs) so a UI can offer
//! exactly what the model takes.

use axum::extract::State;
use axum::Json;
use fastfusion_proto::{Endpoint, InfoResponse};

use crate::openai::{Model, ModelList, ModelPreset};
use crate::state::AppState;
use crate::validation::EffectiveLimits;

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
    let mut data = Vec::new();
    for id in state.workers.models() {
        let mut model = match state.workers.info(Some(&id)).await {
            Ok(info) => describe(&info),
            // The model was reported a moment ago; list it, without details, rather than not.
            Err(_) => Model::default(),
        };
        model.id = id;
        model.object = "model".to_string();
        model.created = state.http.started_at;
        model.owned_by = "fastfusion".to_string();
        data.push(model);
    }
    Json(ModelList {
        object: "list".to_string(),
        data,
    })
}

/// What the model's Info says, in the entry's terms (OpenAI's fields left for the caller).
fn describe(info: &InfoResponse) -> Model {
    let limits = EffectiveLimits::of(info);
    let defaults = info.defaults.clone().unwrap_or_default();
    let endpoints = info
        .endpoints
        .iter()
        .filter_map(|&value| match Endpoint::try_from(value) {
            Ok(Endpoint::Generations) => Some("generations"),
            Ok(Endpoint::Edits) => Some("edits"),
            Ok(Endpoint::Variations) => Some("variations"),
            Ok(Endpoint::Unspecified) | Err(_) => None,
        })
        .map(str::to_string)
        .collect();
    let native_size = if info.native_width > 0 && info.native_height > 0 {
        format!("{}x{}", info.native_width, info.native_height)
    } else {
        String::new()
    };
    Model {
        loaded: info.loaded,
        endpoints,
        native_size,
        size_multiple: limits.size_multiple,
        max_pixels: limits.max_pixels,
        max_n: info.max_n.max(1),
        max_steps: limits.max_steps,
        max_sequence_length: info
            .limits
            .map(|l| l.max_sequence_length)
            .filter(|&l| l > 0),
        schedulers: info.schedulers.clone(),
        default_scheduler: defaults.scheduler,
        default_num_inference_steps: defaults.num_inference_steps,
        default_guidance_scale: defaults.guidance_scale,
        default_strength: defaults.strength,
        presets: info
            .presets
            .iter()
            .map(|preset| ModelPreset {
                name: preset.name.clone(),
                guidance_scale: preset.guidance_scale,
                num_inference_steps: preset.num_inference_steps,
            })
            .collect(),
        loras: info.loras.clone(),
        ..Model::default()
    }
}
