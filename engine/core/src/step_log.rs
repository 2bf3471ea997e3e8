//! A log of engine steps: one JSON line per step with its shape ([`StepShape`]) and how long
//! it took, so step costs can be measured on the real daemon under real traffic
//! (`convoy serve --step-log FILE`) and fitted into a planner profile
//! (`convoy-bench calibrate --from-steps FILE`).
//!
//! Invariants: a line is written only for a step that scheduled something; `execute_s` (the
//! runner's forward pass) is never larger than `step_s` (schedule, execute, update and the
//! events the step produced, everything the engine thread spends on the step); times come from
//! the runner's clock, so a simulated engine logs its modelled times.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::sim::StepShape;

/// One logged step: a JSON object with the shape's fields (`prefill_tokens`, `decode_seqs`,
/// `kv_tokens`, `attention_pairs`, `sampled`, `copied_slots`) beside the times.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// When the step started, seconds on the runner's clock.
    pub at_s: f64,
    /// What the step held.
    #[serde(flatten)]
    pub shape: StepShape,
    /// Seconds in the runner (forward pass and sampling).
    pub execute_s: f64,
    /// Seconds of the whole step on the engine thread.
    pub step_s: f64,
}

impl StepRecord {
    /// A record of a step of this shape (`step_s` is at least `execute_s`).
    pub fn new(at_s: f64, shape: &StepShape, execute_s: f64, step_s: f64) -> StepRecord {
        StepRecord {
            at_s,
            shape: *shape,
            execute_s,
            step_s: step_s.max(execute_s),
        }
    }
}

/// Why a step log could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum StepLogError {
    /// The file could not be opened, written or read.
    #[error("step log {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A line is not a step record.
    #[error("step log {path}, line {line}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

impl StepLogError {
    /// A stable code for the error's kind.
    pub fn code(&self) -> &'static str {
        match self {
            StepLogError::Io { .. } => "step_log_unreadable",
            StepLogError::Invalid { .. } => "step_log_invalid",
        }
    }
}

/// Writes step records as JSON lines (buffered; flushed when dropped).
pub struct StepLog {
    path: PathBuf,
    out: BufWriter<File>,
    failed: bool,
}

impl StepLog {
    /// Create (or truncate) the log file.
    pub fn create(path: &Path) -> Result<StepLog, StepLogError> {
        let file = File::create(path).map_err(|source| StepLogError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(StepLog {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            failed: false,
        })
    }

    /// Append a record. A write error is logged once and later records are dropped: the log
    /// is a measurement aid and never stops the engine.
    pub fn write(&mut self, r: &StepRecord) {
        if self.failed {
            return;
        }
        let line = serde_json::to_string(r).expect("a step record serialises");
        if let Err(e) = writeln!(self.out, "{line}") {
            tracing::error!(path = %self.path.display(), error = %e, "step log write failed; no more steps are logged");
            self.failed = true;
        }
    }
}

impl std::fmt::Debug for StepLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepLog").field("path", &self.path).finish()
    }
}

impl Drop for StepLog {
    fn drop(&mut self) {
        let _ = self.out.flush();
    }
}

/// Read every record of a step log.
pub fn read_step_log(path: &Path) -> Result<Vec<StepRecord>, StepLogError> {
    let io = |source| StepLogError::Io {
        path: path.to_path_buf(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io)?);
    let mut records = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let r: StepRecord = serde_json::from_str(&line).map_err(|e| StepLogError::Invalid {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        if !(r.execute_s.is_finite() && r.step_s.is_finite() && r.execute_s >= 0.0) {
            return Err(StepLogError::Invalid {
                path: path.to_path_buf(),
                line: i + 1,
                message: "times must be finite and non-negative".into(),
            });
        }
        records.push(r);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_lines_are_named() {
        let dir = std::env::temp_dir().join(format!("convoy-steplog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("steps.jsonl");
        let shape = StepShape {
            prefill_tokens: 100,
            decode_seqs: 3,
            kv_tokens: 700,
            attention_pairs: 12_345,
            sampled: 4,
            copied_slots: 0,
        };
        {
            let mut log = StepLog::create(&path).unwrap();
            log.write(&StepRecord::new(1.5, &shape, 0.02, 0.025));
            // A step whose bookkeeping clock read less than its execute time is clamped.
            log.write(&StepRecord::new(2.0, &shape, 0.03, 0.01));
        }
        let back = read_step_log(&path).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[0].shape, shape);
        assert_eq!((back[0].execute_s, back[0].step_s), (0.02, 0.025));
        assert_eq!(back[1].step_s, 0.03);
        std::fs::write(&path, "{\"at_s\":1}\n").unwrap();
        let e = read_step_log(&path).unwrap_err();
        assert_eq!(e.code(), "step_log_invalid");
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = read_step_log(&dir.join("missing.jsonl")).unwrap_err();
        assert_eq!(e.code(), "step_log_unreadable");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
