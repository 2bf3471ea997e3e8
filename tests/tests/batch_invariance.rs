//! Batching changes nothing: greedy outputs of 8 prompts run together (arriving at different
//! steps, prefills chunked next to decodes) equal each prompt run alone.

use convoy_engine::{GenerationRequest, Generator, GeneratorConfig, SamplingParams};
use convoy_tests::{ids, load, smollm2_path, smollm2_reference};

#[test]
fn eight_prompts_together_equal_each_alone() {
    let (model, codec) = load(&smollm2_path());
    let reference = smollm2_reference();
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    for c in reference["completions"]
        .as_array()
        .unwrap()
        .iter()
        .chain(reference["chats"].as_array().unwrap())
    {
        prompts.push(ids(&c["prompt_ids"]));
    }
    for turn in reference["multi_turn"][0]["turns"].as_array().unwrap() {
        prompts.push(ids(&turn["prompt_ids"]));
    }
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
