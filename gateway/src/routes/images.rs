//! `GET /v1/images/data/{file_id}`: serves images stored for `response_format: url`.
//!
//! The store refuses any id it did not hand out, so the path cannot leave the image directory or
//! prefix. Needs no API key: the url is the credential (an unguessable id, and with
//! FASTFUSION_URL_SIGNING_KEY a signature checked before the store is asked). Ids are never
//! reused, so unsigned responses may be cached for good; signed ones until the url expires.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::image_urls::Signature;
use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/v1/images/data/{file_id}",
    tag = "images",
    params(
        ("file_id" = String, Path, description = "The id in an image url"),
        ("expires" = Option<String>, Query, description = "Signed urls: expiry, Unix seconds"),
        ("sig" = Option<String>, Query, description = "Signed urls: the signature"),
    ),
    responses(
        (status = 200, description = "The image", content(
            ([u8] = "image/png"), ([u8] = "image/jpeg"), ([u8] = "image/webp"),
        )),
        (status = 403, description = "Bad signature or expired url", body = crate::openapi::ErrorResponse),
        (status = 404, description = "No such image", body = crate::openapi::ErrorResponse),
    ),
)]
pub async fn get_image(
    State(state): State<AppState>,
    file_id: Result<Path<String>, PathRejection>,
    signature: Result<Query<Signature>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(file_id) =
        file_id.map_err(|rejection| ApiError::ImageNotFound(rejection.body_text()))?;
    // A query that does not even parse carries no usable signature.
    let Query(signature) = signature.unwrap_or_default();
    let valid_for = state.urls.check(&file_id, &signature)?;
    let image = state.images.get(&file_id).await?;
    let cache = match valid_for {
        None => "public, max-age=31536000, immutable".to_string(),
        // Private: the signature is a credential, shared caches should not serve it on.
        Some(secs) => format!("private, max-age={secs}, immutable"),
    };
    Ok((
        [
            (
                header::CONTENT_TYPE,
                image.format.content_type().to_string(),
            ),
            (header::CACHE_CONTROL, cache),
        ],
        image.bytes,
    )
        .into_response())
}
