//! `POST /v1/images/variations`: image-to-image over one uploaded picture (endpoint VARIATIONS),
//! guided by an optional prompt. Without one the gateway sends an empty prompt and the worker
//! finds one (its configured vision model, or its default).
//!
//! Same flow as edits: endpoint switch before the body, then form, model, uploads, validation.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use fastfusion_proto::Endpoint;

use crate::error::ApiError;
use crate::routes::run;
use crate::state::AppState;
use crate::validation::validate_variation;

#[utoipa::path(
    post,
    path = "/v1/images/variations",
    tag = "images",
    request_body(content(
        (crate::openapi::ImageVariationForm = "multipart/form-data"),
        (crate::openai::ImageEditRequest = "application/json"),
    )),
    responses(
        (status = 200, description = "The variations; with `stream: true`, server-sent events instead",
            content(
                (crate::openai::ImagesResponse = "application/json"),
                (crate::openai::ImageStreamEvent = "text/event-stream"),
            )),
        crate::openapi::GenerationErrors,
    ),
    security((), ("api_key" = [])),
)]
pub async fn create_variation(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    request: Request,
) -> Result<Response, ApiError> {
    run::image_task(
        &state,
        &headers,
        &uri,
        request,
        Endpoint::Variations,
        validate_variation,
    )
    .await
}
