//! `POST /v1/images/variations`: image-to-image over one uploaded picture (endpoint VARIATIONS),
//! guided by an optional prompt. Without one the gateway sends an empty prompt and the worker
//! finds one (its configured vision model, or its default).
//!
//! Same flow as edits: endpoint switch before the body, then form, model, uploads, validation.

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Uri};
use axum::Json;
use fastfusion_proto::Endpoint;

use crate::app::AppState;
use crate::error::ApiError;
use crate::form::ImageForm;
use crate::openai::ImagesResponse;
use crate::routes::run;
use crate::validation::validate_variation;

pub async fn create_variation(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    request: Request,
) -> Result<Json<ImagesResponse>, ApiError> {
    run::ensure_endpoint_served(&state, Endpoint::Variations).await?;
    let ImageForm {
        request: fields,
        images,
        mask,
    } = ImageForm::from_request(request, &state).await?;
    let info = state.workers.info(fields.model.as_deref()).await?;
    let (images, mask) = run::inspect_uploads(images, mask, state.http.max_input_pixels).await?;
    let valid = validate_variation(fields, images, mask, &info)?;
    run::generate(&state, &headers, &uri, &info, valid).await
}
