//! Trace files: one JSON object per line, a request each, replayed at its timestamp.
//!
//! ```json
//! {"t": 0.0, "conversation": "c1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}
//! {"t": 4.2, "conversation": "c1", "messages": [...the whole history...], "max_tokens": 48}
//! ```
//! `t` is seconds from the start (non-decreasing is not required: lines are sorted);
//! `messages` is the whole conversation as the client sent it (replies included, as recorded),
//! or `prompt` a plain user message; `max_tokens` is optional (the spec's otherwise).

use std::path::Path;

use convoy_weights::ChatMessage;
use serde::Deserialize;

use super::WorkloadError;

/// The fields a trace line may have.
pub const TRACE_FIELDS: [&str; 5] = ["t", "conversation", "messages", "prompt", "max_tokens"];

/// One line of a trace.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    /// Seconds from the start of the replay.
    pub t: f64,
    /// The conversation it belongs to (routing key; turns are numbered per conversation).
    pub conversation: String,
    /// The whole conversation to send.
    #[serde(default)]
    pub messages: Option<Vec<TraceMessage>>,
    /// Or a single user message.
    #[serde(default)]
    pub prompt: Option<String>,
    /// Reply budget.
    #[serde(default)]
    pub max_tokens: Option<usize>,
}

/// A message of a trace line.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl TraceRecord {
    /// The messages this line sends.
    pub fn chat(&self) -> Vec<ChatMessage> {
        match (&self.messages, &self.prompt) {
            (Some(m), _) => m
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect(),
            (None, Some(p)) => vec![ChatMessage::new("user", p)],
            (None, None) => Vec::new(),
        }
    }
}

/// Read a trace, sorted by time (stable, so equal times keep file order).
pub fn read_trace(path: &Path) -> Result<Vec<TraceRecord>, WorkloadError> {
    let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| WorkloadError::Trace {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        };
        let r: TraceRecord = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if !(r.t.is_finite() && r.t >= 0.0) {
            return Err(bad("t must be a number >= 0".into()));
        }
        if r.messages.is_some() == r.prompt.is_some() {
            return Err(bad("give exactly one of messages and prompt".into()));
        }
        if r.messages.as_ref().is_some_and(|m| m.is_empty()) {
            return Err(bad("messages is empty".into()));
        }
        if r.max_tokens == Some(0) {
            return Err(bad("max_tokens must be at least 1".into()));
        }
        out.push(r);
    }
    if out.is_empty() {
        return Err(WorkloadError::Trace {
            path: path.to_path_buf(),
            line: 0,
            message: "the trace has no requests".into(),
        });
    }
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    Ok(out)
}
