//! Tokenizers: a Hugging Face `tokenizer.json`, or one built from GGUF metadata.
//!
//! GGUF stores a byte-level BPE vocabulary as `tokenizer.ggml.tokens`, `merges`, `token_type`
//! and the name of its pre-tokenizer (`tokenizer.ggml.pre`). We write the equivalent
//! `tokenizer.json` document and hand it to the `tokenizers` crate, so encoding is the same
//! code path as for a Hugging Face directory. Control tokens (type 3) become special added
//! tokens, so `<|im_start|>` in a rendered chat template encodes to one id.

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use crate::gguf::{GgufFile, GgufValue};
use crate::{Result, WeightsError};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// The pre-tokenizer a GGUF `tokenizer.ggml.pre` name stands for.
fn pre_tokenizer(pre: &str) -> Result<Value> {
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        "smollm" | "starcoder" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
            byte_level(false)]}),
        other => {
            return Err(WeightsError::Tokenizer(format!(
                "GGUF pre-tokenizer {other:?} is not supported (known: default, gpt2, smollm, starcoder, llama-bpe, qwen2)"
            )))
        }
    })
}

fn strings(v: Option<&GgufValue>, key: &str) -> Result<Vec<String>> {
    v.and_then(|v| v.as_array())
        .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
        .ok_or_else(|| {
            WeightsError::Tokenizer(format!(
                "GGUF metadata {key} is missing or not a string array"
            ))
        })
}

/// Build the `tokenizer.json` document equivalent to a GGUF file's tokenizer metadata.
pub fn gguf_tokenizer_json(gguf: &GgufFile) -> Result<Value> {
    let model = gguf
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model != "gpt2" {
        return Err(WeightsError::Tokenizer(format!(
            "GGUF tokenizer model {model:?} is not supported (byte-level BPE \"gpt2\" is)"
        )));
    }
    let tokens = strings(gguf.get("tokenizer.ggml.tokens"), "tokenizer.ggml.tokens")?;
    let merges = strings(gguf.get("tokenizer.ggml.merges"), "tokenizer.ggml.merges")?;
    let types: Vec<i64> = gguf
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(1) as i64).collect())
        .unwrap_or_default();
    let pre = gguf
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.as_str())
        .unwrap_or("default");
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| {
            let mut parts = m.splitn(2, ' ');
            let a = parts.next().unwrap_or("");
            let b = parts.next().unwrap_or("");
            json!([a, b])
        })
        .collect();
    let added: Vec<Value> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .filter_map(|(i, &t)| {
            tokens.get(i).map(|content| {
                json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": t == 3})
            })
        })
        .collect();
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer(pre)?,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges}
    }))
}

/// Build a working tokenizer from a GGUF file's metadata.
pub fn from_gguf(gguf: &GgufFile) -> Result<Tokenizer> {
    let doc = gguf_tokenizer_json(gguf)?;
    from_json(&doc.to_string())
}

/// Load a tokenizer from `tokenizer.json` text.
pub fn from_json(text: &str) -> Result<Tokenizer> {
    text.parse::<Tokenizer>()
        .map_err(|e| WeightsError::Tokenizer(e.to_string()))
}
