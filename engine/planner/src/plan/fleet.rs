//! Fleet simulation: N replicas, each the real `EngineCore` (scheduler, KV-cache manager with
//! prefix caching, host tier, preemption) over a [`SimRunner`], behind a router, fed by a
//! workload's conversations; a discrete-event loop over virtual time.
//!
//! Events are conversation starts (open loop from [`Arrivals`], closed loop, or a trace's
//! timestamps), turn sends (a turn is sent `think_s` after the previous reply ended) and replica
//! steps (a replica with work steps at its own clock; a step's cost moves that clock). The next
//! event is the earliest of the three; sends at the same instant as a step go first, so a
//! request that reaches a replica while it is busy waits for the next step, as in the daemon.
//! Latencies are measured from the send, not from when the engine noticed the request: a send
//! reaches its replica the cost model's `request_edge_s` later (the daemon's framing,
//! templating and tokenising, and the first token's way back), and each of its tokens reaches
//! the client `request_edge_per_running_s` x (other requests running on the replica when its
//! first token was made) after the engine made it: the part of the edge that grows with load.
//!
//! A turn's prompt is what the daemon would see: ChatML-style framing (5 template tokens per
//! message, the profile's count for the assistant header), the persona's ids (the same in every
//! conversation that shares it) or, without a persona, the template's default system message
//! (the same in every conversation), then each earlier turn's user ids and the reply ids the
//! simulator produced, then this turn's user ids. Reply ids are a seeded function of (conversation, turn), the same on
//! every replica, so the prefix cache works across turns exactly when the turns meet on one
//! replica: the hit ratio is an output of routing and cache size, never an input.
//!
//! The scale trick (docs/planning.md): only `k` of the `N` replicas run in the engine; a turn
//! routed to one of the others is not simulated, and its reply is taken to end after an
//! estimated latency (running means of the simulated TTFT and TPOT), which only shifts when the
//! conversation's next turn is sent. Under sticky routing (jump consistent hash of the
//! conversation) every replica sees an independent, statistically identical share of the
//! conversations, so each simulated replica is its own independent group (run on its own
//! thread) fed only the conversations that hash to it. Under round-robin and least-loaded each
//! turn lands on a replica drawn uniformly from `N` (round-robin among the simulated ones when
//! it is one of them), which keeps the cross-replica cache effect (a turn finds its history on
//! its replica with probability ~1/N). Turns sent before `sim_start` (the early part of the
//! warm-up) are not simulated either: they only age the conversation population, and the cache
//! warms in the simulated part of the warm-up.
//!
//! Invariants: the same config and seed give the same report (groups are independent and merged
//! in order); a measured request is one sent in `[warmup, warmup + window)`; requests still
//! unfinished when the simulation stops count as infinitely slow.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use convoy_scheduler::{KvCacheConfig, SchedulerConfig};
use serde::Serialize;

use crate::workload::{Arrivals, Conversation, Workload};
use convoy_engine::core::{EngineCore, EngineRequest, EventKind};
use convoy_engine::sampler::SamplingParams;
use convoy_engine::sim::{sim_reply_ids, CostModel, SimClock, SimRunner};
use convoy_engine::tokenizer::TextCodec;

use super::profile::TextCounts;

/// How requests are spread over replicas.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Router {
    /// Every turn of a conversation to the same replica (jump consistent hash of its id).
    Sticky,
    /// Turns in turn.
    RoundRobin,
    /// The replica with the fewest running + waiting requests.
    LeastLoaded,
}

impl Router {
    /// Its command-line name.
    pub fn name(self) -> &'static str {
        match self {
            Router::Sticky => "sticky",
            Router::RoundRobin => "round-robin",
            Router::LeastLoaded => "least-loaded",
        }
    }
}

/// One replica's engine settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplicaConfig {
    /// Requests running at once.
    pub max_running: usize,
    /// Most tokens in one step.
    pub max_batched_tokens: usize,
    /// StepPacer target (`convoy serve --step-time-target-ms`); `None` = off.
    pub step_time_target: Option<Duration>,
    /// Device KV blocks.
    pub num_blocks: usize,
    /// Host-tier KV blocks.
    pub num_host_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Longest sequence.
    pub max_model_len: usize,
    /// Prefix caching on.
    pub prefix_caching: bool,
}

/// How conversations start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Open loop: conversations per second, gap coefficient of variation.
    Open {
        /// Conversations per second (whole fleet).
        conversations_per_s: f64,
        /// Gap CV (1 = Poisson).
        cv: f64,
    },
    /// This many conversations alive at once (whole fleet).
    Closed {
        /// Conversations.
        concurrency: usize,
    },
    /// The workload is a trace: its timestamps.
    Trace,
}

/// Stop early once the p99 TTFT bound is certainly broken.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EarlyStop {
    /// The bound, seconds.
    pub ttft_s: f64,
    /// Share of measured requests that may exceed it (0.01 for a p99).
    pub share: f64,
}

/// A fleet run.
#[derive(Clone, Debug)]
pub struct FleetConfig {
    /// Replicas (GPUs).
    pub replicas: usize,
    /// Router.
    pub router: Router,
    /// Each replica's engine.
    pub replica: ReplicaConfig,
    /// Step cost.
    pub cost: CostModel,
    /// Vocabulary (simulated token ids are drawn below it).
    pub vocab: usize,
    /// Arrivals.
    pub load: Load,
    /// Seed of the arrival stream and routing draws.
    pub seed: u64,
    /// Replicas run in the engine (clamped to `replicas`); the rest are sampled away.
    pub simulated: usize,
    /// Seconds before measuring.
    pub warmup_s: f64,
    /// Seconds of sends measured.
    pub window_s: f64,
    /// Sends before this are not simulated (early warm-up), seconds.
    pub sim_start_s: f64,
    /// Stop, as overloaded, once a request waited this long for its first token.
    pub overload_wait_s: f64,
    /// Stop once a p99 bound is certainly broken (search mode).
    pub early_stop: Option<EarlyStop>,
    /// Expected (TTFT, TPOT) in seconds, for turns that are not simulated until simulated
    /// ones say better.
    pub latency_hint: (f64, f64),
    /// Log the steps of a one-replica fleet here (the daemon's `--step-log` format, with
    /// modelled times); ignored for larger fleets.
    pub step_log: Option<std::path::PathBuf>,
}

