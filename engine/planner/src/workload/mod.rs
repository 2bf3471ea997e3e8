//! Workloads: seeded, reproducible descriptions of traffic, shared by the load generator
//! (`convoy-bench run`, which plays them against a real daemon) and the capacity planner
//! (`convoy plan`, which plays them against the simulation backend).
//!
//! A workload is a [`WorkloadSpec`] (a small TOML or JSON file, docs/workloads.md) that yields
//! [`Conversation`]s: a persona or system prompt, then turns, each a user message of a given
//! length, a reply budget and the think time before it. Single-request kinds (`random`,
//! `shared-prefix`) are one-turn conversations. Arrivals ([`ArrivalProcess`]) say when each
//! conversation starts.
//!
//! Invariants: the same spec and seed give the same conversations and the same arrival times,
//! in every process and on every machine (seeded xoshiro streams, one per conversation, so a
//! conversation does not depend on how many others were drawn before it); every length drawn
//! is at least 1 token.

mod arrival;
mod conversation;
mod dist;
mod error;
mod spec;
mod text;
mod trace;

pub use arrival::{ArrivalProcess, Arrivals};
pub use conversation::{Conversation, Turn, Workload};
pub use dist::Dist;
pub use error::WorkloadError;
pub use spec::{
    ArrivalProcessKind, ArrivalSpec, ChatSpec, RandomSpec, SharedPrefixSpec, TraceSpec,
    WorkloadKind, WorkloadSpec,
};
pub use text::{synthetic_ids, synthetic_text};
pub use trace::{read_trace, TraceMessage, TraceRecord, TRACE_FIELDS};
