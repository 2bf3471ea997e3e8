//! The workload spec file (TOML, or JSON when the name ends in `.json`): which kind of traffic,
//! its lengths and times, and how conversations arrive. Every field is documented in
//! docs/workloads.md; unknown fields are refused.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Dist, WorkloadError};

/// The kinds of traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    /// Character.ai-like chat: personas shared by many conversations of several turns whose
    /// history grows, with think times between turns.
    Chat,
    /// Single requests on a few long common prefixes.
    SharedPrefix,
    /// Independent single requests.
    Random,
    /// Replay of a JSONL file of timestamped requests.
    Trace,
}

/// A whole spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Which traffic.
    pub kind: WorkloadKind,
    /// Seed of every draw (lengths, texts, arrivals).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Reply budget of each request (`max_tokens`), in tokens.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: Dist,
    /// Replies run to `max_tokens` whatever the model says (so lengths are the spec's).
    #[serde(default = "default_true")]
    pub ignore_eos: bool,
    /// Sampling temperature (0 = greedy).
    #[serde(default)]
    pub temperature: f64,
    /// `kind = "chat"`.
    #[serde(default)]
    pub chat: ChatSpec,
    /// `kind = "shared-prefix"`.
    #[serde(default)]
    pub shared_prefix: SharedPrefixSpec,
    /// `kind = "random"`.
    #[serde(default)]
    pub random: RandomSpec,
    /// `kind = "trace"`.
    #[serde(default)]
    pub trace: TraceSpec,
    /// When conversations (or single requests) start.
    #[serde(default)]
    pub arrival: ArrivalSpec,
}

/// The chat kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChatSpec {
    /// Distinct personas; each conversation draws one uniformly.
    pub personas: usize,
    /// Length of a persona's system prompt in words of synthetic text, drawn once per persona.
    pub persona_tokens: Dist,
    /// Turns of a conversation.
    pub turns: Dist,
    /// Length of each user message in words of synthetic text (after its tag).
    pub user_tokens: Dist,
    /// Seconds between a reply's end and the next user message.
    pub think_time_s: Dist,
}

impl Default for ChatSpec {
    fn default() -> ChatSpec {
        ChatSpec {
            personas: 16,
            persona_tokens: Dist::Named(super::dist::NamedDist::Uniform {
                min: 500.0,
                max: 2000.0,
            }),
            turns: Dist::Named(super::dist::NamedDist::Uniform { min: 3.0, max: 8.0 }),
            user_tokens: Dist::Named(super::dist::NamedDist::Lognormal {
                mean: 30.0,
                sigma: 0.5,
            }),
            think_time_s: Dist::Named(super::dist::NamedDist::Exponential { mean: 5.0 }),
        }
    }
}

/// The shared-prefix kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SharedPrefixSpec {
    /// Distinct prefixes; each request draws one uniformly.
    pub prefixes: usize,
    /// Length of each prefix, drawn once per prefix.
    pub prefix_tokens: Dist,
    /// Length of each request's own suffix.
    pub suffix_tokens: Dist,
}

impl Default for SharedPrefixSpec {
    fn default() -> SharedPrefixSpec {
        SharedPrefixSpec {
            prefixes: 4,
            prefix_tokens: Dist::Fixed(1024.0),
            suffix_tokens: Dist::Fixed(32.0),
        }
    }
}

/// The random kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RandomSpec {
    /// Length of each prompt.
    pub prompt_tokens: Dist,
}

impl Default for RandomSpec {
    fn default() -> RandomSpec {
        RandomSpec {
            prompt_tokens: Dist::Fixed(256.0),
        }
    }
}

/// The trace kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSpec {
    /// The JSONL file (relative to the spec file's directory); see [`super::TraceRecord`].
    pub path: Option<PathBuf>,
    /// Multiply every timestamp by this (0.5 = twice as fast).
    pub time_scale: f64,
}

impl Default for TraceSpec {
    fn default() -> TraceSpec {
        TraceSpec {
            path: None,
            time_scale: 1.0,
        }
    }
}

/// How starts are spaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrivalProcessKind {
    /// Exponential gaps at `rate`.
    Poisson,
    /// Gamma gaps at `rate` with coefficient of variation `cv` (> 1 is burstier than Poisson).
    Gamma,
    /// A fixed number of conversations alive at once; each one ended starts the next.
    Closed,
}

