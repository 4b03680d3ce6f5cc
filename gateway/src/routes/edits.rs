//! `POST /v1/images/edits`: repaint an uploaded image from a prompt, inside a mask (task INPAINT)
//! or over the whole picture without one (task IMAGE_TO_IMAGE).
//!
//! [`run::image_task`] checks the endpoint switch before the body is read, then parses the form
//! (multipart or JSON, [`crate::form::ImageForm`]), resolves the model, inspects the uploads off
//! the runtime, validates the whole request and runs it (`stream`: `image_edit.*` events).

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use fastfusion_proto::Endpoint;

use crate::error::ApiError;
use crate::routes::run;
use crate::state::AppState;
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
    run::image_task(
        &state,
        &headers,
        &uri,
        request,
        Endpoint::Edits,
        validate_edit,
    )
    .await
}