/// What a fleet run measured (fleet-wide figures scaled from the simulated share).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FleetReport {
    /// Replicas.
    pub gpus: usize,
    /// Router name.
    pub router: String,
    /// Requests running at once per replica.
    pub max_running: usize,
    /// Token budget per step.
    pub max_batched_tokens: usize,
    /// Replicas run in the engine.
    pub simulated_replicas: usize,
    /// Measured requests (finished or not).
    pub requests: usize,
    /// Measurement window, seconds.
    pub window_s: f64,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Time to first token, ms.
    pub ttft_p50_ms: f64,
    /// Time to first token, ms.
    pub ttft_p99_ms: f64,
    /// Time per output token after the first (per-request mean), ms.
    pub tpot_p50_ms: f64,
    /// Time per output token, ms.
    pub tpot_p99_ms: f64,
    /// End to end, ms.
    pub e2e_p50_ms: f64,
    /// End to end, ms.
    pub e2e_p99_ms: f64,
    /// Prompt tokens served from either cache tier / prompt tokens.
    pub hit_ratio: f64,
    /// Of which from the host tier.
    pub host_hit_ratio: f64,
    /// Finished requests per second, whole fleet.
    pub requests_per_s: f64,
    /// Output tokens per second, whole fleet.
    pub output_tokens_per_s: f64,
    /// Offered messages per second, whole fleet (measured sends).
    pub offered_per_s: f64,
    /// The message rate the fleet was asked to serve (`None` for closed loops and traces).
    /// Below it in a chat, sends in the window fall short of it while the conversations
    /// reach their steady mix or when replies are slow enough to hold back next turns.
    pub nominal_per_s: Option<f64>,
    /// Busy share of the simulated replicas' time during the window.
    pub utilization: f64,
    /// Mean sequences per step on the simulated replicas.
    pub mean_batch: f64,
    /// Preemptions on the simulated replicas (whole run).
    pub preemptions: u64,
    /// Requests the engine refused (prompt longer than the context).
    pub refused: usize,
    /// Measured requests that never finished (stopped early or overloaded).
    pub unfinished: usize,
    /// A request waited longer than the overload bound: the queue grows without limit.
    pub overloaded: bool,
    /// Stopped once a p99 bound was certainly broken.
    pub stopped_early: bool,
    /// Requests run in the engine (all phases).
    pub simulated_requests: usize,
    /// Seconds of this machine's time.
    pub sim_wall_s: f64,
}

impl FleetReport {
    /// Whether the fleet cannot keep up with its load: a request waited past the overload
    /// bound, or a run that went to its end served under 90% of the nominal message rate with
    /// batches at 90% of max running and more. A saturated chat fleet holds back each
    /// conversation's next turn, so it serves less than offered before any queue gets long;
    /// the batch condition keeps the sampling noise of a few simulated replicas (and the ramp
    /// of a small fleet's conversations) from reading as overload.
    pub fn cannot_keep_up(&self) -> bool {
        let full = self.mean_batch >= 0.9 * self.max_running as f64;
        self.overloaded
            || (!self.stopped_early
                && full
                && self
                    .nominal_per_s
                    .is_some_and(|o| o > 0.0 && self.requests_per_s < 0.9 * o))
    }
}

