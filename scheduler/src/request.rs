//! A request as the scheduler sees it: token ids and a count of how many of them have K/V in
//! the cache. No phases: a prompt chunk, a prefix hit and a decode step are all "compute the
//! tokens from `num_computed_tokens` on".

use crate::kv_cache_manager::PrefixMatch;
use crate::sampling::SamplingSpec;

/// Engine-wide request id.
pub type RequestId = u64;

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A stop token (EOS or a requested id) or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The client cancelled or disconnected.
    Cancelled,
    /// The request's deadline passed.
    Deadline,
    /// The client fell too far behind reading its stream.
    SlowConsumer,
    /// The engine failed.
    Error,
}

impl FinishReason {
    /// The protocol's name for the reason.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Deadline => "deadline",
            FinishReason::SlowConsumer => "slow_consumer",
            FinishReason::Error => "error",
        }
    }
}

/// Where a request is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestStatus {
    /// Queued (new, or preempted and waiting to resume).
    Waiting,
    /// Holding KV blocks and scheduled every step.
    Running,
    /// Done generating; one more step computes its last token's K/V for the cache.
    Finishing(FinishReason),
}

/// What the caller hands to [`crate::Scheduler::add`].
#[derive(Clone, Debug, Default)]
pub struct NewRequest {
    /// Id chosen by the caller, unique among live requests.
    pub id: RequestId,
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token ids that end generation (EOS included unless the caller ignores it).
    pub stop_token_ids: Vec<u32>,
    /// Larger is served first; equal priorities are first come, first served.
    pub priority: i32,
    /// Requests with different salts never share cached K/V.
    pub cache_salt: Option<String>,
    /// Who sent it (a connection): the waiting queue is shared fairly between owners.
    pub owner: u64,
    /// How the runner draws its tokens.
    pub sampling: SamplingSpec,
}

/// A live request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Id.
    pub id: RequestId,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt within `tokens`.
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed_tokens: usize,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Tokens that end generation, sorted and unique.
    pub stop_token_ids: Vec<u32>,
    /// Base priority (larger first).
    pub priority: i32,
    /// Arrival order, for first come, first served among equals; kept across preemptions.
    pub arrival: u64,
    /// Cache salt.
    pub cache_salt: Option<String>,
    /// Status.
    pub status: RequestStatus,
    /// What the cache served at first admission.
    pub first_hit: Option<PrefixMatch>,
    /// Times the request was preempted.
    pub num_preemptions: u32,
    /// Scheduler step at which the request arrived (its age, for aging, counts from here).
    pub arrival_step: u64,
    /// Who sent it.
    pub owner: u64,
    /// Start-time fair-queuing tag among owners (see the scheduler's header).
    pub fair_tag: u64,
    /// How the runner draws its tokens.
    pub sampling: SamplingSpec,
    /// Whether the runner has been told of it (in a step's `new_requests`).
    pub(crate) announced: bool,
    /// Whether the KV-cache manager holds a sequence for it.
    pub(crate) in_cache: bool,
}

impl Request {
    /// Generated tokens so far.
    pub fn num_output_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// The generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }
}
