//! Between the wire and the engine: a `generate` line becomes an [`EngineRequest`] (its prompt
//! encoded, which may take long: callers run [`encode_prompt`] off the I/O thread), and engine
//! events become wire events. Every refusal carries its protocol code from the typed error that
//! caused it.

use std::time::Duration;

use crate::api::protocol::{
    GenerateRequest, LogprobOut, Prompt, ProtocolError, ServerEvent, TemplatePrompt,
    TemplateSource, TimingOut, UsageOut,
};
use crate::prompt::{parse_parts, Budget, RenderPool, TemplateRef, TemplateSet};
use convoy_engine::core::{EngineEvent, EngineRequest, EventKind, SubmitError};
use convoy_engine::sampler::SamplingParams;
use convoy_engine::tokenizer::TextCodec;

/// An encoded prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// Token ids.
    pub ids: Vec<u32>,
    /// For a templated prompt, the parts truncation cut.
    pub truncated_parts: Option<Vec<String>>,
}

fn codec_error(e: convoy_engine::tokenizer::CodecError) -> ProtocolError {
    ProtocolError::new(e.code(), e.to_string())
}

/// What templated prompts render with.
#[derive(Clone, Debug)]
pub struct TemplateContext {
    /// The daemon's templates (`--templates`), or an empty set for inline templates only.
    pub set: std::sync::Arc<TemplateSet>,
    /// Whether `set` came from a `--templates` directory (else named templates are refused).
    pub has_dir: bool,
    /// The render workers; `None` renders on the calling thread (trusted callers only: an
    /// allocation failure there aborts the process).
    pub pool: Option<std::sync::Arc<RenderPool>>,
}

/// Render, truncate and encode a templated prompt. Named templates come from the context's
/// set; an inline one may include them.
fn encode_template(
    codec: &TextCodec,
    templates: &TemplateContext,
    t: &TemplatePrompt,
) -> Result<EncodedPrompt, ProtocolError> {
    let set = &*templates.set;
    let which = match &t.source {
        TemplateSource::Named(name) => {
            if !templates.has_dir {
                return Err(ProtocolError::new(
                    "unknown_template",
                    format!("no template {name:?}: the daemon was started without --templates"),
                ));
            }
            TemplateRef::Named(name)
        }
        TemplateSource::Inline(text) => TemplateRef::Inline(text),
    };
    let prompt_error = |e: crate::prompt::PromptError| ProtocolError::new(e.code(), e.to_string());
    let budget = t
        .token_limit
        .map(|limit| Budget::new(limit, t.truncation_step))
        .transpose()
        .map_err(prompt_error)?;
    let text = match &templates.pool {
        Some(pool) => pool.render_text(set, which, &t.variables),
        None => set.render_text(which, &t.variables),
    }
    .map_err(prompt_error)?;
    let parts = parse_parts(which.name(), &text).map_err(prompt_error)?;
    let prompt = crate::prompt::build_prompt(which.name(), parts, budget, |text| {
        codec.encode(text).map(|ids| ids.len())
    })
    .map_err(prompt_error)?;
    Ok(EncodedPrompt {
        ids: codec.encode_chat(&prompt.messages).map_err(codec_error)?,
        truncated_parts: Some(prompt.cut_part_names()),
    })
}

/// The prompt's token ids, checked against the model's context.
pub fn encode_prompt(
    codec: &TextCodec,
    templates: &TemplateContext,
    prompt: &Prompt,
    special_tokens: bool,
    max_context: usize,
) -> Result<EncodedPrompt, ProtocolError> {
    let encoded = match prompt {
        Prompt::Template(t) => encode_template(codec, templates, t)?,
        other => EncodedPrompt {
            ids: match other {
                Prompt::Ids(ids) => ids.clone(),
                Prompt::Text(t) if special_tokens => {
                    codec.encode_with_special_tokens(t).map_err(codec_error)?
                }
                Prompt::Text(t) => codec.encode(t).map_err(codec_error)?,
                Prompt::Messages(m) => codec.encode_chat(m).map_err(codec_error)?,
                Prompt::Template(_) => unreachable!("handled above"),
            },
            truncated_parts: None,
        },
    };
    let ids = &encoded.ids;
    if ids.is_empty() {
        return Err(ProtocolError::new(
            "empty_prompt",
            "the prompt encodes to no tokens",
        ));
    }
    if ids.len() >= max_context {
        return Err(ProtocolError::new(
            "prompt_too_long",
            format!(
                "the prompt has {} tokens; the context holds {max_context}",
                ids.len()
            ),
        ));
    }
    Ok(encoded)
}

/// The engine request for a parsed `generate` line whose prompt is `prompt_ids`, accepted from
/// its client at `accepted` (queueing, TTFT and the deadline count from there).
pub fn engine_request(
    g: &GenerateRequest,
    prompt_ids: Vec<u32>,
    owner: u64,
    accepted: std::time::Instant,
) -> EngineRequest {
    EngineRequest {
        prompt_ids,
        params: SamplingParams {
            temperature: g.temperature,
            top_k: g.top_k,
            top_p: g.top_p,
            seed: g.seed,
            max_tokens: g.max_tokens,
            stop_token_ids: g.stop_token_ids.clone(),
            stop: g.stop.clone(),
            ignore_eos: g.ignore_eos,
        },
        priority: g.priority,
        cache_salt: g.cache_salt.clone(),
        logprobs: g.logprobs,
        deadline: g.deadline_ms.map(Duration::from_millis),
        owner,
        accepted: Some(accepted),
        // Built once the prompt is encoded, just before the submission.
        handed_over: Some(std::time::Instant::now()),
    }
}

/// The error line for a refused submission.
pub fn submit_error(id: &str, e: &SubmitError) -> ServerEvent {
    error_event(Some(id.to_string()), e.code(), e.to_string())
}

/// An error line.
pub fn error_event(id: Option<String>, code: &str, message: impl Into<String>) -> ServerEvent {
    ServerEvent::Error {
        id,
        code: code.to_string(),
        message: message.into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The wire event for an engine event (`None`: a token event of a non-streamed request).
pub fn wire_event(ev: EngineEvent, client_id: &str, stream: bool) -> Option<ServerEvent> {
    match ev.kind {
        EventKind::Token {
            text,
            token_ids,
            logprobs,
        } => stream.then(|| ServerEvent::Token {
            id: client_id.to_string(),
            text,
            token_ids,
            logprobs: logprobs.map(|l| {
                vec![LogprobOut {
                    logprob: l.logprob,
                    top: l.top,
                }]
            }),
        }),
        EventKind::Done(d) => Some(ServerEvent::Done {
            id: client_id.to_string(),
            finish_reason: d.finish_reason.as_str().to_string(),
            text: (!stream).then_some(d.text),
            token_ids: (!stream).then_some(d.output_ids),
            usage: UsageOut {
                prompt_tokens: d.usage.prompt_tokens,
                cached_tokens: d.usage.cached_tokens,
                host_cached_tokens: d.usage.host_cached_tokens,
                completion_tokens: d.usage.completion_tokens,
            },
            timing: TimingOut {
                admit_ms: ms(d.timing.admit),
                queue_ms: ms(d.timing.queue),
                ttft_ms: ms(d.timing.ttft),
                total_ms: ms(d.timing.total),
            },
            truncated_parts: None,
        }),
    }
}
