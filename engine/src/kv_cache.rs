//! Storage behind the KV-cache manager: per layer, K and V arrays of
//! `[num_blocks][block_size][num_kv_heads][head_dim]` f32 values on the device (for the CPU
//! backend, RAM), plus a host tier of the same layout.
//!
//! The manager's block ids index this storage directly; nothing here decides who owns what.
//! [`KvCache::apply`] executes the manager's copies in order.

use convoy_scheduler::{BlockCopy, Loc};

struct Tier {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl Tier {
    fn new(num_layers: usize, floats_per_layer: usize) -> Tier {
        Tier {
            k: (0..num_layers)
                .map(|_| vec![0f32; floats_per_layer])
                .collect(),
            v: (0..num_layers)
                .map(|_| vec![0f32; floats_per_layer])
                .collect(),
        }
    }
}

/// Paged K/V storage for all layers, device tier and host tier.
pub struct KvCache {
    device: Tier,
    host: Tier,
    /// Tokens per block.
    pub block_size: usize,
    /// Device blocks per layer.
    pub num_blocks: usize,
    /// Host blocks per layer.
    pub num_host_blocks: usize,
    /// K/V heads.
    pub num_kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
}

impl KvCache {
    /// Zeroed storage for `num_blocks` device and `num_host_blocks` host blocks of
    /// `block_size` tokens in each of `num_layers`.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        num_host_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> KvCache {
        let per_block = block_size * num_kv_heads * head_dim;
        KvCache {
            device: Tier::new(num_layers, num_blocks * per_block),
            host: Tier::new(num_layers, num_host_blocks * per_block),
            block_size,
            num_blocks,
            num_host_blocks,
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

    /// Write the K and V rows of packed tokens to their device slots in `layer`.
    pub fn write(&mut self, layer: usize, slot_mapping: &[u32], k: &[f32], v: &[f32]) {
        let w = self.token_width();
        for (i, &slot) in slot_mapping.iter().enumerate() {
            let s = slot as usize * w;
            self.device.k[layer][s..s + w].copy_from_slice(&k[i * w..(i + 1) * w]);
            self.device.v[layer][s..s + w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
    }

    /// Device K and V storage of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.device.k[layer], &self.device.v[layer])
    }

    /// Execute block copies in order (all layers, K and V).
    pub fn apply(&mut self, copies: &[BlockCopy]) {
        let block = self.block_size * self.token_width();
        let w = self.token_width();
        for c in copies {
            let n = c.num_slots * w;
            for layer in 0..self.device.k.len() {
                for kv in 0..2 {
                    let (src, src_at) = match c.src {
                        Loc::Device(b) => (
                            if kv == 0 {
                                &self.device.k[layer]
                            } else {
                                &self.device.v[layer]
                            },
                            b as usize * block,
                        ),
                        Loc::Host(b) => (
                            if kv == 0 {
                                &self.host.k[layer]
                            } else {
                                &self.host.v[layer]
                            },
                            b as usize * block,
                        ),
                    };
                    let data = src[src_at..src_at + n].to_vec();
                    let (dst, dst_at) = match c.dst {
                        Loc::Device(b) => (
                            if kv == 0 {
                                &mut self.device.k[layer]
                            } else {
                                &mut self.device.v[layer]
                            },
                            b as usize * block,
                        ),
                        Loc::Host(b) => (
                            if kv == 0 {
                                &mut self.host.k[layer]
                            } else {
                                &mut self.host.v[layer]
                            },
                            b as usize * block,
                        ),
                    };
                    dst[dst_at..dst_at + n].copy_from_slice(&data);
                }
            }
        }
    }
}
