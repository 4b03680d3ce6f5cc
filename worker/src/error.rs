//! The worker's one error type at its boundaries (gRPC service and CLI).
//!
//! Every fallible path that reaches a client ends up here; `service.rs` converts it to a
//! `tonic::Status` in one place, the CLI prints it. Each variant has a stable machine-readable
//! `kind()` used in logs and metrics.

use std::path::PathBuf;

/// Everything that can go wrong in the worker, by who has to act on it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A request parameter is invalid; `param` names it as clients spell it.
    #[error("invalid value for '{param}': {message}")]
    InvalidArgument { param: String, message: String },
    /// A request names something this worker does not have (a LoRA, a scheduler).
    #[error("unknown {param} '{name}'")]
    NotFound { param: String, name: String },
    /// The task (generations, edits, variations) is disabled in this worker's config.
    #[error("{0} is disabled on this worker")]
    TaskDisabled(String),
    /// The queue is full; the caller should retry later or elsewhere.
    #[error("worker queue is full ({0} requests)")]
    QueueFull(usize),
    /// The model is still loading or the worker is draining.
    #[error("worker unavailable: {0}")]
    Unavailable(String),
    /// The caller went away before the request finished.
    #[error("request cancelled")]
    Cancelled,
    /// `model_config.json` is unreadable or has an invalid value; `key` is its dotted path.
    #[error("config {key}: {message}")]
    Config { key: String, message: String },
    /// Model files are missing or malformed. `source` is the repo id or directory, `file` the file
    /// inside it.
    #[error("model {source_name}: {file}: {message}")]
    ModelLoad {
        source_name: String,
        file: PathBuf,
        message: String,
    },
    /// A tensor operation failed; never the client's fault.
    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Anything else that is the worker's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    /// Stable name of the variant, for logs and metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            WorkerError::InvalidArgument { .. } => "invalid_argument",
            WorkerError::NotFound { .. } => "not_found",
            WorkerError::TaskDisabled(_) => "task_disabled",
            WorkerError::QueueFull(_) => "queue_full",
            WorkerError::Unavailable(_) => "unavailable",
            WorkerError::Cancelled => "cancelled",
            WorkerError::Config { .. } => "config",
            WorkerError::ModelLoad { .. } => "model_load",
            WorkerError::Tensor(_) => "tensor",
            WorkerError::Internal(_) => "internal",
        }
    }

    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::InvalidArgument {
            param: param.into(),
            message: message.into(),
        }
    }

    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        WorkerError::Config {
            key: key.into(),
            message: message.into(),
        }
    }

    pub fn model_load(
        source_name: impl Into<String>,
        file: impl Into<PathBuf>,
        message: impl std::fmt::Display,
    ) -> Self {
        WorkerError::ModelLoad {
            source_name: source_name.into(),
            file: file.into(),
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = WorkerError> = std::result::Result<T, E>;
