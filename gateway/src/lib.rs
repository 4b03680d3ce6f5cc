//! FastFusion's gateway: the OpenAI Images API over HTTP in front of gRPC model workers.
//!
//! A request flows top to bottom:
//!
//! ```text
//! app.rs          router + middleware (request id, tracing, body limit, draining)
//! state.rs        AppState (the seams handlers reach) and HttpSettings
//! drain.rs        a refused request's unread body is read before the answer, so it arrives
//! routes/         handlers: generations, edits, variations, image data, models, health/ready,
//!                 the playground page (its files in gateway/static/, compiled in)
//! extract.rs      JSON bodies → OpenAI types, rejections as ApiError
//! form.rs         edit/variation bodies (multipart or JSON) → request + uploads
//! uploads.rs      uploaded images: data URLs, format sniffing, pixel limit, decode check
//! openai.rs       the OpenAI wire types (requests, responses, model list)
//! validation.rs   raw request + the model's Info → ValidGeneration (or a 400 naming the param)
//! workers/        WorkerPool: discovery (DNS), routing by model, balancing and failover
//! storage/        ImageStore: url images in a directory or S3 bucket; the TTL sweeper
//! image_urls.rs   image urls, signed with an expiry when FASTFUSION_URL_SIGNING_KEY is set
//! auth.rs         API keys (Authorization: Bearer) on the image endpoints and /v1/models
//! concurrency.rs  FASTFUSION_MAX_CONCURRENT_REQUESTS: 429 beyond it
//! public_url.rs   BASE_URL or the request's host → image urls
//! error.rs        ApiError → OpenAI's error body and status, in one place
//! config.rs       flags and environment → validated Settings
//! metrics.rs      Prometheus metrics: request middleware, /metrics, generation and worker series
//! telemetry.rs    request spans joined to the client's W3C trace; trace context into gRPC calls
//! openapi.rs      the OpenAPI document (utoipa), served at /openapi.json, committed in docs/
//! ```
//!
//! The gateway holds no per-request state beyond the request: any number of replicas can share
//! one image directory or bucket. `main.rs` is the `fastfusion-gateway` binary.

pub mod app;
pub mod auth;
pub mod concurrency;
pub mod config;
pub mod drain;
pub mod error;
pub mod extract;
pub mod form;
pub mod image_urls;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod public_url;
pub mod routes;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod uploads;
pub mod validation;
pub mod workers;

pub use app::router;
pub use error::ApiError;
pub use state::{AppState, HttpSettings};
