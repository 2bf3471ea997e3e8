//! The wire protocol: one JSON object per line in both directions (see docs/protocol.md).
//!
//! Parsing is strict and total: every line maps to a [`ClientMessage`] or to a
//! [`ProtocolError`] with a stable `code`; nothing here panics on any input (fuzzed by
//! `fuzz/fuzz_targets/parse_line.rs`). Strict means: a blank line, a duplicate key (at any
//! depth), a field the op does not have (also inside a message) and a message role other than
//! system, user or assistant are all refused. The code of an error is decided by the check
//! that fails, never by the wording of a message.

use std::cell::RefCell;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use convoy_weights::ChatMessage;

use convoy_engine::sampler::DEFAULT_MAX_TOKENS;
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
        /// Encode control-token text as control tokens (default: as plain text).
        special_tokens: bool,
    },
}

/// How the prompt is given.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text (no special tokens added; control-token text is text unless
    /// `special_tokens` is set).
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A conversation, rendered with the model's chat template.
    Messages(Vec<ChatMessage>),
    /// A prompt template rendered against variables, truncated by part priorities, then
    /// rendered with the model's chat template (docs/prompts.md).
    Template(TemplatePrompt),
}

/// Which prompt template a request uses.
#[derive(Clone, Debug, PartialEq)]
pub enum TemplateSource {
    /// One of the daemon's `--templates`, by name.
    Named(String),
    /// The template's text, given in the request (`template_yaml`).
    Inline(String),
}

/// A templated prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct TemplatePrompt {
    /// The template.
    pub source: TemplateSource,
    /// What the template is rendered against (an object).
    pub variables: Value,
    /// Most tokens the parts may hold (none: nothing is cut).
    pub token_limit: Option<usize>,
    /// Cuts are rounded up to a multiple of this (default 1).
    pub truncation_step: Option<usize>,
}

/// A `generate` line.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The client's id, unique among its live requests on this connection.
    pub id: String,
    /// The prompt.
    pub prompt: Prompt,
    /// For a text prompt: control-token text in it becomes control tokens (opt-in).
    pub special_tokens: bool,
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

/// Longest error message sent to a client, in bytes.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 512;

/// `message` cut to [`MAX_ERROR_MESSAGE_BYTES`] on a character boundary.
pub fn short_message(mut message: String) -> String {
    if message.len() > MAX_ERROR_MESSAGE_BYTES {
        let end = crate::prompt::cut(&message, MAX_ERROR_MESSAGE_BYTES - 3).len();
        message.truncate(end);
        message.push_str("...");
    }
    message
}

impl ProtocolError {
    /// An error with a code and message.
    /// The message is cut to [`MAX_ERROR_MESSAGE_BYTES`] (on a character boundary, marked with
    /// `...`): an error line never carries a request's bulk back to its client.
    pub fn new(code: &'static str, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: short_message(message.into()),
            id: None,
        }
    }

    /// The same error about request `id`.
    pub fn with_id(mut self, id: Option<String>) -> ProtocolError {
        self.id = id;
        self
    }
}

/// Largest `max_tokens` accepted.
pub const MAX_TOKENS_LIMIT: usize = 1 << 20;
/// Largest `logprobs` accepted.
pub const MAX_LOGPROBS: usize = 20;
/// Message roles accepted in `messages`.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

