//! `POST /v1/images/edits`: repaint an uploaded image from a prompt, inside a mask (task INPAINT)
//! or over the whole picture without one (task IMAGE_TO_IMAGE).
//!
//! The endpoint switch is checked before the body is read; then the form (multipart or JSON,
//! [`ImageForm`]) is parsed, the model resolved, the uploads inspected off the runtime, the whole
//! request validated and run by [`run::generate`].

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Uri};
use axum::Json;
use fastfusion_proto::Endpoint;

use crate::app::AppState;
use crate::error::ApiError;
use crate::form::ImageForm;
use crate::openai::ImagesResponse;
use crate::routes::run;
use crate::validation::validate_edit;

pub async fn create_edit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    request: Request,
) -> Result<Json<ImagesResponse>, ApiError> {
    run::ensure_endpoint_served(&state, Endpoint::Edits).await?;
    let ImageForm {
        request: fields,
        images,
        mask,
    } = ImageForm::from_request(request, &state).await?;
    let info = state.workers.info(fields.model.as_deref()).await?;
    let (images, mask) = run::inspect_uploads(images, mask, state.http.max_input_pixels).await?;
    let valid = validate_edit(fields, images, mask, &info)?;
    run::generate(&state, &headers, &uri, &info, valid).await
}
