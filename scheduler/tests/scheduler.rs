//! Exact plans for hand-written situations: chunked prefill next to decodes, budget exhaustion,
//! preemption and resume (recompute and swap), abort mid-prefill, priority with aging.

use convoy_scheduler::{
    FinishReason, KvCacheConfig, Loc, ModelOutput, NewRequest, RequestStatus, SampledToken,
    Scheduler, SchedulerConfig, SchedulerOutput,
};

fn scheduler(bs: usize, blocks: usize, host: usize, budget: usize) -> Scheduler {
    let mut kv = KvCacheConfig::new(bs, blocks);
    kv.num_host_blocks = host;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_batched_tokens = budget;
    Scheduler::new(cfg)
}

fn req(id: u64, prompt_len: usize, max_tokens: usize) -> NewRequest {
    NewRequest {
        id,
        prompt: (0..prompt_len as u32)
            .map(|t| t + 1000 * id as u32)
            .collect(),
        max_tokens,
        ..Default::default()
    }
}

/// (id, first position, tokens, sample) of each scheduled request.
fn plan(out: &SchedulerOutput) -> Vec<(u64, usize, usize, bool)> {
    out.scheduled
        .iter()
        .map(|s| (s.id, s.num_computed_tokens, s.token_ids.len(), s.sample))
        .collect()
}

/// Run the step with a fake model that samples token 7 for everyone.
fn step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    let sampled = out
        .scheduled
        .iter()
        .filter(|r| r.sample)
        .map(|r| SampledToken { id: r.id, token: 7 })
        .collect();
    s.update_from_output(&out, &ModelOutput { sampled });
    out
}

#[test]
fn chunked_prefill_runs_next_to_decodes() {
    let mut s = scheduler(4, 32, 0, 8);
    s.add(req(1, 3, 10)).unwrap();
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 3, true)]);
    s.add(req(2, 20, 10)).unwrap();
    // A decodes one token per step; B's 20-token prompt fills the rest of the budget.
    assert_eq!(plan(&step(&mut s)), vec![(1, 3, 1, true), (2, 0, 7, false)]);
    assert_eq!(plan(&step(&mut s)), vec![(1, 4, 1, true), (2, 7, 7, false)]);
    assert_eq!(plan(&step(&mut s)), vec![(1, 5, 1, true), (2, 14, 6, true)]);
    assert_eq!(plan(&step(&mut s)), vec![(1, 6, 1, true), (2, 20, 1, true)]);
}

#[test]
fn budget_exhaustion_leaves_the_rest_waiting_in_order() {
    let mut s = scheduler(4, 32, 0, 4);
    for id in 1..=3 {
        s.add(req(id, 3, 1)).unwrap();
    }
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(1, 0, 3, true), (2, 0, 1, false)]);
    assert_eq!(out.num_batched_tokens, 4);
    assert_eq!(s.num_waiting(), 1);
    // 1 finished generating (max_tokens 1): it computes its last token's K/V, then leaves.
    assert_eq!(
        plan(&step(&mut s)),
        vec![(1, 3, 1, false), (2, 1, 2, true), (3, 0, 1, false)]
    );
    assert!(s.request(1).is_none());
}

#[test]
fn preemption_recomputes_from_the_cached_prefix() {
    // 4 blocks of 2 tokens: two 4-token prompts fill the cache.
    let mut s = scheduler(2, 4, 0, 64);
    s.add(req(1, 4, 8)).unwrap();
    s.add(req(2, 3, 8)).unwrap();
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 4, true), (2, 0, 3, true)]);
    // Step 2: request 1 needs a third block for position 4; 2 (later arrival) is preempted.
    let out = step(&mut s);
    assert_eq!(out.preempted, vec![2]);
    assert_eq!(plan(&out), vec![(1, 4, 1, true)]);
    let r2 = s.request(2).unwrap();
    assert_eq!(
        (r2.status, r2.num_preemptions, r2.tokens.len()),
        (RequestStatus::Waiting, 1, 4)
    );
    // 2 cannot come back while 1 holds 3 of 4 blocks and grows; once 1 ends, 2 resumes with its
    // generated token kept and its prompt recomputed where the cache lost it.
    let mut resumed = None;
    for _ in 0..20 {
        let out = step(&mut s);
        if let Some(r) = out.scheduled.iter().find(|r| r.id == 2) {
            resumed = Some((r.num_computed_tokens, r.token_ids.len()));
            break;
        }
    }
    let (from, n) = resumed.expect("request 2 resumes");
    assert_eq!(
        from + n,
        4,
        "prompt plus the token sampled before preemption"
    );
    assert!(s.request(1).is_none(), "1 finished first");
}

