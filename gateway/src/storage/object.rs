//! [`ObjectImageStore`]: the [`ImageStore`] over the `object_store` crate, so a local directory
//! and an S3-compatible bucket behave alike.
//!
//! IMAGE_DATA_PATH picks the backend ([`StorageLocation`]): a path is a directory (created if
//! missing; a volume several replicas mount), `s3://bucket/prefix` a bucket, reached with the
//! usual AWS variables (AWS_REGION, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//! AWS_SESSION_TOKEN, or the pod's own identity). Images are `<prefix>/<id>` objects.
//!
//! Atomicity comes from the backends: an S3 PUT is all or nothing, and the local backend writes
//! a staging file (`<id>#<n>`, never listed or served) that it renames over the final name.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, PutPayload, RetryConfig};

use super::{new_id, parse_id, ImageStore, StorageError, StoredImage};
use crate::openai::OutputFormat;

/// S3 requests are retried a few times, within a bound well under the request timeout: an
/// unreachable store should fail start-up or a request in seconds, not minutes.
const S3_MAX_RETRIES: usize = 3;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where IMAGE_DATA_PATH points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageLocation {
    /// A local or mounted directory.
    Directory(PathBuf),
    /// An S3-compatible bucket; `prefix` has no leading or trailing `/` and may be empty.
    S3 { bucket: String, prefix: String },
}

impl StorageLocation {
    /// `s3://bucket[/prefix]` or a directory path; other schemes are refused rather than taken
    /// for a directory named `gs:`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("must not be empty".to_string());
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let bucket_ok = !bucket.is_empty()
                && bucket
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !bucket_ok {
                return Err(format!(
                    "'{text}' has no valid bucket name; expected s3://bucket/prefix"
                ));
            }
            let prefix = prefix.trim_matches('/');
            Path::parse(prefix).map_err(|e| format!("'{text}' has an invalid prefix: {e}"))?;
            return Ok(StorageLocation::S3 {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
            });
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(format!(
                "unsupported scheme '{scheme}://'; use a directory or s3://bucket/prefix"
            ));
        }
        Ok(StorageLocation::Directory(PathBuf::from(text)))
    }
}

impl fmt::Display for StorageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageLocation::Directory(dir) => write!(f, "{}", dir.display()),
            StorageLocation::S3 { bucket, prefix } if prefix.is_empty() => {
                write!(f, "s3://{bucket}")
            }
            StorageLocation::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// An [`ImageStore`] over any object store. Cheap to clone; clones share the connection pool.
#[derive(Debug, Clone)]
pub struct ObjectImageStore {
    /// The bucket or directory.
    pub(super) store: Arc<dyn ObjectStore>,
    /// Key prefix the images live under; empty for a directory (the store is rooted there).
    pub(super) prefix: Path,
    /// IMAGE_DATA_PATH as configured, for error messages.
    location: Arc<str>,
    /// The directory of a local store: its new images are fsynced before `put` returns.
    local_dir: Option<Arc<PathBuf>>,
}

