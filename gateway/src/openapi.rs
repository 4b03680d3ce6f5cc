//! The OpenAPI 3.1 document of the HTTP API, generated from the code: the wire types in
//! `openai.rs` derive their schemas (doc comments become descriptions) and each handler carries
//! its `#[utoipa::path]`. Served at `GET /openapi.json`; `docs/openapi.json` is the committed copy,
//! which the `openapi` test keeps identical ([`pretty_json`]).
//!
//! Types here exist only to describe shapes the code builds without a named type: the error
//! envelope (`error.rs` writes it), the probes' bodies and the multipart forms.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi, ToSchema};

use crate::openai;
use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "FastFusion",
        description = "The OpenAI Images API (generations, edits, variations) served by \
                       diffusion models on FastFusion workers, with extensions: seed, \
                       negative_prompt, guidance_scale, num_inference_steps, scheduler, \
                       lora_settings, strength, stream_progress (fastfusion.progress events)."
    ),
    paths(
        routes::generations::create_image,
        routes::edits::create_edit,
        routes::variations::create_variation,
        routes::images::get_image,
        routes::models::list_models,
        routes::probes::health,
        routes::probes::ready,
    ),
    components(schemas(
        openai::CommonFields,
        openai::ImageGenerationRequest,
        openai::ImageEditRequest,
        openai::ImagesResponse,
        openai::ImageStreamEvent,
        openai::ModelList,
        openai::ImageProgressEvent,
        ErrorResponse,
        ImageEditForm,
        ImageVariationForm,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "images", description = "Image generation, edits, variations and stored images"),
        (name = "models", description = "The models the workers serve"),
        (name = "probes", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The document as committed: pretty JSON with a trailing newline.
pub fn pretty_json() -> String {
    // Serialising a document of plain maps and strings cannot fail; an empty object would show
    // up in the drift test at once.
    let mut text = ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    text
}

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], pretty_json()).into_response()
}

/// Declares the `Authorization: Bearer KEY` scheme that FASTFUSION_API_KEYS turns on.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// OpenAI's error envelope, the body of every error status.
#[derive(ToSchema)]
#[allow(dead_code)] // describes what error.rs serialises
pub struct ErrorResponse {
    error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)]
struct ErrorDetail {
    /// What went wrong, for people.
    message: String,
    /// `invalid_request_error` or `server_error`.
    #[schema(rename = "type")]
    kind: String,
    /// The request parameter at fault, as clients spell it.
    param: Option<String>,
    /// A stable machine-readable code, e.g. `invalid_value`, `model_not_found`.
    code: Option<String>,
}

/// `POST /v1/images/edits` as multipart/form-data: the files, beside the text fields of
/// [`openai::ImageEditRequest`] (without its JSON-only `images` and `mask` references).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ImageEditForm {
    /// The image to edit (PNG, JPEG or WebP); `image[]` parts for several, the first is edited.
    #[schema(value_type = Vec<String>, format = Binary)]
    image: Vec<u8>,
    /// Where to paint: transparent (alpha 0) pixels, or white ones in an opaque mask.
    #[schema(value_type = Option<String>, format = Binary)]
    mask: Option<u8>,
    #[schema(inline)]
    #[serde(flatten)]
    fields: openai::ImageEditRequest,
}

/// `POST /v1/images/variations` as multipart/form-data: one image and optional text fields of
/// [`openai::ImageEditRequest`] (`prompt` optional; no mask).
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ImageVariationForm {
    #[schema(value_type = String, format = Binary)]
    image: Vec<u8>,
    #[schema(inline)]
    #[serde(flatten)]
    fields: openai::ImageEditRequest,
}

/// The error statuses of the generation endpoints.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum GenerationErrors {
    /// A parameter is missing or invalid; `param` names it.
    #[response(status = 400)]
    BadRequest(ErrorResponse),
    /// API keys are configured and the request has none (`missing_api_key`) or an unknown one
    /// (`invalid_api_key`).
    #[response(status = 401)]
    Unauthorized(ErrorResponse),
    /// The endpoint or task is switched off for the model, or the model is unknown.
    #[response(status = 404)]
    NotFound(ErrorResponse),
    /// The body is larger than FASTFUSION_MAX_BODY_BYTES.
    #[response(status = 413)]
    PayloadTooLarge(ErrorResponse),
    /// FASTFUSION_MAX_CONCURRENT_REQUESTS are running, or the worker's queue is full.
    #[response(status = 429)]
    TooManyRequests(ErrorResponse),
    /// The gateway or a worker failed.
    #[response(status = 500)]
    Internal(ErrorResponse),
    /// No worker can take the request (loading, draining, unreachable) or it timed out.
    #[response(status = 503)]
    Unavailable(ErrorResponse),
}

/// The body of `GET /health` and a ready `GET /ready`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ProbeStatus {
    /// `ok` (health) or `ready`.
    status: String,
}
