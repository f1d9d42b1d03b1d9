//! The engine's error type: every message names the operation and the values involved.

use crate::gguf::GgufError;
use crate::tensor::{DType, Shape};

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no GPU adapter found ({0})")]
    NoAdapter(String),
    #[error("could not open the GPU device on {adapter}: {reason}")]
    RequestDevice { adapter: String, reason: String },
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("{op}: {what} has dtype {got:?}, expected {expected}")]
    DType { op: &'static str, what: &'static str, got: DType, expected: &'static str },
    #[error("{op}: {bytes} bytes exceeds the adapter's limit of {limit} bytes ({which})")]
    TooLarge { op: &'static str, bytes: u64, limit: u64, which: &'static str },
    #[error("{op}: {detail}")]
    Unsupported { op: &'static str, detail: String },
    #[error("reading back a tensor of shape {shape} failed: {reason}")]
    Readback { shape: Shape, reason: String },
    #[error("the GPU reported an error: {0}")]
    Device(String),
}

impl EngineError {
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        EngineError::Shape { op, detail: detail.into() }
    }
}

/// Loading or running a model: every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("{file}: {problem}")]
    Invalid { file: String, problem: String },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl ModelError {
    pub(crate) fn invalid(file: &str, problem: impl Into<String>) -> ModelError {
        ModelError::Invalid { file: file.to_string(), problem: problem.into() }
    }
}
