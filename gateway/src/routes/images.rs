//! `GET /v1/images/data/{file_id}`: serves images stored for `response_format: url`.
//!
//! The store refuses any id it did not hand out, so the path cannot leave the image directory.
//! Ids are unguessable and never reused, so responses may be cached for good.

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::app::AppState;
use crate::error::ApiError;

pub async fn get_image(
    State(state): State<AppState>,
    file_id: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(file_id) =
        file_id.map_err(|rejection| ApiError::ImageNotFound(rejection.body_text()))?;
    let image = state.images.get(&file_id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, image.format.content_type()),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        image.bytes,
    )
        .into_response())
}
