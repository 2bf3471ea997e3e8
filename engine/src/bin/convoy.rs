//! `convoy`: generate text, chat, and inspect tokens from the command line.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use convoy_engine::options::ModelArgs;
use convoy_engine::{GenerationRequest, Generator, SamplingParams};
use convoy_weights::ChatMessage;

#[derive(Parser)]
#[command(
    name = "convoy",
    version,
    about = "An LLM inference engine for chat workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone, Debug)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Nucleus sampling threshold (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Random seed (same seed, same output).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// A string that ends generation (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            max_tokens: self.max_tokens,
            stop_token_ids: Vec::new(),
            stop: self.stop.clone(),
            ignore_eos: self.ignore_eos,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming text as it comes.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// Plain text prompt (no special tokens added).
        #[arg(long, group = "input")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids.
        #[arg(long, group = "input", value_delimiter = ',')]
        prompt_ids: Option<Vec<u32>>,
        /// JSON file with [{"role":..,"content":..},..], rendered with the chat template.
        #[arg(long, group = "input")]
        chat: Option<PathBuf>,
        /// text (streamed) or json (one object at the end).
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Chat with the model in the terminal.
    Chat {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
        /// A system message for the conversation.
        #[arg(long)]
        system: Option<String>,
    },
    /// Print the token ids of a text.
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        /// The text.
        #[arg(long)]
        text: String,
        /// text or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            model,
            sampling,
            prompt,
            prompt_ids,
            chat,
            format,
        } => {
            if format != "text" && format != "json" {
                bail!("--format must be text or json");
            }
            let loaded = model.load()?;
            let ids = match (prompt, prompt_ids, chat) {
                (Some(p), _, _) => loaded.codec.encode(&p)?,
                (_, Some(ids), _) => ids,
                (_, _, Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let messages: Vec<ChatMessage> =
                        serde_json::from_str(&text).with_context(|| {
                            format!(
                                "{}: expected [{{\"role\":..,\"content\":..}},..]",
                                path.display()
                            )
                        })?;
                    loaded.codec.encode_chat(&messages)?
                }
                _ => bail!("give one of --prompt, --prompt-ids or --chat"),
            };
            let mut generator = Generator::new(
                &loaded.model,
                loaded.codec.clone(),
                loaded.generator_config(),
            );
            let req = GenerationRequest {
                prompt_ids: ids.clone(),
                params: sampling.params(),
                arrival_step: 0,
                cache_salt: None,
                priority: 0,
            };
            let stream = format == "text";
            let mut out = std::io::stdout();
            let results = generator.run(std::slice::from_ref(&req), |_, delta| {
                if stream {
                    let _ = out.write_all(delta.as_bytes());
                    let _ = out.flush();
                }
            })?;
            let r = &results[0];
            if stream {
                println!();
            } else {
                let ttft = r.time_to_first_token.as_secs_f64();
                let decode = (r.total_time - r.time_to_first_token).as_secs_f64();
                let doc = serde_json::json!({
                    "prompt_ids": ids,
                    "output_ids": r.output_ids,
                    "text": r.text,
                    "finish_reason": r.finish_reason.as_str(),
                    "prompt_tokens_per_s": ids.len() as f64 / ttft.max(1e-9),
                    "decode_tokens_per_s": if r.output_ids.len() > 1 { (r.output_ids.len() - 1) as f64 / decode.max(1e-9) } else { 0.0 },
                    "time_to_first_token_ms": ttft * 1e3,
                    "total_ms": r.total_time.as_secs_f64() * 1e3,
                });
                println!("{doc}");
            }
            Ok(())
        }
        Command::Chat {
            model,
            sampling,
            system,
        } => {
            let loaded = model.load()?;
            let mut generator = Generator::new(
                &loaded.model,
                loaded.codec.clone(),
                loaded.generator_config(),
            );
            let mut messages: Vec<ChatMessage> = system
                .into_iter()
                .map(|s| ChatMessage::new("system", s))
                .collect();
            let stdin = std::io::stdin();
            let mut out = std::io::stdout();
            eprintln!(
                "convoy chat: {} ({} layers). Empty line or Ctrl-D to quit.",
                model.model_path()?.display(),
                loaded.model.config.num_layers
            );
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                    break;
                }
                messages.push(ChatMessage::new("user", line.trim_end()));
                let ids = loaded.codec.encode_chat(&messages)?;
                let req = GenerationRequest {
                    prompt_ids: ids,
                    params: sampling.params(),
                    arrival_step: 0,
                    cache_salt: None,
                    priority: 0,
                };
                let r = generator.run(std::slice::from_ref(&req), |_, delta| {
                    let _ = out.write_all(delta.as_bytes());
                    let _ = out.flush();
                })?;
                println!();
                messages.push(ChatMessage::new("assistant", r[0].text.clone()));
            }
            Ok(())
        }
        Command::Tokenize {
            model,
            text,
            format,
        } => {
            let path = model.model_path()?;
            let mut loaded = convoy_weights::load_model(&path, convoy_weights::LoadFormat::Auto)?;
            let codec = convoy_engine::TextCodec::take_from(&mut loaded);
            let ids = codec.encode(&text)?;
            match format.as_str() {
                "json" => println!("{}", serde_json::json!({ "ids": ids })),
                "text" => println!(
                    "{}",
                    ids.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                other => bail!("--format must be text or json, got {other:?}"),
            }
            Ok(())
        }
    }
}
