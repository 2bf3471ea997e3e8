//! glassllm, converted to a Hugging Face directory (f16 safetensors), against the package's own
//! NumPy forward pass (fixture written by scripts/make_glass_fixture.py): every logit of every
//! position within 1e-4.

use convoy_engine::ForwardBatch;
use convoy_tests::{glassllm_path, ids, load, repo_root};

#[test]
fn logits_match_the_numpy_forward_pass() {
    let (model, codec) = load(&glassllm_path());
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_root().join("tests/fixtures/glassllm_logits.json")).unwrap(),
    )
    .unwrap();
    let vocab = model.config.vocab_size;
    let mut worst = 0f32;
    for case in fixture["cases"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        assert_eq!(
            codec.encode(case["text"].as_str().unwrap()).unwrap(),
            prompt,
            "tokenizer.json reproduces glassllm's tokenizer"
        );
        let bs = 4; // several blocks per sequence, so paging is exercised
        let table: Vec<u32> = (0..32).rev().collect();
        let mut cache = model.new_kv_cache(32, bs);
        let mut batch = ForwardBatch::default();
        batch.push_seq(&prompt, 0, &table, bs, false);
        batch.logits_rows = (0..prompt.len()).collect();
        let logits = model.forward(&batch, &mut cache);
        for (p, want_row) in case["logits"].as_array().unwrap().iter().enumerate() {
            for (v, want) in want_row.as_array().unwrap().iter().enumerate() {
                let want = want.as_f64().unwrap() as f32;
                let got = logits[p * vocab + v];
                let err = (got - want).abs() / want.abs().max(1.0);
                worst = worst.max(err);
                assert!(err <= 1e-4, "position {p} token {v}: {got} vs {want}");
            }
        }
    }
    eprintln!("glassllm worst relative logit error: {worst:e}");
}