impl ObjectImageStore {
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, location: impl Into<Arc<str>>) -> Self {
        ObjectImageStore {
            store,
            prefix,
            location: location.into(),
            local_dir: None,
        }
    }

    /// Opens IMAGE_DATA_PATH and proves it writable by writing and deleting a probe object, so
    /// a wrong path, bucket, endpoint or credential stops start-up instead of the first request.
    pub async fn open(location: &StorageLocation) -> Result<Self, StorageError> {
        let store = match location {
            StorageLocation::Directory(dir) => Self::directory(dir)?,
            StorageLocation::S3 { bucket, prefix } => Self::s3(bucket, prefix, location)?,
        };
        store.probe().await?;
        Ok(store)
    }

    /// A store over `dir`, created if missing (no probe: see [`ObjectImageStore::open`]).
    pub fn directory(dir: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let dir = dir.into();
        let location = dir.display().to_string();
        let fail = |cause: Box<dyn std::error::Error + Send + Sync>| StorageError::Backend {
            location: location.clone(),
            cause,
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(Box::new(e)))?;
        let store = LocalFileSystem::new_with_prefix(&dir).map_err(|e| fail(Box::new(e)))?;
        Ok(ObjectImageStore {
            local_dir: Some(Arc::new(dir)),
            ..Self::new(Arc::new(store), Path::default(), location)
        })
    }

    fn s3(bucket: &str, prefix: &str, location: &StorageLocation) -> Result<Self, StorageError> {
        let fail = |cause: object_store::Error| StorageError::Backend {
            location: location.to_string(),
            cause: Box::new(cause),
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: S3_MAX_RETRIES,
                retry_timeout: S3_RETRY_TIMEOUT,
            });
        // An http:// AWS_ENDPOINT_URL (MinIO or another in-cluster store) is an explicit choice;
        // object_store would otherwise refuse it without AWS_ALLOW_HTTP.
        let plain_http = builder
            .get_config_value(&AmazonS3ConfigKey::Endpoint)
            .is_some_and(|endpoint| endpoint.starts_with("http://"));
        if plain_http {
            builder = builder.with_allow_http(true);
        }
        let store = builder.build().map_err(fail)?;
        let prefix = Path::parse(prefix).map_err(|e| fail(e.into()))?;
        Ok(Self::new(Arc::new(store), prefix, location.to_string()))
    }

    /// IMAGE_DATA_PATH as configured.
    pub fn location(&self) -> &str {
        &self.location
    }

    async fn probe(&self) -> Result<(), StorageError> {
        let probe = self.path(&format!(".probe-{:032x}", rand::random::<u128>()));
        self.store
            .put(&probe, PutPayload::new())
            .await
            .map_err(|e| self.backend(e))?;
        self.store.delete(&probe).await.map_err(|e| self.backend(e))
    }

    fn path(&self, name: &str) -> Path {
        self.prefix.child(name)
    }

    pub(super) fn backend(&self, cause: object_store::Error) -> StorageError {
        StorageError::Backend {
            location: self.location.to_string(),
            cause: Box::new(cause),
        }
    }
}

#[async_trait::async_trait]
impl ImageStore for ObjectImageStore {
    async fn put(&self, bytes: Bytes, format: OutputFormat) -> Result<String, StorageError> {
        let id = new_id(format);
        self.store
            .put(&self.path(&id), PutPayload::from(bytes))
            .await
            .map_err(|e| self.backend(e))?;
        if let Some(dir) = &self.local_dir {
            // LocalFileSystem renames its staging file into place without fsyncing: flush the
            // file and the directory entry before the url is handed out, so an image a client was
            // told about survives a power loss (S3 acknowledges a PUT only once it is durable).
            let (dir, name) = (Arc::clone(dir), id.clone());
            let synced = tokio::task::spawn_blocking(move || {
                std::fs::File::open(dir.join(&name))?.sync_all()?;
                std::fs::File::open(dir.as_path())?.sync_all()
            })
            .await;
            let failed = match synced {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(e) => Some(std::io::Error::other(e)),
            };
            if let Some(cause) = failed {
                return Err(StorageError::Backend {
                    location: self.location.to_string(),
                    cause: Box::new(cause),
                });
            }
        }
        Ok(id)
    }

