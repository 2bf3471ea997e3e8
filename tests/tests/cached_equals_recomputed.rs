//! Prefix caching never changes the output. Every multi-turn conversation of the transformers
//! reference is replayed turn by turn with the cache on: each turn reproduces the reference
//! tokens, and each later turn is served from cache for exactly the prefix it shares with the
//! previous turn's prompt plus reply (all but the last prompt token), at every block size;
//! again with a device cache so small that the conversation is evicted to the host tier
//! between turns and brought back. Finally the oracle is shown to catch a broken cache key.

use convoy_engine::{
    GenerationRequest, GenerationResult, Generator, GeneratorConfig, LlamaModel, SamplingParams,
    TextCodec,
};
use convoy_tests::{comparable_steps, ids, load, smollm2_path, smollm2_reference};
use convoy_weights::ChatMessage;

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    GenerationRequest {
        prompt_ids: prompt,
        params: SamplingParams {
            max_tokens,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

struct Replay {
    cached: usize,
    host_cached: usize,
    prompt_tokens: usize,
}

/// Replay every reference conversation. With `filler`, an unrelated long request runs between
/// turns to push the conversation out of a small device tier into the host tier.
fn replay(model: &LlamaModel, codec: &TextCodec, cfg: GeneratorConfig, filler: bool) -> Replay {
    let reference = smollm2_reference();
    let max_new = reference["max_new_tokens"].as_u64().unwrap() as usize;
    let mut g = Generator::new(model, codec.clone(), cfg);
    let mut out = Replay {
        cached: 0,
        host_cached: 0,
        prompt_tokens: 0,
    };
    for conv in reference["multi_turn"].as_array().unwrap() {
        let mut msgs = vec![ChatMessage::new("system", conv["system"].as_str().unwrap())];
        let mut previous: Option<Vec<u32>> = None;
        for (t, turn) in conv["turns"].as_array().unwrap().iter().enumerate() {
            msgs.push(ChatMessage::new("user", turn["user"].as_str().unwrap()));
            let prompt = codec.encode_chat(&msgs).unwrap();
            assert_eq!(prompt, ids(&turn["prompt_ids"]));
            let r: GenerationResult = g
                .run(&[greedy(prompt.clone(), max_new)], |_, _| {})
                .unwrap()
                .remove(0);
            let want = ids(&turn["output_ids"]);
            let n = comparable_steps(turn.get("top1_top2_margins"), want.len());
            assert_eq!(
                &r.output_ids[..n],
                &want[..n],
                "turn {t}: output with the cache on"
            );
            let served = r.cached_tokens + r.host_cached_tokens;
            match &previous {
                None => assert_eq!(served, 0, "turn {t}: nothing cached yet"),
                Some(prev) => {
                    let expect = common_prefix(prev, &prompt).min(prompt.len() - 1);
                    assert_eq!(
                        served, expect,
                        "turn {t}: every shared token except the last is served from cache"
                    );
                    out.cached += served;
                    out.host_cached += r.host_cached_tokens;
                    out.prompt_tokens += prompt.len();
                }
            }
            let mut prev = prompt.clone();
            prev.extend_from_slice(&r.output_ids);
            previous = Some(prev);
            if filler {
                let junk: Vec<u32> = (0..280).map(|i| 1000 + (i * 37 % 5000) as u32).collect();
                g.run(&[greedy(junk, 1)], |_, _| {}).unwrap();
            }
            msgs.push(ChatMessage::new(
                "assistant",
                turn["reply"].as_str().unwrap(),
            ));
        }
    }
    assert_eq!(
        g.free_blocks(),
        g.cache_manager().device().num_blocks(),
        "no block is left held"
    );
    out
}

#[test]
fn multi_turn_hits_every_shared_token_at_every_block_size() {
    let (model, codec) = load(&smollm2_path());
    for bs in [1, 4, 16, 32, 64] {
        let r = replay(
            &model,
            &codec,
            GeneratorConfig::new(4096 / bs + 8, bs),
            false,
        );
        let ratio = r.cached as f64 / r.prompt_tokens as f64;
        eprintln!(
            "block size {bs}: {} of {} prompt tokens of turns 2+ from cache ({ratio:.4})",
            r.cached, r.prompt_tokens
        );
        // The public four-turn chat: 90.3% of turns 2-4's prompt tokens, whatever the block size.
        assert!(
            (ratio - 0.9029).abs() < 1e-3,
            "block size {bs}: hit ratio {ratio}"
        );
    }
}

#[test]
fn evicted_to_host_and_back_still_equals_recomputation() {
    let (model, codec) = load(&smollm2_path());
    for bs in [4, 16, 64] {
        let mut cfg = GeneratorConfig::new(320usize.div_ceil(bs), bs);
        cfg.num_host_blocks = 1600usize.div_ceil(bs);
        let r = replay(&model, &codec, cfg, true);
        eprintln!(
            "block size {bs}: {} cached, {} of them from the host tier",
            r.cached, r.host_cached
        );
        assert!(
            r.host_cached > 0,
            "block size {bs}: the host tier served nothing"
        );
        assert!((r.cached as f64 / r.prompt_tokens as f64 - 0.9029).abs() < 1e-3);
    }
}

/// A deliberately broken key: it keeps the chat template's control tokens and forgets what the
/// messages say, the bug that once made a production model talk to itself.
fn forget_contents(t: u32) -> u32 {
    if t < 17 {
        t
    } else {
        0
    }
}

fn chat(codec: &TextCodec, user: &str) -> Vec<u32> {
    codec
        .encode_chat(&[ChatMessage::new("user", user)])
        .unwrap()
}

#[test]
fn the_oracle_catches_a_cache_key_without_user_messages() {
    let (model, codec) = load(&smollm2_path());
    let a = chat(&codec, "What is the capital of France?");
    let b = chat(&codec, "What is the capital of Spain?");
    assert_eq!(a.len(), b.len());
    let recompute = |prompt: &[u32]| {
        let mut cfg = GeneratorConfig::new(256, 16);
        cfg.enable_prefix_caching = false;
        Generator::new(&model, codec.clone(), cfg)
            .run(&[greedy(prompt.to_vec(), 16)], |_, _| {})
            .unwrap()
            .remove(0)
            .output_ids
    };
    let b_alone = recompute(&b);
    assert_ne!(
        recompute(&a),
        b_alone,
        "the two questions have different answers"
    );

    for broken in [false, true] {
        let mut cfg = GeneratorConfig::new(256, 16);
        cfg.verify_fraction = 1.0;
        if broken {
            cfg.key_fn = forget_contents;
        }
        let mut g = Generator::new(&model, codec.clone(), cfg);
        g.run(&[greedy(a.clone(), 16)], |_, _| {}).unwrap();
        let r = g
            .run(&[greedy(b.clone(), 16)], |_, _| {})
            .unwrap()
            .remove(0);
        let stats = g.stats();
        assert!(r.cached_tokens > 0 && stats.verified_prefills >= 1);
        if broken {
            assert_eq!(
                r.cached_tokens,
                b.len() - 1,
                "the broken key serves A's K/V for B's prompt"
            );
            assert_ne!(
                r.output_ids, b_alone,
                "cached-equals-recomputed fails under the broken key"
            );
            assert!(
                stats.cache_divergence_total >= 1,
                "--verify-cache counts the divergence"
            );
        } else {
            assert_eq!(r.output_ids, b_alone);
            assert_eq!(stats.cache_divergence_total, 0);
        }
    }
}
