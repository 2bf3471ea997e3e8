//! The wire protocol: one JSON object per line in both directions (see docs/protocol.md).
//!
//! Parsing is strict and total: every line maps to a [`ClientMessage`] or to a
//! [`ProtocolError`] with a stable `code`; nothing here panics on any input (fuzzed by
//! `fuzz/fuzz_targets/parse_line.rs`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use convoy_weights::ChatMessage;

/// A parsed client line.
#[derive(Clone, Debug, PartialEq)]
pub enum ClientMessage {
    /// Start a generation.
    Generate(Box<GenerateRequest>),
    /// Cancel a live generation of this connection.
    Cancel {
        /// The client's id of the request.
        id: String,
    },
    /// Engine statistics.
    Stats,
    /// Liveness.
    Health,
    /// Token ids of a text.
    Tokenize {
        /// The text.
        text: String,
    },
}

/// How the prompt is given.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text (no special tokens added).
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
}

/// A `generate` line.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The client's id, unique among its live requests on this connection.
    pub id: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    /// Random seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stop token ids.
    pub stop_token_ids: Vec<u32>,
    /// Keep going past EOS.
    pub ignore_eos: bool,
    /// Larger is served first.
    pub priority: i32,
    /// Give up this many milliseconds after arrival.
    pub deadline_ms: Option<u64>,
    /// Requests with different salts never share cached K/V.
    pub cache_salt: Option<String>,
    /// Return log-probabilities with this many alternatives (0..=20).
    pub logprobs: Option<usize>,
    /// Stream token events (default) or only the final event with the whole text.
    pub stream: bool,
}

/// A line the daemon refuses, with a stable code (listed in docs/protocol.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProtocolError {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// The request id, when the line had a readable one.
    pub id: Option<String>,
}

impl ProtocolError {
    /// An error with a code and message.
    pub fn new(code: &'static str, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
            id: None,
        }
    }

    fn with_id(mut self, id: Option<String>) -> ProtocolError {
        self.id = id;
        self
    }
}

