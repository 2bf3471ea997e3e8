//! The real scheduler and engine core under the simulation backend: 2,000 random requests
//! (mixed prompt and output lengths, priorities, aborts) through a KV cache far too small to
//! hold them all at once.
//!
//! Asserted: every request that was not aborted finishes with exactly the tokens it asked for
//! (no stop tokens are sampled, so each ends by length); no request waits in the queue longer
//! than the stated bound; no KV block is left held; preemption really happened.

use std::collections::{HashMap, HashSet};

use convoy_engine::core::{EngineCore, EngineRequest, EventKind};
use convoy_engine::sim::{CostModel, SimRunner};
use convoy_engine::{FinishReason, SamplingParams, TextCodec};
use convoy_scheduler::{KvCacheConfig, SchedulerConfig};

/// The engine's seeded stream, drawing below a bound.
struct Rng(convoy_engine::sampler::Rng);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0.next_u64() % n
    }
}

/// Longest a request may wait for its first step, in engine steps. The offered load (~0.4
/// requests per step, with bursts) is below what the 96-block cache sustains (~0.45 average
/// requests per step), priorities age by one every 32 steps (so priority 0 outranks a fresh
/// priority 3 after 128 steps of waiting), and the head of the queue is never skipped: a
/// request waits at most for the backlog ahead of it to drain plus the aging delay.
const MAX_QUEUE_STEPS: u64 = 600;

#[test]
fn two_thousand_random_requests_all_finish_exactly() {
    let mut kv = KvCacheConfig::new(16, 96); // 1,536 tokens of KV for 2,000 requests
    kv.num_host_blocks = 64;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_batched_tokens = 512;
    cfg.max_running = 32;
    cfg.aging_steps = 32;
    cfg.max_model_len = 4096;
    let mut core = EngineCore::new(
        cfg,
        SimRunner::new(CostModel::smollm2_cpu(), 32_000),
        TextCodec::without_tokenizer(vec![2]),
        0.0,
    );
    let mut rng = Rng(convoy_engine::sampler::Rng::new(2026));
    let n = 2000u64;
    let mut asked: HashMap<u64, usize> = HashMap::new();
    let mut arrived_step: HashMap<u64, u64> = HashMap::new();
    let mut first_step: HashMap<u64, u64> = HashMap::new();
    let mut produced: HashMap<u64, usize> = HashMap::new();
    let mut done: HashMap<u64, FinishReason> = HashMap::new();
    let mut aborted: HashSet<u64> = HashSet::new();
    let mut next = 0u64;
    let mut step = 0u64;
    // A few shared "personas" so the prefix cache is exercised too.
    let personas: Vec<Vec<u32>> = (0..4)
        .map(|p| (0..200).map(|i| 1000 + p * 300 + i).collect())
        .collect();
    while done.len() < n as usize {
        // Arrivals: one with probability 0.35 per step, a burst of 8 every 200 steps.
        let arrivals = if step % 200 == 199 {
            8
        } else {
            (rng.below(100) < 35) as u64
        };
        for _ in 0..arrivals {
            if next == n {
                break;
            }
            let long = rng.below(4) == 0;
            let len = 1 + rng.below(if long { 400 } else { 60 }) as usize;
            let shared = rng.below(3) == 0;
            let persona = rng.below(4) as usize;
            let mut prompt: Vec<u32> = if shared {
                personas[persona][..len.min(200)].to_vec()
            } else {
                vec![]
            };
            while prompt.len() < len {
                prompt.push(100 + rng.below(30_000) as u32);
            }
            let max_tokens = 1 + rng.below(64) as usize;
            let req = EngineRequest {
                prompt_ids: prompt,
                params: SamplingParams {
                    max_tokens,
                    seed: Some(next),
                    ..Default::default()
                },
                priority: rng.below(4) as i32,
                ..Default::default()
            };
            core.add(next, req).unwrap();
            asked.insert(next, max_tokens);
            arrived_step.insert(next, step);
            next += 1;
        }
        // Random aborts among recent arrivals (queued, prefilling or decoding).
        if rng.below(16) == 0 && next > 0 {
            let victim = next - 1 - rng.below(next.min(30));
            if let std::collections::hash_map::Entry::Vacant(slot) = done.entry(victim) {
                if let Some(ev) = core.abort(victim, FinishReason::Cancelled) {
                    assert!(matches!(ev.kind, EventKind::Done(_)));
                    aborted.insert(victim);
                    slot.insert(FinishReason::Cancelled);
                }
            }
        }
        for ev in core.step() {
            first_step.entry(ev.id).or_insert(step);
            match ev.kind {
                EventKind::Token { token_ids, .. } => {
                    *produced.entry(ev.id).or_default() += token_ids.len()
                }
                EventKind::Done(d) => {
                    assert_eq!(
                        d.usage.completion_tokens,
                        produced.get(&ev.id).copied().unwrap_or(0)
                    );
                    done.insert(ev.id, d.finish_reason);
                }
            }
        }
        step += 1;
        assert!(step < 200_000, "the simulation must end");
    }
    while core.has_work() {
        core.step();
    }
    let mut total_asked = 0;
    let mut total_produced = 0;
    for id in 0..n {
        if aborted.contains(&id) {
            continue;
        }
        assert_eq!(done[&id], FinishReason::Length, "request {id}");
        assert_eq!(
            produced[&id], asked[&id],
            "request {id} got exactly max_tokens"
        );
        total_asked += asked[&id];
        total_produced += produced[&id];
        let waited = first_step[&id] - arrived_step[&id];
        assert!(
            waited <= MAX_QUEUE_STEPS,
            "request {id} waited {waited} steps"
        );
    }
    assert_eq!(total_produced, total_asked);
    assert!(aborted.len() > 20, "aborts exercised: {}", aborted.len());
    let kv = core.scheduler().kv();
    assert_eq!(kv.num_held_blocks(), 0, "no block leaks");
    kv.check_invariants();
    let stats = core.stats();
    assert!(
        stats.cache.swapped_out_blocks > 0,
        "the cache was under pressure: {:?}",
        stats.cache
    );
    assert!(
        core.scheduler().num_preemptions() > 0,
        "the cache is small enough to force preemption"
    );
    let max_wait = (0..n)
        .filter(|id| !aborted.contains(id))
        .map(|id| first_step[&id] - arrived_step[&id])
        .max()
        .unwrap();
    eprintln!(
        "{n} requests, {} aborted, {step} steps, {:.1} s simulated, longest queue wait {max_wait} steps, preemptions {}, cache {:?}",
        aborted.len(),
        core.now().as_secs_f64(),
        core.scheduler().num_preemptions(),
        stats.cache
    );
}