// Chat framing tokens of the simulation (below the ids drawn for text).
const IM_START: u32 = 3;
const IM_END: u32 = 4;
const NL: u32 = 5;
const ROLE_SYSTEM: u32 = 6;
const ROLE_USER: u32 = 7;
const ROLE_ASSISTANT: u32 = 8;
/// Ids of simulated text are drawn from `FIRST_TEXT_ID..vocab`.
pub const FIRST_TEXT_ID: u32 = 100;
/// Seed of the text of the template's default system message.
const DEFAULT_SYSTEM_SEED: u64 = 0x0051_57e3;

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: u64) -> f64 {
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Jump consistent hash (Lamping & Veach): a key to one of `buckets`, uniform, and moving only
/// `1/(n+1)` of the keys when a bucket is added.
pub fn jump_hash(mut key: u64, buckets: usize) -> usize {
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b.max(0) as usize
}

pub use crate::workload::synthetic_ids;

fn word_id(word: &str, vocab: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in word.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    FIRST_TEXT_ID + (mix(h, 7) % (vocab - FIRST_TEXT_ID) as u64) as u32
}

/// One turn, as the planner keeps it.
#[derive(Clone, Debug)]
struct TurnSpec {
    user_seed: u64,
    user_tokens: u32,
    max_tokens: u32,
    think_s: f64,
    at_s: Option<f64>,
}

/// A conversation, as the planner keeps it (no text).
#[derive(Clone, Debug)]
struct ConvSpec {
    key: u64,
    system: Option<(u64, u32)>,
    turns: Vec<TurnSpec>,
    /// Trace turns: the whole prompt of each turn, already framed.
    explicit: Option<Vec<Arc<Vec<u32>>>>,
}

const CHUNK: usize = 4096;

/// Turns checked for landing on a sampled replica before a conversation is drawn (turns past
/// this of a conversation none of whose first turns landed are not simulated).
const LANDING_CHECK: usize = 64;

/// One conversation of the book, drawn on first use (`None`: past a trace's end).
type ConvSlot = OnceLock<Option<Arc<ConvSpec>>>;
/// Token ids of each shared system prompt, by (seed, length).
type PersonaIds = HashMap<(u64, u32), Arc<Vec<u32>>>;

/// Conversations drawn once and shared by every run of a plan (and its threads).
pub struct ConversationBook {
    workload: Arc<Workload>,
    vocab: u32,
    text: TextCounts,
    chunks: Vec<OnceLock<Vec<ConvSlot>>>,
    personas: std::sync::Mutex<PersonaIds>,
}

impl ConversationBook {
    /// A book over a workload, for a model with this vocabulary whose tokenizer counts the
    /// workload's synthetic text as `text` says.
    pub fn new(workload: Arc<Workload>, vocab: usize, text: TextCounts) -> ConversationBook {
        ConversationBook {
            workload,
            vocab: vocab as u32,
            text,
            chunks: (0..1 << 16).map(|_| OnceLock::new()).collect(),
            personas: Default::default(),
        }
    }

    /// The workload.
    pub fn workload(&self) -> &Workload {
        &self.workload
    }

    /// The routing key of conversation `i` (cheap: no conversation is drawn for generated
    /// kinds).
    fn key(&self, i: u64) -> u64 {
        if self.workload.len().is_some() {
            return self.get(i).map_or(0, |c| c.key);
        }
        mix(self.workload.spec().seed ^ 0x5eed, i)
    }

    fn get(&self, i: u64) -> Option<Arc<ConvSpec>> {
        let chunk = self.chunks.get(i as usize / CHUNK)?;
        let slots = chunk.get_or_init(|| (0..CHUNK).map(|_| OnceLock::new()).collect());
        slots[i as usize % CHUNK]
            .get_or_init(|| {
                self.workload
                    .conversation(i)
                    .map(|c| Arc::new(self.compact(&c)))
            })
            .clone()
    }

    fn compact(&self, c: &Conversation) -> ConvSpec {
        let explicit = c.turns.iter().any(|t| t.messages.is_some()).then(|| {
            c.turns
                .iter()
                .map(|t| {
                    let mut ids = Vec::new();
                    let messages = t.messages.iter().flatten();
                    if !messages.clone().any(|m| m.role == "system") {
                        ids.extend(self.default_system());
                    }
                    for m in messages {
                        let role = match m.role.as_str() {
                            "system" => ROLE_SYSTEM,
                            "assistant" => ROLE_ASSISTANT,
                            _ => ROLE_USER,
                        };
                        ids.extend([IM_START, role, NL]);
                        ids.extend(m.content.split_whitespace().map(|w| word_id(w, self.vocab)));
                        ids.extend([IM_END, NL]);
                    }
                    ids.extend(self.assistant_header());
                    Arc::new(ids)
                })
                .collect()
        });
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in c.id.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        ConvSpec {
            key: mix(h, 1),
            system: c
                .system
                .as_ref()
                .map(|_| (c.system_seed, c.system_tokens as u32)),
            turns: c
                .turns
                .iter()
                .map(|t| TurnSpec {
                    user_seed: t.user_seed,
                    user_tokens: t.user_tokens as u32,
                    max_tokens: t.max_tokens.max(1) as u32,
                    think_s: t.think_s,
                    at_s: t.at_s,
                })
                .collect(),
            explicit,
        }
    }

    fn persona(&self, seed: u64, tokens: u32) -> Arc<Vec<u32>> {
        let mut m = self.personas.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((seed, tokens))
            .or_insert_with(|| {
                Arc::new(synthetic_ids(
                    seed,
                    tokens as usize,
                    FIRST_TEXT_ID,
                    self.vocab,
                ))
            })
            .clone()
    }

    /// The template's own system message for a conversation without one (framing and one
    /// fixed text, the same in every conversation); empty when the template adds none.
    fn default_system(&self) -> Vec<u32> {
        let n = self.text.default_system_tokens as usize;
        if n == 0 {
            return Vec::new();
        }
        let mut ids = vec![IM_START, ROLE_SYSTEM, NL];
        ids.extend(synthetic_ids(
            DEFAULT_SYSTEM_SEED,
            n.saturating_sub(5),
            FIRST_TEXT_ID,
            self.vocab,
        ));
        ids.extend([IM_END, NL]);
        ids
    }

    /// The header that opens a reply: `<|im_start|>`, the role's tokens, the newline.
    fn assistant_header(&self) -> impl Iterator<Item = u32> {
        let role = (self.text.assistant_header_tokens as usize).saturating_sub(2);
        std::iter::once(IM_START)
            .chain(std::iter::repeat_n(ROLE_ASSISTANT, role))
            .chain(std::iter::once(NL))
    }

    /// The prompt of `turn`, given the reply lengths of the earlier turns.
    fn prompt(&self, c: &ConvSpec, conv: u64, turn: usize, reply_lens: &[u32]) -> Vec<u32> {
        if let Some(e) = &c.explicit {
            return e[turn].as_ref().clone();
        }
        let mut ids = Vec::new();
        if let Some((seed, n)) = c.system {
            ids.extend([IM_START, ROLE_SYSTEM, NL]);
            ids.extend_from_slice(&self.persona(seed, self.text.tokens(n)));
            ids.extend([IM_END, NL]);
        } else {
            ids.extend(self.default_system());
        }
        let tag = self.text.user_tag_tokens.round() as usize;
        for (j, t) in c.turns[..=turn].iter().enumerate() {
            ids.extend([IM_START, ROLE_USER, NL]);
            ids.extend(synthetic_ids(
                t.user_seed,
                self.text.tokens(t.user_tokens) as usize + tag,
                FIRST_TEXT_ID,
                self.vocab,
            ));
            ids.extend([IM_END, NL]);
            ids.extend(self.assistant_header());
            if j < turn {
                ids.extend(sim_reply_ids(
                    reply_seed(conv, j),
                    reply_lens[j] as usize,
                    self.vocab as usize,
                ));
                ids.extend([IM_END, NL]);
            }
        }
        ids
    }
}

fn reply_seed(conv: u64, turn: usize) -> u64 {
    mix(conv.wrapping_mul(0x1000_0001), turn as u64 + 0xabc)
}

/// A plain summary of a workload used to size runs.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WorkloadSummary {
    /// Mean turns per conversation.
    pub mean_turns: f64,
    /// Mean reply budget.
    pub mean_max_tokens: f64,
    /// Mean user message tokens.
    pub mean_user_tokens: f64,
    /// Mean shared (system) prompt tokens.
    pub mean_system_tokens: f64,
    /// Per sampled turn: (think time before it summed over the conversation so far, turns
    /// before it, reply tokens before it, think time just before it, the previous reply's
    /// budget), to turn latencies into conversation timing.
    #[serde(skip)]
    pub turns: Vec<(f64, u32, u32, f64, u32)>,
}

