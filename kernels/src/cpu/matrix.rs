//! A weight matrix in its stored encoding, `rows x cols`, row-major, ready for [`crate::matmul`].
//!
//! Invariant: for block formats `cols % 32 == 0` and `bytes.len() == rows * row_bytes`; for f32
//! `data.len() == rows * cols` (these products never overflow). The constructors check it and
//! the fields are private to the crate, so every `Matrix` satisfies it: the AVX-512 matrix
//! multiply reads the storage through raw pointers on the strength of it.

use half::f16;

/// How a matrix's elements are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// Plain float32.
    F32,
    /// GGML Q8_0 blocks of 32: f16 scale, 32 x i8.
    Q8_0,
    /// GGML Q4_0 blocks of 32: f16 scale, 16 bytes of nibbles, value = d * (q - 8).
    Q4_0,
    /// GGML Q4_1 blocks of 32: f16 scale, f16 min, 16 bytes of nibbles, value = d * q + m.
    Q4_1,
}

impl WeightFormat {
    /// Bytes per block of 32 elements (block formats only).
    pub fn block_bytes(self) -> usize {
        match self {
            WeightFormat::F32 => 128,
            WeightFormat::Q8_0 => 34,
            WeightFormat::Q4_0 => 18,
            WeightFormat::Q4_1 => 20,
        }
    }
}

/// Why a matrix could not be built.
#[derive(Debug, thiserror::Error)]
#[error("matrix {rows}x{cols} ({format:?}): {reason}")]
pub struct MatrixError {
    rows: usize,
    cols: usize,
    format: WeightFormat,
    reason: String,
}

#[derive(Clone, Debug)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    Blocks(Vec<u8>),
}

/// A weight matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub(crate) format: WeightFormat,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) storage: Storage,
}

impl Matrix {
    /// A float32 matrix.
    pub fn from_f32(rows: usize, cols: usize, data: Vec<f32>) -> Result<Matrix, MatrixError> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(MatrixError {
                rows,
                cols,
                format: WeightFormat::F32,
                reason: format!("{} values", data.len()),
            });
        }
        Ok(Matrix {
            format: WeightFormat::F32,
            rows,
            cols,
            storage: Storage::F32(data),
        })
    }

    /// A block-quantised matrix from its raw GGML bytes.
    pub fn from_blocks(
        format: WeightFormat,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<Matrix, MatrixError> {
        let err = |reason: String| MatrixError {
            rows,
            cols,
            format,
            reason,
        };
        if format == WeightFormat::F32 {
            return Err(err("use from_f32".into()));
        }
        if !cols.is_multiple_of(32) {
            return Err(err("columns are not a multiple of 32".into()));
        }
        let expected = rows
            .checked_mul(cols / 32)
            .and_then(|blocks| blocks.checked_mul(format.block_bytes()));
        if expected != Some(bytes.len()) {
            return Err(err(format!("{} bytes", bytes.len())));
        }
        Ok(Matrix {
            format,
            rows,
            cols,
            storage: Storage::Blocks(bytes),
        })
    }

    /// Rows (output features).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (input features).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Storage format.
    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes the weights occupy.
    pub fn size_bytes(&self) -> usize {
        match &self.storage {
            Storage::F32(v) => v.len() * 4,
            Storage::Blocks(b) => b.len(),
        }
    }

    pub(crate) fn row_bytes(&self) -> usize {
        self.cols / 32 * self.format.block_bytes()
    }

    /// Stack matrices of one format and width on top of each other (e.g. Q, K and V
    /// projections into one), so one multiply computes all of them. Exact for every format.
    /// An error when `parts` is empty, differ in format or width, or add up to more rows than
    /// `usize` counts.
    pub fn concat_rows(parts: &[&Matrix]) -> Result<Matrix, MatrixError> {
        let Some(first) = parts.first() else {
            return Err(MatrixError {
                rows: 0,
                cols: 0,
                format: WeightFormat::F32,
                reason: "no matrices to stack".into(),
            });
        };
        let rows = parts
            .iter()
            .try_fold(0usize, |sum, m| sum.checked_add(m.rows));
        let err = |reason: &str| MatrixError {
            rows: rows.unwrap_or(usize::MAX),
            cols: first.cols,
            format: first.format,
            reason: reason.into(),
        };
        let Some(rows) = rows else {
            return Err(err("row count overflows usize"));
        };
        if parts
            .iter()
            .any(|m| m.format != first.format || m.cols != first.cols)
        {
            return Err(err("parts differ in format or width"));
        }
        let storage = match &first.storage {
            Storage::F32(_) => Storage::F32(
                parts
                    .iter()
                    .flat_map(|m| match &m.storage {
                        Storage::F32(v) => v.iter().copied(),
                        Storage::Blocks(_) => [].iter().copied(),
                    })
                    .collect(),
            ),
            Storage::Blocks(_) => Storage::Blocks(
                parts
                    .iter()
                    .flat_map(|m| match &m.storage {
                        Storage::Blocks(b) => b.iter().copied(),
                        Storage::F32(_) => [].iter().copied(),
                    })
                    .collect(),
            ),
        };
        Ok(Matrix {
            format: first.format,
            rows,
            cols: first.cols,
            storage,
        })
    }

    /// Decode row `r` into `out` (`cols` values), e.g. for an embedding lookup.
    ///
    /// # Panics
    /// If `r >= rows` or `out` holds fewer than `cols` values.
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        assert!(
            r < self.rows && out.len() >= self.cols,
            "row {r} of a {}x{} matrix into {} values",
            self.rows,
            self.cols,
            out.len()
        );
        let out = &mut out[..self.cols];
        match &self.storage {
            Storage::F32(v) => out.copy_from_slice(&v[r * self.cols..(r + 1) * self.cols]),
            Storage::Blocks(b) => {
                let rb = self.row_bytes();
                dequantize_row(self.format, &b[r * rb..(r + 1) * rb], out);
            }
        }
    }
}

