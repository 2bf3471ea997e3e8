//! OpenAI's request and response shapes for `/v1/chat/completions` and `/v1/completions`.
//!
//! A request body is read in two passes: first into [`OpenAiRequest`] (OpenAI's field names
//! and types; unknown fields are ignored, as OpenAI clients expect; a wrong type is refused
//! with the path of the field), then turned into the socket protocol's `generate` object and
//! handed to [`parse_line`], so the HTTP face shares every range check and error code with the
//! socket (docs/protocol.md). Only what the socket cannot express is checked here: `n`,
//! `best_of`, `echo`, `suffix`, penalties, `logprobs` / `top_logprobs` pairing, batched prompts.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::api::http::errors::ApiError;
use crate::api::protocol::{parse_json, parse_line, ClientMessage, GenerateRequest, ProtocolError};
use convoy_engine::core::{Done, Usage};

/// Which endpoint a request came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

/// A message content: a string or a list of parts (only text parts are supported).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Clone, Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (other kinds are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// One chat message (fields beyond role and content, such as `name`, are ignored).
#[derive(Clone, Debug, Deserialize)]
pub struct MessageIn {
    /// system, developer (read as system), user or assistant.
    pub role: String,
    /// The content (null reads as empty).
    pub content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and `"usage": null` on the others).
    pub include_usage: Option<bool>,
}

/// The fields of both endpoints, with OpenAI's names and types.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct OpenAiRequest {
    /// The model name (must be the served one when given).
    pub model: Option<String>,
    /// Chat: the conversation.
    pub messages: Option<Vec<MessageIn>>,
    /// Chat, instead of `messages` (a convoy extension, e.g. the openai client's `extra_body`):
    /// a prompt template of `--templates` by name (docs/prompts.md).
    pub template: Option<String>,
    /// Chat: a prompt template's text, instead of `messages`.
    pub template_yaml: Option<String>,
    /// With a template: what it is rendered against.
    pub variables: Option<Value>,
    /// With a template: most tokens its parts may hold.
    pub token_limit: Option<u64>,
    /// With a template: cuts are rounded up to a multiple of this.
    pub truncation_step: Option<u64>,
    /// Completions: a string, `[string]`, `[int]` or `[[int]]` (one prompt).
    pub prompt: Option<Value>,
    /// Most tokens to generate (older name).
    pub max_tokens: Option<u64>,
    /// Most tokens to generate (newer name; wins over `max_tokens`).
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature (default 1, as OpenAI).
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    pub top_p: Option<f64>,
    /// Top-k (an extension; 0 or -1 is off).
    pub top_k: Option<i64>,
    /// Random seed.
    pub seed: Option<i64>,
    /// Stop strings.
    pub stop: Option<Stop>,
    /// Stop token ids (an extension).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Choices: only 1.
    pub n: Option<u64>,
    /// Completions: only 1.
    pub best_of: Option<u64>,
    /// Completions: not supported when true.
    pub echo: Option<bool>,
    /// Completions: not supported.
    pub suffix: Option<String>,
    /// Chat: bool; completions: the number of alternatives.
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token (needs `logprobs: true`).
    pub top_logprobs: Option<u64>,
    /// Keep going past EOS (an extension).
    pub ignore_eos: Option<bool>,
    /// The end user: requests of one user share a fair-queuing slot.
    pub user: Option<String>,
    /// Server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Not supported unless 0.
    pub presence_penalty: Option<f32>,
    /// Not supported unless 0.
    pub frequency_penalty: Option<f32>,
    /// Larger is served first (an extension).
    pub priority: Option<i32>,
    /// Requests with different salts never share cached K/V (an extension).
    pub cache_salt: Option<String>,
    /// Completions: control-token text in the prompt becomes control tokens (an extension).
    pub special_tokens: Option<bool>,
}

/// How log-probabilities are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsMode {
    /// Not asked for.
    Off,
    /// Chat's `logprobs.content` with this many alternatives.
    Chat(usize),
    /// Completions' `tokens` / `token_logprobs` / `top_logprobs` with this many alternatives.
    Completions(usize),
}

/// A request, ready for the engine.
#[derive(Clone, Debug)]
pub struct Parsed {
    /// The socket protocol's request (always streamed internally).
    pub generate: GenerateRequest,
    /// The client asked for server-sent events.
    pub stream: bool,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
    /// Log-probabilities.
    pub logprobs: LogprobsMode,
    /// `user`, when given.
    pub user: Option<String>,
}