impl WorkloadSummary {
    /// The `q` quantile of a turn's start after its conversation's start, when a reply takes
    /// `ttft + (tokens - 1) x tpot`: after a warm-up this long the mix of turns is stationary
    /// (a share `1 - q` of the steady rate is still missing).
    pub fn turn_offset_s(&self, q: f64, ttft: f64, tpot: f64) -> f64 {
        let mut v: Vec<f64> = self
            .turns
            .iter()
            .map(|&(think, before, tokens, _, _)| {
                think + before as f64 * (ttft - tpot) + tokens as f64 * tpot
            })
            .collect();
        quantile(&mut v, q)
    }

    /// The 99th percentile of the time between a turn's reply and the next turn's send plus
    /// that reply: how long a conversation's KV must survive in the cache to be reused.
    pub fn reuse_gap_p99_s(&self, ttft: f64, tpot: f64) -> f64 {
        let mut v: Vec<f64> = self
            .turns
            .iter()
            .filter(|t| t.1 > 0)
            .map(|&(_, _, _, think, prev)| think + ttft + prev.saturating_sub(1) as f64 * tpot)
            .collect();
        quantile(&mut v, 0.99)
    }
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

/// Summarise the first `n` conversations of a book.
pub fn summarize(book: &ConversationBook, n: u64) -> WorkloadSummary {
    let mut convs = 0usize;
    let (mut mt, mut ut, mut st) = (0.0, 0.0, 0.0);
    let mut turns = Vec::new();
    for i in 0..n {
        let Some(c) = book.get(i) else { break };
        convs += 1;
        st += c.system.map_or(0.0, |s| s.1 as f64);
        let first_at = c.turns.first().and_then(|t| t.at_s);
        let (mut think, mut tokens) = (0.0, 0u32);
        for (j, tu) in c.turns.iter().enumerate() {
            mt += tu.max_tokens as f64;
            ut += tu.user_tokens as f64;
            let prev = if j > 0 { c.turns[j - 1].max_tokens } else { 0 };
            match (tu.at_s, first_at) {
                // A trace: offsets are its timestamps (latency plays no part).
                (Some(a), Some(f)) => turns.push((a - f, 0, 0, a - f, 0)),
                _ => {
                    think += tu.think_s;
                    turns.push((think, j as u32, tokens, tu.think_s, prev));
                }
            }
            tokens += tu.max_tokens;
        }
    }
    let n_turns = turns.len().max(1) as f64;
    WorkloadSummary {
        mean_turns: turns.len() as f64 / convs.max(1) as f64,
        mean_max_tokens: mt / n_turns,
        mean_user_tokens: ut / n_turns,
        mean_system_tokens: st / convs.max(1) as f64,
        turns,
    }
}

#[derive(Clone, Debug)]
struct ConvState {
    spec: Arc<ConvSpec>,
    reply_lens: Vec<u32>,
}

#[derive(Clone, Copy, Debug)]
struct Inflight {
    conv: u64,
    turn: usize,
    sent: f64,
    /// When the client has the first token (delivery included).
    first: Option<f64>,
    last: f64,
    tokens: usize,
    measured: bool,
    /// Seconds each token of this request takes to reach the client after the engine made it,
    /// beyond the constant edge: set when the first token is out, from the other requests
    /// running on the replica then (`request_edge_per_running_s`).
    delivery: f64,
}

/// Samples of one group.
#[derive(Clone, Debug, Default)]
struct Samples {
    ttft: Vec<f64>,
    tpot: Vec<f64>,
    e2e: Vec<f64>,
    prompt_tokens: u64,
    cached_tokens: u64,
    host_tokens: u64,
    output_tokens: u64,
    finished: usize,
    sent: usize,
    refused: usize,
    unfinished: usize,
    busy_s: f64,
    steps: u64,
    step_seqs: u64,
    preemptions: u64,
    simulated: usize,
    overloaded: bool,
    stopped_early: bool,
}

/// Which replicas a group runs and which conversations it is fed.
struct GroupPlan {
    /// Global indices of the replicas this group runs.
    replicas: Vec<usize>,
    /// Sticky: only conversations hashing to `replicas[0]`.
    sticky_target: Option<usize>,
    /// Share of the fleet's sends the group runs (for the early stop).
    share: f64,
}

/// Running means of simulated latencies, for turns that are not simulated.
struct Estimate {
    ttft: f64,
    tpot: f64,
    n: f64,
}

impl Estimate {
    fn observe(&mut self, ttft: f64, tpot: Option<f64>) {
        self.n += 1.0;
        let w = 1.0 / self.n.min(200.0);
        self.ttft += w * (ttft - self.ttft);
        if let Some(t) = tpot {
            self.tpot += w * (t - self.tpot);
        }
    }
    fn e2e(&self, max_tokens: u32) -> f64 {
        self.ttft + (max_tokens.saturating_sub(1)) as f64 * self.tpot
    }
}

struct Group<'a> {
    cfg: &'a FleetConfig,
    book: &'a ConversationBook,
    plan: GroupPlan,
    cores: Vec<EngineCore<SimRunner>>,
    clocks: Vec<SimClock>,
    in_heap: Vec<bool>,
    busy: BinaryHeap<Reverse<(u64, usize)>>,
    sends: BinaryHeap<Reverse<(u64, u64, u64, usize)>>,
    seq: u64,
    convs: HashMap<u64, ConvState>,
    inflight: HashMap<u64, Inflight>,
    next_id: u64,
    rr: usize,
    est: Estimate,
    s: Samples,
    end_s: f64,
    // Conversation starts.
    arrivals: Option<Arrivals>,
    next_index: u64,
    next_start: Option<(f64, u64)>,
    violations: usize,
    expected_measured: f64,
}

