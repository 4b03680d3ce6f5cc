//! `POST /v1/images/generations`: OpenAI's text-to-image endpoint.
//!
//! The body is parsed ([`ApiJson`]), the model resolved, the request validated against that model's
//! Info into a `ValidGeneration` (endpoint GENERATIONS, task TEXT_TO_IMAGE) and run by
//! [`run::generate`]: one JSON body, or `image_generation.*` server-sent events with `stream`.

use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;

use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::openai::ImageGenerationRequest;
use crate::routes::run;
use crate::state::AppState;
use crate::validation::validate_generation;

#[utoipa::path(
    post,
    path = "/v1/images/generations",
    tag = "images",
    request_body = crate::openai::ImageGenerationRequest,
    responses(
        (status = 200, description = "The images; with `stream: true`, server-sent events instead",
            content(
                (crate::openai::ImagesResponse = "application/json"),
                (crate::openai::ImageStreamEvent = "text/event-stream"),
            )),
        crate::openapi::GenerationErrors,
    ),
    security((), ("api_key" = [])),
)]
pub async fn create_image(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    ApiJson(body): ApiJson<ImageGenerationRequest>,
) -> Result<Response, ApiError> {
    let info = state.workers.info(body.common.model.as_deref()).await?;
    let valid = validate_generation(body, &info)?;
    run::generate(&state, &headers, &uri, &info, valid).await
}
