//! The gateway's one error type, [`ApiError`], and its single conversion to an HTTP response.
//!
//! Everything a handler can fail with becomes an `ApiError`: bad input (from the JSON extractor or
//! `validation.rs`), worker answers (`tonic::Status`, converted in [`ApiError::from_status`]),
//! storage failures and unknown routes. [`IntoResponse`] turns each variant into OpenAI's error
//! body `{"error":{"message","type","param","code"}}` with the status code OpenAI would use, so
//! SDKs raise their usual exception classes. Internal details are logged here and never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::storage::StorageError;

/// Seconds a client should wait before retrying after a 429 (a worker's queue or the gateway's
/// concurrency limit was full).
const RETRY_AFTER_BUSY_SECS: u64 = 1;
/// Seconds a client should wait before retrying after a 503 (a worker is loading or unreachable).
const RETRY_AFTER_UNAVAILABLE_SECS: u64 = 5;

/// Everything a request can fail with, grouped by what the client has to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed; `param` names the offending field as clients spell it.
    #[error("{message}")]
    InvalidRequest {
        param: Option<String>,
        message: String,
    },
    /// No route matches the path.
    #[error("unknown route {method} {path}")]
    RouteNotFound { method: String, path: String },
    /// The route exists but not for this method.
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// `GET /v1/images/data/{file_id}` for an id that is malformed or not stored.
    #[error("image '{0}' not found")]
    ImageNotFound(String),
    /// Several models are served and the request names none of them.
    #[error("model '{requested}' not found; available models: {}", .available.join(", "))]
    ModelNotFound {
        requested: String,
        available: Vec<String>,
    },
    /// The endpoint (generations, edits, variations) or task is switched off for the model:
    /// by its Info before the request is sent, or by the worker (FAILED_PRECONDITION).
    #[error("{0}")]
    TaskDisabled(String),
    /// API keys are configured and the request carries no `Authorization: Bearer` key.
    #[error(
        "You didn't provide an API key. Send it in an Authorization header using Bearer auth \
         (Authorization: Bearer YOUR_KEY)."
    )]
    MissingApiKey,
    /// The request's key is not one of the configured keys.
    #[error("Incorrect API key provided.")]
    InvalidApiKey,
    /// An image download's signature is missing or does not match (urls signed with
    /// FASTFUSION_URL_SIGNING_KEY).
    #[error("{0}")]
    InvalidSignature(String),
    /// An image download's signed url has expired.
    #[error("this image url has expired; request the image again for a new url")]
    UrlExpired,
    /// The gateway runs FASTFUSION_MAX_CONCURRENT_REQUESTS generation requests already.
    #[error("this server is busy with its maximum of {0} concurrent requests; retry shortly")]
    TooManyConcurrentRequests(usize),
    /// The request body is larger than the configured limit.
    #[error("the request body is larger than this server accepts (FASTFUSION_MAX_BODY_BYTES)")]
    PayloadTooLarge,
    /// The worker's queue is full.
    #[error("{0}")]
    Busy(String),
    /// No worker can take the request now (loading, draining, unreachable).
    #[error("{0}")]
    Unavailable(String),
    /// The request took longer than the configured request timeout.
    #[error("request timed out after {0} s")]
    Timeout(u64),
    /// The gateway's or a worker's fault; the detail is logged, the client sees a generic message.
    #[error("internal error: {0}")]
    Internal(String),
}

/// OpenAI's error envelope.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    message: String,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<String>,
    code: Option<&'a str>,
}

