//! `convoy serve --device sim`: the daemon on a simulated H100 (Llama-3-8B roofline), paced in
//! real time. A multi-turn chat hits the prefix cache; a few hundred concurrent streams finish
//! or are cancelled with every block freed; a drain ends every stream.

mod support;

use std::time::{Duration, Instant};

use convoy_server::api::client::Client;
use convoy_server::api::protocol::ServerEvent;
use serde_json::json;
use support::{smollm2, wait_for_zero_held, Daemon};

fn sim_daemon(name: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--device",
        "sim",
        "--max-running",
        "1024",
        "--max-queued",
        "4096",
    ];
    args.extend_from_slice(extra);
    Daemon::start(name, &smollm2(), &args)
}

#[test]
fn a_multi_turn_chat_on_the_simulated_device_hits_the_prefix_cache() {
    let d = sim_daemon("sim-chat", &[]);
    let mut c = d.client();
    let mut messages = vec![json!({"role": "system", "content": "You are a pirate."})];
    let mut cached = Vec::new();
    for turn in ["Hello!", "Where is the treasure?", "How far is it?"] {
        messages.push(json!({"role": "user", "content": turn}));
        let (tokens, done) = c
            .generate(&json!({"op":"generate","id":"t","messages":messages,"max_tokens":24}))
            .unwrap();
        let ServerEvent::Done {
            usage,
            finish_reason,
            ..
        } = done
        else {
            panic!("{done:?}")
        };
        assert_eq!(finish_reason, "length");
        assert_eq!(usage.completion_tokens, 24);
        let text: String = tokens
            .iter()
            .map(|t| match t {
                ServerEvent::Token { text, .. } => text.clone(),
                _ => String::new(),
            })
            .collect();
        cached.push((usage.cached_tokens, usage.prompt_tokens));
        messages.push(json!({"role": "assistant", "content": text}));
    }
    assert_eq!(cached[0].0, 0, "{cached:?}");
    for &(hit, prompt) in &cached[1..] {
        assert!(
            hit > prompt / 2,
            "later turns come from the cache: {cached:?}"
        );
    }
    // The tokens are the simulator's: the same request gives the same reply.
    let ask =
        json!({"op":"generate","id":"s","prompt":"Once","max_tokens":8,"seed":7,"stream":false});
    let first = c.generate(&ask).unwrap().1;
    let second = c.generate(&ask).unwrap().1;
    match (first, second) {
        (ServerEvent::Done { text: a, .. }, ServerEvent::Done { text: b, .. }) => {
            assert_eq!(a, b);
            assert!(!a.unwrap_or_default().is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn hundreds_of_streams_finish_or_cancel_and_a_drain_ends_them_all() {
    let mut d = sim_daemon("sim-streams", &["--drain-timeout", "2"]);
    const STREAMS: usize = 300;
    let socket = d.socket.clone();
    let threads: Vec<_> = (0..STREAMS)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let id = format!("s{i}");
                c.send(&json!({"op":"generate","id":id,"prompt":format!("Story {i}:"),"max_tokens":64}))
                    .unwrap();
                let mut tokens = 0;
                loop {
                    match c.recv().unwrap() {
                        Some(ServerEvent::Token { .. }) => {
                            tokens += 1;
                            // Every tenth stream cancels itself after five tokens.
                            if i % 10 == 0 && tokens == 5 {
                                c.send(&json!({"op":"cancel","id":id})).unwrap();
                            }
                        }
                        Some(ServerEvent::Done { finish_reason, .. }) => {
                            return (i, finish_reason, tokens)
                        }
                        other => panic!("stream {i}: {other:?}"),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let (i, reason, tokens) = t.join().unwrap();
        if i % 10 == 0 {
            assert_eq!(reason, "cancelled", "stream {i}");
            assert!(tokens < 64, "stream {i}");
        } else {
            assert_eq!((reason.as_str(), tokens), ("length", 64), "stream {i}");
        }
    }
    let mut c = d.client();
    wait_for_zero_held(&mut c);
    // A drain with a few hundred long streams in flight: each gets its end, the daemon exits 0.
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(&socket).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let req = json!({"op":"generate","id":"long","prompt":format!("Epic {i}:"),"max_tokens":100000,"ignore_eos":true});
                match c.generate(&req).unwrap().1 {
                    ServerEvent::Done { finish_reason, .. } => finish_reason,
                    other => panic!("{other:?}"),
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = d.sigterm();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    for t in threads {
        assert_eq!(t.join().unwrap(), "cancelled");
    }
}
