//! `POST /v1/images/generations`: OpenAI's text-to-image endpoint.
//!
//! The body is parsed ([`ApiJson`]), the model resolved, the request validated against that model's
//! Info into a `ValidGeneration` (endpoint GENERATIONS, task TEXT_TO_IMAGE) and run by
//! [`run::generate`].

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::Json;

use crate::app::AppState;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::openai::{ImageGenerationRequest, ImagesResponse};
use crate::routes::run;
use crate::validation::validate_generation;

pub async fn create_image(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ApiJson(body): ApiJson<ImageGenerationRequest>,
) -> Result<Json<ImagesResponse>, ApiError> {
    let info = state.workers.info(body.model.as_deref()).await?;
    let valid = validate_generation(body, &info)?;
    run::generate(&state, &headers, &uri, &info, valid).await
}
