//! The one error type of the weights crate: every bad file ends here, never in a panic.

use std::path::PathBuf;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// No model was found where one was expected.
    #[error(
        "no model at {0}: expected a .gguf file or a directory with config.json and *.safetensors"
    )]
    NotFound(PathBuf),
    /// The file's contents are not what its format requires.
    #[error("{path}: corrupt or truncated file: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A tensor's data type is not one convoy computes with.
    #[error("unsupported tensor data type {dtype} for tensor {tensor}")]
    UnsupportedDType {
        /// The data type as the file names it.
        dtype: String,
        /// The tensor.
        tensor: String,
    },
    /// The model's architecture is not one convoy implements.
    #[error(
        "unsupported architecture {0:?}: convoy runs llama, mistral, smollm2 and qwen2 models"
    )]
    UnsupportedArchitecture(String),
    /// The config is missing a field or has a wrong value.
    #[error("invalid model config: {0}")]
    InvalidConfig(String),
    /// A tensor the architecture needs is absent or has the wrong shape.
    #[error("tensor {name}: {reason}")]
    BadTensor {
        /// The tensor's Hugging Face name.
        name: String,
        /// What was wrong.
        reason: String,
    },
    /// The tokenizer could not be built or loaded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The chat template could not be compiled or rendered.
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

impl WeightsError {
    pub(crate) fn corrupt(path: &std::path::Path, reason: impl Into<String>) -> Self {
        WeightsError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        WeightsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
