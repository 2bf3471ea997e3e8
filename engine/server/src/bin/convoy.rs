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
    #[arg(long, default_value_t = convoy_engine::sampler::DEFAULT_MAX_TOKENS)]
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
        /// Requests one connection may have waiting; more of its requests are refused
        /// (queue_full), so one client cannot fill the queue for the others.
        #[arg(long, default_value_t = 256)]
        max_queued_per_connection: usize,
        /// Target milliseconds of a step: prompt chunks are sized to it (from measured step
        /// times) so running streams keep a steady pace and new requests are admitted within
        /// about a step of a long prompt; 0 turns it off.
        #[arg(long, default_value_t = 250.0)]
        step_time_target_ms: f64,
        /// Write one JSON line per engine step (its shape and times) to this file, for
        /// `convoy-bench calibrate --from-steps` (docs/planning.md).
        #[arg(long)]
        step_log: Option<PathBuf>,
        /// A directory of prompt templates (`*.yaml.j2`) that `generate` may name with
        /// `template`; reloaded on SIGHUP (a bad reload keeps the old set). See docs/prompts.md.
        #[arg(long)]
        templates: Option<PathBuf>,
        /// Most bytes one template render may write; rendering stops with `template_error`
        /// as soon as its text would pass this.
        #[arg(long, default_value = "1MiB")]
        template_max_output: String,
        /// Address space of each template render worker (a child process): a render that needs
        /// more stops with `template_error`; the daemon and other requests carry on.
        #[arg(long, default_value = "1GiB")]
        template_memory: String,
        /// Seconds one template render may take, waiting for a free worker included.
        #[arg(long, default_value_t = 10.0)]
        template_timeout: f64,
        /// Template render worker processes alive at once.
        #[arg(long, default_value_t = 4)]
        template_workers: usize,
        /// With --device sim: the GPU simulated (h100, h200, a100), by its roofline.
        #[arg(long, default_value = "h100")]
        sim_gpu: String,
        /// With --device sim: the model shape simulated (llama-3-8b, llama-3-70b, mistral-7b, ... or a
        /// config.json); the tokenizer still comes from --model.
        #[arg(long, default_value = "llama-3-8b")]
        sim_model: String,
        /// With --device sim: a device profile file instead (`convoy-bench calibrate --out`).
        #[arg(long)]
        sim_profile: Option<PathBuf>,
        /// Requests running at once.
        #[arg(long, default_value_t = 256)]
        max_running: usize,
        /// Most tokens in one forward pass.
        #[arg(long, default_value_t = 2048)]
        max_batched_tokens: usize,
        /// The OpenAI-compatible HTTP API and Prometheus metrics (docs/http.md).
        #[command(flatten)]
        http: Box<convoy_server::api::http::HttpArgs>,
    },
    /// Render a prompt template: its parts with their tokens, what truncation keeps, and the
    /// chat the model would see (see docs/prompts.md).
    Render(RenderArgs),
    /// Capacity planning on the simulation backend: the fewest GPUs that meet latency SLOs
    /// for a workload, the latencies of a given fleet, and the curve between (docs/planning.md).
    Plan(Box<convoy_planner::plan::cli::PlanArgs>),
    /// Print the token ids of a text, and each token's text.
    Tokenize {
        /// A .gguf file, a directory holding one, or a Hugging Face directory (default: the
        /// SmolLM2 GGUF of the checkout's models/).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The text.
        #[arg(long)]
        text: String,
        /// text (the ids on one line, then one line per token) or json.
        #[arg(long, default_value = "text")]
        format: String,
    },
    /// Internal: a template render worker of `convoy serve` (JSON lines on stdin/stdout).
    #[command(hide = true)]
    RenderWorker,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            let mut loaded = model.load()?;
            let ids = match (prompt, prompt_ids, chat) {
                (Some(p), _, _) => loaded.codec.encode(&p)?,
                (_, Some(ids), _) => ids,
                (_, _, Some(path)) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    // The daemon's own checks: one validation path for every face.
                    let messages: Vec<ChatMessage> =
                        convoy_server::api::protocol::parse_chat(&text).map_err(|e| {
                            anyhow::anyhow!("{}: {} ({})", path.display(), e.message, e.code)
                        })?;
                    loaded.codec.encode_chat(&messages)?
                }
                _ => bail!("give one of --prompt, --prompt-ids or --chat"),
            };
            let cfg = loaded.generator_config();
            let mut generator = Generator::on_weights(
                loaded.device,
                &mut loaded.weights,
                loaded.codec.clone(),
                cfg,
            )?;
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
            let mut loaded = model.load()?;
            // Every turn is a chat: say so before the first prompt, not after it.
            if !loaded.codec.has_chat_template() {
                bail!(
                    "the model has no chat template, which `convoy chat` needs: give one with \
                     --chat-template FILE (a Jinja file)"
                );
            }
            let cfg = loaded.generator_config();
            let num_layers = loaded.weights.config().num_layers;
            let mut generator = Generator::on_weights(
                loaded.device,
                &mut loaded.weights,
                loaded.codec.clone(),
                cfg,
            )?;
            let mut messages: Vec<ChatMessage> = system
                .into_iter()
                .map(|s| ChatMessage::new("system", s))
                .collect();
            let stdin = std::io::stdin();
            let mut out = std::io::stdout();
            eprintln!(
                "convoy chat: {} ({} layers). Empty line or Ctrl-D to quit. After each reply: the \
                 prompt tokens served from the cache, and the time to the first token.",
                model.model_path()?.display(),
                num_layers
            );
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 {
                    // Ctrl-D leaves the cursor after the prompt: end its line.
                    eprintln!();
                    break;
                }
                if line.trim().is_empty() {
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
                // The cache at work, quietly, on the side channel: how much of the
                // conversation was already computed, and how soon the reply began.
                let prompt_tokens = req.prompt_ids.len();
                let cached = r[0].cached_tokens + r[0].host_cached_tokens;
                // A length stop is --max-tokens, or a context or KV cache that is full.
                let cut = match r[0].finish_reason {
                    convoy_engine::FinishReason::Length
                        if r[0].output_ids.len() >= req.params.max_tokens =>
                    {
                        ", reply cut at --max-tokens"
                    }
                    convoy_engine::FinishReason::Length => {
                        ", reply cut: the context or the KV cache is full"
                    }
                    _ => "",
                };
                eprintln!(
                    "  [{cached}/{prompt_tokens} prompt tokens cached, first token in {:.0} ms{cut}]",
                    r[0].time_to_first_token.as_secs_f64() * 1e3
                );
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
            max_queued_per_connection,
            step_time_target_ms,
            step_log,
            templates,
            template_max_output,
            template_memory,
            template_timeout,
            template_workers,
            sim_gpu,
            sim_model,
            sim_profile,
            max_running,
            max_batched_tokens,
            http,
        } => {
            if !(template_timeout > 0.0 && template_timeout.is_finite()) {
                bail!("--template-timeout must be a positive number of seconds");
            }
            let render = convoy_server::prompt::RenderLimits {
                max_output_bytes: convoy_engine::options::parse_bytes(&template_max_output)?,
                memory_bytes: convoy_engine::options::parse_bytes(&template_memory)? as u64,
                timeout: std::time::Duration::from_secs_f64(template_timeout),
                workers: template_workers.max(1),
            };
            let render_worker = convoy_server::prompt::WorkerCommand {
                program: std::env::current_exe()
                    .context("cannot find the convoy binary to start template render workers")?,
                args: vec!["render-worker".to_string()],
            };
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
            if !(step_time_target_ms >= 0.0 && step_time_target_ms.is_finite()) {
                bail!("--step-time-target-ms must be a non-negative number");
            }
            let http = http.config(&model.model_path()?)?;
            let step_log = step_log
                .map(|p| convoy_engine::step_log::StepLog::create(&p))
                .transpose()?;
            let max_connections = match convoy_server::api::raise_fd_limit() {
                Some(limit) => fit_connections(limit, max_connections, &http, render.workers),
                None => max_connections,
            };
            // The socket and the HTTP addresses are checked before the model loads (a large
            // model takes minutes): a typo fails at once.
            convoy_server::api::socket::preflight_socket(&socket, socket_group.as_deref())?;
            http.preflight()?;
            let service = convoy_engine::service::ServiceConfig {
                max_queued,
                max_queued_per_owner: max_queued_per_connection.max(1),
                step_time_target: (step_time_target_ms > 0.0)
                    .then(|| std::time::Duration::from_secs_f64(step_time_target_ms / 1e3)),
                step_log,
            };
            let (engine, codec, max_context) = if model.device == "sim" {
                start_simulated(
                    &model,
                    SimArgs {
                        gpu: &sim_gpu,
                        model: &sim_model,
                        profile: sim_profile.as_deref(),
                    },
                    max_running,
                    max_batched_tokens,
                    service,
                )?
            } else {
                let loaded = model.load()?;
                let mut cfg = loaded.generator_config();
                cfg.max_running = max_running.max(1);
                cfg.max_batched_tokens = max_batched_tokens.max(1);
                let config = loaded.weights.config();
                let max_context = config.max_position_embeddings;
                eprintln!(
                    "convoy: model {} ({} layers, {} heads, {} KV heads), device {}, {} KV blocks of {} tokens (+{} host blocks)",
                    model.model_path()?.display(),
                    config.num_layers,
                    config.num_heads,
                    config.num_kv_heads,
                    loaded.device.as_str(),
                    cfg.num_blocks,
                    cfg.block_size,
                    cfg.num_host_blocks
                );
                let codec = loaded.codec.clone();
                let engine = convoy_engine::service::spawn_on(
                    loaded.device,
                    loaded.weights,
                    loaded.codec,
                    cfg,
                    service,
                );
                (engine, codec, max_context)
            };
            let serve_cfg = convoy_server::api::server::ServeConfig {
                socket,
                socket_mode: mode,
                socket_group,
                max_connections,
                max_line_bytes: convoy_engine::options::parse_bytes(&max_line_bytes)?,
                max_pending_bytes: convoy_engine::options::parse_bytes(&max_pending_bytes)?,
                drain_timeout: std::time::Duration::from_secs_f64(drain_timeout),
                max_context,
                templates,
                render,
                render_worker: Some(render_worker),
                http,
            };
            let code = convoy_server::api::server::serve(engine, codec, serve_cfg)?;
            if code != 0 {
                std::process::exit(code);
            }
            Ok(())
        }
        Command::Render(args) => render_template(args),
        Command::RenderWorker => {
            let code = convoy_server::prompt::run_worker(
                std::io::stdin().lock(),
                std::io::stdout().lock(),
            );
            std::process::exit(code)
        }
        Command::Plan(args) => convoy_planner::plan::cli::run(*args),
        Command::Tokenize {
            model,
            text,
            format,
        } => {
            let path = convoy_engine::options::find_model(model.as_deref())?;
            let mut loaded = convoy_weights::load_model(&path, convoy_weights::LoadFormat::Auto)?;
            let codec = convoy_engine::TextCodec::take_from(&mut loaded);
            let ids = codec.encode(&text)?;
            // Each token's own bytes: text where they are whole characters, escaped bytes where
            // a token holds part of one.
            let pieces: Vec<String> = ids
                .iter()
                .map(|&id| {
                    let bytes = codec.token_bytes(id);
                    match String::from_utf8(bytes) {
                        Ok(text) => format!("{text:?}"),
                        Err(e) => format!("b\"{}\"", e.into_bytes().escape_ascii()),
                    }
                })
                .collect();
            match format.as_str() {
                "json" => {
                    let bytes: Vec<Vec<u8>> = ids.iter().map(|&id| codec.token_bytes(id)).collect();
                    // Each token's text, or null where its bytes are part of a character
                    // (`token_bytes` has them all).
                    let texts: Vec<Option<&str>> =
                        bytes.iter().map(|b| std::str::from_utf8(b).ok()).collect();
                    println!(
                        "{}",
                        serde_json::json!({ "ids": ids, "tokens": texts, "token_bytes": bytes })
                    )
                }
                "text" => {
                    println!(
                        "{}",
                        ids.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    );
                    for (id, piece) in ids.iter().zip(&pieces) {
                        println!("{id:>8}  {piece}");
                    }
                }
                other => bail!("--format must be text or json, got {other:?}"),
            }
            Ok(())
        }
    }
}

