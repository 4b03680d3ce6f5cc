//! `POST /v1/images/edits`: repaint an uploaded image from a prompt, inside a mask (task INPAINT)
//! or over the whole picture without one (task IMAGE_TO_IMAGE).
//!
//! The endpoint switch is checked before the body is read; then the form (multipart or JSON,
//! [`ImageForm`]) is parsed, the model resolved, the uploads inspected off the runtime, the whole
//! request validated and run by [`run::generate`] (`stream`: `image_edit.*` server-sent events).

use axum::extract::{FromRequest, Request, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use fastfusion_proto::Endpoint;

use crate::app::AppState;
use crate::error::ApiError;
use crate::form::ImageForm;
use crate::routes::run;
use crate::validation::validate_edit;

#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "images",
    request_body(content(
        (crate::openapi::ImageEditForm = "multipart/form-data"),
        (crate::openai::ImageEditRequest = "application/json"),
    )),
    responses(
        (status = 200, description = "The edited images; with `stream: true`, server-sent events instead",
            content(
                (crate::openai::ImagesResponse = "application/json"),
                (crate::openai::ImageStreamEvent = "text/event-stream"),
            )),
        crate::openapi::GenerationErrors,
    ),
    security((), ("api_key" = [])),
)]
pub async fn create_edit(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    request: Request,
) -> Result<Response, ApiError> {
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
