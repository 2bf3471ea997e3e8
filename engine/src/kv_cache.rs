//! Storage behind the KV-cache manager: per layer, a V array of
//! `[num_blocks][block_size][num_kv_heads][head_dim]` f32 values and a K array with each block
//! transposed, `[num_blocks][num_kv_heads][head_dim][block_size]` (so attention computes scores
//! along positions), on the device (for the CPU backend, RAM), plus a host tier of the same
//! layout.
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

    /// Write the K and V rows of packed tokens to their device slots in `layer`. V rows are
    /// stored as they are; K is stored transposed inside its block (see `KvCache`).
    pub fn write(&mut self, layer: usize, slot_mapping: &[u32], k: &[f32], v: &[f32]) {
        let w = self.token_width();
        let bs = self.block_size;
        for (i, &slot) in slot_mapping.iter().enumerate() {
            let s = slot as usize * w;
            self.device.v[layer][s..s + w].copy_from_slice(&v[i * w..(i + 1) * w]);
            let (block, off) = (slot as usize / bs, slot as usize % bs);
            let kb = &mut self.device.k[layer][block * bs * w..(block + 1) * bs * w];
            for (e, &x) in k[i * w..(i + 1) * w].iter().enumerate() {
                kb[e * bs + off] = x;
            }
        }
    }

    /// Device K and V storage of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.device.k[layer], &self.device.v[layer])
    }

    /// Execute block copies in order (all layers, K and V): the first `num_slots` slots of
    /// each block, whatever the layout (V slots are contiguous; K slots are the first
    /// `num_slots` values of each of the block's `token_width` rows).
    pub fn apply(&mut self, copies: &[BlockCopy]) {
        let w = self.token_width();
        let bs = self.block_size;
        let block = bs * w;
        for c in copies {
            for layer in 0..self.device.k.len() {
                for kv in 0..2 {
                    let tier = |t: &Tier, loc: Loc| -> (Vec<f32>, usize) {
                        let (data, b) = match loc {
                            Loc::Device(b) => (if kv == 0 { &t.k } else { &t.v }, b),
                            Loc::Host(b) => (if kv == 0 { &t.k } else { &t.v }, b),
                        };
                        let at = b as usize * block;
                        (data[layer][at..at + block].to_vec(), at)
                    };
                    let (src, _) = match c.src {
                        Loc::Device(_) => tier(&self.device, c.src),
                        Loc::Host(_) => tier(&self.host, c.src),
                    };
                    let (dst_tier, b) = match c.dst {
                        Loc::Device(b) => (&mut self.device, b),
                        Loc::Host(b) => (&mut self.host, b),
                    };
                    let dst = if kv == 0 {
                        &mut dst_tier.k[layer]
                    } else {
                        &mut dst_tier.v[layer]
                    };
                    let at = b as usize * block;
                    if kv == 1 {
                        dst[at..at + c.num_slots * w].copy_from_slice(&src[..c.num_slots * w]);
                    } else {
                        for row in 0..w {
                            dst[at + row * bs..at + row * bs + c.num_slots]
                                .copy_from_slice(&src[row * bs..row * bs + c.num_slots]);
                        }
                    }
                }
            }
        }
    }
}