#[derive(Deserialize)]
struct RawGenerate {
    id: String,
    prompt: Option<String>,
    prompt_ids: Option<Vec<u32>>,
    messages: Option<Vec<ChatMessage>>,
    template: Option<String>,
    template_yaml: Option<String>,
    variables: Option<Value>,
    token_limit: Option<usize>,
    truncation_step: Option<usize>,
    #[serde(default)]
    special_tokens: bool,
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
struct RawCancel {
    id: String,
}

#[derive(Deserialize)]
struct RawTokenize {
    text: String,
    #[serde(default)]
    special_tokens: bool,
}

/// The fields of each op: (name, required).
const GENERATE_FIELDS: &[(&str, bool)] = &[
    ("op", true),
    ("id", true),
    ("prompt", false),
    ("prompt_ids", false),
    ("messages", false),
    ("template", false),
    ("template_yaml", false),
    ("variables", false),
    ("token_limit", false),
    ("truncation_step", false),
    ("special_tokens", false),
    ("max_tokens", false),
    ("temperature", false),
    ("top_k", false),
    ("top_p", false),
    ("seed", false),
    ("stop", false),
    ("stop_token_ids", false),
    ("ignore_eos", false),
    ("priority", false),
    ("deadline_ms", false),
    ("cache_salt", false),
    ("logprobs", false),
    ("stream", false),
];
const CANCEL_FIELDS: &[(&str, bool)] = &[("op", true), ("id", true)];
const TOKENIZE_FIELDS: &[(&str, bool)] = &[("op", true), ("text", true), ("special_tokens", false)];
const BARE_FIELDS: &[(&str, bool)] = &[("op", true)];
const MESSAGE_FIELDS: &[(&str, bool)] = &[("role", true), ("content", true)];

/// Refuse fields `obj` should not have and report required ones it lacks (`at` names where).
fn check_fields(
    obj: &Map<String, Value>,
    fields: &[(&str, bool)],
    at: &str,
) -> Result<(), ProtocolError> {
    if let Some(k) = obj.keys().find(|k| !fields.iter().any(|(f, _)| f == k)) {
        return Err(ProtocolError::new(
            "unknown_field",
            format!("unknown field {k:?}{at}"),
        ));
    }
    if let Some((f, _)) = fields.iter().find(|(f, req)| *req && !obj.contains_key(*f)) {
        return Err(ProtocolError::new(
            "missing_field",
            format!("missing field {f:?}{at}"),
        ));
    }
    Ok(())
}

/// Deserialize a value whose fields were already checked: what can still fail is a type.
fn typed<T: for<'de> Deserialize<'de>>(v: Value) -> Result<T, ProtocolError> {
    serde_json::from_value(v).map_err(|e| ProtocolError::new("invalid_type", e.to_string()))
}

fn check_range(cond: bool, what: &str) -> Result<(), ProtocolError> {
    if cond {
        Ok(())
    } else {
        Err(ProtocolError::new("invalid_parameter", what.to_string()))
    }
}

/// Builds a `serde_json::Value` and records the first key that appears twice in an object.
#[derive(Clone, Copy)]
struct NoDuplicateKeys<'a> {
    duplicate: &'a RefCell<Option<String>>,
}

impl<'de> DeserializeSeed<'de> for NoDuplicateKeys<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoDuplicateKeys<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self)? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut obj = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if obj.contains_key(&k) {
                *self.duplicate.borrow_mut() = Some(k.clone());
                return Err(serde::de::Error::custom(format!("duplicate key {k:?}")));
            }
            let v = map.next_value_seed(self)?;
            obj.insert(k, v);
        }
        Ok(Value::Object(obj))
    }
}

/// Parse JSON text, refusing duplicate keys anywhere (`duplicate_key`): one rule for the
/// socket and the HTTP face.
pub fn parse_json(text: &str) -> Result<Value, ProtocolError> {
    let duplicate = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = NoDuplicateKeys {
        duplicate: &duplicate,
    }
    .deserialize(&mut de)
    .and_then(|v| de.end().map(|()| v));
    match (parsed, duplicate.into_inner()) {
        (_, Some(k)) => Err(ProtocolError::new(
            "duplicate_key",
            format!("the key {k:?} appears twice in one object"),
        )),
        (Ok(v), None) => Ok(v),
        (Err(e), None) => Err(ProtocolError::new(
            "invalid_json",
            format!("the line is not JSON: {e}"),
        )),
    }
}