    async fn get(&self, id: &str) -> Result<StoredImage, StorageError> {
        let format = parse_id(id).ok_or_else(|| StorageError::InvalidId(id.to_string()))?;
        let found = match self.store.get(&self.path(id)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(StorageError::NotFound(id.to_string()))
            }
            Err(e) => return Err(self.backend(e)),
        };
        let bytes = found.bytes().await.map_err(|e| self.backend(e))?;
        Ok(StoredImage { bytes, format })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[tokio::test]
    async fn put_then_get_round_trips_leaving_only_the_image() {
        let dir = tempfile::tempdir().expect("tempdir");
        let images = dir.path().join("images");
        let store = ObjectImageStore::open(&StorageLocation::Directory(images.clone()))
            .await
            .expect("open");
        let id = store
            .put(Bytes::from_static(b"jpeg bytes"), OutputFormat::Jpeg)
            .await
            .expect("put");
        assert!(id.ends_with(".jpg"), "{id}");
        let image = store.get(&id).await.expect("get");
        assert_eq!(image.bytes.as_ref(), b"jpeg bytes");
        assert_eq!(image.format.content_type(), "image/jpeg");
        // Only the image is left behind: no staging file, no probe.
        let names: Vec<_> = std::fs::read_dir(&images)
            .expect("read_dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(&id)]);
    }

    #[tokio::test]
    async fn malformed_ids_are_refused_before_touching_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret.png"), b"x").expect("write");
        let store = ObjectImageStore::directory(dir.path().join("images")).expect("open");
        let good_hex = "0123456789abcdef0123456789abcdef";
        for id in [
            "../secret.png",
            "secret.png",
            &format!("{good_hex}.gif"),
            &format!("{}.png", good_hex.to_uppercase()),
            &format!("../images/{good_hex}.png"),
            &format!(".tmp-{good_hex}.png"),
            &format!("{good_hex}.png#1"),
        ] {
            assert!(
                matches!(store.get(id).await, Err(StorageError::InvalidId(_))),
                "{id}"
            );
        }
        assert!(matches!(
            store.get(&format!("{good_hex}.png")).await,
            Err(StorageError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn one_replica_writes_another_reads() {
        // Two stores over one directory, and two over one bucket under a prefix: what two
        // gateway replicas see.
        let dir = tempfile::tempdir().expect("tempdir");
        let a = ObjectImageStore::directory(dir.path()).expect("open");
        let b = ObjectImageStore::directory(dir.path()).expect("open");
        let id = a
            .put(Bytes::from_static(b"png"), OutputFormat::Png)
            .await
            .expect("put");
        assert_eq!(b.get(&id).await.expect("get").bytes.as_ref(), b"png");

        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let a = ObjectImageStore::new(bucket.clone(), Path::from("ff/images"), "mem");
        let b = ObjectImageStore::new(bucket.clone(), Path::from("ff/images"), "mem");
        let id = a
            .put(Bytes::from_static(b"webp"), OutputFormat::Webp)
            .await
            .expect("put");
        assert_eq!(b.get(&id).await.expect("get").bytes.as_ref(), b"webp");
        let key = Path::from(format!("ff/images/{id}"));
        assert!(bucket.head(&key).await.is_ok(), "stored under the prefix");
    }

    #[tokio::test]
    async fn open_fails_clearly_on_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let error = ObjectImageStore::open(&StorageLocation::Directory(file))
            .await
            .expect_err("must fail");
        assert!(error.to_string().contains("not-a-dir"), "{error}");
    }

    #[test]
    fn locations_parse() {
        assert_eq!(
            StorageLocation::parse("/data"),
            Ok(StorageLocation::Directory("/data".into()))
        );
        let s3 = StorageLocation::parse("s3://images/ff/prod/").expect("valid");
        assert_eq!(
            s3,
            StorageLocation::S3 {
                bucket: "images".into(),
                prefix: "ff/prod".into()
            }
        );
        assert_eq!(s3.to_string(), "s3://images/ff/prod");
        let bare = StorageLocation::parse("s3://images").expect("valid");
        assert_eq!(bare.to_string(), "s3://images");
        for bad in [
            "",
            "  ",
            "s3://",
            "s3:///prefix",
            "s3://bad bucket/x",
            "gs://b/p",
        ] {
            assert!(StorageLocation::parse(bad).is_err(), "{bad}");
        }
    }
}