fn invalid(message: impl Into<String>, param: &str) -> ApiError {
    ApiError::new("invalid_parameter", message).param(param)
}

fn message_text(i: usize, content: Option<Content>) -> Result<String, ApiError> {
    match content {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t),
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(ApiError::new("missing_field", "a text part needs text")
                            .param(format!("messages[{i}].content[{j}].text")))
                    }
                    (kind, _) => {
                        return Err(invalid(
                            format!("content parts of type {kind:?} are not supported; only text"),
                            &format!("messages[{i}].content[{j}].type"),
                        ))
                    }
                }
            }
            Ok(text)
        }
    }
}

/// The completions prompt as a socket field: `("prompt", text)` or `("prompt_ids", ids)`.
fn completion_prompt(v: Value) -> Result<(&'static str, Value), ApiError> {
    let wrong = || {
        ApiError::new(
            "invalid_type",
            "prompt must be a string, an array of token ids, or a one-element array of either",
        )
        .param("prompt")
    };
    match v {
        Value::String(_) => Ok(("prompt", v)),
        Value::Array(items) => {
            if items.iter().all(Value::is_number) && !items.is_empty() {
                return Ok(("prompt_ids", Value::Array(items)));
            }
            if items.len() > 1 {
                return Err(invalid(
                    "batched prompts are not supported: send one prompt per request",
                    "prompt",
                ));
            }
            match items.into_iter().next() {
                Some(s @ Value::String(_)) => Ok(("prompt", s)),
                Some(Value::Array(ids)) if ids.is_empty() => Err(ApiError::new(
                    "empty_prompt",
                    "prompt is an empty list of token ids",
                )
                .param("prompt")),
                Some(Value::Array(ids)) => Ok(("prompt_ids", Value::Array(ids))),
                None => {
                    Err(ApiError::new("empty_prompt", "prompt is an empty list").param("prompt"))
                }
                Some(_) => Err(wrong()),
            }
        }
        _ => Err(wrong()),
    }
}

