//! The named types at the boundaries of one engine step:
//! `Scheduler::schedule() -> SchedulerOutput`, `ModelRunner::execute(&SchedulerOutput) ->
//! ModelOutput`, `Scheduler::update_from_output(ModelOutput) -> Vec<RequestOutput>`.

use crate::block_pool::BlockId;
use crate::kv_cache_manager::{BlockCopy, PrefixMatch};
use crate::request::{FinishReason, RequestId};

/// One request's part of a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScheduledRequest {
    /// The request.
    pub id: RequestId,
    /// Tokens already in the cache before this step (the position of the first new token).
    pub num_computed_tokens: usize,
    /// The tokens to compute this step.
    pub token_ids: Vec<u32>,
    /// The request's block table, covering every position up to the new tokens.
    pub block_table: Vec<BlockId>,
    /// Whether to sample a token from the last new position.
    pub sample: bool,
}

/// What the scheduler decided for one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerOutput {
    /// Step number.
    pub step: u64,
    /// Requests in the forward pass, in batch order.
    pub scheduled: Vec<ScheduledRequest>,
    /// Block copies to execute, in order, before the forward pass.
    pub copies: Vec<BlockCopy>,
    /// Requests preempted this step (their blocks are back in the cache).
    pub preempted: Vec<RequestId>,
    /// Tokens in the forward pass.
    pub num_batched_tokens: usize,
    /// Requests the scheduler ended itself: alone in the cache and still out of blocks, they
    /// can never grow (finish reason `Length`).
    pub ended: Vec<(RequestId, FinishReason)>,
}

/// One sampled token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampledToken {
    /// The request.
    pub id: RequestId,
    /// The token.
    pub token: u32,
}

/// What the runner computed: a token for every scheduled request with `sample`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelOutput {
    /// Sampled tokens.
    pub sampled: Vec<SampledToken>,
}

/// What happened to one request this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutput {
    /// The request.
    pub id: RequestId,
    /// Tokens generated this step.
    pub new_token_ids: Vec<u32>,
    /// Set when the request finished generating this step.
    pub finished: Option<FinishReason>,
    /// What the cache served, on the step the request first ran.
    pub prefix_hit: Option<PrefixMatch>,
}
