//! [`AppState`]: what every handler reaches through `State<AppState>` (the worker pool, the image
//! store, keys, url signing, the concurrency limit) and [`HttpSettings`]. Set once at start-up by
//! `main.rs` (or a test) and handed to [`crate::app::router`]; handlers depend on this module,
//! never on the one that builds the router.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::ApiKeys;
use crate::concurrency::ConcurrencyLimit;
use crate::image_urls::ImageUrls;
use crate::storage::ImageStore;
use crate::workers::WorkerPool;

/// What every handler can reach. Cheap to clone: all shared behind `Arc`s, set once at start-up.
#[derive(Clone)]
pub struct AppState {
    pub workers: Arc<dyn WorkerPool>,
    pub images: Arc<dyn ImageStore>,
    pub http: Arc<HttpSettings>,
    /// Keys the image endpoints and `/v1/models` ask for (none: open).
    pub api_keys: Arc<ApiKeys>,
    /// Builds (and signs) image urls; checks downloads.
    pub urls: Arc<ImageUrls>,
    /// Generation requests running at once on this gateway.
    pub concurrency: Arc<ConcurrencyLimit>,
}

/// The HTTP side's settings.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// BASE_URL without trailing slash; `None`: urls follow the request's host.
    pub base_url: Option<String>,
    /// Longest a generation may take, queueing included.
    pub request_timeout: Duration,
    /// Largest request body, in bytes (uploads included).
    pub max_body_bytes: usize,
    /// Most pixels an uploaded image or mask may declare.
    pub max_input_pixels: u64,
    /// Unix seconds at start-up; reported as the models' `created`.
    pub started_at: u64,
}
