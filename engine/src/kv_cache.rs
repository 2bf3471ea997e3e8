//! Storage behind the block pool: per layer, K and V arrays of
//! `[num_blocks][block_size][num_kv_heads][head_dim]` f32 values.
//!
//! The scheduler's block ids index this storage directly; nothing here decides who owns what.

/// Paged K/V storage for all layers.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks per layer.
    pub num_blocks: usize,
    /// K/V heads.
    pub num_kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
}

impl KvCache {
    /// Zeroed storage for `num_blocks` blocks of `block_size` tokens in each of `num_layers`.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> KvCache {
        let per_layer = num_blocks * block_size * num_kv_heads * head_dim;
        KvCache {
            k: (0..num_layers).map(|_| vec![0f32; per_layer]).collect(),
            v: (0..num_layers).map(|_| vec![0f32; per_layer]).collect(),
            block_size,
            num_blocks,
            num_kv_heads,
            head_dim,
        }
    }

    /// Bytes of storage for one block across all layers (K and V).
    pub fn block_bytes(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * std::mem::size_of::<f32>()
    }

    /// Floats of one token's K (or V) in one layer.
    pub fn token_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Write the K and V rows of packed tokens to their slots in `layer`.
    pub fn write(&mut self, layer: usize, slot_mapping: &[u32], k: &[f32], v: &[f32]) {
        let w = self.token_width();
        for (i, &slot) in slot_mapping.iter().enumerate() {
            let s = slot as usize * w;
            self.k[layer][s..s + w].copy_from_slice(&k[i * w..(i + 1) * w]);
            self.v[layer][s..s + w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
    }

    /// K and V storage of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }
}