#[test]
fn a_deadline_ends_a_request_with_its_final_event() {
    let kv = KvCacheConfig::new(16, 64);
    let mut core = EngineCore::new(
        SchedulerConfig::new(kv),
        SimRunner::new(CostModel::smollm2_cpu(), 32_000),
        TextCodec::without_tokenizer(vec![2]),
        0.0,
    );
    let req = |deadline_ms: Option<u64>| EngineRequest {
        prompt_ids: vec![100; 10],
        params: SamplingParams {
            max_tokens: 1000,
            ..Default::default()
        },
        deadline: deadline_ms.map(std::time::Duration::from_millis),
        ..Default::default()
    };
    core.add(1, req(Some(100))).unwrap(); // ~12 simulated steps of 8 ms
    core.add(2, req(None)).unwrap();
    let mut ended = None;
    for _ in 0..100 {
        for ev in core.step() {
            if let EventKind::Done(d) = ev.kind {
                assert_eq!(ev.id, 1);
                ended = Some(d);
            }
        }
        if ended.is_some() {
            break;
        }
    }
    let d = ended.expect("the deadline passed");
    assert_eq!(d.finish_reason, FinishReason::Deadline);
    assert!(
        d.timing.total >= std::time::Duration::from_millis(100) && d.usage.completion_tokens > 0
    );
    assert!(
        core.scheduler().request(2).is_some(),
        "the other request goes on"
    );
}
