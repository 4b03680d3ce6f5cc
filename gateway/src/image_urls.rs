//! [`ImageUrls`]: the urls handed out for stored images, and the check of their signatures.
//!
//! Without FASTFUSION_URL_SIGNING_KEY a url is `{base}/v1/images/data/{id}`: the 128-bit id is
//! the only credential. With a key, urls carry `?expires=UNIX&sig=HEX` where `sig` is
//! hex(HMAC-SHA256(key, "{id}|{expires}")) and `expires` is now + FASTFUSION_URL_TTL_SECS; a
//! download without a valid, unexpired signature is a 403. Every replica configured with the
//! same key accepts the urls of every other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::error::ApiError;

type HmacSha256 = Hmac<Sha256>;

/// Builds image urls and checks their signatures.
#[derive(Clone, Default)]
pub struct ImageUrls {
    signer: Option<Signer>,
}

#[derive(Clone)]
struct Signer {
    /// Keyed once; cloned for each signature.
    mac: HmacSha256,
    /// How long a signed url stays valid.
    ttl: Duration,
}

impl std::fmt::Debug for ImageUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ttl = self.signer.as_ref().map(|s| s.ttl);
        f.debug_struct("ImageUrls")
            .field("signed_for", &ttl)
            .finish()
    }
}

/// The query of an image download; absent or malformed values are judged by [`ImageUrls::check`].
#[derive(Debug, Default, Deserialize)]
pub struct Signature {
    pub expires: Option<String>,
    pub sig: Option<String>,
}

impl ImageUrls {
    /// Plain urls.
    pub fn unsigned() -> Self {
        ImageUrls::default()
    }

    /// Urls signed with `key`, valid for `ttl`. HMAC takes keys of any length, so this fails
    /// only if that ever changes; the caller stops rather than serve unsigned urls.
    pub fn signed(key: &[u8], ttl: Duration) -> Result<Self, hmac::digest::InvalidLength> {
        let mac = HmacSha256::new_from_slice(key)?;
        Ok(ImageUrls {
            signer: Some(Signer { mac, ttl }),
        })
    }

    pub fn is_signed(&self) -> bool {
        self.signer.is_some()
    }

    /// The url of image `id` under `base` (no trailing slash), signed when a key is set.
    pub fn image_url(&self, base: &str, id: &str) -> String {
        self.image_url_at(base, id, unix_now())
    }

    fn image_url_at(&self, base: &str, id: &str, now: u64) -> String {
        let url = format!("{base}/v1/images/data/{id}");
        match &self.signer {
            None => url,
            Some(signer) => {
                let expires = now.saturating_add(signer.ttl.as_secs());
                let sig = hex::encode(signer.mac(id, expires).finalize().into_bytes());
                format!("{url}?expires={expires}&sig={sig}")
            }
        }
    }

    /// Checks a download of `id`; returns the seconds the url stays valid (`None`: unsigned
    /// urls, valid as long as the image exists).
    pub fn check(&self, id: &str, signature: &Signature) -> Result<Option<u64>, ApiError> {
        self.check_at(id, signature, unix_now())
    }

    fn check_at(&self, id: &str, signature: &Signature, now: u64) -> Result<Option<u64>, ApiError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let (Some(expires), Some(sig)) = (&signature.expires, &signature.sig) else {
            return Err(ApiError::InvalidSignature(
                "this image url must be signed: it needs the expires and sig parameters it was \
                 handed out with"
                    .to_string(),
            ));
        };
        let bad = || ApiError::InvalidSignature("the image url's signature is not valid".into());
        let expires: u64 = expires.parse().map_err(|_| bad())?;
        let sig = hex::decode(sig).map_err(|_| bad())?;
        // verify_slice compares in constant time.
        signer
            .mac(id, expires)
            .verify_slice(&sig)
            .map_err(|_| bad())?;
        if expires <= now {
            return Err(ApiError::UrlExpired);
        }
        Ok(Some(expires - now))
    }
}

impl Signer {
    fn mac(&self, id: &str, expires: u64) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(format!("{id}|{expires}").as_bytes());
        mac
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef.png";
    const NOW: u64 = 1_800_000_000;

    /// Splits a signed url into its path and signature.
    fn split(url: &str) -> (&str, Signature) {
        let (path, query) = url.split_once('?').expect("signed url");
        let mut signature = Signature::default();
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("expires", v)) => signature.expires = Some(v.to_string()),
                Some(("sig", v)) => signature.sig = Some(v.to_string()),
                _ => panic!("unexpected {pair}"),
            }
        }
        (path, signature)
    }

    fn kind(result: Result<Option<u64>, ApiError>) -> &'static str {
        result.map_or_else(|e| e.kind(), |_| "ok")
    }

    #[test]
    fn unsigned_urls_are_plain_and_always_valid() {
        let urls = ImageUrls::unsigned();
        assert_eq!(
            urls.image_url("https://img.example/ff", ID),
            format!("https://img.example/ff/v1/images/data/{ID}")
        );
        assert_eq!(urls.check(ID, &Signature::default()).ok(), Some(None));
    }

    #[test]
    fn signed_urls_verify_until_they_expire() {
        let urls = ImageUrls::signed(b"0123456789abcdef", Duration::from_secs(600))
            .expect("any key length");
        let url = urls.image_url_at("http://gw", ID, NOW);
        let (path, signature) = split(&url);
        assert_eq!(path, format!("http://gw/v1/images/data/{ID}"));
        assert_eq!(signature.expires.as_deref(), Some("1800000600"));
        assert_eq!(signature.sig.as_ref().map(String::len), Some(64));
        assert_eq!(urls.check_at(ID, &signature, NOW).ok(), Some(Some(600)));
        assert_eq!(urls.check_at(ID, &signature, NOW + 599).ok(), Some(Some(1)));
        assert_eq!(
            kind(urls.check_at(ID, &signature, NOW + 600)),
            "url_expired"
        );

        // Another replica with the same key accepts it; another key does not.
        let same =
            ImageUrls::signed(b"0123456789abcdef", Duration::from_secs(1)).expect("any key length");
        assert_eq!(kind(same.check_at(ID, &signature, NOW)), "ok");
        let other = ImageUrls::signed(b"fedcba9876543210", Duration::from_secs(600))
            .expect("any key length");
        assert_eq!(
            kind(other.check_at(ID, &signature, NOW)),
            "invalid_signature"
        );
    }

    #[test]
    fn tampering_is_refused() {
        let urls = ImageUrls::signed(b"0123456789abcdef", Duration::from_secs(600))
            .expect("any key length");
        let (_, signature) = split(&urls.image_url_at("http://gw", ID, NOW));
        let other_id = "ffffffffffffffffffffffffffffffff.png";
        assert_eq!(
            kind(urls.check_at(other_id, &signature, NOW)),
            "invalid_signature"
        );
        let later = Signature {
            expires: Some("1900000000".into()),
            sig: signature.sig.clone(),
        };
        assert_eq!(kind(urls.check_at(ID, &later, NOW)), "invalid_signature");
        for (expires, sig) in [
            (None, signature.sig.clone()),
            (signature.expires.clone(), None),
            (Some("soon".into()), signature.sig.clone()),
            (signature.expires.clone(), Some("zz".into())),
            (signature.expires.clone(), Some(String::new())),
        ] {
            let signature = Signature { expires, sig };
            assert_eq!(
                kind(urls.check_at(ID, &signature, NOW)),
                "invalid_signature",
                "{signature:?}"
            );
        }
    }
}