/// The offset of one encoded block of a Q4 format, in `value = d * q + offset` (`q` the
/// unsigned nibble): Q4_1's stored minimum, `-8 d` for Q4_0; `None` for Q8_0 and F32, which
/// have none. The fast precision multiplies it by the activations' block sums.
///
/// # Panics
/// If `blk` is shorter than the format's header.
pub(crate) fn block_offset(format: WeightFormat, blk: &[u8]) -> Option<f32> {
    match format {
        WeightFormat::Q4_1 => Some(f16_at(blk, 2)),
        WeightFormat::Q4_0 => Some(-8.0 * f16_at(blk, 0)),
        WeightFormat::Q8_0 | WeightFormat::F32 => None,
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Scalar decoding of one row of blocks; the reference the SIMD kernels are tested against.
#[inline(always)]
pub(crate) fn dequantize_row(format: WeightFormat, bytes: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    for (blk, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(32)) {
        match format {
            WeightFormat::F32 => unreachable!("f32 rows are not blocks"),
            WeightFormat::Q8_0 => {
                let d = f16_at(blk, 0);
                for (o, &q) in o.iter_mut().zip(&blk[2..34]) {
                    *o = d * (q as i8) as f32;
                }
            }
            WeightFormat::Q4_0 => {
                let d = f16_at(blk, 0);
                for j in 0..16 {
                    o[j] = d * ((blk[2 + j] & 0x0f) as i32 - 8) as f32;
                    o[j + 16] = d * ((blk[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
            WeightFormat::Q4_1 => {
                let (d, m) = (f16_at(blk, 0), f16_at(blk, 2));
                for j in 0..16 {
                    o[j] = d * (blk[4 + j] & 0x0f) as f32 + m;
                    o[j + 16] = d * (blk[4 + j] >> 4) as f32 + m;
                }
            }
        }
    }
}