impl ApiError {
    /// A 400 naming the parameter at fault.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            param: Some(param.into()),
            message: message.into(),
        }
    }

    /// Converts a worker's gRPC status. The worker sets metadata `ff-param`
    /// ([`fastfusion_proto::PARAM_METADATA_KEY`]) on INVALID_ARGUMENT and NOT_FOUND to name the
    /// request parameter at fault; its messages for those codes are written for clients.
    pub fn from_status(status: &tonic::Status) -> Self {
        use tonic::Code;
        let message = status.message().to_string();
        match status.code() {
            Code::InvalidArgument | Code::NotFound | Code::OutOfRange => {
                let param = status
                    .metadata()
                    .get(fastfusion_proto::PARAM_METADATA_KEY)
                    .and_then(|value| value.to_str().ok())
                    .map(str::to_string);
                ApiError::InvalidRequest { param, message }
            }
            Code::FailedPrecondition => ApiError::TaskDisabled(message),
            Code::ResourceExhausted => ApiError::Busy(message),
            Code::Unavailable => ApiError::Unavailable(message),
            Code::DeadlineExceeded => ApiError::Unavailable(format!("worker timed out: {message}")),
            Code::Ok
            | Code::Cancelled
            | Code::Unknown
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Aborted
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss
            | Code::Unauthenticated => {
                ApiError::Internal(format!("worker answered {:?}: {message}", status.code()))
            }
        }
    }

    /// Stable machine-readable name of the variant, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::RouteNotFound { .. } => "route_not_found",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::ImageNotFound(_) => "image_not_found",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::TaskDisabled(_) => "task_disabled",
            ApiError::MissingApiKey => "missing_api_key",
            ApiError::InvalidApiKey => "invalid_api_key",
            ApiError::InvalidSignature(_) => "invalid_signature",
            ApiError::UrlExpired => "url_expired",
            ApiError::TooManyConcurrentRequests(_) => "too_many_concurrent_requests",
            ApiError::PayloadTooLarge => "payload_too_large",
            ApiError::Busy(_) => "busy",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<tonic::Status> for ApiError {
    fn from(status: tonic::Status) -> Self {
        ApiError::from_status(&status)
    }
}

