//! Loading real files that have been damaged gives errors, never panics.

use convoy_tests::smollm2_path;
use convoy_weights::{load_model, LoadFormat, WeightsError};

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let src = std::fs::read(smollm2_path()).expect("run scripts/fetch_models.sh");
    let dir = std::env::temp_dir().join(format!("convoy-trunc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for cut in [3usize, 100, 1_000_000, src.len() - 1] {
        let f = dir.join(format!("cut{cut}.gguf"));
        std::fs::write(&f, &src[..cut]).unwrap();
        let err = load_model(&f, LoadFormat::Auto).unwrap_err();
        assert!(
            matches!(err, WeightsError::Corrupt { .. }),
            "cut at {cut}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn incremental_decoding_never_splits_a_character() {
    let mut loaded = load_model(&smollm2_path(), LoadFormat::Auto).unwrap();
    let codec = convoy_engine::TextCodec::take_from(&mut loaded);
    let text = "Caf\u{e9} \u{1f600}\u{1f680} na\u{ef}ve \u{4e2d}\u{6587} done";
    let ids = codec.encode(text).unwrap();
    let mut dec = convoy_engine::detokenizer::IncrementalDecoder::new();
    let mut out = String::new();
    for &id in &ids {
        let delta = dec.push(codec.tokenizer().unwrap(), id);
        assert!(!delta.contains('\u{fffd}'), "delta {delta:?}");
        out.push_str(&delta);
    }
    assert_eq!(out, text);
}
