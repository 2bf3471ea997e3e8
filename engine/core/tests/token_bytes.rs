//! Each token's real bytes (OpenAI's `bytes`): tokens that carry part of a character decode to
//! U+FFFD alone, but their bytes put together are the text.

use std::path::Path;

use convoy_engine::TextCodec;
use convoy_weights::{load_model, LoadFormat};

fn codec(rel: &str) -> TextCodec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    assert!(path.exists(), "run scripts/fetch_models.sh");
    let mut loaded = load_model(&path, LoadFormat::Auto).unwrap();
    TextCodec::take_from(&mut loaded)
}

#[test]
fn the_bytes_of_a_texts_tokens_are_the_text() {
    // (glassllm's vocabulary has no bytes: what it cannot spell is <unk>.)
    for rel in ["models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"] {
        let c = codec(rel);
        for text in ["\n\n```\n👍👍", "héllo wörld ✓ 日本語", "plain ascii"] {
            let ids = c.encode(text).unwrap();
            let bytes: Vec<u8> = ids.iter().flat_map(|&id| c.token_bytes(id)).collect();
            assert_eq!(String::from_utf8_lossy(&bytes), text, "{rel}: {ids:?}");
            assert_eq!(bytes, text.as_bytes(), "{rel}");
        }
    }
    // A token that holds part of a character: alone it decodes to U+FFFD, its bytes are real.
    let c = codec("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let ids = c.encode("👍").unwrap();
    assert!(ids.len() > 1, "{ids:?}");
    assert!(c.decode(&ids[..1]).unwrap().contains('\u{fffd}'));
    assert!(!c.token_bytes(ids[0]).is_empty());
    assert!(std::str::from_utf8(&c.token_bytes(ids[0])).is_err());
}

#[test]
fn the_byte_path_of_the_detokeniser_gives_what_decoding_gives() {
    use convoy_engine::detokenizer::IncrementalDecoder;
    let c = codec("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        c.decodes_by_bytes(),
        "SmolLM2's byte-level BPE takes the byte path"
    );
    let tok = c.tokenizer().unwrap();
    let vocab = tok.get_vocab_size(true) as u64;
    // Real texts (emoji split over tokens, accents, CJK) and random ids, special ones included.
    let mut cases: Vec<Vec<u32>> = [
        "\n\n```\n👍👍 done",
        "héllo wörld ✓ 日本語 ok",
        "<|im_start|>user\nhi",
    ]
    .iter()
    .map(|t| c.encode_with_special_tokens(t).unwrap())
    .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        let ids = (0..40)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % vocab) as u32
            })
            .collect();
        cases.push(ids);
    }
    for ids in cases {
        let mut fast = IncrementalDecoder::new();
        let mut slow = IncrementalDecoder::new();
        let mut a = String::new();
        let mut b = String::new();
        for &id in &ids {
            a.push_str(&c.decode_step(&mut fast, id));
            b.push_str(&slow.push(tok, id));
        }
        let whole = tok.decode(&ids, true).unwrap();
        // The slow path holds back a trailing U+FFFD for good; the byte path writes it.
        assert_eq!(
            a.trim_end_matches('\u{fffd}'),
            whole.trim_end_matches('\u{fffd}'),
            "{ids:?}"
        );
        assert!(whole.starts_with(&b), "{ids:?}");
        assert!(a.starts_with(&b) || b.starts_with(&a), "{ids:?}");
    }
}
