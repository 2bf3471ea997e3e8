//! Safetensors reader (memory-mapped), for one file or many shards listed in
//! `model.safetensors.index.json`.
//!
//! The header is validated in full before any tensor is read: offsets in order, inside the
//! file, and byte lengths equal to shape times element size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde_json::Value;

use crate::{DType, Result, Tensor, WeightsError};

/// Read every tensor of one safetensors file.
pub fn read_file(path: &Path) -> Result<Vec<Tensor>> {
    let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
    // SAFETY: read-only private map of a file convoy never writes; all slicing below is
    // checked against the map's length first.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
    if map.len() < 8 {
        return Err(WeightsError::corrupt(
            path,
            "shorter than the 8-byte header length",
        ));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&map[..8]);
    let header_len = u64::from_le_bytes(len8);
    if header_len > (map.len() - 8) as u64 {
        return Err(WeightsError::corrupt(
            path,
            format!("header length {header_len} exceeds the file (truncated?)"),
        ));
    }
    let data_start = 8 + header_len as usize;
    let header: Value = serde_json::from_slice(&map[8..data_start])
        .map_err(|e| WeightsError::corrupt(path, format!("header is not JSON: {e}")))?;
    let obj = header
        .as_object()
        .ok_or_else(|| WeightsError::corrupt(path, "header is not a JSON object"))?;
    let data_len = map.len() - data_start;
    let mut tensors = Vec::with_capacity(obj.len());
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_name = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let dtype = match dtype_name {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            other => {
                return Err(WeightsError::UnsupportedDType {
                    dtype: other.to_string(),
                    tensor: name.clone(),
                })
            }
        };
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .ok_or_else(|| WeightsError::corrupt(path, format!("tensor {name}: bad shape")))?;
        let offsets: Vec<usize> = info
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|o: &Vec<usize>| o.len() == 2 && o[0] <= o[1])
            .ok_or_else(|| {
                WeightsError::corrupt(path, format!("tensor {name}: bad data_offsets"))
            })?;
        if offsets[1] > data_len {
            return Err(WeightsError::corrupt(
                path,
                format!("tensor {name} extends past the end of the file (truncated?)"),
            ));
        }
        let bytes = map[data_start + offsets[0]..data_start + offsets[1]].to_vec();
        let tensor = Tensor::new(name.clone(), shape, dtype, bytes)
            .map_err(|e| WeightsError::corrupt(path, e.to_string()))?;
        tensors.push(tensor);
    }
    Ok(tensors)
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
