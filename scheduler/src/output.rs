//! The named types at the boundaries of one engine step:
//! `Scheduler::schedule() -> SchedulerOutput`, `ModelRunner::execute(&SchedulerOutput) ->
//! ModelOutput`, `Scheduler::update_from_output(ModelOutput) -> Vec<RequestOutput>`.

use crate::block_pool::BlockId;
use crate::kv_cache_manager::{BlockCopy, PrefixMatch};
use crate::request::{FinishReason, RequestId};
use crate::sampling::SamplingSpec;

/// A request the runner has not seen before: it sets up its sampling state from this.
#[derive(Clone, Debug, PartialEq)]
pub struct NewRequestData {
    /// The request.
    pub id: RequestId,
    /// How to draw its tokens.
    pub sampling: SamplingSpec,
}

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
///
/// Invariants: every id in `scheduled` is either in `new_requests` of this step or of an
/// earlier one, and in no `finished_ids` since; an id appears in `finished_ids` once, in the
/// first step after it left the scheduler (finished, aborted or ended), so the runner can drop
/// its state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SchedulerOutput {
    /// Step number.
    pub step: u64,
    /// Requests scheduled for the first time this step (announced to the runner once, not
    /// again when they resume after a preemption).
    pub new_requests: Vec<NewRequestData>,
    /// Requests that left the scheduler since the previous step.
    pub finished_ids: Vec<RequestId>,
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

/// What the runner computed: a token for every scheduled request with `sample`, matched to
/// requests by id (the order is the runner's business).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModelOutput {
    /// Sampled tokens.
    pub sampled: Vec<SampledToken>,
}

impl ModelOutput {
    /// `token` for every request `out` samples: a stand-in model for studying the scheduler
    /// alone (benchmarks, tests).
    pub fn constant(out: &SchedulerOutput, token: u32) -> ModelOutput {
        ModelOutput {
            sampled: out
                .scheduled
                .iter()
                .filter(|r| r.sample)
                .map(|r| SampledToken { id: r.id, token })
                .collect(),
        }
    }
}

/// What happened to one request this step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestOutput {
    /// The request.
    pub id: RequestId,
    /// The token generated this step.
    pub new_token: u32,
    /// Set when the request finished generating this step.
    pub finished: Option<FinishReason>,
    /// What the cache served, on the step the request first ran.
    pub prefix_hit: Option<PrefixMatch>,
}

/// The runner's output does not match the step it was given: a token for a request that was
/// not sampled, a missing token, or two tokens for one request. Continuing would hand tokens to
/// the wrong conversation, so the engine stops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OutputMismatch {
    /// A sampled request got no token.
    #[error("the runner returned no token for request {0}, which was sampled this step")]
    Missing(RequestId),
    /// A token for a request that was not sampled this step.
    #[error("the runner returned a token for request {0}, which was not sampled this step")]
    Unexpected(RequestId),
    /// Two tokens for one request.
    #[error("the runner returned two tokens for request {0}")]
    Duplicate(RequestId),
}
