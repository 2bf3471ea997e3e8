//! The continuous-batching scheduler: which requests run in the next forward pass and how many
//! tokens each computes.
//!
//! Per step, within a token budget (`max_batched_tokens`) and a cap on running sequences
//! (`max_running`):
//! 1. running requests first, by effective priority then arrival: each computes what it has not
//!    computed yet (one token when decoding, a chunk of its prompt when prefilling);
//! 2. then waiting requests, in the same order, while budget and blocks last. A new request first
//!    takes its longest cached prefix. The head of the queue is never skipped for a smaller
//!    request behind it, so a long prompt cannot be starved by short ones.
//!
//! When blocks run out, the running request with the lowest effective priority (latest arrival
//! among equals) that is not yet scheduled this step is preempted: its computed blocks are
//! released into the prefix cache (from where eviction copies them to the host tier when there is
//! room), and it goes back to the waiting queue with its arrival order and priority. On resume its
//! prefix is matched again: from the device, from the host tier (swap in, no recompute), or
//! recomputed for whatever was dropped.
//!
//! Fairness between owners (connections): within an effective priority, the waiting queue is
//! ordered by a start-time fair-queuing tag (an owner's next request is tagged one after the
//! later of its previous tag and the tag of the last admitted request), so owners take turns
//! however many requests each sent; and one owner may hold at most `max_queued_per_owner`
//! waiting requests, so it cannot fill the queue for everyone else. With one owner the order
//! is arrival order.
//!
//! Steady decodes and prompt admission: running requests that decode get their token before any
//! prefill chunk takes the rest of the budget, and when the engine sets a per-step token budget
//! ([`Scheduler::set_step_token_budget`], from a time target), every step carries at most that
//! many tokens (decodes always go, plus at least `MIN_PREFILL_CHUNK` prompt tokens so prefills
//! progress), so a long prompt cannot stall other streams, nor keep the engine from seeing new
//! arrivals for longer than a step. Paced, while requests wait and could be admitted, a running
//! prefill's chunk takes at most half of what the decodes leave, so a newcomer is admitted
//! within a step or two of a long prompt rather than after it.
//!
//! Aging: a request's effective priority grows by one every `aging_steps` steps since it arrived
//! (kept while it runs and across preemptions), so a low priority request is never starved
//! forever.
//!
//! A request that finishes generating stays one more step (`Finishing`) to compute its last
//! sampled token's K/V, so the next turn of the conversation finds the whole reply in cache; a
//! waiting request that shares a long prefix with a finishing one is admitted a step later, once
//! that reply is in the cache.

use rustc_hash::FxHashMap;

use crate::kv_cache_manager::{KvCacheConfig, KvCacheManager, OutOfBlocks};
use crate::output::{
    ModelOutput, NewRequestData, OutputMismatch, RequestOutput, ScheduledRequest, SchedulerOutput,
};
use crate::request::{FinishReason, NewRequest, Request, RequestId, RequestStatus};

/// Fewest prompt tokens a step with decodes still gives to prefills under a step budget.
pub const MIN_PREFILL_CHUNK: usize = 16;

/// Scheduler limits.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most tokens in one forward pass.
    pub max_batched_tokens: usize,
    /// Most requests holding KV blocks at once.
    pub max_running: usize,
    /// Most requests waiting; more are refused.
    pub max_queued: usize,
    /// Most requests one owner may have waiting; more of its requests are refused.
    pub max_queued_per_owner: usize,
    /// Steps of waiting per +1 of effective priority.
    pub aging_steps: u64,
    /// Longest sequence (prompt + output) the model takes.
    pub max_model_len: usize,
    /// The KV cache.
    pub kv: KvCacheConfig,
}

impl SchedulerConfig {
    /// Defaults around a KV cache config.
    pub fn new(kv: KvCacheConfig) -> SchedulerConfig {
        SchedulerConfig {
            max_batched_tokens: 2048,
            max_running: 256,
            max_queued: 4096,
            max_queued_per_owner: 4096,
            aging_steps: 64,
            max_model_len: usize::MAX,
            kv,
        }
    }
}

