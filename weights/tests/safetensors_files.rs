//! Safetensors files through convoy's loader: a valid Hugging Face directory (one file or
//! shards) loads with its dtypes intact, and every damaged file is one clear
//! [`WeightsError`] naming the file, never a panic or a huge allocation.
//!
//! Every file is built here, in a fresh directory under the system temp dir.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use convoy_weights::safetensors::{read_dir, read_file};
use convoy_weights::{dummy, load_model, DType, LoadFormat, ModelConfig, Tensor, WeightsError};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// A fresh directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "convoy-weights-st-{}-{n}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// Write `bytes` to `name` in the directory and return its path.
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A safetensors file whose 8-byte prefix says `declared` header bytes, followed by `header`
/// and `data_len` zero bytes.
fn raw(declared: u64, header: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = declared.to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(bytes.len() + data_len, 0);
    bytes
}

/// A well-formed file: the prefix states the header's true length.
fn well_formed(header: &str, data_len: usize) -> Vec<u8> {
    raw(header.len() as u64, header, data_len)
}

/// Read `file`, expect it to be rejected as corrupt, check that the error names the file,
/// and return the reason.
fn corrupt_reason(file: &Path) -> String {
    let err = read_file(file).unwrap_err();
    let line = err.to_string();
    assert!(
        !line.contains('\n') && line.contains(&*file.to_string_lossy()),
        "one line naming {}: {line:?}",
        file.display()
    );
    match err {
        WeightsError::Corrupt { path, reason } => {
            assert_eq!(path, file);
            reason
        }
        other => panic!("expected Corrupt for {}, got {other:?}", file.display()),
    }
}

fn assert_contains(reason: &str, needles: &[&str]) {
    for needle in needles {
        assert!(reason.contains(needle), "{needle:?} not in {reason:?}");
    }
}

#[test]
fn overlapping_tensor_offsets_name_the_tensor() {
    let d = Scratch::new("overlap");
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#;
    let f = d.write("overlap.safetensors", &well_formed(header, 24));
    assert_contains(&corrupt_reason(&f), &["tensor b", "overlap"]);

    // A gap between tensors is refused the same way: the ranges must tile the data.
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[20,36]}}"#;
    let f = d.write("gap.safetensors", &well_formed(header, 36));
    assert_contains(&corrupt_reason(&f), &["tensor b", "gap"]);
}

#[test]
fn header_length_longer_than_the_file() {
    let d = Scratch::new("longheader");
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#;
    let bytes = raw(header.len() as u64 + 64, header, 16);
    let len = bytes.len();
    let f = d.write("long.safetensors", &bytes);
    assert_contains(
        &corrupt_reason(&f),
        &[
            "header length runs past the end",
            &format!("{len}-byte file"),
        ],
    );
}

#[test]
fn dtype_the_crate_does_not_know_is_refused() {
    let d = Scratch::new("q9");
    let header = r#"{"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}"#;
    let f = d.write("q9.safetensors", &well_formed(header, 16));
    // The crate's JSON error names the unknown variant.
    assert_contains(
        &corrupt_reason(&f),
        &["not a valid safetensors tensor table", "Q9"],
    );
}

#[test]
fn dtype_the_crate_knows_but_convoy_does_not_compute_with() {
    let d = Scratch::new("i32");
    let header = r#"{"ids":{"dtype":"I32","shape":[4],"data_offsets":[0,16]}}"#;
    let f = d.write("i32.safetensors", &well_formed(header, 16));
    match read_file(&f).unwrap_err() {
        WeightsError::UnsupportedDType { dtype, tensor } => {
            assert_eq!((dtype.as_str(), tensor.as_str()), ("I32", "ids"));
        }
        other => panic!("expected UnsupportedDType, got {other:?}"),
    }
}

#[test]
fn hundred_megabyte_header_length_is_refused_without_reading_it() {
    let d = Scratch::new("huge");
    // 100_000_000 is the crate's limit itself: allowed in principle, but not in a small file.
    let f = d.write("at-limit.safetensors", &raw(100_000_000, "{}", 32));
    assert_contains(
        &corrupt_reason(&f),
        &["header length runs past the end", "42-byte file"],
    );
    // Past the limit, and absurd lengths, are refused before looking at the file's size.
    for declared in [100_000_001u64, u64::MAX] {
        let f = d.write(
            &format!("over-{declared}.safetensors"),
            &raw(declared, "{}", 32),
        );
        assert_contains(
            &corrupt_reason(&f),
            &["over the safetensors limit of 100 MB"],
        );
    }
}

#[test]
fn byte_range_that_does_not_match_the_shape() {
    let d = Scratch::new("span");
    let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,12]}}"#;
    let f = d.write("span.safetensors", &well_formed(header, 12));
    assert_contains(&corrupt_reason(&f), &["do not span its shape"]);
}

#[test]
fn header_that_is_not_json() {
    let d = Scratch::new("json");
    let f = d.write("json.safetensors", &well_formed("{\"a\": [1, 2", 0));
    assert_contains(
        &corrupt_reason(&f),
        &["not a valid safetensors tensor table"],
    );
    let mut bytes = 2u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0xff, 0xfe]);
    let f = d.write("utf8.safetensors", &bytes);
    assert_contains(&corrupt_reason(&f), &["header is not UTF-8"]);
}

/// A small valid file of one f32 tensor of 8 elements, written by the crate.
fn small_valid_file() -> Vec<u8> {
    let data: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![2, 4], &data).unwrap();
    safetensors::serialize([("w", view)], None).unwrap()
}

