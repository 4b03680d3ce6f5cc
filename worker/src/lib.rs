//! FastFusion's model worker: one diffusion model on candle behind a gRPC service.
//!
//! Data flows top to bottom:
//!
//! ```text
//! service.rs     gRPC adapter: GenerateRequest → ValidJob, WorkerError → tonic::Status, grpc.health.v1
//! engine.rs      the job actor: bounded FIFO queue, dynamic batching of compatible jobs, one model
//!                thread, progress, previews and cancellation
//! pipelines/     text-to-image, image-to-image and inpainting on the loaded model
//! models/        unet, vae, clip text encoder, tokenizer — built from diffusers config.json files
//! schedulers/    the denoising step rules, each matching its diffusers class
//! rng.rs         torch's CPU generator, so a seed gives the same noise as diffusers
//! inputs.rs      uploaded images and masks → validated, resized pixels
//! encode.rs      RGB pixels → PNG / JPEG / WebP bytes
//! vision.rs      a vision model's description as the prompt of a variation without one
//! lora/          LoRA adapters: files of every format, per-request sets applied unfused
//! config.rs      model_config.json (the seed's schema) · hub.rs model resolution · device.rs
//! ```
//!
//! `embedded.rs` runs the same service in-process for the gateway's single-machine default;
//! `main.rs` is the `fastfusion-worker` CLI (serve, generate, bench).

pub mod backend;
pub mod bench;
pub mod config;
pub mod device;
pub mod embedded;
pub mod encode;
pub mod engine;
pub mod error;
pub mod hub;
pub mod inputs;
pub mod lora;
pub mod metrics;
pub mod models;
pub mod pipelines;
pub mod rng;
pub mod schedulers;
pub mod service;
pub mod startup;
pub mod vision;
