//! Batching changes nothing: greedy outputs of 8 prompts run together (arriving at different
//! steps, prefills chunked next to decodes) equal each prompt run alone.

use convoy_engine::{GenerationRequest, Generator, GeneratorConfig, SamplingParams};
use convoy_tests::{ids, load, smollm2_path, smollm2_reference};

/// The prompts of the transformers reference: completions, chats, then multi-turn turns.
fn reference_prompts() -> Vec<Vec<u32>> {
    let reference = smollm2_reference();
    let completions = reference["completions"].as_array().unwrap();
    let chats = reference["chats"].as_array().unwrap();
    let turns = reference["multi_turn"][0]["turns"].as_array().unwrap();
    completions
        .iter()
        .chain(chats)
        .chain(turns)
        .map(|c| ids(&c["prompt_ids"]))
        .collect()
}

#[test]
fn eight_prompts_together_equal_each_alone() {
    let (model, codec) = load(&smollm2_path());
    let mut prompts = reference_prompts();
    prompts.truncate(8);
    assert_eq!(prompts.len(), 8);
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p.clone(),
            params: SamplingParams {
                max_tokens: 24,
                ..Default::default()
            },
            arrival_step: i * 3,
            cache_salt: None,
            priority: 0,
        })
        .collect();
    // Prefix caching off: the runs alone must recompute everything, not reuse the batch's K/V.
    // Together: at most 20 tokens per step, so prompts are chunked next to other decodes.
    let mut cfg = GeneratorConfig::new(512, 16);
    cfg.enable_prefix_caching = false;
    cfg.max_batched_tokens = 20;
    let together = Generator::new(&model, codec.clone(), cfg.clone())
        .run(&requests, |_, _| {})
        .unwrap();
    cfg.max_batched_tokens = 2048;
    let mut generator = Generator::new(&model, codec, cfg);
    for (i, r) in requests.iter().enumerate() {
        let alone = generator
            .run(
                &[GenerationRequest {
                    arrival_step: 0,
                    ..r.clone()
                }],
                |_, _| {},
            )
            .unwrap();
        assert_eq!(together[i].output_ids, alone[0].output_ids, "prompt {i}");
        assert_eq!(together[i].text, alone[0].text, "prompt {i}");
    }
    assert_eq!(generator.free_blocks(), 512);
}

/// 16 concurrent requests of different lengths arriving at different steps equal each request
/// run alone; and again through a KV cache so small that requests are preempted and resumed.
#[test]
fn sixteen_concurrent_requests_with_and_without_preemption_equal_each_alone() {
    let (model, codec) = load(&smollm2_path());
    let mut prompts = reference_prompts();
    // Variations: every prompt again, cut short, so lengths differ and prefixes are shared.
    let base = prompts.clone();
    for p in base {
        if prompts.len() == 16 {
            break;
        }
        prompts.push(p[..p.len().div_ceil(2)].to_vec());
    }
    assert_eq!(prompts.len(), 16);
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| GenerationRequest {
            prompt_ids: p.clone(),
            params: SamplingParams {
                max_tokens: 40,
                ignore_eos: true,
                ..Default::default()
            },
            arrival_step: (i * 7) % 23,
            ..Default::default()
        })
        .collect();
    let mut alone_cfg = GeneratorConfig::new(512, 16);
    alone_cfg.enable_prefix_caching = false;
    let mut alone = Generator::new(&model, codec.clone(), alone_cfg);
    let want: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            alone
                .run(
                    &[GenerationRequest {
                        arrival_step: 0,
                        ..r.clone()
                    }],
                    |_, _| {},
                )
                .unwrap()
                .remove(0)
                .output_ids
        })
        .collect();

    for (blocks, expect_preemption) in [(512, false), (20, true)] {
        let mut cfg = GeneratorConfig::new(blocks, 16);
        // Large cache: 64 tokens per step, so prompts are chunked next to decodes. Small cache:
        // many requests are admitted at once and overflow it while they decode, so the
        // scheduler must preempt and resume them.
        cfg.max_batched_tokens = if expect_preemption { 512 } else { 64 };
        // The requests share long prefixes; without sharing each needs its own blocks.
        cfg.enable_prefix_caching = !expect_preemption;
        let mut g = Generator::new(&model, codec.clone(), cfg);
        // Small cache: everything arrives at once, so admission fills the cache before the
        // running requests grow.
        let batch: Vec<GenerationRequest> = requests
            .iter()
            .map(|r| GenerationRequest {
                arrival_step: if expect_preemption { 0 } else { r.arrival_step },
                ..r.clone()
            })
            .collect();
        let got = g.run(&batch, |_, _| {}).unwrap();
        for (i, r) in got.iter().enumerate() {
            assert_eq!(r.output_ids, want[i], "request {i} with {blocks} KV blocks");
        }
        let stats = g.stats();
        assert_eq!(
            stats.preemptions > 0,
            expect_preemption,
            "{blocks} blocks: {} preemptions",
            stats.preemptions
        );
        assert_eq!(g.free_blocks(), blocks);
    }
}
