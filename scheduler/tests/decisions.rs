//! The scheduler's decisions, step by step, on seeded random chat traffic, pinned by a digest.
//!
//! Every field of every `SchedulerOutput` (scheduled requests with their tokens and block
//! tables, copies, preemptions, new and finished ids, ended requests, batched tokens) and of
//! every `RequestOutput` goes into an FNV-1a digest of its `Debug` text. The traffic has
//! conversations that extend earlier prompts (prefix hits), a device cache small enough to
//! preempt, a host tier, priorities, several owners, aborts, stop strings seen by the caller
//! (`finish`), stop tokens, and a step budget that changes. The digests were first recorded on
//! the scheduler of commit 9756bc8, before its step was made linear in its work, and recorded
//! again when a partial prefix match tied between cached blocks went to the token-order
//! neighbour instead of the lowest block id (the sorted sibling index, run with the old rule,
//! gave the old digests): a change of any decision changes the digest.

use convoy_scheduler::{
    KvCacheConfig, ModelOutput, NewRequest, SampledToken, Scheduler, SchedulerConfig,
};

/// xorshift64*: a small seeded stream, enough to vary the traffic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// FNV-1a, 64 bits: stable across Rust versions (unlike `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn eat(&mut self, text: &str) {
        for b in text.bytes() {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn run(seed: u64, steps: usize) -> (u64, usize, u64) {
    let mut kv = KvCacheConfig::new(4, 96);
    kv.num_host_blocks = 64;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_batched_tokens = 48;
    cfg.max_running = 12;
    cfg.max_queued = 64;
    cfg.max_queued_per_owner = 24;
    cfg.aging_steps = 20;
    let mut s = Scheduler::new(cfg);
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut digest = Fnv(0xcbf2_9ce4_8422_2325);
    // Conversations: each next turn is the previous prompt plus a reply and a new message.
    let mut conversations: Vec<Vec<u32>> = Vec::new();
    let mut next_id = 0u64;
    let mut live: Vec<u64> = Vec::new();
    let mut scheduled_total = 0;
    for step in 0..steps {
        // Arrivals.
        for _ in 0..rng.below(3) {
            let prompt = if !conversations.is_empty() && rng.below(3) > 0 {
                let c = rng.below(conversations.len() as u64) as usize;
                let mut p = conversations[c].clone();
                p.extend((0..1 + rng.below(12)).map(|_| rng.below(50) as u32));
                conversations[c] = p.clone();
                p
            } else {
                let p: Vec<u32> = (0..1 + rng.below(40))
                    .map(|_| rng.below(50) as u32)
                    .collect();
                conversations.push(p.clone());
                p
            };
            if prompt.len() > 200 {
                continue;
            }
            let req = NewRequest {
                id: next_id,
                prompt,
                max_tokens: 1 + rng.below(16) as usize,
                stop_token_ids: vec![3, 49],
                priority: rng.below(3) as i32 - 1,
                owner: rng.below(4),
                cache_salt: (rng.below(10) == 0).then(|| "salt".to_string()),
                ..Default::default()
            };
            let added = s.add(req);
            digest.eat(&format!("add {next_id} {added:?};"));
            if added.is_ok() {
                live.push(next_id);
            }
            next_id += 1;
        }
        // Cancels and stop strings.
        if !live.is_empty() && rng.below(8) == 0 {
            let id = live[rng.below(live.len() as u64) as usize];
            let aborted = s.abort(id);
            digest.eat(&format!("abort {id} {aborted};"));
        }
        if !live.is_empty() && rng.below(6) == 0 {
            let id = live[rng.below(live.len() as u64) as usize];
            s.finish(id, convoy_scheduler::FinishReason::Stop);
            digest.eat(&format!("finish {id};"));
        }
        if step % 37 == 0 {
            let budget = [None, Some(8), Some(24), Some(64)][rng.below(4) as usize];
            s.set_step_token_budget(budget);
            digest.eat(&format!("budget {budget:?};"));
        }
        let out = s.schedule();
        scheduled_total += out.scheduled.len();
        digest.eat(&format!("{out:?};"));
        let model = ModelOutput {
            sampled: out
                .scheduled
                .iter()
                .filter(|r| r.sample)
                .map(|r| SampledToken {
                    id: r.id,
                    token: rng.below(50) as u32,
                })
                .collect(),
        };
        let results = s
            .update_from_output(&out, &model)
            .expect("a matching output");
        for r in &results {
            digest.eat(&format!(
                "{} {} {:?} {:?};",
                r.id, r.new_token, r.finished, r.prefix_hit
            ));
        }
        live.retain(|&id| s.request(id).is_some());
    }
    (digest.0, scheduled_total, s.num_preemptions())
}

#[test]
fn decisions_on_seeded_traffic_are_unchanged() {
    for (seed, expected) in [
        (1u64, 15_457_660_032_275_787_563u64),
        (2, 18_309_088_982_411_954_011),
        (3, 16_604_075_228_607_686_405),
    ] {
        let (digest, scheduled, preemptions) = run(seed, 1500);
        assert!(
            scheduled > 3000 && preemptions > 10,
            "seed {seed}: the traffic exercises the scheduler ({scheduled} scheduled, {preemptions} preemptions)"
        );
        assert_eq!(digest, expected, "seed {seed}: the decisions changed");
    }
}