/// Why a request was refused. [`AddError::code`] names the kind for the wire.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// The waiting queue is full.
    #[error("the queue is full ({waiting} requests waiting)")]
    QueueFull {
        /// Requests waiting.
        waiting: usize,
    },
    /// This owner already has its share of the queue.
    #[error("this connection already has {waiting} requests waiting (at most {limit})")]
    OwnerQueueFull {
        /// The owner's requests waiting.
        waiting: usize,
        /// The per-owner limit.
        limit: usize,
    },
    /// The id is already live.
    #[error("request id {0} is already live")]
    DuplicateId(RequestId),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt does not fit the model's context.
    #[error("the prompt has {tokens} tokens; the context holds {limit}")]
    PromptTooLong {
        /// Prompt tokens.
        tokens: usize,
        /// Longest sequence the model takes.
        limit: usize,
    },
    /// The prompt needs more KV blocks than the whole cache has.
    #[error("the prompt needs {needed} KV blocks; the cache has {available}")]
    PromptExceedsCache {
        /// Blocks the prompt and one generated token need.
        needed: usize,
        /// Device blocks in all.
        available: usize,
    },
}

impl AddError {
    /// The protocol's error code (docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            AddError::QueueFull { .. } | AddError::OwnerQueueFull { .. } => "queue_full",
            AddError::DuplicateId(_) => "duplicate_id",
            AddError::EmptyPrompt => "empty_prompt",
            AddError::PromptTooLong { .. } | AddError::PromptExceedsCache { .. } => {
                "prompt_too_long"
            }
        }
    }
}

/// The scheduler; owns the KV-cache manager.
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    requests: FxHashMap<RequestId, Request>,
    waiting: Vec<RequestId>,
    /// Waiting requests per owner (the per-owner queue limit without a scan of the queue).
    waiting_per_owner: FxHashMap<u64, usize>,
    running: Vec<RequestId>,
    step: u64,
    next_arrival: u64,
    preemptions: u64,
    /// The queue head that last failed to get blocks, and how many blocks were free then: it
    /// is not matched again (repeating the lookups and any swap-in copies) until more are free.
    blocked_head: Option<(RequestId, usize)>,
    /// Announced requests that left since the last step (for `SchedulerOutput::finished_ids`).
    left: Vec<RequestId>,
    /// Tokens per step while decodes run, when the engine sets a time-based budget.
    step_token_budget: Option<usize>,
    /// Fair-queuing clock: the tag of the last admitted request.
    virtual_time: u64,
    /// Each owner's last tag (entries at or below `virtual_time` are pruned as redundant).
    owner_tags: FxHashMap<u64, u64>,
    /// Buffers reused from step to step, so a steady step allocates nothing.
    scratch: StepScratch,
}

/// Per-step working memory, kept between steps.
#[derive(Default)]
struct StepScratch {
    /// Sort keys of the running or waiting list, with their ids.
    keys: Vec<((i64, u64, u64), RequestId)>,
    /// Running requests that are finishing this step (for the next-turn rule).
    finishing: Vec<RequestId>,
    /// This step's sampled tokens by request.
    sampled: FxHashMap<RequestId, u32>,
}

impl Scheduler {
    /// An idle scheduler.
    pub fn new(cfg: SchedulerConfig) -> Scheduler {
        Scheduler {
            kv: KvCacheManager::new(cfg.kv.clone()),
            cfg,
            requests: FxHashMap::default(),
            waiting: Vec::new(),
            waiting_per_owner: FxHashMap::default(),
            running: Vec::new(),
            step: 0,
            next_arrival: 0,
            preemptions: 0,
            blocked_head: None,
            left: Vec::new(),
            step_token_budget: None,
            virtual_time: 0,
            owner_tags: FxHashMap::default(),
            scratch: StepScratch::default(),
        }
    }

    /// Limit the tokens of a step that carries decodes (`None`: only `max_batched_tokens`).
    /// The engine derives it from a target step time and the measured cost per token.
    pub fn set_step_token_budget(&mut self, tokens: Option<usize>) {
        self.step_token_budget = tokens;
    }

    /// The per-step budget set by [`Scheduler::set_step_token_budget`].
    pub fn step_token_budget(&self) -> Option<usize> {
        self.step_token_budget
    }

    /// Remove a request from the table, remembering it for the runner if it was announced.
    fn forget(&mut self, id: RequestId) -> Option<Request> {
        let r = self.requests.remove(&id)?;
        if r.announced {
            self.left.push(id);
        }
        Some(r)
    }