#[test]
fn truncated_or_padded_files_are_reported() {
    let d = Scratch::new("trunc");
    let good = small_valid_file();
    let f = d.write("good.safetensors", &good);
    assert_eq!(read_file(&f).unwrap()[0].to_f32()[7], 7.0);

    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let cases: [(usize, &str); 4] = [
        (0, "shorter than the 8-byte header length"),
        (5, "shorter than the 8-byte header length"),
        (8 + header_len / 2, "header length runs past the end"),
        (good.len() - 1, "does not end where the last tensor does"),
    ];
    for (cut, expected) in cases {
        let f = d.write(&format!("cut{cut}.safetensors"), &good[..cut]);
        let reason = corrupt_reason(&f);
        assert_contains(&reason, &[expected]);
        // The one-line message says "truncated" whatever the cut.
        let line = read_file(&f).unwrap_err().to_string();
        assert!(line.contains("truncated"), "cut {cut}: {line}");
    }
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 4]);
    let f = d.write("padded.safetensors", &padded);
    assert_contains(
        &corrupt_reason(&f),
        &["does not end where the last tensor does", "trailing bytes"],
    );
}

fn tiny_config() -> serde_json::Value {
    serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 64,
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": false,
        "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2})
}

/// The tensors of the tiny model, with values from convoy's dummy weights: the first third of
/// the names in f32, the next in f16, the rest in bf16. Returns (name, dtype, shape, bytes).
fn tiny_tensors() -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let cfg = ModelConfig::from_hf_json(&tiny_config()).unwrap();
    let mut source: Vec<Tensor> = dummy::tensors(&cfg, DType::F32, 7).into_values().collect();
    source.sort_by(|a, b| a.name.cmp(&b.name));
    let n = source.len();
    source
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let values = t.to_f32();
            let (dtype, bytes): (Dtype, Vec<u8>) = match i * 3 / n {
                0 => (
                    Dtype::F32,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ),
                1 => (
                    Dtype::F16,
                    values
                        .iter()
                        .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
                _ => (
                    Dtype::BF16,
                    values
                        .iter()
                        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                        .collect(),
                ),
            };
            (t.name, dtype, t.shape, bytes)
        })
        .collect()
}

/// Serialise `tensors` with the safetensors crate.
fn serialize(tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views = tensors.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.as_str(),
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

/// Every tensor loaded matches what was written: name, dtype, shape, bytes and values.
fn assert_loaded(
    loaded: &HashMap<String, Tensor>,
    written: &[(String, Dtype, Vec<usize>, Vec<u8>)],
) {
    assert_eq!(loaded.len(), written.len());
    let mut seen = [0usize; 3];
    for (name, dtype, shape, bytes) in written {
        let t = &loaded[name];
        let (expect, slot) = match dtype {
            Dtype::F32 => (DType::F32, 0),
            Dtype::F16 => (DType::F16, 1),
            _ => (DType::BF16, 2),
        };
        seen[slot] += 1;
        assert_eq!(t.dtype, expect, "{name}");
        assert_eq!(&t.shape, shape, "{name}");
        assert_eq!(&t.data, bytes, "{name}");
        let decoded: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        assert_eq!(t.to_f32(), decoded, "{name}");
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "all three dtypes used: {seen:?}"
    );
}

#[test]
fn hugging_face_directory_loads_through_load_model() {
    let d = Scratch::new("hf");
    std::fs::write(d.0.join("config.json"), tiny_config().to_string()).unwrap();
    let written = tiny_tensors();
    d.write("model.safetensors", &serialize(&written));

    let model = load_model(&d.0, LoadFormat::Auto).unwrap();
    assert_eq!(model.config.num_layers, 2);
    assert_eq!(model.config.num_kv_heads, 2);
    assert!(model
        .tensors
        .contains_key("model.layers.1.mlp.down_proj.weight"));
    assert_loaded(&model.tensors, &written);
}

#[test]
fn sharded_directory_follows_its_index() {
    let d = Scratch::new("shards");
    std::fs::write(d.0.join("config.json"), tiny_config().to_string()).unwrap();
    let written = tiny_tensors();
    let (first, second) = written.split_at(written.len() / 2);
    d.write("model-00001-of-00002.safetensors", &serialize(first));
    d.write("model-00002-of-00002.safetensors", &serialize(second));
    // A stray file the index does not name is not read.
    d.write("stray.safetensors", b"not a safetensors file");
    let mut weight_map = serde_json::Map::new();
    for (i, (name, ..)) in written.iter().enumerate() {
        let shard = if i < first.len() { 1 } else { 2 };
        weight_map.insert(
            name.clone(),
            format!("model-0000{shard}-of-00002.safetensors").into(),
        );
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    d.write("model.safetensors.index.json", index.to_string().as_bytes());

    assert_loaded(&read_dir(&d.0).unwrap(), &written);
    assert_loaded(
        &load_model(&d.0, LoadFormat::Auto).unwrap().tensors,
        &written,
    );

    // A shard the index names but that is missing is an I/O error naming it.
    std::fs::remove_file(d.0.join("model-00002-of-00002.safetensors")).unwrap();
    match load_model(&d.0, LoadFormat::Auto).unwrap_err() {
        WeightsError::Io { path, .. } => {
            assert!(
                path.ends_with("model-00002-of-00002.safetensors"),
                "{path:?}"
            )
        }
        other => panic!("expected Io, got {other:?}"),
    }
}