/// A conversation as the CLI reads it (`generate --chat FILE`): a JSON array of messages,
/// checked exactly as a `generate` line's `messages` (roles, fields, duplicate keys, an empty
/// chat), so every face accepts and refuses the same chats.
pub fn parse_chat(text: &str) -> Result<Vec<ChatMessage>, ProtocolError> {
    let messages = parse_json(text)?;
    if !messages.is_array() {
        return Err(ProtocolError::new(
            "invalid_type",
            "a chat is a JSON array of {\"role\": .., \"content\": ..} objects",
        ));
    }
    let line = serde_json::json!({"op": "generate", "id": "chat", "messages": messages});
    match parse_line(line.to_string().as_bytes())? {
        ClientMessage::Generate(g) => match g.prompt {
            Prompt::Messages(m) => Ok(m),
            _ => unreachable!("a messages prompt parses as messages"),
        },
        _ => unreachable!("a generate object parses as generate"),
    }
}

/// Parse one line (without its newline).
pub fn parse_line(line: &[u8]) -> Result<ClientMessage, ProtocolError> {
    let text = std::str::from_utf8(line)
        .map_err(|e| ProtocolError::new("invalid_utf8", format!("the line is not UTF-8: {e}")))?;
    if text.trim().is_empty() {
        return Err(ProtocolError::new(
            "empty_line",
            "the line is blank; each line must be one JSON object",
        ));
    }
    let Value::Object(obj) = parse_json(text)? else {
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
    let fields = match op.as_str() {
        "generate" => GENERATE_FIELDS,
        "cancel" => CANCEL_FIELDS,
        "tokenize" => TOKENIZE_FIELDS,
        "stats" | "health" => BARE_FIELDS,
        other => {
            return Err(ProtocolError::new(
                "unknown_op",
                format!("unknown op {other:?} (generate, cancel, stats, health, tokenize)"),
            )
            .with_id(id))
        }
    };
    let parsed = check_fields(&obj, fields, "").and_then(|()| {
        let v = Value::Object(obj);
        match op.as_str() {
            "generate" => parse_generate(v),
            "cancel" => typed::<RawCancel>(v).map(|c| ClientMessage::Cancel { id: c.id }),
            "tokenize" => typed::<RawTokenize>(v).map(|t| ClientMessage::Tokenize {
                text: t.text,
                special_tokens: t.special_tokens,
            }),
            "stats" => Ok(ClientMessage::Stats),
            _ => Ok(ClientMessage::Health),
        }
    });
    parsed.map_err(|e| e.with_id(id))
}

/// Check each message's fields and role before the messages are deserialized.
fn check_messages(v: &Value) -> Result<(), ProtocolError> {
    let Some(Value::Array(messages)) = v.get("messages") else {
        return Ok(()); // absent, or a wrong type reported by deserialization
    };
    for (i, m) in messages.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(ProtocolError::new(
                "invalid_type",
                format!("messages[{i}] must be an object with role and content"),
            ));
        };
        check_fields(m, MESSAGE_FIELDS, &format!(" in messages[{i}]"))?;
        if let Some(Value::String(role)) = m.get("role") {
            check_range(
                ROLES.contains(&role.as_str()),
                &format!("messages[{i}].role {role:?} is not one of system, user, assistant"),
            )?;
        }
    }
    Ok(())
}