    /// The KV-cache manager.
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// A live request.
    pub fn request(&self, id: RequestId) -> Option<&Request> {
        self.requests.get(&id)
    }

    /// Requests waiting.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests running (including those finishing).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether nothing is live.
    pub fn is_idle(&self) -> bool {
        self.requests.is_empty()
    }

    /// Preemptions so far.
    pub fn num_preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Steps scheduled so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Queue a request.
    pub fn add(&mut self, r: NewRequest) -> Result<(), AddError> {
        if self.requests.contains_key(&r.id) {
            return Err(AddError::DuplicateId(r.id));
        }
        if r.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        if r.prompt.len() >= self.cfg.max_model_len {
            return Err(AddError::PromptTooLong {
                tokens: r.prompt.len(),
                limit: self.cfg.max_model_len,
            });
        }
        let needed = (r.prompt.len() + 1).div_ceil(self.kv.block_size());
        if needed > self.kv.device().num_blocks() {
            return Err(AddError::PromptExceedsCache {
                needed,
                available: self.kv.device().num_blocks(),
            });
        }
        if self.waiting.len() >= self.cfg.max_queued {
            return Err(AddError::QueueFull {
                waiting: self.waiting.len(),
            });
        }
        let of_owner = self.waiting_per_owner.get(&r.owner).copied().unwrap_or(0);
        if of_owner >= self.cfg.max_queued_per_owner {
            return Err(AddError::OwnerQueueFull {
                waiting: of_owner,
                limit: self.cfg.max_queued_per_owner,
            });
        }
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let last = self.owner_tags.get(&r.owner).copied().unwrap_or(0);
        let fair_tag = last.max(self.virtual_time) + 1;
        self.owner_tags.insert(r.owner, fair_tag);
        self.requests.insert(
            r.id,
            Request {
                id: r.id,
                prompt_len: r.prompt.len(),
                tokens: r.prompt,
                num_computed_tokens: 0,
                max_tokens: r.max_tokens.max(1),
                stop_token_ids: {
                    // Sorted and unique: each sampled token is looked up by binary search.
                    let mut ids = r.stop_token_ids;
                    ids.sort_unstable();
                    ids.dedup();
                    ids
                },
                priority: r.priority,
                arrival,
                cache_salt: r.cache_salt,
                status: RequestStatus::Waiting,
                first_hit: None,
                num_preemptions: 0,
                arrival_step: self.step,
                fair_tag,
                owner: r.owner,
                sampling: r.sampling,
                announced: false,
                in_cache: false,
            },
        );
        self.push_waiting(r.id, r.owner);
        Ok(())
    }

    /// Put a request at the back of the waiting queue.
    fn push_waiting(&mut self, id: RequestId, owner: u64) {
        self.waiting.push(id);
        *self.waiting_per_owner.entry(owner).or_insert(0) += 1;
    }

    /// Count a request out of the waiting queue (the caller removes it from the list).
    fn left_waiting(&mut self, owner: u64) {
        if let Some(n) = self.waiting_per_owner.get_mut(&owner) {
            *n -= 1;
            if *n == 0 {
                self.waiting_per_owner.remove(&owner);
            }
        }
    }

    /// Base priority plus one for every `aging_steps` steps since the request arrived. The age
    /// counts while it runs and survives preemption, so an aged request is not the first victim
    /// and does not start over each time it is preempted.
    fn effective_priority(&self, r: &Request) -> i64 {
        let aged = (self.step.saturating_sub(r.arrival_step) / self.cfg.aging_steps.max(1)) as i64;
        r.priority as i64 + aged
    }

    /// Order `list` by `key`, computing each key once; an already ordered list (the usual
    /// case from one step to the next) costs one pass. Keys are unique (arrival breaks ties),
    /// so the order is the same as any sort's.
    fn sort_by_cached_key(
        &mut self,
        list: &mut [RequestId],
        key: impl Fn(&Self, &Request) -> (i64, u64, u64),
    ) {
        let mut keys = std::mem::take(&mut self.scratch.keys);
        keys.clear();
        keys.extend(list.iter().map(|&id| (key(self, &self.requests[&id]), id)));
        if !keys.is_sorted() {
            keys.sort_unstable();
            for (slot, &(_, id)) in list.iter_mut().zip(&keys) {
                *slot = id;
            }
        }
        self.scratch.keys = keys;
    }

