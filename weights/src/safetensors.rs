//! Safetensors reader (memory-mapped), for one file or many shards listed in
//! `model.safetensors.index.json`.
//!
//! Each file is parsed by Hugging Face's `safetensors` crate straight over the memory map, so
//! nothing is copied until the header has been validated in full: a header length of at most
//! 100 MB that fits in the file, a JSON table of known element types, byte ranges that tile the
//! data section in order without gaps or overlaps, each exactly shape times element size, and
//! a data section that ends where the last tensor does. Any failure is one
//! [`WeightsError`] naming the file. Only then are the tensors convoy computes with (F32, F16,
//! BF16) copied out of the map.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ::safetensors::{Dtype, SafeTensorError, SafeTensors};
use memmap2::Mmap;
use serde_json::Value;

use crate::{DType, Result, Tensor, WeightsError};

/// Read every tensor of one safetensors file.
pub fn read_file(path: &Path) -> Result<Vec<Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    // SAFETY: read-only private map of a file convoy never writes. The map outlives every
    // borrow below: the parsed table and its tensor views borrow it, and each tensor's bytes
    // are copied out before this function returns.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
    let parsed = SafeTensors::deserialize(&map).map_err(|e| header_error(path, map.len(), e))?;
    let mut views: Vec<_> = parsed.iter().collect();
    views.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let mut tensors = Vec::with_capacity(views.len());
    for (name, view) in views {
        let dtype = convoy_dtype(view.dtype()).ok_or_else(|| WeightsError::UnsupportedDType {
            dtype: view.dtype().to_string(),
            tensor: name.to_string(),
        })?;
        let tensor = Tensor::new(
            name.to_string(),
            view.shape().to_vec(),
            dtype,
            view.data().to_vec(),
        )
        .map_err(|e| WeightsError::corrupt(path, e.to_string()))?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

/// The convoy element type of a safetensors one, for the types convoy computes with.
fn convoy_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Turn the crate's reason for rejecting `path` (of `file_len` bytes) into convoy's error.
fn header_error(path: &Path, file_len: usize, err: SafeTensorError) -> WeightsError {
    let reason = match err {
        SafeTensorError::IoError(e) => return WeightsError::io(path, e),
        SafeTensorError::HeaderTooSmall => {
            format!("{file_len} bytes, shorter than the 8-byte header length")
        }
        SafeTensorError::HeaderTooLarge => {
            "header length is over the safetensors limit of 100 MB".to_string()
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("header length runs past the end of the {file_len}-byte file")
        }
        SafeTensorError::InvalidHeader(e) => format!("header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            format!("header is not a valid safetensors tensor table: {e}")
        }
        SafeTensorError::InvalidOffset(name) => format!(
            "tensor {name}: data_offsets overlap another tensor, leave a gap or run backwards"
        ),
        SafeTensorError::TensorInvalidInfo => {
            "a tensor's data_offsets do not span its shape times its element size".to_string()
        }
        SafeTensorError::ValidationOverflow => {
            "a tensor's shape is too large to size in bytes".to_string()
        }
        SafeTensorError::MisalignedSlice => {
            "a tensor of a sub-byte element type does not end on a byte boundary".to_string()
        }
        SafeTensorError::MetadataIncompleteBuffer => format!(
            "the {file_len}-byte file does not end where the last tensor does \
             (truncated, or trailing bytes)"
        ),
        SafeTensorError::TensorNotFound(name) => format!("tensor {name} is not in the file"),
        SafeTensorError::InvalidTensorView(dtype, shape, bytes) => {
            format!("a {dtype} tensor of shape {shape:?} cannot hold {bytes} bytes")
        }
    };
    WeightsError::corrupt(path, reason)
}

/// The safetensors files of a Hugging Face model directory: the shards named by
/// `model.safetensors.index.json` when present, else every `*.safetensors` file.
pub fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| WeightsError::io(&index, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| WeightsError::corrupt(&index, e.to_string()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| WeightsError::corrupt(&index, "missing weight_map"))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| WeightsError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

/// Read every tensor of a model directory into a map by name.
pub fn read_dir(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let files = shard_paths(dir)?;
    if files.is_empty() {
        return Err(WeightsError::NotFound(dir.to_path_buf()));
    }
    let mut out = HashMap::new();
    for f in files {
        for t in read_file(&f)? {
            out.insert(t.name.clone(), t);
        }
    }
    Ok(out)
}