/// The simulated device of `convoy serve --device sim`.
struct SimArgs<'a> {
    gpu: &'a str,
    model: &'a str,
    profile: Option<&'a std::path::Path>,
}

/// Start the engine on the simulated device: the tokenizer and context length of `--model`,
/// the KV cache and step times of the device profile (a roofline of `--sim-gpu` and
/// `--sim-model`, or `--sim-profile`).
fn start_simulated(
    model: &ModelArgs,
    sim: SimArgs<'_>,
    max_running: usize,
    max_batched_tokens: usize,
    service: convoy_engine::service::ServiceConfig,
) -> Result<(
    convoy_engine::service::EngineHandle,
    convoy_engine::TextCodec,
    usize,
)> {
    use convoy_planner::plan::profile::{GpuSpec, ModelShape, Profile, RooflineOptions};
    let profile = match sim.profile {
        Some(p) => Profile::load(p)?,
        None => {
            let gpu = GpuSpec::named(sim.gpu)
                .with_context(|| format!("--sim-gpu {:?}: one of h100, h200, a100", sim.gpu))?;
            let shape = match ModelShape::named(sim.model) {
                Some(s) => s,
                None => ModelShape::from_config_file(std::path::Path::new(sim.model))
                    .with_context(|| {
                        format!(
                            "--sim-model {:?}: a config.json or one of {}",
                            sim.model,
                            ModelShape::NAMES.join(", ")
                        )
                    })?,
            };
            Profile::roofline(&gpu, &shape, &RooflineOptions::default())?
        }
    };
    let path = model.model_path()?;
    let mut loaded = convoy_weights::load_model(&path, convoy_weights::LoadFormat::Auto)?;
    let vocab = loaded.config.vocab_size;
    let max_context = loaded.config.max_position_embeddings;
    let mut codec = convoy_engine::TextCodec::take_from(&mut loaded);
    if let Some(t) = &model.chat_template {
        let source = std::fs::read_to_string(t)
            .with_context(|| format!("--chat-template {}", t.display()))?;
        codec.set_chat_template(&source)?;
    }
    drop(loaded);
    let mut cfg =
        convoy_engine::GeneratorConfig::new(profile.memory.num_blocks(), profile.memory.block_size);
    cfg.num_host_blocks = profile.memory.num_host_blocks();
    cfg.enable_prefix_caching = !model.no_prefix_caching;
    cfg.max_running = max_running.max(1);
    cfg.max_batched_tokens = max_batched_tokens.max(1);
    cfg.model_id = format!("sim:{}", profile.name);
    eprintln!(
        "convoy: simulated device {}, {} KV blocks of {} tokens (+{} host blocks); tokenizer of {}",
        profile.name,
        cfg.num_blocks,
        cfg.block_size,
        cfg.num_host_blocks,
        path.display()
    );
    let engine = convoy_engine::service::spawn_paced_sim(
        profile.cost,
        vocab,
        max_context,
        codec.clone(),
        cfg,
        service,
    );
    Ok((engine, codec, max_context))
}

