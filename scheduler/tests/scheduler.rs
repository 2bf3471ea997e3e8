//! Exact plans for hand-written situations: chunked prefill next to decodes, budget exhaustion,
//! preemption and resume (recompute and swap), abort mid-prefill, priority with aging.

use convoy_scheduler::{
    AddError, FinishReason, KvCacheConfig, Loc, ModelOutput, NewRequest, OutputMismatch,
    RequestStatus, SampledToken, Scheduler, SchedulerConfig, SchedulerOutput,
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
    s.update_from_output(&out, &ModelOutput::constant(&out, 7))
        .expect("the fake model answers every sampled request");
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
    for attempt in 0.. {
        assert!(attempt < 50, "request 2 never resumed");
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
    assert!(s.abort(1));
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
        Err(convoy_scheduler::AddError::QueueFull { waiting: 2 })
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

#[test]
fn tokens_are_matched_by_id_whatever_the_runner_order() {
    let mut s = scheduler(4, 32, 0, 64);
    s.add(req(1, 3, 4)).unwrap();
    s.add(req(2, 3, 4)).unwrap();
    let out = s.schedule();
    // The runner answers in reverse order: each request still gets its own token.
    let sampled = vec![
        SampledToken { id: 2, token: 22 },
        SampledToken { id: 1, token: 11 },
    ];
    let outs = s
        .update_from_output(&out, &ModelOutput { sampled })
        .unwrap();
    assert_eq!(s.request(1).unwrap().output(), &[11]);
    assert_eq!(s.request(2).unwrap().output(), &[22]);
    assert_eq!(outs.len(), 2);
}

#[test]
fn a_runner_output_that_does_not_match_the_step_is_refused_and_changes_nothing() {
    let mut s = scheduler(4, 32, 0, 64);
    s.add(req(1, 3, 4)).unwrap();
    s.add(req(2, 3, 4)).unwrap();
    let out = s.schedule();
    let tok = |id, token| SampledToken { id, token };
    let cases = [
        (vec![tok(1, 5)], OutputMismatch::Missing(2)),
        (
            vec![tok(1, 5), tok(2, 6), tok(9, 7)],
            OutputMismatch::Unexpected(9),
        ),
        (vec![tok(1, 5), tok(1, 6)], OutputMismatch::Duplicate(1)),
    ];
    for (sampled, want) in cases {
        let got = s.update_from_output(&out, &ModelOutput { sampled });
        assert_eq!(got, Err(want));
        for id in [1, 2] {
            let r = s.request(id).unwrap();
            assert_eq!((r.num_computed_tokens, r.output().len()), (0, 0));
        }
    }
}

#[test]
fn the_runner_hears_of_new_and_finished_requests_in_the_step_output() {
    let mut s = scheduler(2, 4, 0, 64);
    s.add(NewRequest {
        sampling: convoy_scheduler::SamplingSpec {
            temperature: 0.5,
            seed: Some(9),
            ..Default::default()
        },
        ..req(1, 4, 8)
    })
    .unwrap();
    s.add(req(2, 3, 8)).unwrap();
    s.add(req(3, 2, 1)).unwrap();
    let out = step(&mut s);
    let new: Vec<_> = out.new_requests.iter().map(|n| n.id).collect();
    assert_eq!(new, vec![1, 2]);
    assert_eq!(out.new_requests[0].sampling.seed, Some(9));
    assert!(out.finished_ids.is_empty());
    // Aborting 3, which never ran, tells the runner nothing; 2 is preempted (not finished)
    // and is not announced again when it resumes.
    assert!(s.abort(3));
    let out = step(&mut s);
    assert_eq!(out.preempted, vec![2]);
    assert!(out.new_requests.is_empty() && out.finished_ids.is_empty());
    let mut announced_again = false;
    let mut finished = vec![];
    for _ in 0..40 {
        let out = step(&mut s);
        announced_again |= !out.new_requests.is_empty();
        finished.extend(out.finished_ids);
        if s.is_idle() {
            break;
        }
    }
    assert!(!announced_again);
    assert!(s.is_idle());
    let out = step(&mut s);
    finished.extend(out.finished_ids);
    finished.sort();
    assert_eq!(finished, vec![1, 2], "each announced request leaves once");
}

fn owned(id: u64, owner: u64) -> NewRequest {
    NewRequest {
        owner,
        ..req(id, 2, 1)
    }
}

#[test]
fn owners_take_turns_in_the_waiting_queue_and_one_owner_cannot_fill_it() {
    let mut kv = KvCacheConfig::new(4, 64);
    kv.enable_prefix_caching = false;
    let mut cfg = SchedulerConfig::new(kv);
    cfg.max_running = 1;
    cfg.max_queued = 8;
    cfg.max_queued_per_owner = 4;
    let mut s = Scheduler::new(cfg);
    for id in 1..=4 {
        s.add(owned(id, 7)).unwrap();
    }
    assert_eq!(
        s.add(owned(5, 7)),
        Err(AddError::OwnerQueueFull {
            waiting: 4,
            limit: 4
        })
    );
    assert_eq!(s.add(owned(5, 7)).unwrap_err().code(), "queue_full");
    // Another owner still gets in, and is served second, not fifth.
    s.add(owned(10, 8)).unwrap();
    s.add(owned(11, 8)).unwrap();
    let mut order = vec![];
    for _ in 0..40 {
        let out = step(&mut s);
        order.extend(
            out.scheduled
                .iter()
                .filter(|r| r.num_computed_tokens == 0)
                .map(|r| r.id),
        );
    }
    assert_eq!(order, vec![1, 10, 2, 11, 3, 4]);
}

#[test]
fn decodes_get_their_token_before_a_prefill_chunk_and_a_step_budget_bounds_the_chunk() {
    // 1 (higher priority) is prefilling a long prompt, 2 and 3 decode.
    let mut s = scheduler(4, 128, 0, 64);
    s.add(req(2, 3, 100)).unwrap();
    s.add(req(3, 3, 100)).unwrap();
    step(&mut s);
    s.add(NewRequest {
        priority: 5,
        ..req(1, 300, 4)
    })
    .unwrap();
    // Without a step budget the chunk takes what the decodes leave: 64 - 2.
    assert_eq!(
        plan(&step(&mut s)),
        vec![(2, 3, 1, true), (3, 3, 1, true), (1, 0, 62, false)]
    );
    // 1 now runs first (priority): the decodes are still owed their token.
    s.set_step_token_budget(Some(20));
    assert_eq!(
        plan(&step(&mut s)),
        vec![(1, 62, 18, false), (2, 4, 1, true), (3, 4, 1, true)]
    );
    // A budget below the decodes plus the minimum chunk still lets the prefill progress.
    s.set_step_token_budget(Some(1));
    let out = step(&mut s);
    assert_eq!(
        plan(&out),
        vec![
            (1, 80, convoy_scheduler::scheduler::MIN_PREFILL_CHUNK, false),
            (2, 5, 1, true),
            (3, 5, 1, true)
        ]
    );
}

#[test]
fn a_long_prefill_is_paced_and_leaves_room_for_a_newcomer() {
    let mut s = scheduler(4, 128, 0, 64);
    s.set_step_token_budget(Some(32));
    s.add(req(1, 100, 4)).unwrap();
    // Alone, the prefill is still paced: the engine sees arrivals only between steps.
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 32, false)]);
    // A newcomer arrives: the running prefill takes half the step, the newcomer's whole prompt
    // fits in the rest and it samples its first token in this very step.
    s.add(req(2, 3, 4)).unwrap();
    assert_eq!(
        plan(&step(&mut s)),
        vec![(1, 32, 16, false), (2, 0, 3, true)]
    );
    // Nobody waits any more: the prefill has the whole paced step again, beside the decode.
    assert_eq!(
        plan(&step(&mut s)),
        vec![(1, 48, 31, false), (2, 3, 1, true)]
    );
}

