//! The engine thread: requests submitted over the channel stream their events back; cancel and
//! disconnect free every KV block at once; a full queue is refused with a clear error.

use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use convoy_engine::core::{EngineEvent, EngineRequest, EventKind};
use convoy_engine::service::{spawn_cpu, Delivery, EngineHandle, ServiceConfig};
use convoy_engine::{FinishReason, GeneratorConfig, LlamaModel, SamplingParams, TextCodec};
use convoy_weights::{load_model, LoadFormat};

fn engine(max_queued: usize, max_running: usize) -> EngineHandle {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "run scripts/fetch_models.sh");
    let mut loaded = load_model(&path, LoadFormat::Auto).unwrap();
    let codec = TextCodec::take_from(&mut loaded);
    let model = LlamaModel::new(loaded).unwrap();
    let mut cfg = GeneratorConfig::new(256, 16);
    cfg.max_running = max_running;
    let service = ServiceConfig {
        max_queued,
        ..Default::default()
    };
    spawn_cpu(model, codec, cfg, service)
}

fn stream() -> (convoy_engine::service::BoxedSink, Receiver<EngineEvent>) {
    let (tx, rx) = channel();
    (
        Box::new(move |ev: EngineEvent| {
            if tx.send(ev).is_ok() {
                Delivery::Delivered
            } else {
                Delivery::Gone
            }
        }),
        rx,
    )
}

fn request(max_tokens: usize) -> EngineRequest {
    EngineRequest {
        prompt_ids: vec![504, 3575, 282, 4649, 314],
        params: SamplingParams {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        logprobs: Some(3),
        ..Default::default()
    }
}

fn wait_done(rx: &Receiver<EngineEvent>) -> (Vec<EngineEvent>, convoy_engine::core::Done) {
    let mut tokens = Vec::new();
    loop {
        let ev = rx.recv_timeout(Duration::from_secs(60)).expect("event");
        match ev.kind {
            EventKind::Done(d) => return (tokens, d),
            _ => tokens.push(ev),
        }
    }
}

#[test]
fn streams_cancels_and_frees_blocks() {
    let h = engine(64, 256);
    // Three concurrent streams; the greedy continuation of the first reference prompt. The ids
    // are transformers' own: tests/fixtures/smollm2-transformers.json, completions[0]
    // ("The capital of France is"), the first 8 of `output_ids`.
    let rxs: Vec<Receiver<EngineEvent>> = (0..3)
        .map(|i| {
            let (sink, rx) = stream();
            h.submit(i, request(8), sink).unwrap().unwrap();
            rx
        })
        .collect();
    for rx in &rxs {
        let (tokens, done) = wait_done(rx);
        assert_eq!(done.finish_reason, FinishReason::Length);
        assert_eq!(
            done.output_ids,
            vec![7042, 30, 198, 198, 504, 2988, 314, 42]
        );
        assert_eq!(tokens.len(), 8);
        let EventKind::Token {
            logprobs: Some(lp), ..
        } = &tokens[0].kind
        else {
            panic!("logprobs asked for")
        };
        assert_eq!(lp.top.len(), 3);
        assert_eq!(lp.top[0].0, 7042);
        assert!((lp.logprob - lp.top[0].1).abs() < 1e-6);
    }

    // Cancel mid-stream.
    let (sink, rx) = stream();
    h.submit(10, request(10_000), sink).unwrap().unwrap();
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    h.abort(10, FinishReason::Cancelled).unwrap();
    let (_, done) = wait_done(&rx);
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert_eq!(h.stats().unwrap().device_blocks_held, 0);

    // Disconnect mid-stream: the receiver goes away, the engine notices and frees the blocks.
    let (sink, rx) = stream();
    h.submit(11, request(10_000), sink).unwrap().unwrap();
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    drop(rx);
    let mut held = usize::MAX;
    for _ in 0..200 {
        let s = h.stats().unwrap();
        held = s.device_blocks_held + s.running + s.waiting;
        if held == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(held, 0, "a disconnected stream leaves nothing held");

    // A bad parameter is refused with a reason, and the engine goes on.
    let (sink, _rx) = stream();
    let bad = EngineRequest {
        params: SamplingParams {
            top_p: 0.0,
            ..Default::default()
        },
        ..request(4)
    };
    let err = h.submit(12, bad, sink).unwrap().unwrap_err();
    assert_eq!(err.code(), "invalid_parameter");
    assert!(err.to_string().contains("top_p"), "{err}");
    h.shutdown();
    h.join().unwrap();
}

#[test]
fn a_full_queue_refuses_new_work() {
    // One running request at a time: the others wait, and the queue holds two.
    let h = engine(2, 1);
    let mut keep = Vec::new();
    let mut refused = None;
    for i in 0..40 {
        let (sink, rx) = stream();
        keep.push(rx);
        if let Err(e) = h.submit(i, request(2000), sink).unwrap() {
            refused = Some(e);
            break;
        }
    }
    let e = refused.expect("the queue fills up");
    assert_eq!(e.code(), "queue_full");
    assert!(e.to_string().contains("queue is full"), "{e}");
    h.shutdown();
    h.join().unwrap();
}