    /// Order the running list (effective priority, then arrival) and, in the same pass, count
    /// the requests owed one token this step and note those finishing. Returns the count.
    fn sort_running(&mut self) -> usize {
        let mut keys = std::mem::take(&mut self.scratch.keys);
        keys.clear();
        self.scratch.finishing.clear();
        let mut owed = 0;
        for &id in &self.running {
            let r = &self.requests[&id];
            if r.tokens.len() - r.num_computed_tokens == 1 {
                owed += 1;
            }
            if matches!(r.status, RequestStatus::Finishing(_)) {
                self.scratch.finishing.push(id);
            }
            keys.push(((-self.effective_priority(r), r.arrival, 0), id));
        }
        if !keys.is_sorted() {
            keys.sort_unstable();
            for (slot, &(_, id)) in self.running.iter_mut().zip(&keys) {
                *slot = id;
            }
        }
        self.scratch.keys = keys;
        owed
    }

    /// Order the waiting queue: effective priority, then fair-queuing tag, then arrival.
    fn sort_waiting(&mut self) {
        let mut waiting = std::mem::take(&mut self.waiting);
        self.sort_by_cached_key(&mut waiting, |s, r| {
            (-s.effective_priority(r), r.fair_tag, r.arrival)
        });
        self.waiting = waiting;
    }

    /// Advance the fair-queuing clock past an admitted request's tag.
    fn advance_virtual_time(&mut self, tag: u64) {
        if tag > self.virtual_time {
            self.virtual_time = tag;
            if self.owner_tags.len() > 64 {
                let now = self.virtual_time;
                self.owner_tags.retain(|_, t| *t > now);
            }
        }
    }

    /// Blocks for `num_tokens` positions of scratch work under id `id` (e.g. recomputing a
    /// prompt without the cache to verify it), with the copies the allocation needs. Nothing
    /// computed there is cached; give them back with [`Scheduler::release_scratch`].
    pub fn reserve_scratch(
        &mut self,
        id: RequestId,
        tokens: &[u32],
    ) -> Option<(Vec<crate::BlockId>, Vec<crate::BlockCopy>)> {
        let mut copies = Vec::new();
        self.kv.begin(id, tokens, None, 0, &mut copies);
        match self.kv.allocate(id, tokens.len(), &mut copies) {
            Ok(()) => Some((self.kv.block_table(id).to_vec(), copies)),
            Err(_) => {
                self.kv.discard(id);
                None
            }
        }
    }

    /// Give back scratch blocks.
    pub fn release_scratch(&mut self, id: RequestId) {
        self.kv.discard(id);
    }

