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
    /// `num_slots` values of each of the block's `token_width` rows). Copies within a tier
    /// move data in place; nothing is allocated.
    ///
    /// # Panics
    /// When a block id is outside its tier or `num_slots` exceeds the block size.
    pub fn apply(&mut self, copies: &[BlockCopy]) {
        let (w, bs) = (self.token_width(), self.block_size);
        let KvCache { device, host, .. } = self;
        for c in copies {
            let n = c.num_slots;
            assert!(n <= bs, "a copy of {n} slots between blocks of {bs}");
            let at = |loc: Loc| match loc {
                Loc::Device(b) | Loc::Host(b) => b as usize * bs * w,
            };
            let (src, dst) = (at(c.src), at(c.dst));
            // The runs of a block to copy, as (offset in the block, length).
            let runs = |is_k: bool| {
                let (count, len, stride) = if is_k { (w, n, bs) } else { (1, n * w, 0) };
                (0..count).map(move |r| (r * stride, len))
            };
            for layer in 0..device.k.len() {
                for is_k in [true, false] {
                    let between = |from: &[f32], to: &mut [f32]| {
                        for (o, len) in runs(is_k) {
                            to[dst + o..dst + o + len]
                                .copy_from_slice(&from[src + o..src + o + len]);
                        }
                    };
                    let within = |buf: &mut [f32]| {
                        for (o, len) in runs(is_k) {
                            buf.copy_within(src + o..src + o + len, dst + o);
                        }
                    };
                    match (c.src, c.dst) {
                        (Loc::Device(_), Loc::Device(_)) => within(plane(device, layer, is_k)),
                        (Loc::Host(_), Loc::Host(_)) => within(plane(host, layer, is_k)),
                        (Loc::Device(_), Loc::Host(_)) => {
                            between(plane(device, layer, is_k), plane(host, layer, is_k))
                        }
                        (Loc::Host(_), Loc::Device(_)) => {
                            between(plane(host, layer, is_k), plane(device, layer, is_k))
                        }
                    }
                }
            }
        }
    }
}

/// The K or V storage of one layer of a tier.
fn plane(t: &mut Tier, layer: usize, is_k: bool) -> &mut [f32] {
    if is_k {
        &mut t.k[layer]
    } else {
        &mut t.v[layer]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value that names its tier, layer, K or V, block and position in the block.
    fn tag(host: bool, layer: usize, is_k: bool, block: usize, i: usize) -> f32 {
        (host as usize * 100_000 + layer * 10_000 + is_k as usize * 1000 + block * 100 + i) as f32
    }

    #[test]
    fn copies_move_the_first_slots_of_blocks_between_and_within_tiers() {
        // 2 layers, 4 device and 2 host blocks of 4 slots, 2 KV heads of dimension 3.
        let mut kv = KvCache::new(2, 4, 2, 4, 2, 3);
        let block = 4 * 6;
        for layer in 0..2 {
            for is_k in [true, false] {
                for (host, tier) in [(false, &mut kv.device), (true, &mut kv.host)] {
                    for (j, x) in plane(tier, layer, is_k).iter_mut().enumerate() {
                        *x = tag(host, layer, is_k, j / block, j % block);
                    }
                }
            }
        }
        let before_device: Vec<Vec<f32>> =
            kv.device.k.iter().chain(&kv.device.v).cloned().collect();
        kv.apply(&[
            BlockCopy {
                src: Loc::Device(1),
                dst: Loc::Host(0),
                num_slots: 3,
            },
            BlockCopy {
                src: Loc::Host(1),
                dst: Loc::Device(2),
                num_slots: 2,
            },
            BlockCopy {
                src: Loc::Device(0),
                dst: Loc::Device(3),
                num_slots: 4,
            },
        ]);
        for layer in 0..2 {
            for is_k in [true, false] {
                // Slot s of a block: V values s*6..s*6+6; K values row*4 + s for each row.
                let slot_of = |i: usize| if is_k { i % 4 } else { i / 6 };
                let host0 = &plane(&mut kv.host, layer, is_k)[..block];
                for (i, &x) in host0.iter().enumerate() {
                    let want = if slot_of(i) < 3 {
                        tag(false, layer, is_k, 1, i)
                    } else {
                        tag(true, layer, is_k, 0, i)
                    };
                    assert_eq!(x, want, "host block 0, layer {layer}, k {is_k}, value {i}");
                }
                let dev = plane(&mut kv.device, layer, is_k).to_vec();
                for (i, &x) in dev[2 * block..3 * block].iter().enumerate() {
                    let want = if slot_of(i) < 2 {
                        tag(true, layer, is_k, 1, i)
                    } else {
                        tag(false, layer, is_k, 2, i)
                    };
                    assert_eq!(
                        x, want,
                        "device block 2, layer {layer}, k {is_k}, value {i}"
                    );
                }
                for (i, &x) in dev[3 * block..].iter().enumerate() {
                    assert_eq!(x, tag(false, layer, is_k, 0, i), "device block 3");
                }
                // Untouched blocks stay.
                let idx = if is_k { layer } else { 2 + layer };
                assert_eq!(dev[..2 * block], before_device[idx][..2 * block]);
            }
        }
    }
}
