//! The gRPC contract between the FastFusion gateway and its workers.
//!
//! Generated at build time from `proto/fastfusion/worker/v1/worker.proto`, which documents every
//! message and field. The gateway uses the client, the worker implements the server.

/// `fastfusion.worker.v1`: the worker service.
pub mod worker {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("fastfusion.worker.v1");
}

pub use worker::*;

/// gRPC metadata key naming the request parameter an INVALID_ARGUMENT or NOT_FOUND status is about.
pub const PARAM_METADATA_KEY: &str = "ff-param";