#[test]
fn without_a_step_budget_a_lone_prefill_takes_the_whole_token_limit() {
    let mut s = scheduler(4, 128, 0, 64);
    s.add(req(1, 100, 4)).unwrap();
    assert_eq!(plan(&step(&mut s)), vec![(1, 0, 64, false)]);
}

#[test]
fn a_request_alone_and_out_of_blocks_ends_with_length() {
    // 2 blocks of 2 tokens: a 3-token prompt fits, but it cannot grow past 4 tokens.
    let mut s = scheduler(2, 2, 0, 64);
    s.add(req(1, 3, 10)).unwrap();
    step(&mut s); // prompt, token 4
    let out = step(&mut s); // position 3 computed, token 5 sampled: 5 tokens
    assert!(out.ended.is_empty());
    let out = step(&mut s);
    assert_eq!(out.ended, vec![(1, FinishReason::Length)]);
    assert!(s.is_idle());
    assert_eq!(s.kv().num_held_blocks(), 0);
    assert_eq!(out.finished_ids, vec![1]);
}

#[test]
fn a_blocked_queue_head_is_not_matched_again_until_blocks_free_up() {
    let mut s = scheduler(4, 4, 0, 64);
    s.add(req(1, 9, 6)).unwrap(); // 3 of 4 blocks, 4 from its 13th token
    step(&mut s);
    s.add(req(2, 8, 1)).unwrap(); // needs 3 blocks, 1 is free: blocked
    step(&mut s);
    let lookups = s.kv().stats().queried_tokens;
    assert!(lookups > 0);
    for _ in 0..3 {
        assert!(step(&mut s).scheduled.iter().all(|r| r.id != 2));
    }
    assert_eq!(
        s.kv().stats().queried_tokens,
        lookups,
        "no new prefix lookups while nothing was freed"
    );
}