/// Read a request body for `endpoint`. `default_max_tokens` applies when neither
/// `max_tokens` nor `max_completion_tokens` is given.
pub fn parse_request(
    endpoint: Endpoint,
    body: &[u8],
    served_model: &str,
    default_max_tokens: u64,
) -> Result<Parsed, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| ApiError::new("invalid_utf8", format!("the body is not UTF-8: {e}")))?;
    let value = parse_json(text).map_err(|e| {
        let message = e
            .message
            .replace("the line is not JSON", "the body is not valid JSON");
        ApiError::from(ProtocolError::new(e.code, message))
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            "not_an_object",
            "the body must be a JSON object",
        ));
    }
    let r: OpenAiRequest = serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        ApiError::new("invalid_type", format!("{path}: {}", e.inner())).param(path)
    })?;
    if let Some(m) = &r.model {
        if m != served_model {
            return Err(ApiError::new(
                "model_not_found",
                format!("the model {m:?} does not exist; this server serves {served_model:?}"),
            )
            .param("model"));
        }
    }
    if r.n.is_some_and(|n| n != 1) {
        return Err(invalid("only n = 1 is supported", "n"));
    }
    if r.best_of.is_some_and(|n| n != 1) {
        return Err(invalid("only best_of = 1 is supported", "best_of"));
    }
    if r.echo == Some(true) {
        return Err(invalid("echo is not supported", "echo"));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("suffix is not supported", "suffix"));
    }
    for (name, v) in [
        ("presence_penalty", r.presence_penalty),
        ("frequency_penalty", r.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(invalid(format!("{name} is not supported (only 0)"), name));
        }
    }
    let mut g = Map::new();
    g.insert("op".into(), json!("generate"));
    g.insert("id".into(), json!("http"));
    g.insert("stream".into(), json!(true));
    let logprobs = match endpoint {
        Endpoint::Chat => {
            if r.prompt.is_some() {
                return Err(invalid(
                    "prompt belongs to /v1/completions; chat takes messages",
                    "prompt",
                ));
            }
            let templated = r.template.is_some() || r.template_yaml.is_some();
            for (name, v) in [
                ("template", r.template.clone().map(Value::from)),
                ("template_yaml", r.template_yaml.clone().map(Value::from)),
                ("variables", r.variables.clone()),
                ("token_limit", r.token_limit.map(Value::from)),
                ("truncation_step", r.truncation_step.map(Value::from)),
            ] {
                if let Some(v) = v {
                    g.insert(name.into(), v);
                }
            }
            let messages = match r.messages {
                Some(m) => m,
                // The socket's checks refuse a template beside messages, or neither.
                None if templated => Vec::new(),
                None => {
                    return Err(
                        ApiError::new("missing_field", "messages is required").param("messages")
                    )
                }
            };
            let mut out = Vec::with_capacity(messages.len());
            for (i, m) in messages.into_iter().enumerate() {
                let role = if m.role == "developer" {
                    "system".to_string()
                } else {
                    m.role
                };
                out.push(json!({"role": role, "content": message_text(i, m.content)?}));
            }
            if !(templated && out.is_empty()) {
                g.insert("messages".into(), Value::Array(out));
            }
            let on = match &r.logprobs {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::new("invalid_type", "logprobs must be a boolean")
                        .param("logprobs"))
                }
            };
            match (on, r.top_logprobs) {
                (false, Some(n)) if n > 0 => {
                    return Err(invalid("top_logprobs needs logprobs: true", "top_logprobs"))
                }
                (false, _) => LogprobsMode::Off,
                (true, n) => LogprobsMode::Chat(n.unwrap_or(0) as usize),
            }
        }
        Endpoint::Completions => {
            if r.messages.is_some() {
                return Err(invalid(
                    "messages belongs to /v1/chat/completions; completions take prompt",
                    "messages",
                ));
            }
            let Some(prompt) = r.prompt else {
                return Err(ApiError::new("missing_field", "prompt is required").param("prompt"));
            };
            let (field, v) = completion_prompt(prompt)?;
            g.insert(field.into(), v);
            if let Some(s) = r.special_tokens {
                g.insert("special_tokens".into(), json!(s));
            }
            match &r.logprobs {
                None | Some(Value::Null) => LogprobsMode::Off,
                Some(Value::Number(n)) if n.as_u64().is_some() => {
                    LogprobsMode::Completions(n.as_u64().unwrap_or(0) as usize)
                }
                Some(_) => {
                    return Err(ApiError::new(
                        "invalid_type",
                        "logprobs must be a non-negative integer",
                    )
                    .param("logprobs"))
                }
            }
        }
    };
    match logprobs {
        LogprobsMode::Chat(n) | LogprobsMode::Completions(n) => {
            g.insert("logprobs".into(), json!(n));
        }
        LogprobsMode::Off => {}
    }
    let max_tokens = r
        .max_completion_tokens
        .or(r.max_tokens)
        .unwrap_or(default_max_tokens);
    g.insert("max_tokens".into(), json!(max_tokens));
    g.insert("temperature".into(), json!(r.temperature.unwrap_or(1.0)));
    if let Some(p) = r.top_p {
        g.insert("top_p".into(), json!(p));
    }
    match r.top_k {
        None | Some(-1) => {}
        Some(k) if k < 0 => return Err(invalid("top_k must be -1, 0 or positive", "top_k")),
        Some(k) => {
            g.insert("top_k".into(), json!(k));
        }
    }
    if let Some(seed) = r.seed {
        // OpenAI's seed is any 64-bit integer: a negative one keeps its bits.
        g.insert("seed".into(), json!(seed as u64));
    }
    match r.stop {
        None => {}
        Some(Stop::One(s)) => {
            g.insert("stop".into(), json!([s]));
        }
        Some(Stop::Many(v)) => {
            g.insert("stop".into(), json!(v));
        }
    }
    if let Some(ids) = r.stop_token_ids {
        g.insert("stop_token_ids".into(), json!(ids));
    }
    if let Some(b) = r.ignore_eos {
        g.insert("ignore_eos".into(), json!(b));
    }
    if let Some(p) = r.priority {
        g.insert("priority".into(), json!(p));
    }
    if let Some(s) = r.cache_salt {
        g.insert("cache_salt".into(), json!(s));
    }
    let line = Value::Object(g).to_string();
    let generate = match parse_line(line.as_bytes()).map_err(ApiError::from)? {
        ClientMessage::Generate(g) => *g,
        _ => unreachable!("a generate object parses as generate"),
    };
    Ok(Parsed {
        generate,
        stream: r.stream.unwrap_or(false),
        include_usage: r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        logprobs,
        user: r.user,
    })
}

