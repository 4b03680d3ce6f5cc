//! API keys: [`ApiKeys`] (FASTFUSION_API_KEYS / FASTFUSION_API_KEYS_FILE) and the
//! [`require_api_key`] middleware on the routes that need one.
//!
//! With keys configured, the image endpoints and `/v1/models` need `Authorization: Bearer KEY`;
//! a missing or wrong key is a 401 in OpenAI's shape. Probes (`/health`, `/ready`), `/metrics`
//! and image downloads stay open: an image url is a capability of its own (unguessable, and
//! signed with an expiry when FASTFUSION_URL_SIGNING_KEY is set), so browsers can load it.
//!
//! Keys are kept as SHA-256 digests and a presented key is compared with every one of them in
//! constant time, so neither timing nor an early exit tells how much of a guess was right.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;
use crate::error::ApiError;

/// The accepted keys; none (the default) means the API is open.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    pub fn new<'a>(keys: impl IntoIterator<Item = &'a Secret>) -> Self {
        ApiKeys {
            digests: keys.into_iter().map(|key| digest(key.expose())).collect(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.digests.is_empty()
    }

    /// Checks the request's `Authorization: Bearer` header.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.is_enabled() {
            return Ok(());
        }
        let value = headers
            .get(header::AUTHORIZATION)
            .ok_or(ApiError::MissingApiKey)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(ApiError::MissingApiKey)?;
        let presented = digest(token);
        // Fold over every key without stopping at a match.
        let matched = self
            .digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&presented)
            });
        if bool::from(matched) {
            Ok(())
        } else {
            Err(ApiError::InvalidApiKey)
        }
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Middleware: lets the request through only with a valid key (or when no key is configured).
pub async fn require_api_key(
    State(keys): State<Arc<ApiKeys>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    keys.check(request.headers())?;
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with_auth(value: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static(value));
        headers
    }

    #[test]
    fn keys_are_checked_exactly() {
        let keys = ApiKeys::new(&[Secret::new("sk-alpha"), Secret::new("sk-beta")]);
        assert!(keys.check(&with_auth("Bearer sk-alpha")).is_ok());
        assert!(keys.check(&with_auth("bearer  sk-beta ")).is_ok());
        for wrong in ["Bearer sk-alph", "Bearer sk-alpha2", "Bearer SK-ALPHA"] {
            assert!(
                matches!(keys.check(&with_auth(wrong)), Err(ApiError::InvalidApiKey)),
                "{wrong}"
            );
        }
        for missing in ["sk-alpha", "Basic c2stYWxwaGE=", "Bearer ", "Bearer"] {
            assert!(
                matches!(
                    keys.check(&with_auth(missing)),
                    Err(ApiError::MissingApiKey)
                ),
                "{missing}"
            );
        }
        assert!(matches!(
            keys.check(&HeaderMap::new()),
            Err(ApiError::MissingApiKey)
        ));
    }

    #[test]
    fn no_keys_means_open() {
        let keys = ApiKeys::default();
        assert!(!keys.is_enabled());
        assert!(keys.check(&HeaderMap::new()).is_ok());
        assert!(keys.check(&with_auth("Bearer anything")).is_ok());
    }

    #[test]
    fn debug_does_not_print_keys() {
        let keys = ApiKeys::new(&[Secret::new("sk-alpha")]);
        assert_eq!(format!("{keys:?}"), "ApiKeys(1 keys)");
    }
}
