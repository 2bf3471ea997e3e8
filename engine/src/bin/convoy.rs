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
    /// Run the daemon: a JSON-lines API on a Unix socket (see docs/protocol.md).
    Serve {
        #[command(flatten)]
        model: ModelArgs,
        /// Socket path (default: $XDG_RUNTIME_DIR/convoy.sock, else ./convoy.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Socket file mode, octal.
        #[arg(long, default_value = "0600")]
        socket_mode: String,
        /// Give the socket to this group (widen --socket-mode to 0660 to let it in).
        #[arg(long)]
        socket_group: Option<String>,
        /// Connections beyond this are refused with an error line.
        #[arg(long, default_value_t = 16384)]
        max_connections: usize,
        /// Longest accepted line.
        #[arg(long, default_value = "8MiB")]
        max_line_bytes: String,
        /// Unwritten bytes per connection before a request is cancelled as a slow consumer.
        #[arg(long, default_value = "1MiB")]
        max_pending_bytes: String,
        /// Seconds running requests may take to finish after SIGTERM.
        #[arg(long, default_value_t = 30.0)]
        drain_timeout: f64,
        /// Requests that may wait; more are refused (queue_full).
        #[arg(long, default_value_t = 4096)]
        max_queued: usize,
        /// Requests running at once.
        #[arg(long, default_value_t = 256)]
        max_running: usize,
        /// Most tokens in one forward pass.
        #[arg(long, default_value_t = 2048)]
        max_batched_tokens: usize,
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
        Command::Serve {
            model,
            socket,
            socket_mode,
            socket_group,
            max_connections,
            max_line_bytes,
            max_pending_bytes,
            drain_timeout,
            max_queued,
            max_running,
            max_batched_tokens,
        } => {
            let socket = socket.unwrap_or_else(|| {
                std::env::var_os("XDG_RUNTIME_DIR")
                    .map(|d| PathBuf::from(d).join("convoy.sock"))
                    .unwrap_or_else(|| PathBuf::from("convoy.sock"))
            });
            let mode = u32::from_str_radix(socket_mode.trim_start_matches("0o"), 8)
                .with_context(|| format!("--socket-mode {socket_mode:?} is not octal"))?;
            if !(drain_timeout >= 0.0 && drain_timeout.is_finite()) {
                bail!("--drain-timeout must be a non-negative number of seconds");
            }
            convoy_engine::api::server::raise_fd_limit();
            let loaded = model.load()?;
            let mut cfg = loaded.generator_config();
            cfg.max_running = max_running.max(1);
            cfg.max_batched_tokens = max_batched_tokens.max(1);
            let max_context = loaded.model.config.max_position_embeddings;
            eprintln!(
                "convoy: model {} ({} layers, {} heads, {} KV heads), device cpu, {} KV blocks of {} tokens (+{} host blocks)",
                model.model_path()?.display(),
                loaded.model.config.num_layers,
                loaded.model.config.num_heads,
                loaded.model.config.num_kv_heads,
                cfg.num_blocks,
                cfg.block_size,
                cfg.num_host_blocks
            );
            let codec = loaded.codec.clone();
            let engine =
                convoy_engine::service::spawn_cpu(loaded.model, loaded.codec, cfg, max_queued);
            let serve_cfg = convoy_engine::api::server::ServeConfig {
                socket,
                socket_mode: mode,
                socket_group,
                max_connections,
                max_line_bytes: convoy_engine::options::parse_bytes(&max_line_bytes)?,
                max_pending_bytes: convoy_engine::options::parse_bytes(&max_pending_bytes)?,
                drain_timeout: std::time::Duration::from_secs_f64(drain_timeout),
                max_context,
            };
            let code = convoy_engine::api::server::serve(engine, codec, serve_cfg)?;
            if code != 0 {
                std::process::exit(code);
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
