//! [`Sweeper`]: deletes url images once they are older than the TTL (FASTFUSION_IMAGE_TTL_SECS).
//!
//! Every interval it lists the store's prefix and deletes each image whose last modification
//! (the object's `last_modified`: file mtime or the S3 upload time) is more than the TTL ago.
//! Only direct children named like an image id are touched: anything else sharing the directory
//! or prefix stays. A failed listing or delete is logged and the next pass tries again; the task
//! never stops on an error. Several replicas may sweep one store: an image another replica
//! deleted first counts as deleted.
//!
//! Ages compare the gateway's clock with the store's; a store clock ahead of the gateway's only
//! keeps images longer.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use object_store::ObjectMeta;

use super::{parse_id, ObjectImageStore};

/// Deletes images older than `ttl` from one store.
#[derive(Debug, Clone)]
pub struct Sweeper {
    store: ObjectImageStore,
    /// Images at most this old are never deleted.
    ttl: Duration,
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Images deleted (or already gone).
    pub deleted: usize,
    /// Images not yet older than the TTL.
    pub kept: usize,
    /// Images whose delete failed; the next pass tries again.
    pub failed: usize,
    /// The listing failed, so the pass saw only part of the store (or nothing).
    pub listing_failed: bool,
}

impl Sweeper {
    pub fn new(store: ObjectImageStore, ttl: Duration) -> Self {
        Sweeper { store, ttl }
    }

    /// One pass, taking `now` as the current time.
    pub async fn sweep(&self, now: SystemTime) -> SweepReport {
        let mut report = SweepReport::default();
        let prefix = &self.store.prefix;
        // `None` lists the whole store: an empty prefix would be sent to S3 as "/".
        let scope = (!prefix.as_ref().is_empty()).then_some(prefix);
        let mut listing = self.store.store.list(scope);
        while let Some(entry) = listing.next().await {
            let meta = match entry {
                Ok(meta) => meta,
                Err(error) => {
                    let location = self.store.location();
                    tracing::warn!(location, %error, "image sweep: listing failed");
                    report.listing_failed = true;
                    break;
                }
            };
            if !self.is_image(&meta) {
                continue;
            }
            if !self.expired(&meta, now) {
                report.kept += 1;
                continue;
            }
            match self.store.store.delete(&meta.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => report.deleted += 1,
                Err(error) => {
                    tracing::warn!(image = %meta.location, %error, "image sweep: delete failed");
                    report.failed += 1;
                }
            }
        }
        report
    }