fn nanos(t: f64) -> u64 {
    (t.max(0.0) * 1e9).round() as u64
}

impl<'a> Group<'a> {
    fn new(cfg: &'a FleetConfig, book: &'a ConversationBook, plan: GroupPlan) -> Group<'a> {
        let r = &cfg.replica;
        let mut cores = Vec::new();
        let mut clocks = Vec::new();
        for _ in &plan.replicas {
            let mut kv = KvCacheConfig::new(r.block_size, r.num_blocks);
            kv.num_host_blocks = r.num_host_blocks;
            kv.enable_prefix_caching = r.prefix_caching;
            let mut sc = SchedulerConfig::new(kv);
            sc.max_running = r.max_running.max(1);
            sc.max_batched_tokens = r.max_batched_tokens.max(1);
            sc.max_model_len = r.max_model_len;
            sc.max_queued = usize::MAX;
            sc.max_queued_per_owner = usize::MAX;
            let runner = SimRunner::new(cfg.cost, cfg.vocab);
            clocks.push(runner.clock());
            let mut core = EngineCore::new(sc, runner, TextCodec::without_tokenizer(vec![2]), 0.0);
            core.set_step_time_target(r.step_time_target);
            if let (Some(path), 1) = (&cfg.step_log, plan.replicas.len()) {
                match convoy_engine::step_log::StepLog::create(path) {
                    Ok(log) => core.set_step_log(Some(log)),
                    Err(e) => tracing::error!(error = %e, "no simulated step log"),
                }
            }
            cores.push(core);
        }
        let (ttft, tpot) = cfg.latency_hint;
        let end_s = cfg.warmup_s + cfg.window_s;
        let arrivals = match cfg.load {
            Load::Open {
                conversations_per_s,
                cv,
            } => Arrivals::new(conversations_per_s, cv, cfg.seed),
            _ => None,
        };
        let n = plan.replicas.len();
        Group {
            cfg,
            book,
            plan,
            cores,
            clocks,
            in_heap: vec![false; n],
            busy: BinaryHeap::new(),
            sends: BinaryHeap::new(),
            seq: 0,
            convs: HashMap::new(),
            inflight: HashMap::new(),
            next_id: 0,
            rr: 0,
            est: Estimate { ttft, tpot, n: 0.0 },
            s: Samples::default(),
            end_s,
            arrivals,
            next_index: 0,
            next_start: None,
            violations: 0,
            expected_measured: 0.0,
        }
    }

    /// Whether conversation `i` belongs to this group: under sticky routing, whether it hashes
    /// to the group's replica; otherwise, when only a sample of the replicas runs, whether one
    /// of its first [`LANDING_CHECK`] turns lands on the sample (a conversation that never
    /// reaches a simulated replica cannot change what they see, so it is not walked). Closed
    /// loops walk every conversation (each end starts the next).
    fn mine(&self, i: u64) -> bool {
        match self.plan.sticky_target {
            Some(r) => jump_hash(self.book.key(i), self.cfg.replicas) == r,
            None if self.sampled() && !matches!(self.cfg.load, Load::Closed { .. }) => {
                (0..LANDING_CHECK).any(|t| self.lands(i, t))
            }
            None => true,
        }
    }

    /// Only some replicas run (round-robin and least-loaded).
    fn sampled(&self) -> bool {
        self.plan.sticky_target.is_none() && self.plan.replicas.len() < self.cfg.replicas
    }

    /// Whether turn `turn` of conversation `conv` lands on a simulated replica: a uniform draw
    /// over the `N` replicas, fixed by (seed, conversation, turn).
    fn lands(&self, conv: u64, turn: usize) -> bool {
        let u = unit(mix(self.cfg.seed ^ 0xd1ce, mix(conv, turn as u64)));
        ((u * self.cfg.replicas as f64) as usize) < self.plan.replicas.len()
    }

    /// The next conversation start (index, time) of an open or trace load.
    fn pull_start(&mut self) {
        self.next_start = None;
        match self.cfg.load {
            Load::Open { .. } => {
                while let Some(t) = self.arrivals.as_mut().and_then(|a| a.next()) {
                    let i = self.next_index;
                    self.next_index += 1;
                    if t >= self.end_s {
                        return;
                    }
                    if self.mine(i) {
                        self.next_start = Some((t, i));
                        return;
                    }
                }
            }
            Load::Trace => loop {
                let i = self.next_index;
                let Some(c) = self.book.get(i) else { return };
                self.next_index += 1;
                let t = c.turns.first().and_then(|t| t.at_s).unwrap_or(0.0);
                if t >= self.end_s {
                    return;
                }
                if self.mine(i) {
                    self.next_start = Some((t, i));
                    return;
                }
            },
            Load::Closed { .. } => {}
        }
    }

    /// Start a closed-loop conversation at `t` (the next index that belongs here).
    fn start_closed(&mut self, t: f64) {
        if t >= self.end_s {
            return;
        }
        loop {
            let i = self.next_index;
            self.next_index += 1;
            if self
                .book
                .workload()
                .len()
                .is_some_and(|len| i >= len as u64)
            {
                return;
            }
            if self.mine(i) {
                self.start(t, i);
                return;
            }
        }
    }

    fn start(&mut self, t: f64, i: u64) {
        let Some(spec) = self.book.get(i) else { return };
        if spec.turns.is_empty()
            || (self.sampled()
                && !matches!(self.cfg.load, Load::Closed { .. })
                && !(0..spec.turns.len()).any(|t| self.lands(i, t)))
        {
            return;
        }
        let trace = spec.explicit.is_some();
        let turns: Vec<Option<f64>> = spec.turns.iter().map(|t| t.at_s).collect();
        self.convs.insert(
            i,
            ConvState {
                reply_lens: Vec::with_capacity(spec.turns.len()),
                spec,
            },
        );
        if trace {
            for (j, at) in turns.into_iter().enumerate() {
                self.push_send(at.unwrap_or(t), i, j);
            }
        } else {
            self.push_send(t, i, 0);
        }
    }

    /// Queue a send at `t`: it reaches the engine `request_edge_s` later.
    fn push_send(&mut self, t: f64, conv: u64, turn: usize) {
        self.seq += 1;
        let arrive = t + self.cfg.cost.request_edge_s;
        self.sends
            .push(Reverse((nanos(arrive), self.seq, conv, turn)));
    }

    /// Route a send: the local replica index, or `None` when it lands on an unsimulated one.
    fn route(&mut self, conv: u64, turn: usize) -> Option<usize> {
        let k = self.plan.replicas.len();
        match self.cfg.router {
            // A sticky group runs one replica and is fed only the conversations hashing to it.
            Router::Sticky => Some(0),
            Router::RoundRobin | Router::LeastLoaded => {
                if self.sampled() && !self.lands(conv, turn) {
                    return None;
                }
                if self.cfg.router == Router::RoundRobin {
                    self.rr += 1;
                    Some((self.rr - 1) % k)
                } else {
                    // Fewest running + waiting; ties broken in turn from a rotating start.
                    self.rr += 1;
                    let load = |c: &EngineCore<SimRunner>| {
                        c.scheduler().num_running() + c.scheduler().num_waiting()
                    };
                    (0..k)
                        .map(|j| (j + self.rr) % k)
                        .min_by_key(|&j| load(&self.cores[j]))
                }
            }
        }
    }

    fn finish_turn(&mut self, t_done: f64, conv: u64, turn: usize, reply_len: u32) {
        let Some(st) = self.convs.get_mut(&conv) else {
            return;
        };
        st.reply_lens.push(reply_len);
        let trace = st.spec.explicit.is_some();
        let next = turn + 1;
        if trace {
            if st.reply_lens.len() >= st.spec.turns.len() {
                self.convs.remove(&conv);
                if let Load::Closed { .. } = self.cfg.load {
                    self.start_closed(t_done);
                }
            }
            return;
        }
        if next < st.spec.turns.len() {
            let t = t_done + st.spec.turns[next].think_s;
            if t < self.end_s {
                self.push_send(t, conv, next);
                return;
            }
        }
        self.convs.remove(&conv);
        if let Load::Closed { .. } = self.cfg.load {
            self.start_closed(t_done);
        }
    }

    /// A request reaches the engine at `arrive` (sent `request_edge_s` earlier).
    fn send(&mut self, arrive: f64, conv: u64, turn: usize) {
        let t = arrive - self.cfg.cost.request_edge_s;
        if t >= self.end_s {
            self.convs.remove(&conv);
            return;
        }
        let Some(spec) = self.convs.get(&conv).map(|c| c.spec.clone()) else {
            return;
        };
        let max_tokens = spec.turns[turn].max_tokens;
        let measured = t >= self.cfg.warmup_s;
        let local = if t >= self.cfg.sim_start_s {
            self.route(conv, turn)
        } else {
            None
        };
        let Some(local) = local else {
            // Not simulated: the reply ends after the estimated latency.
            let done = t + self.est.e2e(max_tokens);
            self.finish_turn(done, conv, turn, max_tokens);
            return;
        };
        let prompt = self
            .book
            .prompt(&spec, conv, turn, &self.convs[&conv].reply_lens);
        let id = self.next_id;
        self.next_id += 1;
        let req = EngineRequest {
            prompt_ids: prompt,
            params: SamplingParams {
                max_tokens: max_tokens as usize,
                ignore_eos: true,
                seed: Some(reply_seed(conv, turn)),
                ..Default::default()
            },
            ..Default::default()
        };
        let clock = &self.clocks[local];
        clock.advance_to(Duration::from_secs_f64(arrive));
        if measured {
            self.s.sent += 1;
        }
        self.s.simulated += 1;
        if self.cores[local].add(id, req).is_err() {
            self.s.refused += measured as usize;
            self.finish_turn(t, conv, turn, 0);
            return;
        }
        self.inflight.insert(
            id,
            Inflight {
                conv,
                turn,
                sent: t,
                first: None,
                last: t,
                tokens: 0,
                measured,
                delivery: 0.0,
            },
        );
        if !self.in_heap[local] {
            self.in_heap[local] = true;
            self.busy
                .push(Reverse((clock.now().as_nanos() as u64, local)));
        }
    }

    fn step(&mut self, local: usize, t: f64) {
        let events = self.cores[local].step();
        let now = self.clocks[local].now().as_secs_f64();
        let in_window = t >= self.cfg.warmup_s && t < self.end_s;
        if in_window {
            self.s.busy_s += now - t;
            self.s.steps += 1;
            self.s.step_seqs += self.cores[local].scheduler().num_running() as u64;
        }
        // The load-dependent part of the edge: whatever on a request's way out waits longer
        // behind a larger batch. (Others, not counting the request itself: what calibrate fits
        // against is the daemon's time-averaged running count.)
        let others = self.cores[local]
            .scheduler()
            .num_running()
            .saturating_sub(1);
        let per_token_delivery = self.cfg.cost.request_edge_per_running_s * others as f64;
        for ev in events {
            let Some(f) = self.inflight.get_mut(&ev.id) else {
                continue;
            };
            match ev.kind {
                EventKind::Token { token_ids, .. } => {
                    if f.first.is_none() {
                        f.delivery = per_token_delivery;
                        f.first = Some(now + f.delivery);
                        if f.measured {
                            if let Some(es) = self.cfg.early_stop {
                                if now + f.delivery - f.sent > es.ttft_s {
                                    self.violations += 1;
                                }
                            }
                        }
                    }
                    f.last = now + f.delivery;
                    f.tokens += token_ids.len();
                }
                EventKind::Done(d) => {
                    let f = self.inflight.remove(&ev.id).expect("in flight");
                    // The client has the reply once its last token is delivered.
                    let now = now + f.delivery;
                    let ttft = f.first.unwrap_or(now) - f.sent;
                    let tpot = (f.tokens > 1)
                        .then(|| (f.last - f.first.unwrap_or(now)) / (f.tokens - 1) as f64);
                    self.est.observe(ttft, tpot);
                    if f.measured {
                        let s = &mut self.s;
                        s.finished += 1;
                        s.ttft.push(ttft);
                        if let Some(x) = tpot {
                            s.tpot.push(x);
                        }
                        s.e2e.push(now - f.sent);
                        s.prompt_tokens += d.usage.prompt_tokens as u64;
                        s.cached_tokens +=
                            (d.usage.cached_tokens + d.usage.host_cached_tokens) as u64;
                        s.host_tokens += d.usage.host_cached_tokens as u64;
                        s.output_tokens += d.usage.completion_tokens as u64;
                    }
                    self.finish_turn(now, f.conv, f.turn, d.output_ids.len() as u32);
                }
            }
        }
        if self.cores[local].has_work() {
            self.busy.push(Reverse((nanos(now), local)));
        } else {
            self.in_heap[local] = false;
        }
    }

    fn overloaded(&self, t: f64) -> bool {
        self.inflight
            .values()
            .any(|f| f.first.is_none() && t - f.sent > self.cfg.overload_wait_s)
    }

    fn run(mut self) -> Samples {
        // Measured requests expected over every simulated replica, not this group's: the
        // percentile an early stop judges is the pooled one, and one group's violations prove
        // it broken only once they alone pass what the pool allows.
        let pooled = self.cfg.simulated as f64 / self.cfg.replicas.max(1) as f64;
        self.expected_measured = match self.cfg.load {
            Load::Open {
                conversations_per_s,
                ..
            } => {
                conversations_per_s * self.book.workload().mean_turns() * self.cfg.window_s * pooled
            }
            _ => 0.0,
        };
        match self.cfg.load {
            Load::Closed { concurrency } => {
                let c = concurrency as f64 * self.plan.share;
                let c = (c.round() as usize).max(1);
                for _ in 0..c {
                    self.start_closed(0.0);
                }
            }
            _ => self.pull_start(),
        }
        let mut events = 0u64;
        loop {
            let t_start = self.next_start.map(|s| nanos(s.0));
            let t_send = self.sends.peek().map(|Reverse(s)| s.0);
            let t_step = self.busy.peek().map(|Reverse(s)| s.0);
            let t_arr = match (t_start, t_send) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let t_ns = match (t_arr, t_step) {
                (None, None) => break,
                (Some(a), Some(s)) if a <= s => a,
                (Some(a), None) => a,
                (_, Some(s)) => s,
            };
            let t = t_ns as f64 / 1e9;
            events += 1;
            if events.is_multiple_of(4096) {
                if self.overloaded(t) {
                    self.s.overloaded = true;
                    break;
                }
                if let Some(es) = self.cfg.early_stop {
                    if self.expected_measured > 0.0
                        && self.violations as f64 > es.share * self.expected_measured * 1.5 + 10.0
                    {
                        self.s.stopped_early = true;
                        break;
                    }
                }
            }
            if Some(t_ns) == t_arr {
                if t_start == Some(t_ns) && t_send.is_none_or(|s| t_ns <= s) {
                    let (ts, i) = self.next_start.expect("a start");
                    self.start(ts, i);
                    self.pull_start();
                } else {
                    let Reverse((_, _, conv, turn)) = self.sends.pop().expect("a send");
                    self.send(t, conv, turn);
                }
            } else {
                let Reverse((_, local)) = self.busy.pop().expect("a step");
                self.step(local, t);
            }
        }
        // Whatever is still in flight and measured never finished.
        for f in self.inflight.values() {
            if f.measured {
                self.s.unfinished += 1;
                self.s.ttft.push(f64::INFINITY);
                self.s.e2e.push(f64::INFINITY);
                self.s.tpot.push(f64::INFINITY);
            }
        }
        self.s.preemptions = self.cores.iter().map(|c| c.stats().preemptions).sum();
        self.s
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let i = ((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Run a fleet.
pub fn simulate(cfg: &FleetConfig, book: &ConversationBook) -> FleetReport {
    let started = std::time::Instant::now();
    let n = cfg.replicas.max(1);
    let k = cfg.simulated.clamp(1, n);
    let plans: Vec<GroupPlan> = match cfg.router {
        Router::Sticky => (0..k)
            .map(|r| GroupPlan {
                replicas: vec![r],
                sticky_target: Some(r),
                share: 1.0 / n as f64,
            })
            .collect(),
        _ => vec![GroupPlan {
            replicas: (0..k).collect(),
            sticky_target: None,
            share: k as f64 / n as f64,
        }],
    };
    let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
    let mut results: Vec<Samples> = Vec::new();
    let mut plans = plans.into_iter().peekable();
    while plans.peek().is_some() {
        let batch: Vec<GroupPlan> = plans.by_ref().take(threads).collect();
        let out: Vec<Samples> = if batch.len() == 1 {
            batch
                .into_iter()
                .map(|p| Group::new(cfg, book, p).run())
                .collect()
        } else {
            std::thread::scope(|s| {
                let hs: Vec<_> = batch
                    .into_iter()
                    .map(|p| s.spawn(move || Group::new(cfg, book, p).run()))
                    .collect();
                hs.into_iter()
                    .map(|h| h.join().expect("a fleet group panicked"))
                    .collect()
            })
        };
        results.extend(out);
    }
    let mut all = Samples::default();
    for s in results {
        all.ttft.extend(s.ttft);
        all.tpot.extend(s.tpot);
        all.e2e.extend(s.e2e);
        all.prompt_tokens += s.prompt_tokens;
        all.cached_tokens += s.cached_tokens;
        all.host_tokens += s.host_tokens;
        all.output_tokens += s.output_tokens;
        all.finished += s.finished;
        all.sent += s.sent;
        all.refused += s.refused;
        all.unfinished += s.unfinished;
        all.busy_s += s.busy_s;
        all.steps += s.steps;
        all.step_seqs += s.step_seqs;
        all.preemptions += s.preemptions;
        all.simulated += s.simulated;
        all.overloaded |= s.overloaded;
        all.stopped_early |= s.stopped_early;
    }
    let share = k as f64 / n as f64;
    let scale = 1.0 / (share * cfg.window_s.max(1e-9));
    let ms = |v: f64| v * 1e3;
    FleetReport {
        gpus: n,
        router: cfg.router.name().into(),
        max_running: cfg.replica.max_running,
        max_batched_tokens: cfg.replica.max_batched_tokens,
        simulated_replicas: k,
        requests: all.sent,
        window_s: cfg.window_s,
        warmup_s: cfg.warmup_s,
        ttft_p50_ms: ms(pct(&mut all.ttft, 0.5)),
        ttft_p99_ms: ms(pct(&mut all.ttft, 0.99)),
        tpot_p50_ms: ms(pct(&mut all.tpot, 0.5)),
        tpot_p99_ms: ms(pct(&mut all.tpot, 0.99)),
        e2e_p50_ms: ms(pct(&mut all.e2e, 0.5)),
        e2e_p99_ms: ms(pct(&mut all.e2e, 0.99)),
        hit_ratio: all.cached_tokens as f64 / all.prompt_tokens.max(1) as f64,
        host_hit_ratio: all.host_tokens as f64 / all.prompt_tokens.max(1) as f64,
        requests_per_s: all.finished as f64 * scale,
        output_tokens_per_s: all.output_tokens as f64 * scale,
        offered_per_s: all.sent as f64 * scale,
        nominal_per_s: None,
        utilization: all.busy_s / (k as f64 * cfg.window_s.max(1e-9)),
        mean_batch: all.step_seqs as f64 / all.steps.max(1) as f64,
        preemptions: all.preemptions,
        refused: all.refused,
        unfinished: all.unfinished,
        overloaded: all.overloaded,
        stopped_early: all.stopped_early,
        simulated_requests: all.simulated,
        sim_wall_s: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_carry_the_templates_header_and_default_system_message() {
        let spec = crate::workload::WorkloadSpec::parse(
            r#"
kind = "random"
seed = 3
max_tokens = 8
[random]
prompt_tokens = 10
"#,
            std::path::Path::new("chat.toml"),
        )
        .unwrap();
        let workload = Arc::new(Workload::new(spec).unwrap());
        let first_turn = |text: TextCounts| {
            let book = ConversationBook::new(workload.clone(), 5000, text);
            let c = book.get(0).expect("a conversation");
            assert!(c.system.is_none(), "the workload has no persona");
            book.prompt(&c, 0, 0, &[])
        };
        let nominal = first_turn(TextCounts::default());
        // SmolLM2's template: a 4-token assistant header, a 21-token default system message.
        let smollm2 = first_turn(TextCounts {
            assistant_header_tokens: 4,
            default_system_tokens: 21,
            ..TextCounts::default()
        });
        // The header one token longer, and the system message in front.
        assert_eq!(smollm2.len(), nominal.len() + 1 + 21);
        assert_eq!(&smollm2[..3], &[IM_START, ROLE_SYSTEM, NL]);
        assert_eq!(
            &smollm2[smollm2.len() - 4..],
            &[IM_START, ROLE_ASSISTANT, ROLE_ASSISTANT, NL]
        );
        // The default system message is the same in every conversation (a shared prefix).
        let book = ConversationBook::new(
            workload.clone(),
            5000,
            TextCounts {
                default_system_tokens: 21,
                ..TextCounts::default()
            },
        );
        let (a, b) = (book.get(0).unwrap(), book.get(1).unwrap());
        assert_eq!(
            book.prompt(&a, 0, 0, &[])[..21],
            book.prompt(&b, 1, 0, &[])[..21]
        );
    }

    #[test]
    fn jump_hash_is_uniform_and_consistent() {
        let mut counts = [0usize; 7];
        let mut moved = 0;
        for i in 0..70_000u64 {
            let k = mix(9, i);
            let b = jump_hash(k, 7);
            counts[b] += 1;
            let b8 = jump_hash(k, 8);
            if b8 != b {
                assert_eq!(b8, 7, "keys only move to the new bucket");
                moved += 1;
            }
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert!((7_800..9_700).contains(&moved), "{moved}");
    }
}
