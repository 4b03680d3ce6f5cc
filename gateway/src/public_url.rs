//! The base of the image urls handed to clients.
//!
//! With BASE_URL set, that (trailing slashes dropped, so `https://x/` and `https://x` agree).
//! Unset, urls follow the request: `X-Forwarded-Proto` / `X-Forwarded-Host` when a proxy sets them
//! (first value of a comma-separated list: the client-facing hop), else the `Host` header (or the
//! HTTP/2 authority) over plain http. A client can only steer the urls in its own response.

use axum::http::{header, HeaderMap, Uri};

/// Used when a request carries no host at all (HTTP/1.0 without Host).
const FALLBACK_HOST: &str = "localhost";

/// `scheme://host[:port][/prefix]` without a trailing slash.
pub fn public_base_url(configured: Option<&str>, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(base) = configured {
        return base.trim_end_matches('/').to_string();
    }
    let first = |name: &str| -> Option<String> {
        let value = headers.get(name)?.to_str().ok()?;
        let first = value.split(',').next()?.trim();
        (!first.is_empty()).then(|| first.to_string())
    };
    let scheme = first("x-forwarded-proto")
        .filter(|s| s == "http" || s == "https")
        .unwrap_or_else(|| "http".to_string());
    let host = first("x-forwarded-host")
        .or_else(|| first(header::HOST.as_str()))
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_else(|| FALLBACK_HOST.to_string());
    format!("{scheme}://{host}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn configured_base_wins_and_loses_trailing_slash() {
        let h = headers(&[("host", "ignored:1")]);
        let uri = Uri::from_static("/v1/images/generations");
        assert_eq!(
            public_base_url(Some("https://img.example/ff/"), &h, &uri),
            "https://img.example/ff"
        );
        assert_eq!(
            public_base_url(Some("https://img.example"), &h, &uri),
            "https://img.example"
        );
    }

    #[test]
    fn host_header_and_forwarded_headers() {
        let uri = Uri::from_static("/v1/images/generations");
        let h = headers(&[("host", "127.0.0.1:8123")]);
        assert_eq!(public_base_url(None, &h, &uri), "http://127.0.0.1:8123");
        let h = headers(&[
            ("host", "10.0.0.5:8000"),
            ("x-forwarded-proto", "https, http"),
            ("x-forwarded-host", "images.example.com, proxy.internal"),
        ]);
        assert_eq!(
            public_base_url(None, &h, &uri),
            "https://images.example.com"
        );
        // Only http and https are believed.
        let h = headers(&[("host", "a:1"), ("x-forwarded-proto", "javascript")]);
        assert_eq!(public_base_url(None, &h, &uri), "http://a:1");
    }

    #[test]
    fn authority_then_fallback() {
        let uri = Uri::from_static("http://h2.example:9/v1");
        assert_eq!(
            public_base_url(None, &HeaderMap::new(), &uri),
            "http://h2.example:9"
        );
        let uri = Uri::from_static("/v1");
        assert_eq!(
            public_base_url(None, &HeaderMap::new(), &uri),
            "http://localhost"
        );
    }
}