/// Largest `max_tokens` accepted.
pub const MAX_TOKENS_LIMIT: usize = 1 << 20;
/// Largest `logprobs` accepted.
pub const MAX_LOGPROBS: usize = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGenerate {
    #[allow(dead_code)]
    op: String,
    id: String,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    messages: Option<Vec<ChatMessage>>,
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    stop_token_ids: Vec<u32>,
    #[serde(default)]
    ignore_eos: bool,
    #[serde(default)]
    priority: i32,
    deadline_ms: Option<u64>,
    cache_salt: Option<String>,
    logprobs: Option<usize>,
    stream: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCancel {
    #[allow(dead_code)]
    op: String,
    id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTokenize {
    #[allow(dead_code)]
    op: String,
    text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBare {
    #[allow(dead_code)]
    op: String,
}

fn typed<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, ProtocolError> {
    serde_json::from_value(v).map_err(|e| {
        let msg = e.to_string();
        let code = if msg.starts_with("unknown field") {
            "unknown_field"
        } else if msg.starts_with("missing field") {
            "missing_field"
        } else {
            "invalid_type"
        };
        ProtocolError::new(code, msg)
    })
}

fn check_range(cond: bool, what: &str) -> Result<(), ProtocolError> {
    if cond {
        Ok(())
    } else {
        Err(ProtocolError::new("invalid_parameter", what.to_string()))
    }
}

/// Parse one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<ClientMessage, ProtocolError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| ProtocolError::new("invalid_utf8", format!("the line is not UTF-8: {e}")))?;
    let v: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new("invalid_json", format!("the line is not JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ProtocolError::new(
            "not_an_object",
            "each line must be one JSON object",
        ));
    };
    let id = obj.get("id").and_then(|i| i.as_str()).map(String::from);
    let op = match obj.get("op") {
        None => {
            return Err(ProtocolError::new("missing_op", "the object has no \"op\"").with_id(id))
        }
        Some(Value::String(op)) => op.clone(),
        Some(_) => {
            return Err(ProtocolError::new("invalid_type", "\"op\" must be a string").with_id(id))
        }
    };
    let v = Value::Object(obj);
    let parsed = match op.as_str() {
        "generate" => parse_generate(v),
        "cancel" => typed::<RawCancel>(v).map(|c| ClientMessage::Cancel { id: c.id }),
        "stats" => typed::<RawBare>(v).map(|_| ClientMessage::Stats),
        "health" => typed::<RawBare>(v).map(|_| ClientMessage::Health),
        "tokenize" => typed::<RawTokenize>(v).map(|t| ClientMessage::Tokenize { text: t.text }),
        other => Err(ProtocolError::new(
            "unknown_op",
            format!("unknown op {other:?} (generate, cancel, stats, health, tokenize)"),
        )),
    };
    parsed.map_err(|e| e.with_id(id))
}

fn parse_generate(v: Value) -> Result<ClientMessage, ProtocolError> {
    let r: RawGenerate = typed(v)?;
    if r.id.is_empty() || r.id.len() > 256 {
        return Err(ProtocolError::new(
            "invalid_parameter",
            "id must be 1 to 256 bytes",
        ));
    }
    let prompt = match (r.prompt, r.prompt_ids, r.messages) {
        (Some(p), None, None) => Prompt::Text(p),
        (None, Some(ids), None) => Prompt::Ids(ids),
        (None, None, Some(m)) => Prompt::Messages(m),
        (None, None, None) => {
            return Err(ProtocolError::new(
                "missing_prompt",
                "give one of prompt, prompt_ids or messages",
            ))
        }
        _ => {
            return Err(ProtocolError::new(
                "conflicting_prompt",
                "give only one of prompt, prompt_ids or messages",
            ))
        }
    };
    let empty = match &prompt {
        Prompt::Text(t) => t.is_empty(),
        Prompt::Ids(i) => i.is_empty(),
        Prompt::Messages(m) => m.is_empty(),
    };
    if empty {
        return Err(ProtocolError::new("empty_prompt", "the prompt is empty"));
    }
    let max_tokens = r.max_tokens.unwrap_or(256);
    check_range(
        (1..=MAX_TOKENS_LIMIT).contains(&max_tokens),
        "max_tokens must be between 1 and 1048576",
    )?;
    let temperature = r.temperature.unwrap_or(0.0);
    check_range(
        temperature.is_finite() && (0.0..=100.0).contains(&temperature),
        "temperature must be between 0 and 100",
    )?;
    let top_p = r.top_p.unwrap_or(1.0);
    check_range(top_p > 0.0 && top_p <= 1.0, "top_p must be in (0, 1]")?;
    check_range(
        r.stop.iter().all(|s| !s.is_empty() && s.len() <= 256) && r.stop.len() <= 16,
        "stop: at most 16 non-empty strings of at most 256 bytes",
    )?;
    check_range(
        r.logprobs.is_none_or(|n| n <= MAX_LOGPROBS),
        "logprobs must be between 0 and 20",
    )?;
    check_range(
        r.deadline_ms.is_none_or(|d| d > 0),
        "deadline_ms must be positive",
    )?;
    check_range(
        r.logprobs.is_none() || r.stream.unwrap_or(true),
        "logprobs are sent with token events: use stream: true",
    )?;
    Ok(ClientMessage::Generate(Box::new(GenerateRequest {
        id: r.id,
        prompt,
        max_tokens,
        temperature,
        top_k: r.top_k.unwrap_or(0),
        top_p,
        seed: r.seed,
        stop: r.stop,
        stop_token_ids: r.stop_token_ids,
        ignore_eos: r.ignore_eos,
        priority: r.priority,
        deadline_ms: r.deadline_ms,
        cache_salt: r.cache_salt,
        logprobs: r.logprobs,
        stream: r.stream.unwrap_or(true),
    })))
}

/// Token counts in a `done` event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageOut {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prompt tokens served from the device tier of the cache.
    pub cached_tokens: usize,
    /// Prompt tokens served from the host tier.
    pub host_cached_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
}

