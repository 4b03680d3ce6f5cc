//! FastFusion's gateway: the OpenAI Images API over HTTP in front of gRPC model workers.
//!
//! A request flows top to bottom:
//!
//! ```text
//! app.rs          router + middleware (request id, tracing, body limit); AppState
//! routes/         handlers: generations, edits, variations, image data, models, health/ready
//! extract.rs      JSON bodies → OpenAI types, rejections as ApiError
//! form.rs         edit/variation bodies (multipart or JSON) → request + uploads
//! uploads.rs      uploaded images: data URLs, format sniffing, pixel limit, decode check
//! openai.rs       the OpenAI wire types (requests, responses, model list)
//! validation.rs   raw request + the model's Info → ValidGeneration (or a 400 naming the param)
//! workers.rs      WorkerPool: model resolution, Info polling, readiness, the Generate stream
//! storage.rs      ImageStore: where url images live (a local directory for now)
//! public_url.rs   BASE_URL or the request's host → image urls
//! error.rs        ApiError → OpenAI's error body and status, in one place
//! config.rs       flags and environment → validated Settings
//! ```
//!
//! The gateway holds no per-request state beyond the request: any number of replicas can share
//! one image directory. `main.rs` is the `fastfusion-gateway` binary.

pub mod app;
pub mod config;
pub mod error;
pub mod extract;
pub mod form;
pub mod openai;
pub mod public_url;
pub mod routes;
pub mod storage;
pub mod uploads;
pub mod validation;
pub mod workers;

pub use app::{router, AppState, HttpSettings};
pub use error::ApiError;
