//! `convoy serve --device cuda-emulated`: the daemon with the CUDA backend on the emulated
//! device (convoy's CUDA kernels run on the CPU). A multi-turn chat over the socket hits the
//! prefix cache on later turns; under a KV cache of a few blocks, concurrent requests are
//! preempted and their blocks go through the host tier and back, and every output equals the
//! same request run alone.

mod support;

use convoy_server::api::client::Client;
use convoy_server::api::protocol::ServerEvent;
use serde_json::json;
use support::{smollm2, wait_for_zero_held, Daemon};

fn text_of(events: &[ServerEvent]) -> String {
    events
        .iter()
        .map(|t| match t {
            ServerEvent::Token { text, .. } => text.clone(),
            _ => String::new(),
        })
        .collect()
}

fn greedy(c: &mut Client, id: &str, prompt: &str, max_tokens: usize) -> (String, u64) {
    let (tokens, done) = c
        .generate(
            &json!({"op":"generate","id":id,"prompt":prompt,"max_tokens":max_tokens,
                          "temperature":0,"ignore_eos":true}),
        )
        .unwrap();
    let ServerEvent::Done { usage, .. } = done else {
        panic!("{done:?}")
    };
    assert_eq!(usage.completion_tokens, max_tokens);
    (text_of(&tokens), usage.cached_tokens as u64)
}

#[test]
fn a_multi_turn_chat_on_the_emulated_gpu_hits_the_prefix_cache() {
    let d = Daemon::start(
        "cuda-emulated-chat",
        &smollm2(),
        &[
            "--device",
            "cuda-emulated",
            "--kv-cache-memory",
            "24MiB",
            "--host-cache-memory",
            "0",
        ],
    );
    let mut c = d.client();
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful pirate."})];
    let mut cached = Vec::new();
    for turn in ["Hello!", "Where is the treasure?", "How far is it?"] {
        messages.push(json!({"role": "user", "content": turn}));
        let (tokens, done) = c
            .generate(&json!({"op":"generate","id":"t","messages":messages,"max_tokens":12,"temperature":0}))
            .unwrap();
        let ServerEvent::Done { usage, .. } = done else {
            panic!("{done:?}")
        };
        cached.push((usage.cached_tokens, usage.prompt_tokens));
        messages.push(json!({"role": "assistant", "content": text_of(&tokens)}));
    }
    assert_eq!(cached[0].0, 0, "{cached:?}");
    for &(hit, prompt) in &cached[1..] {
        assert!(
            hit > prompt / 2,
            "later turns come from the cache: {cached:?}"
        );
    }
    wait_for_zero_held(&mut c);
}

#[test]
fn preempted_and_swapped_requests_equal_their_solo_runs() {
    // SmolLM2 in bf16 with blocks of 16: 360 KiB a block; 4 MiB holds 11 blocks (176 tokens)
    // for four requests that reach 70 tokens each.
    let d = Daemon::start(
        "cuda-emulated-swap",
        &smollm2(),
        &[
            "--device",
            "cuda-emulated",
            "--kv-cache-memory",
            "4MiB",
            "--host-cache-memory",
            "16MiB",
            "--block-size",
            "16",
            "--max-running",
            "4",
        ],
    );
    let prompts = [
        "The lighthouse keeper wrote in his log that night",
        "A recipe for bread begins with flour, water and",
        "The committee met on Tuesday to discuss the budget for",
        "Under the old bridge the river ran fast and",
    ];
    let max_tokens = 56;
    let mut c = d.client();
    let solo: Vec<String> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| greedy(&mut c, &format!("solo{i}"), p, max_tokens).0)
        .collect();
    let before = c.stats().unwrap();
    // All four at once: they cannot all stay on the device.
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut ci = d.client();
            let p = p.to_string();
            std::thread::spawn(move || greedy(&mut ci, &format!("together{i}"), &p, max_tokens).0)
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(together, solo);
    let after = c.stats().unwrap();
    assert!(after.preemptions > before.preemptions, "{after:?}");
    assert!(
        after.cache.swapped_out_blocks > 0 && after.cache.swapped_in_blocks > 0,
        "blocks went through the host tier: {:?}",
        after.cache
    );
    assert_eq!(after.cache_divergence_total, 0);
    wait_for_zero_held(&mut c);
}
