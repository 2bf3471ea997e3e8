//! Why a workload spec or trace was refused.

use std::path::PathBuf;

/// A workload that cannot be played, with a stable [`code`](WorkloadError::code).
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid spec (syntax, unknown field, wrong type).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said, with the field's location.
        message: String,
    },
    /// A value is out of its range.
    #[error("invalid workload: {field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// A trace line is malformed.
    #[error("{path}:{line}: {message}")]
    Trace {
        /// The trace file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl WorkloadError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            WorkloadError::Read { .. } => "workload_unreadable",
            WorkloadError::Parse { .. } => "workload_syntax",
            WorkloadError::Invalid { .. } => "workload_invalid",
            WorkloadError::Trace { .. } => "trace_invalid",
        }
    }

    pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> WorkloadError {
        WorkloadError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
}
