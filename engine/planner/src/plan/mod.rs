//! Capacity planning on the simulation backend (`convoy plan`, docs/planning.md): how many
//! GPUs (replicas) a chat workload needs to meet latency SLOs, what latencies a given fleet
//! gives, and how many GPUs a relaxed SLO frees.
//!
//! The pieces: [`profile`] (a replica: model shape, KV memory, scheduler defaults and a step
//! [`CostModel`](convoy_engine::sim::CostModel), calibrated on this machine or a GPU roofline),
//! [`fleet`] (N replicas of the real `EngineCore` over `SimRunner` behind a router, driven by a
//! workload in virtual time; the sampled-replica scale trick) and [`search`] (the questions).
//!
//! Invariants: every prediction is produced by the real scheduler and KV-cache manager; the
//! prefix-cache hit ratio is an output of routing and cache size, never an input; the same
//! inputs and seed give the same answer; every refusal is a [`PlanError`] with a stable
//! [`code`](PlanError::code).

pub mod cli;
pub mod fleet;
pub mod plot;
pub mod profile;
pub mod search;

pub use fleet::{FleetConfig, FleetReport, Load, ReplicaConfig, Router};
pub use profile::{GpuSpec, ModelShape, Profile, RooflineOptions};
pub use search::{BatchConfig, Objective, PlanOptions, Planner, SearchResult, Slo};

use crate::workload::WorkloadError;

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The workload spec is bad (its own code).
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// No cost model was given.
    #[error("no device profile: give --profile FILE.json (from `convoy-bench calibrate`) or --gpu NAME with --model-config")]
    ProfileMissing,
    /// The profile file cannot be read.
    #[error("cannot read profile {path}: {message}")]
    ProfileUnreadable {
        /// The file.
        path: String,
        /// The I/O error.
        message: String,
    },
    /// The profile file is not a valid profile.
    #[error("{path}: not a valid profile: {message}")]
    ProfileInvalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An unknown GPU name.
    #[error("unknown GPU {0:?}: known are h100, h200, a100")]
    UnknownGpu(String),
    /// The model config cannot be read or named.
    #[error("model config {what}: {message}")]
    ModelConfig {
        /// The path or name.
        what: String,
        /// What is wrong.
        message: String,
    },
    /// The weights leave no room for a KV cache.
    #[error("{model} does not fit one {gpu}: {weight_gb:.1} GB of weights, {usable_gb:.1} GB usable (tensor parallelism is not modelled)")]
    WeightsDoNotFit {
        /// Model name.
        model: String,
        /// GPU name.
        gpu: String,
        /// Weights, GB.
        weight_gb: f64,
        /// Usable memory, GB.
        usable_gb: f64,
    },
    /// A command-line value is out of range or contradicts another.
    #[error("{name}: {message}")]
    InvalidArgument {
        /// The option.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Searching for the fewest GPUs needs at least one SLO.
    #[error("no SLO given: the fewest-GPUs search needs at least one of --slo-ttft-p50-ms, --slo-ttft-p99-ms, --slo-tpot-ms, --slo-e2e-ms (or give --gpus N for the latencies of a fleet)")]
    NoSlo,
    /// No fleet up to the limit meets the SLOs.
    #[error("no fleet of up to {max_gpus} GPUs meets the SLOs: the best ({} GPUs, max running {}, token budget {}) reached TTFT p50 {:.0} ms, p99 {:.0} ms, TPOT p99 {:.1} ms, e2e p99 {:.0} ms; failing: {}", best.gpus, best.max_running, best.max_batched_tokens, best.ttft_p50_ms, best.ttft_p99_ms, best.tpot_p99_ms, best.e2e_p99_ms, failing.join(", "))]
    Unreachable {
        /// The limit searched.
        max_gpus: usize,
        /// The best fleet reached.
        best: Box<FleetReport>,
        /// The SLOs it fails, e.g. `ttft_p99 1234 ms > 1000 ms`.
        failing: Vec<String>,
    },
}

impl PlanError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            PlanError::Workload(e) => e.code(),
            PlanError::ProfileMissing => "profile_missing",
            PlanError::ProfileUnreadable { .. } => "profile_unreadable",
            PlanError::ProfileInvalid { .. } => "profile_invalid",
            PlanError::UnknownGpu(_) => "unknown_gpu",
            PlanError::ModelConfig { .. } => "model_config_invalid",
            PlanError::WeightsDoNotFit { .. } => "weights_do_not_fit",
            PlanError::InvalidArgument { .. } => "invalid_argument",
            PlanError::NoSlo => "slo_missing",
            PlanError::Unreachable { .. } => "slo_unreachable",
        }
    }

    pub(crate) fn invalid(name: &str, message: impl Into<String>) -> PlanError {
        PlanError::InvalidArgument {
            name: name.to_string(),
            message: message.into(),
        }
    }
}