/// Latencies in a `done` event, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimingOut {
    /// Arrival to first scheduled.
    pub queue_ms: f64,
    /// Arrival to first token.
    pub ttft_ms: f64,
    /// Arrival to the end.
    pub total_ms: f64,
}

/// One log-probability entry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LogprobOut {
    /// Sampled token's log-probability.
    pub logprob: f32,
    /// Most likely alternatives: `[token id, log-probability]`.
    pub top: Vec<(u32, f32)>,
}

/// A line the daemon sends.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ServerEvent {
    /// New tokens of a streamed request.
    Token {
        /// The client's id.
        id: String,
        /// Text delta (never half a character).
        text: String,
        /// Token ids.
        token_ids: Vec<u32>,
        /// Log-probabilities, when asked for.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        logprobs: Option<Vec<LogprobOut>>,
    },
    /// The end of a request.
    Done {
        /// The client's id.
        id: String,
        /// stop, length, cancelled, deadline, slow_consumer or error.
        finish_reason: String,
        /// The whole text (only when `stream` was false).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        text: Option<String>,
        /// The whole token ids (only when `stream` was false).
        #[serde(skip_serializing_if = "Option::is_none", default)]
        token_ids: Option<Vec<u32>>,
        /// Token counts.
        usage: UsageOut,
        /// Latencies.
        timing: TimingOut,
    },
    /// A refused line or request.
    Error {
        /// The request id, when known.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<String>,
        /// Stable code.
        code: String,
        /// Explanation.
        message: String,
    },
    /// Answer to `stats`.
    Stats {
        /// The figures.
        stats: Map<String, Value>,
    },
    /// Answer to `health`.
    Health {
        /// "ok", or "draining" during shutdown.
        status: String,
    },
    /// Answer to `tokenize`.
    Tokenize {
        /// Token ids.
        ids: Vec<u32>,
    },
}

impl ServerEvent {
    /// The event as one line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_else(|_| {
            "{\"event\":\"error\",\"code\":\"internal\",\"message\":\"serialisation failed\"}"
                .into()
        });
        s.push('\n');
        s
    }

    /// The error event for a protocol error.
    pub fn from_error(e: ProtocolError) -> ServerEvent {
        ServerEvent::Error {
            id: e.id,
            code: e.code.to_string(),
            message: e.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_defaults_and_codes() {
        let m = parse_line(br#"{"op":"generate","id":"a","prompt":"hi"}"#).unwrap();
        let ClientMessage::Generate(g) = m else {
            panic!()
        };
        assert_eq!((g.max_tokens, g.temperature, g.stream), (256, 0.0, true));
        for (line, code) in [
            (&b"\xff\xfe"[..], "invalid_utf8"),
            (b"{not json", "invalid_json"),
            (b"[1,2]", "not_an_object"),
            (br#"{"id":"a"}"#, "missing_op"),
            (br#"{"op":"fly"}"#, "unknown_op"),
            (
                br#"{"op":"generate","id":"a","prompt":"x","colour":1}"#,
                "unknown_field",
            ),
            (br#"{"op":"generate","id":"a","prompt":7}"#, "invalid_type"),
            (br#"{"op":"generate","prompt":"x"}"#, "missing_field"),
            (br#"{"op":"generate","id":"a"}"#, "missing_prompt"),
            (
                br#"{"op":"generate","id":"a","prompt":"x","prompt_ids":[1]}"#,
                "conflicting_prompt",
            ),
            (
                br#"{"op":"generate","id":"a","prompt":"x","top_p":2}"#,
                "invalid_parameter",
            ),
        ] {
            let e = parse_line(line).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(line));
        }
    }
}
