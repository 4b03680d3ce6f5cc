//! Where `response_format: url` images live between generation and download.
//!
//! [`ImageStore`] is the seam (`Arc<dyn ImageStore>` in the app state; an S3 store comes later).
//! [`LocalImageStore`] keeps files in one directory (IMAGE_DATA_PATH), shared by every gateway
//! replica that mounts it. Ids are 128 random bits as 32 lowercase hex digits plus the format's
//! extension, so they cannot be guessed; reads accept nothing else, so no path can escape the
//! directory. Writes go to a temporary file in the same directory, are fsynced and then renamed
//! over the final name, so a reader never sees half an image.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::openai::OutputFormat;

/// Hex digits in an image id (128 bits).
const ID_HEX_LEN: usize = 32;
/// Temporary files start with this, which no valid id does, so they are never served.
const TEMP_PREFIX: &str = ".tmp-";

/// Failures of an [`ImageStore`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The id is not of the form the store hands out.
    #[error("invalid image id '{0}'")]
    InvalidId(String),
    #[error("image '{0}' not found")]
    NotFound(String),
    /// `cause` is part of the message (not a `source`), so error chains print it once.
    #[error("image store {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A stored image as served back.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredImage {
    pub bytes: Bytes,
    pub format: OutputFormat,
}

/// Image storage shared by gateway replicas.
#[async_trait::async_trait]
pub trait ImageStore: Send + Sync {
    /// Stores encoded image bytes and returns the new file id (`<32 hex>.<ext>`).
    async fn put(&self, bytes: Bytes, format: OutputFormat) -> Result<String, StorageError>;
    /// Reads an image back by the id `put` returned.
    async fn get(&self, id: &str) -> Result<StoredImage, StorageError>;
}

/// An [`ImageStore`] over a local (or mounted) directory.
#[derive(Debug, Clone)]
pub struct LocalImageStore {
    dir: PathBuf,
}

impl LocalImageStore {
    /// Creates the directory if needed and checks that it is a writable directory, so a bad
    /// IMAGE_DATA_PATH stops start-up instead of failing the first request.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let dir = dir.into();
        let io = |cause| StorageError::Io {
            path: dir.clone(),
            cause,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let probe = dir.join(format!("{TEMP_PREFIX}probe-{}", random_hex()));
        std::fs::write(&probe, b"").map_err(io)?;
        std::fs::remove_file(&probe).map_err(io)?;
        Ok(LocalImageStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[async_trait::async_trait]
impl ImageStore for LocalImageStore {
    async fn put(&self, bytes: Bytes, format: OutputFormat) -> Result<String, StorageError> {
        let id = format!("{}.{}", random_hex(), format.extension());
        let dir = self.dir.clone();
        let final_name = id.clone();
        // Blocking file I/O (fsync can take long) stays off the async runtime's threads.
        tokio::task::spawn_blocking(move || write_atomically(&dir, &final_name, &bytes))
            .await
            .map_err(|join| StorageError::Io {
                path: self.dir.clone(),
                cause: std::io::Error::other(join.to_string()),
            })??;
        Ok(id)
    }

    async fn get(&self, id: &str) -> Result<StoredImage, StorageError> {
        let format = parse_id(id).ok_or_else(|| StorageError::InvalidId(id.to_string()))?;
        let path = self.dir.join(id);
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(StoredImage {
                bytes: Bytes::from(data),
                format,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(StorageError::NotFound(id.to_string()))
            }
            Err(cause) => Err(StorageError::Io { path, cause }),
        }
    }
}

/// Writes `bytes` as `dir/name` so that the file appears whole or not at all.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let temp = dir.join(format!("{TEMP_PREFIX}{name}"));
    let target = dir.join(name);
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temp, &target)
    })();
    result.map_err(|cause| {
        // Best effort: a leftover temp file is never served, but should not pile up.
        let _ = std::fs::remove_file(&temp);
        StorageError::Io {
            path: target,
            cause,
        }
    })
}

/// 128 random bits as 32 lowercase hex digits (ThreadRng is a CSPRNG).
fn random_hex() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// The format of a well-formed id (`[0-9a-f]{32}\.(png|jpg|webp)`), `None` for anything else.
fn parse_id(id: &str) -> Option<OutputFormat> {
    let (stem, extension) = id.split_once('.')?;
    let hex = stem.len() == ID_HEX_LEN
        && stem
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !hex {
        return None;
    }
    OutputFormat::from_extension(extension)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_then_get_round_trips() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalImageStore::open(dir.path().join("images")).expect("open");
        let id = store
            .put(Bytes::from_static(b"jpeg bytes"), OutputFormat::Jpeg)
            .await
            .expect("put");
        assert!(id.ends_with(".jpg"), "{id}");
        assert_eq!(parse_id(&id), Some(OutputFormat::Jpeg));
        let image = store.get(&id).await.expect("get");
        assert_eq!(image.bytes.as_ref(), b"jpeg bytes");
        assert_eq!(image.format.content_type(), "image/jpeg");
        // Only the image is left behind: no temp files.
        let names: Vec<_> = std::fs::read_dir(store.dir())
            .expect("read_dir")
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(&id)]);
    }

    #[tokio::test]
    async fn ids_are_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalImageStore::open(dir.path()).expect("open");
        let a = store
            .put(Bytes::new(), OutputFormat::Png)
            .await
            .expect("put");
        let b = store
            .put(Bytes::new(), OutputFormat::Png)
            .await
            .expect("put");
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn malformed_ids_are_refused_before_touching_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("secret.png"), b"x").expect("write");
        let store = LocalImageStore::open(dir.path().join("images")).expect("open");
        let good_hex = "0123456789abcdef0123456789abcdef";
        for id in [
            "../secret.png",
            "secret.png",
            &format!("{good_hex}.gif"),
            &format!("{}.png", good_hex.to_uppercase()),
            &format!("{good_hex}0.png"),
            &format!("../images/{good_hex}.png"),
            &format!(".tmp-{good_hex}.png"),
            &format!("{good_hex}.png/"),
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

    #[test]
    fn open_fails_clearly_on_a_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("write");
        let error = LocalImageStore::open(&file).expect_err("must fail");
        assert!(error.to_string().contains("not-a-dir"), "{error}");
    }
}