fn parse_generate(v: Value) -> Result<ClientMessage, ProtocolError> {
    check_messages(&v)?;
    let r: RawGenerate = typed(v)?;
    if r.id.is_empty() || r.id.len() > 256 {
        return Err(ProtocolError::new(
            "invalid_parameter",
            "id must be 1 to 256 bytes",
        ));
    }
    let given = [
        r.prompt.is_some(),
        r.prompt_ids.is_some(),
        r.messages.is_some(),
        r.template.is_some(),
        r.template_yaml.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given > 1 {
        return Err(ProtocolError::new(
            "conflicting_prompt",
            "give only one of prompt, prompt_ids, messages, template or template_yaml",
        ));
    }
    let templated = r.template.is_some() || r.template_yaml.is_some();
    check_range(
        templated
            || (r.variables.is_none() && r.token_limit.is_none() && r.truncation_step.is_none()),
        "variables, token_limit and truncation_step go with template or template_yaml",
    )?;
    check_range(
        r.truncation_step.is_none() || r.token_limit.is_some(),
        "truncation_step needs token_limit",
    )?;
    check_range(
        r.token_limit.is_none_or(|l| l > 0) && r.truncation_step.is_none_or(|s| s > 0),
        "token_limit and truncation_step must be positive",
    )?;
    check_range(
        r.variables.as_ref().is_none_or(Value::is_object),
        "variables must be an object",
    )?;
    let template = |source| {
        Prompt::Template(TemplatePrompt {
            source,
            variables: r
                .variables
                .clone()
                .unwrap_or_else(|| Value::Object(Map::new())),
            token_limit: r.token_limit,
            truncation_step: r.truncation_step,
        })
    };
    let prompt = if let Some(p) = r.prompt {
        Prompt::Text(p)
    } else if let Some(ids) = r.prompt_ids {
        Prompt::Ids(ids)
    } else if let Some(m) = r.messages {
        Prompt::Messages(m)
    } else if let Some(name) = r.template.clone() {
        template(TemplateSource::Named(name))
    } else if let Some(text) = r.template_yaml.clone() {
        template(TemplateSource::Inline(text))
    } else {
        return Err(ProtocolError::new(
            "missing_prompt",
            "give one of prompt, prompt_ids, messages, template or template_yaml",
        ));
    };
    let empty = match &prompt {
        Prompt::Text(t) => t.is_empty().then_some("prompt is an empty string"),
        Prompt::Ids(i) => i.is_empty().then_some("prompt_ids is an empty list"),
        Prompt::Messages(m) => m
            .is_empty()
            .then_some("messages is an empty list: give at least one message"),
        Prompt::Template(TemplatePrompt {
            source: TemplateSource::Named(t),
            ..
        }) => t.is_empty().then_some("template is an empty name"),
        Prompt::Template(TemplatePrompt {
            source: TemplateSource::Inline(t),
            ..
        }) => t.is_empty().then_some("template_yaml is an empty string"),
    };
    if let Some(what) = empty {
        return Err(ProtocolError::new("empty_prompt", what));
    }
    check_range(
        !r.special_tokens || matches!(prompt, Prompt::Text(_)),
        "special_tokens applies to a text prompt only",
    )?;
    let max_tokens = r.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
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
        r.stop_token_ids.len() <= convoy_engine::sampler::MAX_STOP_TOKEN_IDS,
        "stop_token_ids: at most 1024 ids",
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
        special_tokens: r.special_tokens,
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
    /// Acceptance (the daemon read the line) to the request's handoff to the engine: parsing,
    /// templating, tokenising. Part of the three below, which count from acceptance too (the
    /// wait for the engine's current step after the handoff is queueing).
    #[serde(default)]
    pub admit_ms: f64,
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

/// KV-cache occupancy in a `stats` answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvReport {
    /// Tokens per block.
    pub block_size: usize,
    /// Device blocks in all.
    pub device_blocks: usize,
    /// Device blocks held by live requests.
    pub device_blocks_held: usize,
    /// Device blocks holding cached contents (held or not).
    pub device_blocks_cached: usize,
    /// Host blocks in all.
    pub host_blocks: usize,
    /// Host blocks holding cached contents.
    pub host_blocks_cached: usize,
    /// `device_blocks_held / device_blocks`.
    pub device_usage: f64,
}

/// Prefix-cache effect in a `stats` answer (since start).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheReport {
    /// Prompt tokens of admitted requests.
    pub prompt_tokens: u64,
    /// Of those, served from either tier of the cache.
    pub cached_prompt_tokens: u64,
    /// `cached_prompt_tokens / prompt_tokens`.
    pub hit_ratio: f64,
    /// Share served from the device tier.
    pub device_hit_ratio: f64,
    /// Share served from the host tier.
    pub host_hit_ratio: f64,
    /// Blocks copied from the device tier to the host tier.
    pub swapped_out_blocks: u64,
    /// Blocks copied back from the host tier.
    pub swapped_in_blocks: u64,
}