    /// Remove a request at once (cancel, disconnect, deadline): its blocks go back to the pool
    /// now. Returns whether it was live.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(r) = self.forget(id) else {
            return false;
        };
        if r.status == RequestStatus::Waiting {
            self.waiting.retain(|&w| w != id);
            self.left_waiting(r.owner);
        } else {
            self.running.retain(|&w| w != id);
        }
        if r.in_cache {
            self.kv.free(id, &r.tokens, r.num_computed_tokens);
        }
        true
    }

    /// End generation now (e.g. a stop string seen by the detokeniser); the request still
    /// caches its last token's K/V on the next step.
    pub fn finish(&mut self, id: RequestId, reason: FinishReason) {
        if let Some(r) = self.requests.get_mut(&id) {
            if matches!(r.status, RequestStatus::Running) {
                r.status = RequestStatus::Finishing(reason);
            } else if r.status == RequestStatus::Waiting {
                self.abort(id);
            }
        }
    }

    fn preempt(&mut self, id: RequestId, out: &mut SchedulerOutput) {
        self.running.retain(|&r| r != id);
        let r = self.requests.get_mut(&id).expect("running request exists");
        self.kv.free(id, &r.tokens, r.num_computed_tokens);
        r.in_cache = false;
        r.num_computed_tokens = 0;
        if let RequestStatus::Finishing(_) = r.status {
            // Its output is complete; only the cache entry of its last token is lost.
            self.forget(id);
            return;
        }
        r.status = RequestStatus::Waiting;
        r.num_preemptions += 1;
        let owner = r.owner;
        self.preemptions += 1;
        self.push_waiting(id, owner);
        out.preempted.push(id);
    }

    /// Whether `id`'s prompt continues a request that is finishing this step past that
    /// request's own prompt (i.e. into its reply, whose last K/V is computed only now).
    fn shares_prefix_with_finishing(&self, id: RequestId) -> bool {
        if !self.cfg.kv.enable_prefix_caching {
            return false;
        }
        let r = &self.requests[&id];
        // A finishing request preempted this step is gone from the table (its output was
        // complete): only those still running count.
        self.scratch.finishing.iter().any(|f| {
            let Some(f) = self.requests.get(f) else {
                return false;
            };
            matches!(f.status, RequestStatus::Finishing(_))
                && f.cache_salt == r.cache_salt
                && f.tokens
                    .iter()
                    .zip(&r.tokens)
                    .take_while(|(a, b)| a == b)
                    .count()
                    > f.prompt_len
        })
    }

    /// Decide the next step.
    pub fn schedule(&mut self) -> SchedulerOutput {
        let mut out = SchedulerOutput::default();
        self.schedule_into(&mut out);
        out
    }

    /// Decide the next step into `out`, reusing its buffers (the token and block-table vectors
    /// of its scheduled requests included): a caller that keeps one `SchedulerOutput` across
    /// steps makes a steady step allocation-free. Everything `out` held is replaced.
    pub fn schedule_into(&mut self, out: &mut SchedulerOutput) {
        self.step += 1;
        out.step = self.step;
        out.new_requests.clear();
        out.finished_ids.clear();
        out.copies.clear();
        out.preempted.clear();
        out.ended.clear();
        out.num_batched_tokens = 0;
        let mut filled = 0usize;
        // Running requests that compute exactly one token this step (decodes, and finishing
        // requests caching their last token): each is owed one token of the budget before any
        // prefill chunk takes the rest. Finishing requests are noted for the next-turn rule.
        let mut owed = self.sort_running();
        let mut budget = self.cfg.max_batched_tokens;
        // Every step is paced, with or without decodes: the engine only sees new arrivals
        // between steps, so the step's length bounds how long a newcomer waits to be admitted.
        if let Some(step_budget) = self.step_token_budget {
            budget = budget.min(step_budget.max(owed + MIN_PREFILL_CHUNK));
        }
        let full_budget = budget;
        // Paced, while requests wait and there is room to admit them, a running prefill takes at
        // most half of what the decodes leave: a long prompt cannot hold newcomers back until it
        // is done.
        let room = !self.waiting.is_empty() && self.running.len() < self.cfg.max_running;
        let prefill_cap = if room && self.step_token_budget.is_some() {
            (budget.saturating_sub(owed) / 2).max(1)
        } else {
            usize::MAX
        };

        // 1. Running requests.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let r = &self.requests[&id];
            let finishing = matches!(r.status, RequestStatus::Finishing(_));
            let left = r.tokens.len() - r.num_computed_tokens;
            let need = if left == 1 {
                owed -= 1;
                1
            } else {
                left.min(budget.saturating_sub(owed)).min(prefill_cap)
            };
            if need == 0 {
                i += 1;
                continue;
            }
            let target = r.num_computed_tokens + need;
            let mut scheduled = true;
            loop {
                match self.kv.allocate(id, target, &mut out.copies) {
                    Ok(()) => break,
                    Err(OutOfBlocks { .. }) => {
                        // Preempt the lowest-priority request not yet scheduled this step.
                        let victim = *self.running.last().expect("non-empty");
                        if self.running.len() - 1 > i {
                            let v = &self.requests[&victim];
                            if v.tokens.len() - v.num_computed_tokens == 1 {
                                owed -= 1;
                            }
                            self.preempt(victim, out);
                        } else if i == 0 {
                            // Alone and still out of blocks: the cache cannot hold it, ever.
                            self.running.retain(|&x| x != id);
                            if let Some(r) = self.forget(id) {
                                self.kv.free(id, &r.tokens, r.num_computed_tokens);
                                let reason = match r.status {
                                    RequestStatus::Finishing(reason) => reason,
                                    _ => FinishReason::Length,
                                };
                                out.ended.push((id, reason));
                            }
                            scheduled = false;
                            break;
                        } else {
                            self.preempt(id, out);
                            scheduled = false;
                            break;
                        }
                    }
                }
            }
            if !scheduled {
                break;
            }
            let r = self.requests.get_mut(&id).expect("running request exists");
            let sample = !finishing && target == r.tokens.len();
            if !r.announced {
                r.announced = true;
                out.new_requests.push(NewRequestData {
                    id,
                    sampling: r.sampling.clone(),
                });
            }
            push_scheduled(
                out,
                &mut filled,
                id,
                r.num_computed_tokens,
                &r.tokens[r.num_computed_tokens..target],
                self.kv.block_table(id),
                sample,
            );
            budget -= need;
            i += 1;
        }

        // 2. Waiting requests, head of the queue first.
        if budget > 0 && !self.waiting.is_empty() {
            self.sort_waiting();
        }
        let mut admitted = 0;
        while budget > 0
            && self.running.len() < self.cfg.max_running
            && admitted < self.waiting.len()
        {
            let id = self.waiting[admitted];
            // The next turn of a conversation that arrives while the previous turn is still
            // finishing waits one step, so that it finds the previous turn's whole reply in
            // the cache instead of recomputing its tail.
            if self.shares_prefix_with_finishing(id) {
                break;
            }
            let free = self.kv.device().num_free();
            if self
                .blocked_head
                .is_some_and(|(head, was_free)| head == id && free <= was_free)
            {
                break;
            }
            let r = self.requests.get_mut(&id).expect("waiting request exists");
            let hit = self.kv.begin(
                id,
                &r.tokens,
                r.cache_salt.as_deref(),
                r.tokens.len() - 1,
                &mut out.copies,
            );
            let computed = hit.total();
            let need = (r.tokens.len() - computed).min(budget);
            if self
                .kv
                .allocate(id, computed + need, &mut out.copies)
                .is_err()
            {
                // Not enough blocks now: give back what the match took and wait. (Its copies
                // stay in the step: the swap-ins they describe have already happened.)
                self.kv.discard(id);
                self.blocked_head = Some((id, free));
                break;
            }
            let tag = r.fair_tag;
            let owner = r.owner;
            r.num_computed_tokens = computed;
            r.in_cache = true;
            r.status = RequestStatus::Running;
            if r.first_hit.is_none() {
                r.first_hit = Some(hit);
            }
            if !r.announced {
                r.announced = true;
                out.new_requests.push(NewRequestData {
                    id,
                    sampling: r.sampling.clone(),
                });
            }
            let target = computed + need;
            push_scheduled(
                out,
                &mut filled,
                id,
                computed,
                &r.tokens[computed..target],
                self.kv.block_table(id),
                target == r.tokens.len(),
            );
            budget -= need;
            admitted += 1;
            self.left_waiting(owner);
            self.running.push(id);
            self.advance_virtual_time(tag);
        }
        self.waiting.drain(..admitted);
        out.scheduled.truncate(filled);
        out.num_batched_tokens = full_budget - budget;
        out.finished_ids.append(&mut self.left);
    }

    /// Match a runner's tokens to the step by id (into `scratch.sampled`), refusing a
    /// doubled, missing or unexpected token.
    fn check_sampled(
        &mut self,
        out: &SchedulerOutput,
        model: &ModelOutput,
    ) -> Result<(), OutputMismatch> {
        let tokens = &mut self.scratch.sampled;
        tokens.clear();
        for t in &model.sampled {
            if tokens.insert(t.id, t.token).is_some() {
                return Err(OutputMismatch::Duplicate(t.id));
            }
        }
        let mut sampled = 0;
        for s in out.scheduled.iter().filter(|s| s.sample) {
            if !tokens.contains_key(&s.id) {
                return Err(OutputMismatch::Missing(s.id));
            }
            sampled += 1;
        }
        // Every sampled request has its token and tokens are unique: any token beyond that
        // count is for a request that was not sampled (found the slow way, on error only).
        if tokens.len() != sampled {
            let unexpected = model
                .sampled
                .iter()
                .find(|t| !out.scheduled.iter().any(|s| s.sample && s.id == t.id))
                .map_or(0, |t| t.id);
            return Err(OutputMismatch::Unexpected(unexpected));
        }
        Ok(())
    }

    /// Apply a step's results: advance computed counts, cache full blocks, append sampled
    /// tokens and apply the stop rules. Tokens are matched to requests by id; a runner output
    /// that does not match the step exactly (a missing, extra or doubled token) is refused
    /// before anything changes.
    pub fn update_from_output(
        &mut self,
        out: &SchedulerOutput,
        model: &ModelOutput,
    ) -> Result<Vec<RequestOutput>, OutputMismatch> {
        let mut results = Vec::with_capacity(model.sampled.len());
        self.update_from_output_into(out, model, &mut results)?;
        Ok(results)
    }

    /// [`Scheduler::update_from_output`] into `results` (cleared first), reusing its buffer.
    /// Linear in the step: the tokens are matched through one map, and requests that leave
    /// are taken off the running list in one pass.
    pub fn update_from_output_into(
        &mut self,
        out: &SchedulerOutput,
        model: &ModelOutput,
        results: &mut Vec<RequestOutput>,
    ) -> Result<(), OutputMismatch> {
        results.clear();
        // A runner that answers in the step's order (the usual case) is matched pairwise; any
        // other order goes through a map. Either way each token finds its request by id.
        let in_order = model.sampled.len() <= out.scheduled.len()
            && out
                .scheduled
                .iter()
                .filter(|s| s.sample)
                .map(|s| s.id)
                .eq(model.sampled.iter().map(|t| t.id));
        if !in_order {
            self.check_sampled(out, model)?;
        }
        let mut next_sampled = 0;
        let mut left_running = false;
        for s in &out.scheduled {
            let token = match (s.sample, in_order) {
                (false, _) => None,
                (true, true) => {
                    next_sampled += 1;
                    Some(model.sampled[next_sampled - 1].token)
                }
                (true, false) => self.scratch.sampled.get(&s.id).copied(),
            };
            let Some(r) = self.requests.get_mut(&s.id) else {
                continue;
            };
            r.num_computed_tokens = s.num_computed_tokens + s.token_ids.len();
            self.kv.commit(s.id, &r.tokens, r.num_computed_tokens);
            if let RequestStatus::Finishing(_) = r.status {
                if r.num_computed_tokens == r.tokens.len() {
                    self.kv.free(s.id, &r.tokens, r.num_computed_tokens);
                    self.forget(s.id);
                    left_running = true;
                }
                continue;
            }
            let prefix_hit = (r.num_output_tokens() == 0 && s.sample)
                .then_some(r.first_hit)
                .flatten();
            let Some(token) = token else {
                continue;
            };
            r.tokens.push(token);
            let mut finished = None;
            if r.stop_token_ids.binary_search(&token).is_ok() {
                finished = Some(FinishReason::Stop);
            } else if r.num_output_tokens() >= r.max_tokens
                || r.tokens.len() >= self.cfg.max_model_len
            {
                finished = Some(FinishReason::Length);
            }
            if let Some(reason) = finished {
                r.status = RequestStatus::Finishing(reason);
            }
            results.push(RequestOutput {
                id: s.id,
                new_token: token,
                finished,
                prefix_hit,
            });
        }
        if left_running {
            let requests = &self.requests;
            self.running.retain(|id| requests.contains_key(id));
        }
        Ok(())
    }
}

/// Write the `filled`-th scheduled request of `out`, reusing the vectors of the entry already
/// there from an earlier step.
fn push_scheduled(
    out: &mut SchedulerOutput,
    filled: &mut usize,
    id: RequestId,
    num_computed_tokens: usize,
    token_ids: &[u32],
    block_table: &[crate::BlockId],
    sample: bool,
) {
    if *filled == out.scheduled.len() {
        out.scheduled.push(ScheduledRequest {
            id,
            num_computed_tokens,
            token_ids: token_ids.to_vec(),
            block_table: block_table.to_vec(),
            sample,
        });
    } else {
        let slot = &mut out.scheduled[*filled];
        slot.id = id;
        slot.num_computed_tokens = num_computed_tokens;
        slot.token_ids.clear();
        slot.token_ids.extend_from_slice(token_ids);
        slot.block_table.clear();
        slot.block_table.extend_from_slice(block_table);
        slot.sample = sample;
    }
    *filled += 1;
}