    /// Sweeps now and then every `interval`, for as long as the runtime runs.
    pub async fn run(self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        // After a slow pass, wait a whole interval rather than sweeping back to back.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let report = self.sweep(SystemTime::now()).await;
            tracing::debug!(?report, "image sweep done");
            if report.deleted > 0 {
                tracing::info!(
                    deleted = report.deleted,
                    kept = report.kept,
                    "old images deleted"
                );
            }
        }
    }

    /// A direct child of the prefix named like an id the store hands out.
    fn is_image(&self, meta: &ObjectMeta) -> bool {
        let Some(mut parts) = meta.location.prefix_match(&self.store.prefix) else {
            return false;
        };
        match (parts.next(), parts.next()) {
            (Some(name), None) => parse_id(name.as_ref()).is_some(),
            _ => false,
        }
    }

    fn expired(&self, meta: &ObjectMeta, now: SystemTime) -> bool {
        let modified = SystemTime::from(meta.last_modified);
        // A modification time in the future (clock skew) is young.
        now.duration_since(modified).is_ok_and(|age| age > self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use std::fmt;
    use std::ops::Range;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use futures::stream::BoxStream;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectStore, PutMultipartOptions,
        PutOptions, PutPayload, PutResult,
    };

    use super::*;
    use crate::openai::OutputFormat;
    use crate::storage::{ImageStore, StorageError};

    const HOUR: Duration = Duration::from_secs(3600);

    /// An in-memory bucket whose first `fail_lists` listings and first `fail_deletes` deletes
    /// fail, like a flaky network.
    #[derive(Debug, Default)]
    struct Flaky {
        inner: InMemory,
        fail_lists: AtomicUsize,
        fail_deletes: AtomicUsize,
    }

    /// Decrements `counter` if positive; true when this call should fail.
    fn take(counter: &AtomicUsize) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn injected() -> object_store::Error {
        object_store::Error::Generic {
            store: "flaky",
            source: "injected failure".into(),
        }
    }

    impl fmt::Display for Flaky {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "Flaky")
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Flaky {
        async fn put_opts(
            &self,
            location: &Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> object_store::Result<PutResult> {
            self.inner.put_opts(location, payload, opts).await
        }

        async fn put_multipart_opts(
            &self,
            location: &Path,
            opts: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(location, opts).await
        }

        async fn get_opts(
            &self,
            location: &Path,
            options: GetOptions,
        ) -> object_store::Result<GetResult> {
            self.inner.get_opts(location, options).await
        }

        async fn get_ranges(
            &self,
            location: &Path,
            ranges: &[Range<u64>],
        ) -> object_store::Result<Vec<Bytes>> {
            self.inner.get_ranges(location, ranges).await
        }

        async fn delete(&self, location: &Path) -> object_store::Result<()> {
            if take(&self.fail_deletes) {
                return Err(injected());
            }
            self.inner.delete(location).await
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            if take(&self.fail_lists) {
                return futures::stream::once(async { Err(injected()) }).boxed();
            }
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(
            &self,
            prefix: Option<&Path>,
        ) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }

        async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    fn store_over(bucket: Arc<Flaky>) -> ObjectImageStore {
        ObjectImageStore::new(bucket, Path::from("images"), "mem://images")
    }

    async fn put(store: &ObjectImageStore) -> String {
        store
            .put(Bytes::from_static(b"png"), OutputFormat::Png)
            .await
            .expect("put")
    }

    async fn exists(store: &ObjectImageStore, id: &str) -> bool {
        match store.get(id).await {
            Ok(_) => true,
            Err(StorageError::NotFound(_)) => false,
            Err(other) => panic!("unexpected {other}"),
        }
    }

    #[tokio::test]
    async fn deletes_only_images_older_than_the_ttl() {
        let bucket = Arc::new(Flaky::default());
        let store = store_over(bucket.clone());
        let ids = [put(&store).await, put(&store).await];
        // Not ours: other files under the prefix, a nested image-like key, and a key outside.
        let others = [
            "images/notes.txt",
            "images/nested/0123456789abcdef0123456789abcdef.png",
            "0123456789abcdef0123456789abcdef.png",
        ];
        for key in others {
            bucket
                .put(&Path::from(key), PutPayload::from_static(b"x"))
                .await
                .expect("put");
        }
        let sweeper = Sweeper::new(store.clone(), HOUR);
        let now = SystemTime::now();

        // Just written, and just under the TTL: young.
        for at in [now, now + HOUR - Duration::from_secs(1)] {
            let report = sweeper.sweep(at).await;
            assert_eq!((report.deleted, report.kept), (0, 2), "{report:?}");
        }
        for id in &ids {
            assert!(exists(&store, id).await);
        }

        let report = sweeper.sweep(now + HOUR + Duration::from_secs(2)).await;
        assert_eq!(
            report,
            SweepReport {
                deleted: 2,
                ..SweepReport::default()
            }
        );
        for id in &ids {
            assert!(!exists(&store, id).await, "{id} survived");
        }
        for key in others {
            assert!(bucket.head(&Path::from(key)).await.is_ok(), "{key} deleted");
        }
    }

    #[tokio::test]
    async fn failures_are_counted_and_the_next_pass_recovers() {
        let bucket = Arc::new(Flaky::default());
        let store = store_over(bucket.clone());
        let ids = [put(&store).await, put(&store).await, put(&store).await];
        let sweeper = Sweeper::new(store.clone(), HOUR);
        let later = SystemTime::now() + 2 * HOUR;

        bucket.fail_lists.store(1, Ordering::SeqCst);
        let report = sweeper.sweep(later).await;
        assert!(report.listing_failed, "{report:?}");
        assert_eq!(report.deleted, 0);

        bucket.fail_deletes.store(1, Ordering::SeqCst);
        let report = sweeper.sweep(later).await;
        assert_eq!((report.deleted, report.failed), (2, 1), "{report:?}");
        assert!(!report.listing_failed);

        let report = sweeper.sweep(later).await;
        assert_eq!((report.deleted, report.failed), (1, 0), "{report:?}");
        for id in &ids {
            assert!(!exists(&store, id).await);
        }
    }

    #[tokio::test]
    async fn the_task_keeps_sweeping_after_errors() {
        let bucket = Arc::new(Flaky::default());
        let store = store_over(bucket.clone());
        let id = put(&store).await;
        bucket.fail_lists.store(2, Ordering::SeqCst);
        bucket.fail_deletes.store(1, Ordering::SeqCst);
        // Any age is past a 1 ns TTL; the first passes fail, later ones must get there.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let task = tokio::spawn(
            Sweeper::new(store.clone(), Duration::from_nanos(1)).run(Duration::from_millis(5)),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while exists(&store, &id).await {
            assert!(tokio::time::Instant::now() < deadline, "never deleted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!task.is_finished(), "the task must outlive errors");
        assert_eq!(bucket.fail_lists.load(Ordering::SeqCst), 0);
        assert_eq!(bucket.fail_deletes.load(Ordering::SeqCst), 0);
        task.abort();
    }

    #[tokio::test]
    async fn a_local_directory_is_swept_by_file_age() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = ObjectImageStore::directory(dir.path()).expect("open");
        let id = put(&store).await;
        std::fs::write(dir.path().join("keep.txt"), b"x").expect("write");
        let sweeper = Sweeper::new(store.clone(), HOUR);
        assert_eq!(sweeper.sweep(SystemTime::now()).await.kept, 1);
        let report = sweeper.sweep(SystemTime::now() + 2 * HOUR).await;
        assert_eq!(report.deleted, 1, "{report:?}");
        assert!(!dir.path().join(&id).exists());
        assert!(dir.path().join("keep.txt").exists());
    }
}