/// Latency percentiles in milliseconds over every request finished since start (HDR
/// histograms, 3 significant digits).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyReport {
    /// Requests recorded.
    pub requests: u64,
    /// Time to first token, median.
    pub ttft_p50: f64,
    /// Time to first token, 90th percentile.
    pub ttft_p90: f64,
    /// Time to first token, 99th percentile.
    pub ttft_p99: f64,
    /// Time to first token, largest.
    pub ttft_max: f64,
    /// Time per output token after the first, median (requests with two or more tokens).
    pub tpot_p50: f64,
    /// Time per output token, 90th percentile.
    pub tpot_p90: f64,
    /// Time per output token, 99th percentile.
    pub tpot_p99: f64,
    /// Arrival to the end, median.
    pub total_p50: f64,
    /// Arrival to the end, 90th percentile.
    pub total_p90: f64,
    /// Arrival to the end, 99th percentile.
    pub total_p99: f64,
    /// Arrival to the end, largest.
    pub total_max: f64,
}

/// The answer to `stats`: the single definition of its fields (docs/protocol.md).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Requests waiting.
    pub queue: usize,
    /// Requests running.
    pub running: usize,
    /// Open client connections.
    pub connections: usize,
    /// KV-cache occupancy.
    pub kv: KvReport,
    /// Prefix-cache effect.
    pub cache: CacheReport,
    /// Tokens generated since start.
    pub generated_tokens: u64,
    /// `generated_tokens / uptime_s`.
    pub generated_tokens_per_s: f64,
    /// Requests finished (any reason).
    pub finished_requests: u64,
    /// Preemptions for lack of KV blocks.
    pub preemptions: u64,
    /// Latency percentiles.
    pub latency_ms: LatencyReport,
    /// Cache-hit prefills recomputed by `--verify-cache`.
    pub verified_prefills: u64,
    /// Of those, how many gave different logits (should stay 0).
    pub cache_divergence_total: u64,
    /// Seconds since the daemon started.
    pub uptime_s: f64,
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
        /// For a templated prompt: the names of the parts truncation cut, in document order.
        #[serde(skip_serializing_if = "Option::is_none", default)]
        truncated_parts: Option<Vec<String>>,
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
        stats: Box<StatsReport>,
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

    #[test]
    fn strictness_found_by_the_adversarial_run() {
        for (line, code) in [
            (&b"   \t "[..], "empty_line"),
            (b"", "empty_line"),
            (
                br#"{"op":"generate","id":"a","prompt":"x","max_tokens":1,"max_tokens":9}"#,
                "duplicate_key",
            ),
            (
                br#"{"op":"generate","id":"a","messages":[{"role":"user","content":"a","content":"b"}]}"#,
                "duplicate_key",
            ),
            (
                br#"{"op":"generate","id":"a","messages":[{"role":"wizard","content":"hi"}]}"#,
                "invalid_parameter",
            ),
            (
                br#"{"op":"generate","id":"a","messages":[{"role":"user","content":"hi","name":"x"}]}"#,
                "unknown_field",
            ),
            (
                br#"{"op":"generate","id":"a","messages":[{"role":"user"}]}"#,
                "missing_field",
            ),
            (
                br#"{"op":"generate","id":"a","messages":["hi"]}"#,
                "invalid_type",
            ),
            (
                br#"{"op":"generate","id":"a","prompt_ids":[1],"special_tokens":true}"#,
                "invalid_parameter",
            ),
            (br#"{"op":"stats","x":1}"#, "unknown_field"),
            (br#"{"op":"tokenize"}"#, "missing_field"),
        ] {
            let e = parse_line(line).unwrap_err();
            assert_eq!(e.code, code, "{}", String::from_utf8_lossy(line));
        }
        // The id survives for the error line when it is readable.
        let e = parse_line(br#"{"op":"generate","id":"q","prompt":"x","prompt":"y"}"#).unwrap_err();
        assert_eq!(e.code, "duplicate_key");
        let ok = parse_line(br#"{"op":"tokenize","text":"<|im_end|>","special_tokens":true}"#);
        assert_eq!(
            ok,
            Ok(ClientMessage::Tokenize {
                text: "<|im_end|>".into(),
                special_tokens: true
            })
        );
    }
}
