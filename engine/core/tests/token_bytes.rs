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
