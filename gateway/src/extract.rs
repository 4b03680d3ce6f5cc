//! [`ApiJson`]: a JSON body extractor whose every rejection is an [`ApiError`] in OpenAI's shape.
//!
//! axum's own `Json` answers 415/422 with plain text. Here the body is read under the router's
//! `DefaultBodyLimit` (too large → 413), parsed as JSON (syntax error → 400), required to be an
//! object, checked for unknown fields (ignored, logged at debug: the SDK gains new ones), and
//! deserialized with `serde_path_to_error`, so a wrong type names the field (`n`,
//! `lora_settings[0].weight`) in `param`. The Content-Type header is not required: curl users
//! often omit it, and the body decides. [`parse_value`] is the same deserialization for a value
//! built elsewhere (the text parts of a multipart form).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::CommonFields;

/// A request body type together with the top-level fields it understands.
pub trait JsonBody: DeserializeOwned {
    /// Whether `field` is one of the body's fields (others are ignored and logged at debug).
    fn knows(field: &str) -> bool;
}

impl JsonBody for crate::openai::ImageGenerationRequest {
    fn knows(field: &str) -> bool {
        CommonFields::FIELDS.contains(&field) || Self::OWN_FIELDS.contains(&field)
    }
}

impl JsonBody for crate::openai::ImageEditRequest {
    fn knows(field: &str) -> bool {
        CommonFields::FIELDS.contains(&field) || Self::OWN_FIELDS.contains(&field)
    }
}

/// The body of a request, deserialized.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: JsonBody,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge
                } else {
                    ApiError::InvalidRequest {
                        param: None,
                        message: rejection.body_text(),
                    }
                }
            })?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// The body bytes → `T`, with errors naming the field where serde knows it.
pub fn parse_body<T: JsonBody>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(bytes).map_err(|e| ApiError::InvalidRequest {
        param: None,
        message: format!("the request body is not valid JSON: {e}"),
    })?;
    parse_value(value)
}

/// A JSON value → `T`, as [`parse_body`] does after parsing. Multipart forms come through here
/// too (`crate::form` turns their text parts into a JSON object), so both forms share one set of
/// type errors.
pub fn parse_value<T: JsonBody>(value: Value) -> Result<T, ApiError> {
    let Some(object) = value.as_object() else {
        return Err(ApiError::InvalidRequest {
            param: None,
            message: "the request body must be a JSON object".to_string(),
        });
    };
    for key in object.keys() {
        if !T::knows(key) {
            tracing::debug!(field = %key, "ignoring unknown request field");
        }
    }
    // Serde loses the path of a wrong value inside a flattened struct, so the shared fields are
    // checked on their own first (a copy of just those keys: never the uploads).
    let common: Map<String, Value> = object
        .iter()
        .filter(|(key, _)| CommonFields::FIELDS.contains(&key.as_str()))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    typed::<CommonFields>(Value::Object(common))?;
    typed(value)
}

/// `value` → `T`, a wrong value named by its path (`n`, `lora_settings[0].weight`).
fn typed<T: DeserializeOwned>(value: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        // A root-level error (such as a missing field) has path "."; serde's message names it.
        let param = (path != ".").then_some(path);
        let message = match &param {
            Some(param) => format!("invalid value for '{param}': {message}"),
            None => message,
        };
        ApiError::InvalidRequest { param, message }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::ImageGenerationRequest;

    fn param_of(body: &str) -> Option<String> {
        match parse_body::<ImageGenerationRequest>(body.as_bytes()) {
            Err(ApiError::InvalidRequest { param, .. }) => param,
            other => panic!("expected a 400 for {body}, got {other:?}"),
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        assert_eq!(
            param_of(r#"{"prompt":"x","n":"two"}"#).as_deref(),
            Some("n")
        );
        assert_eq!(param_of(r#"{"prompt":5}"#).as_deref(), Some("prompt"));
        assert_eq!(
            param_of(r#"{"prompt":"x","seed":-1}"#).as_deref(),
            Some("seed")
        );
        assert_eq!(param_of(r#"{"prompt":"x","n":1.5}"#).as_deref(), Some("n"));
        assert_eq!(
            param_of(r#"{"prompt":"x","response_format":"png"}"#).as_deref(),
            Some("response_format")
        );
        assert_eq!(
            param_of(r#"{"prompt":"x","lora_settings":[{"name":"a","weight":"heavy"}]}"#)
                .as_deref(),
            Some("lora_settings[0].weight")
        );
        assert_eq!(
            param_of(r#"{"prompt":"x","lora_settings":[{"weight":1}]}"#).as_deref(),
            Some("lora_settings[0]")
        );
    }

    #[test]
    fn syntax_errors_and_non_objects_are_400_without_param() {
        assert_eq!(param_of(r#"{"prompt":"#), None);
        assert_eq!(param_of(""), None);
        assert_eq!(param_of(r#"["prompt"]"#), None);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let parsed =
            parse_body::<ImageGenerationRequest>(br#"{"prompt":"x","future_field":{"a":1}}"#)
                .expect("parses");
        assert_eq!(parsed.common.prompt.as_deref(), Some("x"));
    }
}
