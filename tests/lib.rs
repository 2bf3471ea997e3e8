//! Helpers shared by convoy's end-to-end tests: where the models and reference fixtures live,
//! and loading them. Tests fail (never skip) when a model is missing: run
//! `scripts/fetch_models.sh` first (the test script does).

use std::path::PathBuf;

pub mod guarantees;

use convoy_engine::backend::cpu::CpuBackend;
use convoy_engine::backend::cuda::CudaBackend;
use convoy_engine::backend::{forward, Backend};
use convoy_engine::{Device, ForwardBatch, LlamaModel, TextCodec};
use convoy_kernels::cuda::emulator::EmulatedDevice;
use convoy_weights::{load_model, ChatMessage, LoadFormat};

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test fixtures kept in the repository (`tests/fixtures/README.md` says how each was made).
pub fn fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The SmolLM2 GGUF file.
pub fn smollm2_path() -> PathBuf {
    repo_root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// The converted glassllm directory.
pub fn glassllm_path() -> PathBuf {
    repo_root().join("models/glassllm")
}

/// Load a model and its codec, failing the test with a hint when it is missing.
pub fn load(path: &std::path::Path) -> (LlamaModel, TextCodec) {
    assert!(
        path.exists(),
        "{} is missing: run scripts/fetch_models.sh",
        path.display()
    );
    let mut loaded = load_model(path, LoadFormat::Auto).expect("model loads");
    let codec = TextCodec::take_from(&mut loaded);
    (LlamaModel::new(loaded).expect("model builds"), codec)
}

/// The transformers reference outputs for SmolLM2.
pub fn smollm2_reference() -> serde_json::Value {
    let p = fixtures_dir().join("smollm2-transformers.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("reference is JSON")
}

/// A JSON array of integers as token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Number of leading reference steps that are safe to compare exactly: everything before the
/// first step whose top-1/top-2 margin is below 1e-3 (a near-tie may flip under another
/// summation order).
pub fn comparable_steps(margins: Option<&serde_json::Value>, len: usize) -> usize {
    match margins.and_then(|m| m.as_array()) {
        Some(m) => m
            .iter()
            .position(|x| x.as_f64().unwrap_or(0.0) < 1e-3)
            .unwrap_or(len)
            .min(len),
        None => len,
    }
}

/// One prompt of the transformers reference with what transformers generated for it.
pub struct Case {
    /// Which case, for messages.
    pub name: String,
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// transformers' greedy continuation.
    pub output_ids: Vec<u32>,
    /// Top-1 minus top-2 logit at each step, where recorded.
    pub margins: Option<serde_json::Value>,
    /// Top-5 ids and logits of the first steps, where recorded.
    pub top5: Option<serde_json::Value>,
}

impl Case {
    /// The case `name` of `prompt_ids`, with the outputs, margins and top-5 logits of the
    /// reference's record `r`.
    fn from_record(name: String, prompt_ids: Vec<u32>, r: &serde_json::Value) -> Case {
        Case {
            name,
            prompt_ids,
            output_ids: ids(&r["output_ids"]),
            margins: r.get("top1_top2_margins").cloned(),
            top5: r.get("top5_first_steps").cloned(),
        }
    }
}

/// A JSON array of `{role, content}` as chat messages.
pub fn messages(v: &serde_json::Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).expect("messages")
}

/// Every case of the reference (completions, chats, multi-turn turns), with convoy's own
/// tokenisation and chat rendering checked on the way.
pub fn reference_cases(codec: &TextCodec, reference: &serde_json::Value) -> Vec<Case> {
    let mut out = Vec::new();
    for (i, c) in reference["completions"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let prompt_ids = ids(&c["prompt_ids"]);
        assert_eq!(
            codec.encode(c["prompt"].as_str().unwrap()).unwrap(),
            prompt_ids,
            "completion {i} prompt ids"
        );
        out.push(Case::from_record(format!("completion {i}"), prompt_ids, c));
    }
    for (i, c) in reference["chats"].as_array().unwrap().iter().enumerate() {
        let msgs = messages(&c["messages"]);
        assert_eq!(
            codec.render_chat(&msgs).unwrap(),
            c["rendered_prompt"].as_str().unwrap(),
            "chat {i} rendering"
        );
        let prompt_ids = ids(&c["prompt_ids"]);
        assert_eq!(
            codec.encode_chat(&msgs).unwrap(),
            prompt_ids,
            "chat {i} prompt ids"
        );
        out.push(Case::from_record(format!("chat {i}"), prompt_ids, c));
    }
    for (i, conv) in reference["multi_turn"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let mut msgs = vec![ChatMessage::new("system", conv["system"].as_str().unwrap())];
        for (t, turn) in conv["turns"].as_array().unwrap().iter().enumerate() {
            msgs.push(ChatMessage::new("user", turn["user"].as_str().unwrap()));
            let prompt_ids = ids(&turn["prompt_ids"]);
            assert_eq!(
                codec.encode_chat(&msgs).unwrap(),
                prompt_ids,
                "multi-turn {i} turn {t} prompt ids"
            );
            out.push(Case::from_record(
                format!("multi-turn {i} turn {t}"),
                prompt_ids,
                turn,
            ));
            msgs.push(ChatMessage::new(
                "assistant",
                turn["reply"].as_str().unwrap(),
            ));
        }
    }
    out
}

/// convoy's logits at each step the reference recorded top-5 logits for: the prompt, then the
/// reference's own tokens fed back one step at a time, through a fresh paged cache of blocks of
/// 16 on `device`. One full vocabulary row per recorded step (none when the case recorded none).
pub fn first_steps_logits(device: Device, model: &LlamaModel, case: &Case) -> Vec<Vec<f32>> {
    let (blocks, bs) = (64, 16);
    match device {
        Device::Cpu => steps_logits(
            &mut CpuBackend::new(model, model.new_kv_cache(blocks, bs)),
            case,
        ),
        Device::CudaEmulated => steps_logits(
            &mut CudaBackend::new(EmulatedDevice::new(), model, blocks, 0, bs, 2048)
                .expect("the CUDA backend runs the model"),
            case,
        ),
        Device::Cuda => panic!("no driver-backed CUDA device layer in this build"),
    }
}

fn steps_logits<B: Backend>(backend: &mut B, case: &Case) -> Vec<Vec<f32>> {
    let Some(steps) = case.top5.as_ref().and_then(|t| t.as_array()) else {
        return Vec::new();
    };
    let bs = backend.block_size();
    let table: Vec<u32> = (0..64).collect();
    let mut computed = 0;
    let mut tokens = case.prompt_ids.clone();
    let mut out = Vec::with_capacity(steps.len());
    for s in 0..steps.len() {
        let mut batch = ForwardBatch::default();
        batch.push_seq(&tokens[computed..], computed, &table, bs, true);
        let mut logits = Vec::new();
        forward(backend, &batch, &mut logits).expect("the forward pass runs");
        out.push(logits);
        computed = tokens.len();
        tokens.push(case.output_ids[s]);
    }
    out
}
