//! A loaded tensor: a name, a row-major shape and its raw bytes in the stored [`DType`].
//!
//! Invariant: `data.len() == dtype.bytes_for(numel)`; for quantised types the last dimension is
//! a multiple of the block length, so every row is a whole number of blocks.

use crate::{DType, Result, WeightsError};

/// One weight tensor in its stored encoding.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Row-major shape: `[rows, cols]` for matrices, `[n]` for vectors.
    pub shape: Vec<usize>,
    /// Element type of `data`.
    pub dtype: DType,
    /// Raw little-endian bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Build a tensor, checking that the byte length matches shape and type.
    pub fn new(name: String, shape: Vec<usize>, dtype: DType, data: Vec<u8>) -> Result<Tensor> {
        let numel: usize = shape.iter().product();
        let last = shape.last().copied().unwrap_or(1);
        if last % dtype.block_len() != 0 {
            return Err(WeightsError::BadTensor {
                name,
                reason: format!("row length {last} is not a multiple of the {dtype} block"),
            });
        }
        let expected = dtype.bytes_for(numel).unwrap_or(usize::MAX);
        if data.len() != expected {
            return Err(WeightsError::BadTensor {
                name,
                reason: format!("{} bytes, expected {expected}", data.len()),
            });
        }
        Ok(Tensor {
            name,
            shape,
            dtype,
            data,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Rows of a matrix (1 for a vector).
    pub fn rows(&self) -> usize {
        if self.shape.len() >= 2 {
            self.shape[..self.shape.len() - 1].iter().product()
        } else {
            1
        }
    }

    /// Columns (the contiguous dimension).
    pub fn cols(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols() / self.dtype.block_len() * self.dtype.block_bytes()
    }

    /// All elements decoded to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.numel());
        self.dtype.dequantize_into(&self.data, &mut out);
        out
    }

    /// Reorder the rows of each head from llama.cpp's interleaved RoPE layout back to the
    /// Hugging Face half-split layout: HF row `j*half + i` is GGUF row `2i + j` in each head.
    /// Rows are whole quantised blocks, so this is exact for every dtype.
    pub fn unpermute_rope_rows(&mut self, n_heads: usize) -> Result<()> {
        let rows = self.rows();
        if n_heads == 0 || !rows.is_multiple_of(n_heads) || !(rows / n_heads).is_multiple_of(2) {
            return Err(WeightsError::BadTensor {
                name: self.name.clone(),
                reason: format!("{rows} rows do not split into {n_heads} heads of even size"),
            });
        }
        let head_dim = rows / n_heads;
        let half = head_dim / 2;
        let rb = self.row_bytes();
        let mut out = vec![0u8; self.data.len()];
        for h in 0..n_heads {
            for i in 0..half {
                for j in 0..2 {
                    let src = h * head_dim + 2 * i + j;
                    let dst = h * head_dim + j * half + i;
                    out[dst * rb..(dst + 1) * rb]
                        .copy_from_slice(&self.data[src * rb..(src + 1) * rb]);
                }
            }
        }
        self.data = out;
        Ok(())
    }
}