/// OpenAI's `finish_reason` for an engine finish reason: `stop` and `length` as they are;
/// convoy's others (`cancelled`, `deadline`, `slow_consumer`, `error`) pass through.
pub fn finish_reason(d: &Done) -> &'static str {
    d.finish_reason.as_str()
}

/// The `usage` object: `cached_tokens` counts prompt tokens served from either cache tier.
pub fn usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens + u.host_cached_tokens},
    })
}

/// One token of a log-probability report: its text (lossy where the token is part of a
/// character), its real bytes, and its log-probability.
#[derive(Clone, Debug, PartialEq)]
pub struct LogprobToken {
    /// The token's text.
    pub text: String,
    /// The bytes it stands for (see `TextCodec::token_bytes`).
    pub bytes: Vec<u8>,
    /// Its log-probability.
    pub logprob: f32,
}

/// One token's log-probabilities in OpenAI's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The sampled token.
    pub token: LogprobToken,
    /// The most likely alternatives.
    pub top: Vec<LogprobToken>,
}

/// Chat's `logprobs` object.
pub fn chat_logprobs(tokens: &[TokenLogprob]) -> Value {
    let entry = |t: &LogprobToken| json!({"token": t.text, "logprob": t.logprob, "bytes": t.bytes});
    let content: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut e = entry(&t.token);
            e["top_logprobs"] = t.top.iter().map(entry).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions' `logprobs` object; `offset` is the text's length in bytes before these
/// tokens. Offsets advance by each token's real bytes, so they stay inside the text.
pub fn completion_logprobs(tokens: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::with_capacity(tokens.len());
    for t in tokens {
        text_offset.push(offset);
        offset += t.token.bytes.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let m: Map<String, Value> = t
                .top
                .iter()
                .map(|a| (a.text.clone(), json!(a.logprob)))
                .collect();
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.text.clone()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": text_offset,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn logprobs_carry_each_tokens_real_bytes_and_offsets_stay_in_the_text() {
        use super::{chat_logprobs, completion_logprobs, LogprobToken, TokenLogprob};
        // "👍" split over two tokens: each decodes alone to U+FFFD.
        let tok = |bytes: &[u8]| TokenLogprob {
            token: LogprobToken {
                text: "\u{fffd}".into(),
                bytes: bytes.to_vec(),
                logprob: -0.5,
            },
            top: Vec::new(),
        };
        let tokens = [tok(&[0xf0, 0x9f]), tok(&[0x91, 0x8d])];
        let c = completion_logprobs(&tokens, 3);
        assert_eq!(c["text_offset"], serde_json::json!([3, 5]));
        let chat = chat_logprobs(&tokens);
        let bytes: Vec<u64> = chat["content"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|e| e["bytes"].as_array().unwrap().clone())
            .map(|b| b.as_u64().unwrap())
            .collect();
        assert_eq!(bytes, [0xf0, 0x9f, 0x91, 0x8d]);
    }

    use super::*;
    use crate::api::protocol::Prompt;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse_request(Endpoint::Chat, body.to_string().as_bytes(), "m", 4096)
    }

    #[test]
    fn a_chat_may_name_a_prompt_template_instead_of_messages() {
        let p = chat(
            json!({"template": "character", "variables": {"message": "hi"},
            "token_limit": 300, "truncation_step": 64}),
        )
        .unwrap();
        let Prompt::Template(t) = &p.generate.prompt else {
            panic!("{:?}", p.generate.prompt)
        };
        assert_eq!(
            t.source,
            crate::api::protocol::TemplateSource::Named("character".into())
        );
        assert_eq!((t.token_limit, t.truncation_step), (Some(300), Some(64)));
        assert_eq!(t.variables, json!({"message": "hi"}));
        let e = chat(json!({"template": "character",
            "messages": [{"role": "user", "content": "x"}]}))
        .unwrap_err();
        assert_eq!(e.code, "conflicting_prompt");
    }

    #[test]
    fn chat_fields_map_onto_the_socket_request() {
        let p = chat(json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}], "name": "bob"},
            ],
            "max_completion_tokens": 7, "max_tokens": 99, "temperature": 0, "top_p": 0.5,
            "top_k": 3, "seed": 11, "stop": "\n", "logprobs": true, "top_logprobs": 2,
            "stream": true, "stream_options": {"include_usage": true}, "user": "u1",
            "some_future_field": {"ignored": true},
        }))
        .unwrap();
        let g = &p.generate;
        let Prompt::Messages(m) = &g.prompt else {
            panic!("{g:?}")
        };
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].role, "system");
        assert_eq!(m[1].content, "Hi!");
        assert_eq!(g.max_tokens, 7);
        assert_eq!(g.temperature, 0.0);
        assert_eq!(g.top_p, 0.5);
        assert_eq!(g.top_k, 3);
        assert_eq!(g.seed, Some(11));
        assert_eq!(g.stop, vec!["\n".to_string()]);
        assert_eq!(g.logprobs, Some(2));
        assert!(g.stream, "always streamed inside");
        assert!(p.stream && p.include_usage);
        assert_eq!(p.logprobs, LogprobsMode::Chat(2));
        assert_eq!(p.user.as_deref(), Some("u1"));
        // Defaults: OpenAI's temperature 1, the given default for max_tokens.
        let p = chat(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(p.generate.temperature, 1.0);
        assert_eq!(p.generate.max_tokens, 4096);
        assert!(!p.stream);
    }

    #[test]
    fn refusals_carry_codes_and_params() {
        let user = json!([{"role": "user", "content": "x"}]);
        for (body, code, param) in [
            (
                json!({"messages": user, "n": 2}),
                "invalid_parameter",
                Some("n"),
            ),
            (
                json!({"messages": user, "max_tokens": "9"}),
                "invalid_type",
                Some("max_tokens"),
            ),
            (
                json!({"messages": user, "model": "other"}),
                "model_not_found",
                Some("model"),
            ),
            (json!({"messages": "hi"}), "invalid_type", Some("messages")),
            (
                json!({"messages": user, "temperature": 500}),
                "invalid_parameter",
                None,
            ),
            (
                json!({"messages": user, "top_p": 0}),
                "invalid_parameter",
                None,
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                "invalid_parameter",
                None,
            ),
            (json!({"messages": []}), "empty_prompt", None),
            (json!({}), "missing_field", Some("messages")),
            (
                json!({"messages": user, "top_logprobs": 3}),
                "invalid_parameter",
                Some("top_logprobs"),
            ),
            (
                json!({"messages": user, "presence_penalty": 1}),
                "invalid_parameter",
                Some("presence_penalty"),
            ),
            (json!([1, 2]), "not_an_object", None),
        ] {
            let e = chat(body.clone()).unwrap_err();
            assert_eq!(e.code, code, "{body}: {e:?}");
            assert_eq!(e.param.as_deref(), param, "{body}: {e:?}");
        }
        let e = parse_request(Endpoint::Chat, b"{\"messages\": [", "m", 1).unwrap_err();
        assert_eq!((e.code, e.status.as_u16()), ("invalid_json", 400));
    }

    #[test]
    fn completion_prompts() {
        let parse = |prompt: Value| {
            parse_request(
                Endpoint::Completions,
                json!({"prompt": prompt, "logprobs": 1})
                    .to_string()
                    .as_bytes(),
                "m",
                16,
            )
        };
        let p = parse(json!("Once")).unwrap();
        assert_eq!(p.generate.prompt, Prompt::Text("Once".into()));
        assert_eq!(p.logprobs, LogprobsMode::Completions(1));
        assert_eq!(
            parse(json!(["Once"])).unwrap().generate.prompt,
            Prompt::Text("Once".into())
        );
        assert_eq!(
            parse(json!([1, 2])).unwrap().generate.prompt,
            Prompt::Ids(vec![1, 2])
        );
        assert_eq!(
            parse(json!([[3]])).unwrap().generate.prompt,
            Prompt::Ids(vec![3])
        );
        assert_eq!(
            parse(json!(["a", "b"])).unwrap_err().code,
            "invalid_parameter"
        );
        assert_eq!(parse(json!(7)).unwrap_err().code, "invalid_type");
        assert_eq!(parse(json!([-1])).unwrap_err().code, "invalid_type");
    }
}
