//! Tensor element types as stored on disk, with their block geometry.
//!
//! Quantised GGUF types store a row as consecutive blocks of [`DType::block_len`] elements,
//! each [`DType::block_bytes`] long; a row's length must be a multiple of the block length.

use half::{bf16, f16};

/// The element type of a stored tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE float32.
    F32,
    /// IEEE float16.
    F16,
    /// bfloat16.
    BF16,
    /// GGML Q8_0: 32 signed bytes and one f16 scale.
    Q8_0,
    /// GGML Q4_0: 32 nibbles (value - 8) and one f16 scale.
    Q4_0,
    /// GGML Q4_1: 32 nibbles, one f16 scale and one f16 minimum.
    Q4_1,
}

impl DType {
    /// Elements per block (1 for plain floats).
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_1 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => 34,
            DType::Q4_0 => 18,
            DType::Q4_1 => 20,
        }
    }

    /// Bytes taken by `n` elements, or `None` when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        n.is_multiple_of(self.block_len())
            .then(|| n / self.block_len() * self.block_bytes())
    }

    /// The GGML type id, as in GGUF tensor infos.
    pub fn from_ggml(id: u32) -> Option<DType> {
        Some(match id {
            0 => DType::F32,
            1 => DType::F16,
            2 => DType::Q4_0,
            3 => DType::Q4_1,
            8 => DType::Q8_0,
            30 => DType::BF16,
            _ => return None,
        })
    }

    /// Whether this type is a block-quantised GGML type.
    pub fn is_quantized(self) -> bool {
        self.block_len() > 1
    }

    /// Decode `bytes` (a whole number of blocks) into `out`, one f32 per element.
    /// This is the scalar reference decoding; the kernels crate has the fast one.
    pub fn dequantize_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        let rd16 = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
        match self {
            DType::F32 => out.extend(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            DType::F16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::BF16 => out.extend(
                bytes
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
            ),
            DType::Q8_0 => {
                for b in bytes.chunks_exact(34) {
                    let d = rd16(b, 0);
                    out.extend(b[2..34].iter().map(|&q| d * (q as i8) as f32));
                }
            }
            DType::Q4_0 => {
                for b in bytes.chunks_exact(18) {
                    let d = rd16(b, 0);
                    let qs = &b[2..18];
                    out.extend(qs.iter().map(|&q| d * ((q & 0x0f) as i32 - 8) as f32));
                    out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
                }
            }
            DType::Q4_1 => {
                for b in bytes.chunks_exact(20) {
                    let (d, m) = (rd16(b, 0), rd16(b, 2));
                    let qs = &b[4..20];
                    out.extend(qs.iter().map(|&q| d * (q & 0x0f) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}
