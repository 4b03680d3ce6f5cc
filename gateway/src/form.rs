//! [`ImageForm`]: the body of `POST /v1/images/edits` and `/variations`, from either form clients
//! send, with every rejection an [`ApiError`] in OpenAI's shape.
//!
//! - `multipart/form-data` (the OpenAI SDKs, curl `-F`, web UIs): parts are read one at a time
//!   as they stream in, into memory only (no temporary files), under the router's body limit
//!   (over it: 413). File parts `image`, `image[]` (the SDKs' name when several images are sent)
//!   and repeated `image` become uploads in order; `mask` is the mask. Text parts are gathered
//!   into a JSON object, the numeric, boolean and JSON ones (`n`, `seed`, `strength`, `stream`,
//!   `lora_settings`, ...) parsed from their text, and deserialized by
//!   [`crate::extract::parse_value`] exactly as a JSON body is, so `n=abc` is a 400 naming `n`.
//!   An empty part counts as absent (SDKs and HTML forms send empty values for unset fields);
//!   a text field given twice is a 400; unknown parts are skipped unread.
//! - anything else is the JSON form: `{"images":[{"image_url":"data:..."}], "mask":{...}, ...}`,
//!   whose data URLs are decoded by [`crate::uploads::from_reference`].

use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, HeaderMap, StatusCode};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::extract::{parse_value, ApiJson, JsonBody};
use crate::openai::ImageEditRequest;
use crate::uploads::{from_reference, Upload, MAX_INPUT_IMAGES};

/// Text fields whose value is not a string: parsed as JSON from the part's text.
const NON_TEXT_FIELDS: &[&str] = &[
    "n",
    "output_compression",
    "partial_images",
    "seed",
    "num_inference_steps",
    "guidance_scale",
    "strength",
    "stream",
    "stream_progress",
    "lora_settings",
];

/// An edit or variation request with its uploads, not yet checked.
#[derive(Debug, Clone)]
pub struct ImageForm {
    /// The scalar fields; `images` and `mask` are always `None` here (moved into the uploads).
    pub request: ImageEditRequest,
    /// In the order sent; the first is the image edited.
    pub images: Vec<Upload>,
    pub mask: Option<Upload>,
}

impl<S> FromRequest<S> for ImageForm
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        if is_multipart(request.headers()) {
            let multipart = Multipart::from_request(request, state)
                .await
                .map_err(|rejection| ApiError::InvalidRequest {
                    param: None,
                    message: rejection.body_text(),
                })?;
            read_multipart(multipart).await
        } else {
            let ApiJson(request) =
                ApiJson::<ImageEditRequest>::from_request(request, state).await?;
            from_json(request)
        }
    }
}

fn is_multipart(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        })
}

fn multipart_error(error: MultipartError) -> ApiError {
    if error.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge
    } else {
        ApiError::InvalidRequest {
            param: None,
            message: format!("the multipart body is malformed: {}", error.body_text()),
        }
    }
}

async fn read_multipart(mut multipart: Multipart) -> Result<ImageForm, ApiError> {
    let mut fields = Map::new();
    let mut images = Vec::new();
    let mut mask = None;
    while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
        let Some(name) = field.name().map(str::to_string) else {
            continue;
        };
        match name.as_str() {
            "image" | "image[]" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                if bytes.is_empty() {
                    continue;
                }
                if images.len() == MAX_INPUT_IMAGES {
                    return Err(ApiError::invalid(
                        "image",
                        format!("at most {MAX_INPUT_IMAGES} images may be sent"),
                    ));
                }
                images.push(Upload {
                    param: "image".to_string(),
                    bytes,
                });
            }
            "mask" => {
                let bytes = field.bytes().await.map_err(multipart_error)?;
                if bytes.is_empty() {
                    continue;
                }
                if mask.is_some() {
                    return Err(ApiError::invalid("mask", "mask was sent more than once"));
                }
                mask = Some(Upload {
                    param: "mask".to_string(),
                    bytes,
                });
            }
            // Refused before its (possibly large) file is read.
            "markup" => return Err(markup_unsupported()),
            // `images` is the JSON form's field; in a form the files are `image` parts.
            known if known != "images" && ImageEditRequest::knows(known) => {
                let text = field.text().await.map_err(multipart_error)?;
                if text.is_empty() {
                    continue;
                }
                if fields.contains_key(known) {
                    return Err(ApiError::invalid(
                        known,
                        format!("{known} was sent more than once"),
                    ));
                }
                let value = text_value(known, text)?;
                fields.insert(name, value);
            }
            unknown => tracing::debug!(field = %unknown, "ignoring unknown form field"),
        }
    }
    let request = parse_value(Value::Object(fields))?;
    Ok(ImageForm {
        request,
        images,
        mask,
    })
}

/// A text part's value as JSON: numbers, booleans and `lora_settings` parsed, the rest strings.
fn text_value(name: &str, text: String) -> Result<Value, ApiError> {
    if !NON_TEXT_FIELDS.contains(&name) {
        return Ok(Value::String(text));
    }
    serde_json::from_str(&text).map_err(|_| {
        let expected = match name {
            "lora_settings" => r#"a JSON array such as [{"name": "my-lora", "weight": 0.7}]"#,
            "stream" => "true or false",
            _ => "a number",
        };
        ApiError::invalid(name, format!("{name} must be {expected}, got '{text}'"))
    })
}

/// OpenAI's `markup` (annotations drawn over the image for its own models); nothing here can
/// follow them, and silently dropping them would paint something else than asked.
pub fn markup_unsupported() -> ApiError {
    ApiError::invalid(
        "markup",
        "markup is not supported by this server's models; paint the area to change into a mask \
         instead",
    )
}

fn from_json(mut request: ImageEditRequest) -> Result<ImageForm, ApiError> {
    if request.markup.is_some() {
        return Err(markup_unsupported());
    }
    let references = request.images.take().unwrap_or_default();
    if references.len() > MAX_INPUT_IMAGES {
        return Err(ApiError::invalid(
            "images",
            format!("at most {MAX_INPUT_IMAGES} images may be sent"),
        ));
    }
    let images = references
        .into_iter()
        .enumerate()
        .map(|(index, reference)| from_reference(reference, &format!("images[{index}]")))
        .collect::<Result<Vec<_>, _>>()?;
    let mask = request
        .mask
        .take()
        .map(|reference| from_reference(reference, "mask"))
        .transpose()?;
    Ok(ImageForm {
        request,
        images,
        mask,
    })
}
