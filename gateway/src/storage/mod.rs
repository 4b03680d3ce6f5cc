//! Where `response_format: url` images live between generation and download.
//!
//! ```text
//! mod.rs      ImageStore (the seam in AppState), StorageError, image ids
//! object.rs   ObjectImageStore: IMAGE_DATA_PATH, a directory or an S3 bucket, via object_store
//! sweeper.rs  Sweeper: deletes images older than the TTL, every interval
//! ```
//!
//! Every gateway replica writes to and reads from the same place, so an image stored by one is
//! served by any other. Ids are 128 random bits as 32 lowercase hex digits plus the format's
//! extension, so they cannot be guessed; reads accept nothing else, so no key can leave the
//! store's directory or prefix. Writes appear whole or not at all.

mod object;
mod sweeper;

use bytes::Bytes;

use crate::openai::OutputFormat;

pub use object::{ObjectImageStore, StorageLocation};
pub use sweeper::{SweepReport, Sweeper};

/// Hex digits in an image id (128 bits).
const ID_HEX_LEN: usize = 32;

/// Failures of an [`ImageStore`].
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The id is not of the form the store hands out.
    #[error("invalid image id '{0}'")]
    InvalidId(String),
    #[error("image '{0}' not found")]
    NotFound(String),
    /// The store itself failed (disk, network, credentials, missing bucket). `location` is
    /// IMAGE_DATA_PATH as configured; `cause` is part of the message (not a `source`), so error
    /// chains print it once.
    #[error("image store {location}: {cause}")]
    Backend {
        location: String,
        cause: Box<dyn std::error::Error + Send + Sync>,
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
    /// Stores encoded image bytes and returns the new image id (`<32 hex>.<ext>`).
    async fn put(&self, bytes: Bytes, format: OutputFormat) -> Result<String, StorageError>;
    /// Reads an image back by the id `put` returned.
    async fn get(&self, id: &str) -> Result<StoredImage, StorageError>;
}

/// A fresh id: 128 random bits (ThreadRng is a CSPRNG) and the format's extension.
fn new_id(format: OutputFormat) -> String {
    format!("{:032x}.{}", rand::random::<u128>(), format.extension())
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

    #[test]
    fn new_ids_parse_and_differ() {
        let a = new_id(OutputFormat::Jpeg);
        let b = new_id(OutputFormat::Jpeg);
        assert_ne!(a, b);
        assert!(a.ends_with(".jpg"), "{a}");
        assert_eq!(parse_id(&a), Some(OutputFormat::Jpeg));
        assert_eq!(
            parse_id(&new_id(OutputFormat::Webp)),
            Some(OutputFormat::Webp)
        );
    }

    #[test]
    fn only_well_formed_ids_parse() {
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_id(&format!("{hex}.png")), Some(OutputFormat::Png));
        for id in [
            "../secret.png".to_string(),
            "secret.png".to_string(),
            format!("{hex}.gif"),
            format!("{}.png", hex.to_uppercase()),
            format!("{hex}0.png"),
            format!("{hex}.png/"),
            format!(".tmp-{hex}.png"),
            format!("{hex}.png#1"),
        ] {
            assert_eq!(parse_id(&id), None, "{id}");
        }
    }
}
