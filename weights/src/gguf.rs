//! GGUF (v2 and v3) reader: header, metadata, tensor infos and tensor data, memory-mapped.
//!
//! Every length and offset read from the file is checked against the file's size before use,
//! so a truncated or corrupt file is an error, never a panic or an out-of-bounds read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{DType, Result, Tensor, WeightsError};

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// Any integer type, widened.
    Int(i64),
    /// Any unsigned 64-bit integer above `i64::MAX` is rejected; floats are widened.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    String(String),
    /// An array of values.
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            GgufValue::Int(i) if *i >= 0 => Some(*i as u64),
            _ => None,
        }
    }
    /// The value as a float (integers convert).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            GgufValue::Float(f) => Some(*f),
            GgufValue::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            GgufValue::Bool(b) => Some(*b),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Clone, Debug)]
pub struct GgufTensorInfo {
    /// GGUF name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in GGUF order (`dims[0]` is contiguous).
    pub dims: Vec<usize>,
    /// Element type.
    pub dtype: DType,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    /// Byte length of the data.
    pub len: usize,
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// Metadata key/value pairs.
    pub metadata: HashMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                WeightsError::corrupt(
                    self.path,
                    format!("unexpected end of file at byte {}", self.pos),
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64()?;
        // Nothing in a file can be longer than the file itself.
        if n > self.buf.len() as u64 {
            return Err(WeightsError::corrupt(
                self.path,
                format!("{what} length {n} exceeds the file size"),
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.len("string")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| WeightsError::corrupt(self.path, "string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Int(self.take(1)?[0] as i64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => {
                let b = self.take(2)?;
                GgufValue::Int(u16::from_le_bytes([b[0], b[1]]) as i64)
            }
            3 => {
                let b = self.take(2)?;
                GgufValue::Int(i16::from_le_bytes([b[0], b[1]]) as i64)
            }
            4 => GgufValue::Int(self.u32()? as i64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err(WeightsError::corrupt(self.path, "arrays nested too deeply"));
                }
                let elem = self.u32()?;
                let n = self.len("array")?;
                let mut out = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1)?);
                }
                GgufValue::Array(out)
            }
            10 => {
                let v = self.u64()?;
                GgufValue::Int(
                    i64::try_from(v)
                        .map_err(|_| WeightsError::corrupt(self.path, "u64 value out of range"))?,
                )
            }
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            other => {
                return Err(WeightsError::corrupt(
                    self.path,
                    format!("unknown metadata type {other}"),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Open and parse a GGUF file; tensor data stays mapped until read.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = std::fs::File::open(path).map_err(|e| WeightsError::io(path, e))?;
        // SAFETY: the map is read-only and private to this process; convoy never writes model
        // files, and every access below is bounds-checked against the map's length.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| WeightsError::io(path, e))?;
        let mut r = Reader {
            buf: &map,
            pos: 0,
            path,
        };
        if r.take(4).ok() != Some(b"GGUF".as_slice()) {
            return Err(WeightsError::corrupt(path, "bad magic: not a GGUF file"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(WeightsError::corrupt(
                path,
                format!("GGUF version {version} is not supported (2 or 3)"),
            ));
        }
        let n_tensors = r.len("tensor count")?;
        let n_kv = r.len("metadata count")?;
        let mut metadata = HashMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 4 {
                return Err(WeightsError::corrupt(
                    path,
                    format!("tensor {name} has {n_dims} dimensions"),
                ));
            }
            let dims = (0..n_dims)
                .map(|_| r.len("dimension"))
                .collect::<Result<Vec<_>>>()?;
            let ty = r.u32()?;
            let offset = r.len("tensor offset")?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = r.pos.div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let dtype = DType::from_ggml(ty).ok_or_else(|| WeightsError::UnsupportedDType {
                dtype: format!("ggml type {ty}"),
                tensor: name.clone(),
            })?;
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let len = numel.and_then(|n| dtype.bytes_for(n)).ok_or_else(|| {
                WeightsError::corrupt(
                    path,
                    format!("tensor {name}: shape {dims:?} does not fit {dtype} blocks"),
                )
            })?;
            let start = data_start.checked_add(offset);
            match start.and_then(|s| s.checked_add(len)) {
                Some(end) if end <= map.len() => {}
                _ => {
                    return Err(WeightsError::corrupt(
                        path,
                        format!("tensor {name} extends past the end of the file (truncated?)"),
                    ))
                }
            }
            tensors.push(GgufTensorInfo {
                name,
                dims,
                dtype,
                offset: data_start + offset,
                len,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Read a tensor into memory with a row-major `[rows, cols]` shape (GGUF dims reversed).
    pub fn read_tensor(&self, info: &GgufTensorInfo, name: String) -> Result<Tensor> {
        let bytes = self.map[info.offset..info.offset + info.len].to_vec();
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        Tensor::new(name, shape, info.dtype, bytes)
    }
}