/// When conversations start (for `trace`, the file's timestamps rule and this is ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArrivalSpec {
    /// The process.
    pub process: ArrivalProcessKind,
    /// New conversations per second (open processes).
    pub rate: f64,
    /// Coefficient of variation of the gaps (gamma).
    pub cv: f64,
    /// Conversations alive at once (closed).
    pub concurrency: usize,
}

impl Default for ArrivalSpec {
    fn default() -> ArrivalSpec {
        ArrivalSpec {
            process: ArrivalProcessKind::Poisson,
            rate: 1.0,
            cv: 1.0,
            concurrency: 16,
        }
    }
}

fn default_seed() -> u64 {
    1
}
fn default_max_tokens() -> Dist {
    Dist::Fixed(64.0)
}
fn default_true() -> bool {
    true
}

impl WorkloadSpec {
    /// Read and validate a spec file (`.json` as JSON, anything else as TOML). A relative trace
    /// path is made relative to the spec's directory.
    pub fn load(path: &Path) -> Result<WorkloadSpec, WorkloadError> {
        let text = std::fs::read_to_string(path).map_err(|source| WorkloadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut spec = WorkloadSpec::parse(&text, path)?;
        if let Some(p) = &spec.trace.path {
            if p.is_relative() {
                let base = path.parent().unwrap_or(Path::new("."));
                spec.trace.path = Some(base.join(p));
            }
        }
        Ok(spec)
    }

    /// Parse and validate spec text; `path` decides the syntax and names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<WorkloadSpec, WorkloadError> {
        let parse_err = |message: String| WorkloadError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let spec: WorkloadSpec = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(text).map_err(|e| parse_err(e.to_string()))?
        } else {
            toml::from_str(text).map_err(|e| parse_err(e.to_string()))?
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Check every range.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        self.max_tokens.validate("max_tokens")?;
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return Err(WorkloadError::invalid("temperature", "must be in [0, 2]"));
        }
        match self.kind {
            WorkloadKind::Chat => {
                let c = &self.chat;
                if c.personas == 0 {
                    return Err(WorkloadError::invalid(
                        "chat.personas",
                        "must be at least 1",
                    ));
                }
                c.persona_tokens.validate("chat.persona_tokens")?;
                c.turns.validate("chat.turns")?;
                c.user_tokens.validate("chat.user_tokens")?;
                c.think_time_s.validate("chat.think_time_s")?;
            }
            WorkloadKind::SharedPrefix => {
                let s = &self.shared_prefix;
                if s.prefixes == 0 {
                    return Err(WorkloadError::invalid(
                        "shared_prefix.prefixes",
                        "must be at least 1",
                    ));
                }
                s.prefix_tokens.validate("shared_prefix.prefix_tokens")?;
                s.suffix_tokens.validate("shared_prefix.suffix_tokens")?;
            }
            WorkloadKind::Random => self.random.prompt_tokens.validate("random.prompt_tokens")?,
            WorkloadKind::Trace => {
                if self.trace.path.is_none() {
                    return Err(WorkloadError::invalid(
                        "trace.path",
                        "kind = \"trace\" needs it",
                    ));
                }
                if !(self.trace.time_scale.is_finite() && self.trace.time_scale >= 0.0) {
                    return Err(WorkloadError::invalid("trace.time_scale", "must be >= 0"));
                }
            }
        }
        self.arrival.validate()
    }
}

impl ArrivalSpec {
    /// Check the process's parameters.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        match self.process {
            ArrivalProcessKind::Poisson | ArrivalProcessKind::Gamma => {
                if !(self.rate.is_finite() && self.rate > 0.0) {
                    return Err(WorkloadError::invalid("arrival.rate", "must be > 0"));
                }
                if self.process == ArrivalProcessKind::Gamma
                    && !(self.cv.is_finite() && self.cv > 0.0)
                {
                    return Err(WorkloadError::invalid("arrival.cv", "must be > 0"));
                }
            }
            ArrivalProcessKind::Closed => {
                if self.concurrency == 0 {
                    return Err(WorkloadError::invalid(
                        "arrival.concurrency",
                        "must be at least 1",
                    ));
                }
            }
        }
        Ok(())
    }
}