impl From<StorageError> for ApiError {
    fn from(error: StorageError) -> Self {
        match error {
            StorageError::InvalidId(id) | StorageError::NotFound(id) => ApiError::ImageNotFound(id),
            StorageError::Backend { .. } => ApiError::Internal(error.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        const INVALID: &str = "invalid_request_error";
        const SERVER: &str = "server_error";
        let mut message = self.to_string();
        let (status, kind, param, code, retry_after) = match self {
            ApiError::InvalidRequest { param, .. } => (
                StatusCode::BAD_REQUEST,
                INVALID,
                param,
                "invalid_value",
                None,
            ),
            ApiError::RouteNotFound { .. } => {
                (StatusCode::NOT_FOUND, INVALID, None, "not_found", None)
            }
            ApiError::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                INVALID,
                None,
                "method_not_allowed",
                None,
            ),
            ApiError::ImageNotFound(_) => (
                StatusCode::NOT_FOUND,
                INVALID,
                Some("file_id".to_string()),
                "not_found",
                None,
            ),
            ApiError::ModelNotFound { .. } => (
                StatusCode::NOT_FOUND,
                INVALID,
                Some("model".to_string()),
                "model_not_found",
                None,
            ),
            ApiError::TaskDisabled(_) => {
                (StatusCode::NOT_FOUND, INVALID, None, "task_disabled", None)
            }
            ApiError::MissingApiKey => (
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                "missing_api_key",
                None,
            ),
            ApiError::InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                INVALID,
                None,
                "invalid_api_key",
                None,
            ),
            ApiError::InvalidSignature(_) => (
                StatusCode::FORBIDDEN,
                INVALID,
                Some("sig".to_string()),
                "invalid_signature",
                None,
            ),
            ApiError::UrlExpired => (
                StatusCode::FORBIDDEN,
                INVALID,
                Some("expires".to_string()),
                "url_expired",
                None,
            ),
            ApiError::TooManyConcurrentRequests(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                Some(RETRY_AFTER_BUSY_SECS),
            ),
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                INVALID,
                None,
                "request_too_large",
                None,
            ),
            ApiError::Busy(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                None,
                "rate_limit_exceeded",
                Some(RETRY_AFTER_BUSY_SECS),
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                None,
                "service_unavailable",
                Some(RETRY_AFTER_UNAVAILABLE_SECS),
            ),
            ApiError::Timeout(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                SERVER,
                None,
                "timeout",
                Some(RETRY_AFTER_UNAVAILABLE_SECS),
            ),
            ApiError::Internal(detail) => {
                // The detail can name files, hosts or tensors: it goes to the log only.
                tracing::error!(error = %detail, "internal error");
                message = "The server had an error while processing your request.".to_string();
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    SERVER,
                    None,
                    "internal_error",
                    None,
                )
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                message,
                kind,
                param,
                code: Some(code),
            },
        };
        let mut response = (status, Json(body)).into_response();
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 9110: a 401 names the scheme that would work.
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn parts(error: ApiError) -> (StatusCode, Option<String>, serde_json::Value) {
        let response = error.into_response();
        let status = response.status();
        let retry = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        let body = serde_json::from_slice(&bytes).expect("JSON body");
        (status, retry, body)
    }

    #[tokio::test]
    async fn invalid_request_names_the_param() {
        let (status, retry, body) = parts(ApiError::invalid("n", "n must be at least 1")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(retry, None);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["param"], "n");
        assert_eq!(body["error"]["message"], "n must be at least 1");
    }

    #[tokio::test]
    async fn internal_detail_is_not_sent() {
        let (status, _, body) = parts(ApiError::Internal("/secret/path exploded".into())).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["error"]["type"], "server_error");
        let text = body.to_string();
        assert!(!text.contains("secret"), "{text}");
    }

    #[tokio::test]
    async fn busy_and_unavailable_carry_retry_after() {
        let (status, retry, _) = parts(ApiError::Busy("queue full".into())).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry.as_deref(), Some("1"));
        let (status, retry, body) = parts(ApiError::Unavailable("loading".into())).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(retry.as_deref(), Some("5"));
        assert_eq!(body["error"]["message"], "loading");
    }

    #[tokio::test]
    async fn access_errors_map_to_401_403_and_429() {
        for (error, code) in [
            (ApiError::MissingApiKey, "missing_api_key"),
            (ApiError::InvalidApiKey, "invalid_api_key"),
        ] {
            let response = error.into_response();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()[header::WWW_AUTHENTICATE], "Bearer");
            let bytes = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON body");
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert_eq!(body["error"]["param"], serde_json::Value::Null);
        }
        let (status, _, body) = parts(ApiError::UrlExpired).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["param"], "expires");
        let (status, _, body) = parts(ApiError::InvalidSignature("bad".into())).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["error"]["param"], "sig");
        let (status, retry, body) = parts(ApiError::TooManyConcurrentRequests(4)).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(retry.as_deref(), Some("1"));
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("4 concurrent"), "{message}");
    }

    #[tokio::test]
    async fn model_not_found_lists_models() {
        let error = ApiError::ModelNotFound {
            requested: "dall-e-3".into(),
            available: vec!["sd-a".into(), "sd-b".into()],
        };
        let (status, _, body) = parts(error).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["code"], "model_not_found");
        assert_eq!(body["error"]["param"], "model");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains("sd-a, sd-b"), "{message}");
    }

    #[test]
    fn statuses_map_by_code() {
        let mut status = tonic::Status::invalid_argument("bad scheduler");
        status.metadata_mut().insert(
            fastfusion_proto::PARAM_METADATA_KEY,
            tonic::metadata::MetadataValue::from_static("scheduler"),
        );
        match ApiError::from(status) {
            ApiError::InvalidRequest { param, message } => {
                assert_eq!(param.as_deref(), Some("scheduler"));
                assert_eq!(message, "bad scheduler");
            }
            other => panic!("unexpected {other:?}"),
        }
        let kind = |status: tonic::Status| ApiError::from(status).kind();
        assert_eq!(kind(tonic::Status::resource_exhausted("full")), "busy");
        assert_eq!(kind(tonic::Status::unavailable("loading")), "unavailable");
        assert_eq!(
            kind(tonic::Status::failed_precondition("off")),
            "task_disabled"
        );
        assert_eq!(
            kind(tonic::Status::deadline_exceeded("slow")),
            "unavailable"
        );
        assert_eq!(kind(tonic::Status::internal("boom")), "internal");
    }
}
