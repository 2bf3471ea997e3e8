//! `convoy-bench truncation`: does stepped truncation keep the prefix cache warm?
//!
//! Replays one long chat through the daemon with the `character` prompt template
//! (examples/templates), whose history overflows `--token-limit`, once per truncation step.
//! Each reply is appended to the history before the next message, as a chat product does.
//! Reported per step: the prefix-cache hit ratio of turns 2.. (cached prompt tokens over prompt
//! tokens, from the `done` events), and on how many turns the set of cut parts changed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use convoy_server::api::client::Client;
use convoy_server::api::protocol::ServerEvent;
use serde_json::{json, Value};

use crate::daemon::Spawned;

/// A plain ChatML template, for a model that ships none (glassllm).
const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// One run's outcome.
pub struct Run {
    /// The truncation step.
    pub step: usize,
    /// Prompt tokens of turns 2..
    pub prompt_tokens: usize,
    /// Of those, served from the cache.
    pub cached_tokens: usize,
    /// Turns whose cut parts differ from the previous turn's.
    pub cut_changes: usize,
    /// Turns that cut anything.
    pub truncated_turns: usize,
}

/// Replay the chat once per step.
pub fn run(
    convoy: &Path,
    model: &Path,
    turns: usize,
    token_limit: usize,
    steps: &[usize],
    max_tokens: usize,
) -> Result<Vec<Run>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let templates = root.join("examples/templates");
    let vars: Value = serde_json::from_str(
        &std::fs::read_to_string(templates.join("character.variables.json"))
            .context("reading examples/templates/character.variables.json")?,
    )?;
    let template =
        std::env::temp_dir().join(format!("convoy-bench-chatml-{}.jinja", std::process::id()));
    std::fs::write(&template, CHATML)?;
    let mut out = Vec::new();
    for &step in steps {
        let mut extra = vec![
            "--templates".to_string(),
            templates.to_string_lossy().into_owned(),
        ];
        if model.is_dir() {
            extra.extend([
                "--chat-template".into(),
                template.to_string_lossy().into_owned(),
            ]);
        }
        let d = Spawned::start(convoy, model, &format!("truncation-{step}"), &extra)?;
        let mut c = Client::connect(&d.socket)?;
        let mut history: Vec<Value> = Vec::new();
        let mut last_cut: Option<Vec<String>> = None;
        let mut run = Run {
            step,
            prompt_tokens: 0,
            cached_tokens: 0,
            cut_changes: 0,
            truncated_turns: 0,
        };
        for turn in 1..=turns {
            let message = format!(
                "Turn {turn}: tell me one thing about the engine room, the cargo or the crew."
            );
            let mut v = vars.clone();
            v["history"] = Value::Array(history.clone());
            v["message"] = json!(message);
            let req = json!({"op":"generate","id":format!("t{turn}"),"template":"character",
                "variables":v,"token_limit":token_limit,"truncation_step":step,
                "max_tokens":max_tokens,"ignore_eos":true,"stream":false});
            let (text, usage, cut) = match c.generate(&req)?.1 {
                ServerEvent::Done {
                    text,
                    usage,
                    truncated_parts,
                    ..
                } => (
                    text.unwrap_or_default(),
                    usage,
                    truncated_parts.unwrap_or_default(),
                ),
                other => bail!("turn {turn}: {other:?}"),
            };
            if turn > 1 {
                run.prompt_tokens += usage.prompt_tokens;
                run.cached_tokens += usage.cached_tokens + usage.host_cached_tokens;
                if last_cut.as_ref() != Some(&cut) {
                    run.cut_changes += 1;
                }
            }
            run.truncated_turns += usize::from(!cut.is_empty());
            last_cut = Some(cut);
            history.push(json!({"author":"user","text":message}));
            history.push(json!({"author":"character","text":text.trim()}));
        }
        out.push(run);
    }
    let _ = std::fs::remove_file(&template);
    Ok(out)
}