#[test]
fn preemption_with_a_host_tier_resumes_without_recompute() {
    let mut s = scheduler(2, 4, 8, 64);
    s.add(req(1, 4, 8)).unwrap();
    s.add(req(2, 3, 8)).unwrap();
    step(&mut s);
    let out = step(&mut s);
    assert_eq!(out.preempted, vec![2]);
    // 1's new block came from evicting 2's cached full block: saved to the host first.
    assert!(out
        .copies
        .iter()
        .any(|c| matches!((c.src, c.dst), (Loc::Device(_), Loc::Host(_)))));
    loop {
        let out = step(&mut s);
        if let Some(r) = out.scheduled.iter().find(|r| r.id == 2) {
            // Everything 2 had computed (positions 0..3) is served: only its sampled token runs.
            assert_eq!((r.num_computed_tokens, r.token_ids.len()), (3, 1));
            assert!(
                out.copies.iter().any(|c| matches!(c.src, Loc::Host(_))),
                "swapped back in"
            );
            break;
        }
    }
}

#[test]
fn abort_mid_prefill_frees_every_block_at_once() {
    let mut s = scheduler(4, 16, 0, 8);
    s.add(req(1, 20, 4)).unwrap();
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 8, false)]);
    assert_eq!(s.kv().num_held_blocks(), 2);
    assert!(s.abort(1, FinishReason::Cancelled));
    assert_eq!(s.kv().num_held_blocks(), 0);
    assert!(s.is_idle());
    assert!(s.schedule().scheduled.is_empty());
}

fn admission_order(aging_steps: u64) -> Vec<u64> {
    let mut kv = KvCacheConfig::new(4, 64);
    kv.enable_prefix_caching = false;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_running = 1;
    cfg.aging_steps = aging_steps;
    let mut s = Scheduler::new(cfg);
    s.add(req(1, 2, 12)).unwrap();
    s.add(NewRequest {
        priority: 0,
        ..req(2, 2, 1)
    })
    .unwrap();
    let mut order = vec![];
    for t in 0..60 {
        if t == 8 {
            s.add(NewRequest {
                priority: 2,
                ..req(3, 2, 1)
            })
            .unwrap();
        }
        let out = step(&mut s);
        for r in &out.scheduled {
            if r.num_computed_tokens == 0 && !order.contains(&r.id) {
                order.push(r.id);
            }
        }
    }
    order
}

#[test]
fn priority_wins_but_aging_prevents_starvation() {
    // Without aging, the later high-priority request 3 overtakes request 2.
    assert_eq!(admission_order(1_000_000), vec![1, 3, 2]);
    // With +1 every 2 steps, request 2 has waited long enough to outrank priority 2.
    assert_eq!(admission_order(2), vec![1, 2, 3]);
}

#[test]
fn queue_limit_and_duplicate_ids_are_refused() {
    let mut kv = KvCacheConfig::new(4, 16);
    kv.enable_prefix_caching = true;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_queued = 2;
    let mut s = Scheduler::new(cfg);
    s.add(req(1, 2, 1)).unwrap();
    assert!(matches!(
        s.add(req(1, 2, 1)),
        Err(convoy_scheduler::AddError::DuplicateId(1))
    ));
    s.add(req(2, 2, 1)).unwrap();
    assert!(matches!(
        s.add(req(3, 2, 1)),
        Err(convoy_scheduler::AddError::QueueFull(2))
    ));
}

#[test]
fn a_next_turn_arriving_while_the_previous_finishes_waits_one_step_for_the_whole_reply() {
    let mut s = scheduler(4, 32, 0, 64);
    s.add(req(1, 6, 2)).unwrap();
    step(&mut s); // prefill, first token
    step(&mut s); // second token: 1 is finishing (its last token's K/V not computed yet)
    let mut turn2 = s.request(1).unwrap().tokens.clone();
    turn2.extend([55, 56, 57]);
    s.add(NewRequest {
        id: 2,
        prompt: turn2.clone(),
        max_tokens: 1,
        ..Default::default()
    })
    .unwrap();
    // Step 3: 1 computes its last token and is released to the cache; 2 waits.
    assert_eq!(plan(&step(&mut s)), vec![(1, 7, 1, false)]);
    // Step 4: 2 finds all 8 tokens of turn 1 in the cache (prompt + both generated tokens).
    let out = step(&mut s);
    assert_eq!(plan(&out), vec![(2, 8, 3, true)]);
}