/// The options of `convoy render`.
#[derive(clap::Args, Debug)]
struct RenderArgs {
    /// The template file; the other templates of its directory are loaded for includes.
    #[arg(long)]
    template: PathBuf,
    /// JSON file with the variables (an object); without it the template gets none.
    #[arg(long)]
    variables: Option<PathBuf>,
    /// Most tokens the parts may take, each part tokenized alone (default: no limit).
    #[arg(long)]
    token_limit: Option<usize>,
    /// Round the cut up to a multiple of this many tokens (default 1).
    #[arg(long, requires = "token_limit")]
    truncation_step: Option<usize>,
    /// The model whose tokenizer and chat template to use (default: the SmolLM2 GGUF under
    /// models/). Loaded only with --model, --token-limit or --format json.
    #[arg(long)]
    model: Option<PathBuf>,
    /// text (a summary and the chat), json, or yaml (the rendered text before parsing).
    #[arg(long, default_value = "text")]
    format: String,
}

/// `convoy render`: render a template file against variables, count and truncate its parts
/// with the model's tokenizer, and print the result (docs/prompts.md).
fn render_template(args: RenderArgs) -> Result<()> {
    use convoy_server::prompt::{build_prompt, Budget, TemplateRef, TemplateSet};

    if !matches!(args.format.as_str(), "text" | "json" | "yaml") {
        bail!("--format must be text, json or yaml, got {:?}", args.format);
    }
    let (mut set, name) = TemplateSet::load_file(&args.template)?;
    // The user owns these files: an undefined value names the variables not given.
    set.explain_named_templates();
    let variables: serde_json::Value = match &args.variables {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?
        }
        None => serde_json::json!({}),
    };
    let which = TemplateRef::Named(&name);
    if args.format == "yaml" {
        print!("{}", set.render_text(which, &variables)?);
        return Ok(());
    }
    let budget = args
        .token_limit
        .map(|limit| Budget::new(limit, args.truncation_step))
        .transpose()?;

    // Template errors first: they need no model.
    let parts = set.render(which, &variables)?;
    let needs_model = args.model.is_some() || budget.is_some() || args.format == "json";
    let codec = if needs_model {
        let path = convoy_engine::options::find_model(args.model.as_deref())?;
        let mut loaded = convoy_weights::load_model(&path, convoy_weights::LoadFormat::Auto)?;
        Some(convoy_engine::TextCodec::take_from(&mut loaded))
    } else {
        None
    };

    let prompt = match &codec {
        Some(c) => build_prompt(&name, parts, budget, |text| {
            c.encode(text).map(|ids| ids.len())
        })?,
        None => build_prompt(&name, parts, None, |_| {
            Ok::<usize, std::convert::Infallible>(0)
        })?,
    };
    let t = &prompt.truncation;

    if args.format == "json" {
        let codec = codec.as_ref().context("--format json needs the model")?;
        let prompt_ids = codec.encode_chat(&prompt.messages)?;
        let parts: Vec<serde_json::Value> = prompt
            .parts
            .iter()
            .zip(&prompt.part_tokens)
            .zip(&t.kept)
            .map(|((p, tokens), kept)| {
                serde_json::json!({
                    "name": p.name,
                    "role": p.role.as_str(),
                    "truncation_priority": p.truncation_priority,
                    "tokens": tokens,
                    "kept": kept,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "template": prompt.template,
            "parts": parts,
            "messages": prompt.messages,
            "part_tokens_before": t.tokens_before,
            "part_tokens_after": t.tokens_after,
            "token_limit": budget.map(|b| b.token_limit),
            "truncation_step": budget.map(|b| b.truncation_step),
            "cut_target": t.cut_target,
            "cut": prompt.cut_part_names(),
            "prompt_ids": prompt_ids,
        });
        println!("{doc}");
        return Ok(());
    }

    let mut out = String::new();
    let counted = codec.is_some();
    out.push_str(&format!(
        "template {} ({}): {} parts",
        prompt.template,
        args.template.display(),
        prompt.parts.len()
    ));
    if counted {
        out.push_str(&format!(", {} tokens", t.tokens_before));
    }
    match budget {
        Some(b) => out.push_str(&format!(
            " -> {} (token_limit {}, truncation_step {}: surplus {}, cut {})\n",
            t.tokens_after, b.token_limit, b.truncation_step, t.surplus, t.cut_target
        )),
        None => out.push_str(" (no token limit)\n"),
    }
    let width = prompt
        .parts
        .iter()
        .map(|p| p.name.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    out.push_str(&format!(
        "{:>4}  {:<width$}  {:<9}  {:>8}  {:>6}  kept\n",
        "#", "name", "role", "priority", "tokens"
    ));
    for (i, p) in prompt.parts.iter().enumerate() {
        let tokens = if counted {
            prompt.part_tokens[i].to_string()
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "{:>4}  {:<width$}  {:<9}  {:>8}  {:>6}  {}\n",
            i,
            p.name,
            p.role.as_str(),
            p.truncation_priority,
            tokens,
            if t.kept[i] { "kept" } else { "CUT" }
        ));
    }
    match &codec {
        Some(c) => {
            let chat = c.render_chat(&prompt.messages)?;
            let ids = c.encode_chat(&prompt.messages)?;
            // The limit counts the parts' own tokens; the chat template adds its role markers
            // on top, so the prompt the model sees is larger. Both, so nobody is surprised.
            out.push_str(&format!(
                "--- {} messages: {} tokens in the parts (what token_limit counts), {} tokens after the chat template (what the model reads):\n{chat}\n",
                prompt.messages.len(),
                t.tokens_after,
                ids.len()
            ));
        }
        None => {
            out.push_str(&format!(
                "--- {} messages (pass --model for token counts and the chat template):\n",
                prompt.messages.len()
            ));
            for m in &prompt.messages {
                out.push_str(&format!("[{}]\n{}\n", m.role, m.content));
            }
        }
    }
    print!("{out}");
    Ok(())
}

/// `--max-connections`, lowered (with a warning) to what the open-file limit `limit` holds:
/// past it `accept` fails and clients, health checks included, wait unanswered.
fn fit_connections(
    limit: u64,
    max_connections: usize,
    http: &convoy_server::api::http::HttpConfig,
    render_workers: usize,
) -> usize {
    // HTTP clients hold one descriptor each; a render worker three pipes.
    let http_clients = if http.enabled() {
        http.max_connections
    } else {
        0
    };
    let others = http_clients.saturating_add(render_workers.saturating_mul(3));
    let held = convoy_server::api::socket::connections_within(limit, max_connections, others);
    if held < max_connections {
        tracing::warn!(
            limit,
            max_connections,
            held,
            "connections lowered to the open-file limit"
        );
        eprintln!(
            "convoy: --max-connections {max_connections} lowered to {held}: the open-file limit is \
             {limit} (ulimit -n), one per connection, {others} kept for HTTP connections and \
             render workers and {} for the daemon",
            convoy_server::api::socket::daemon_reserve(limit)
        );
    }
    held
}
