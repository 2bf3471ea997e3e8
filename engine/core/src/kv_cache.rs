//! Storage behind the KV-cache manager: per layer, a V array of
//! `[num_blocks][block_size][num_kv_heads][head_dim]` values and a K array with each block
//! transposed, `[num_blocks][num_kv_heads][head_dim][block_size]` (so attention computes scores
//! along positions), on the device (for the CPU backend, RAM), plus a host tier of the same
//! layout. Values are f32, or f16 or 8-bit floats with `--kv-cache-dtype f16|fp8_e4m3`
//! ([`KvCacheDtype`]).
//!
//! The manager's block ids index this storage directly; nothing here decides who owns what.
//! [`KvCache::apply`] executes the manager's copies in order.

use convoy_kernels::{KvElem, F8E4M3};
use convoy_scheduler::{BlockCopy, Loc};
use half::f16;

/// The element type of the KV cache (`--kv-cache-dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvCacheDtype {
    /// float32: K/V kept exactly as the model computed them (the exact precision's parity
    /// with transformers needs it). The default.
    #[default]
    F32,
    /// float16: half the memory per block (twice the cached tokens in the same budget) and
    /// half the bytes attention reads, at a rounding of every stored value to 11 significant
    /// bits (round to nearest even). Attention on it is f32 attention on the rounded values,
    /// so it stays batch invariant, and cached equals recomputed.
    F16,
    /// 8-bit floats, E4M3 (the format of vLLM's `fp8` KV cache, here without a scale): a
    /// quarter of f32's memory and bytes read, each stored value rounded to 4 significant bits
    /// (round to nearest even) and saturated at ±448. Attention on it is f32 attention on the
    /// rounded values, so it keeps both guarantees; its distance from float32 is measured
    /// (docs/kv_cache.md).
    Fp8E4m3,
}

/// A `--kv-cache-dtype` that is not `f32`, `f16` or `fp8_e4m3`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown KV cache dtype {0:?}: use f32, f16 or fp8_e4m3")]
pub struct UnknownKvCacheDtype(pub String);

impl KvCacheDtype {
    /// Bytes of one stored value.
    pub fn bytes(self) -> usize {
        match self {
            KvCacheDtype::F32 => f32::BYTES,
            KvCacheDtype::F16 => f16::BYTES,
            KvCacheDtype::Fp8E4m3 => F8E4M3::BYTES,
        }
    }

    /// The name `--kv-cache-dtype` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            KvCacheDtype::F32 => "f32",
            KvCacheDtype::F16 => "f16",
            KvCacheDtype::Fp8E4m3 => "fp8_e4m3",
        }
    }

    /// `f32`, `f16` or `fp8_e4m3` (case-insensitive; also `float32`, `float16`, `fp8`).
    pub fn parse(s: &str) -> Result<KvCacheDtype, UnknownKvCacheDtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvCacheDtype::F32),
            "f16" | "float16" => Ok(KvCacheDtype::F16),
            "fp8_e4m3" | "fp8" => Ok(KvCacheDtype::Fp8E4m3),
            _ => Err(UnknownKvCacheDtype(s.to_string())),
        }
    }
}

struct Tier<E> {
    k: Vec<Vec<E>>,
    v: Vec<Vec<E>>,
}

impl<E: KvElem> Tier<E> {
    fn new(num_layers: usize, values_per_layer: usize) -> Tier<E> {
        Tier {
            k: (0..num_layers)
                .map(|_| vec![E::default(); values_per_layer])
                .collect(),
            v: (0..num_layers)
                .map(|_| vec![E::default(); values_per_layer])
                .collect(),
        }
    }

    /// The K or V storage of one layer.
    fn plane(&mut self, layer: usize, is_k: bool) -> &mut [E] {
        if is_k {
            &mut self.k[layer]
        } else {
            &mut self.v[layer]
        }
    }
}

/// Both tiers, of one element type.
struct Tiers<E> {
    device: Tier<E>,
    host: Tier<E>,
}

impl<E: KvElem> Tiers<E> {
    fn new(num_layers: usize, device_values: usize, host_values: usize) -> Tiers<E> {
        Tiers {
            device: Tier::new(num_layers, device_values),
            host: Tier::new(num_layers, host_values),
        }
    }

    /// See [`KvCache::write`]; `w` values per token, blocks of `bs` slots.
    fn write(
        &mut self,
        layer: usize,
        slot_mapping: &[u32],
        k: &[f32],
        v: &[f32],
        w: usize,
        bs: usize,
    ) {
        for (i, &slot) in slot_mapping.iter().enumerate() {
            let s = slot as usize * w;
            for (d, &x) in self.device.v[layer][s..s + w]
                .iter_mut()
                .zip(&v[i * w..(i + 1) * w])
            {
                *d = E::from_f32(x);
            }
            let (block, off) = (slot as usize / bs, slot as usize % bs);
            let kb = &mut self.device.k[layer][block * bs * w..(block + 1) * bs * w];
            for (e, &x) in k[i * w..(i + 1) * w].iter().enumerate() {
                kb[e * bs + off] = E::from_f32(x);
            }
        }
    }

    /// See [`KvCache::apply`].
    fn apply(&mut self, copies: &[BlockCopy], w: usize, bs: usize) {
        let Tiers { device, host } = self;
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
                    let between = |from: &[E], to: &mut [E]| {
                        for (o, len) in runs(is_k) {
                            to[dst + o..dst + o + len]
                                .copy_from_slice(&from[src + o..src + o + len]);
                        }
                    };
                    let within = |buf: &mut [E]| {
                        for (o, len) in runs(is_k) {
                            buf.copy_within(src + o..src + o + len, dst + o);
                        }
                    };
                    match (c.src, c.dst) {
                        (Loc::Device(_), Loc::Device(_)) => within(device.plane(layer, is_k)),
                        (Loc::Host(_), Loc::Host(_)) => within(host.plane(layer, is_k)),
                        (Loc::Device(_), Loc::Host(_)) => {
                            between(device.plane(layer, is_k), host.plane(layer, is_k))
                        }
                        (Loc::Host(_), Loc::Device(_)) => {
                            between(host.plane(layer, is_k), device.plane(layer, is_k))
                        }
                    }
                }
            }
        }
    }
}

/// The storage, in the cache's element type.
enum Storage {
    F32(Tiers<f32>),
    F16(Tiers<f16>),
    Fp8E4m3(Tiers<F8E4M3>),
}

/// The device K and V storage of one layer, in the cache's element type; attention reads
/// either (`convoy_kernels::paged_attention` is generic over [`KvElem`]).
#[derive(Clone, Copy, Debug)]
pub enum KvLayer<'a> {
    /// An f32 cache.
    F32 {
        /// K, blocks transposed.
        k: &'a [f32],
        /// V.
        v: &'a [f32],
    },
    /// An f16 cache.
    F16 {
        /// K, blocks transposed.
        k: &'a [f16],
        /// V.
        v: &'a [f16],
    },
    /// An 8-bit float (E4M3) cache.
    Fp8E4m3 {
        /// K, blocks transposed.
        k: &'a [F8E4M3],
        /// V.
        v: &'a [F8E4M3],
    },
}

/// Paged K/V storage for all layers, device tier and host tier.
pub struct KvCache {
    storage: Storage,
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
    /// Zeroed storage of `dtype` values for `num_blocks` device and `num_host_blocks` host
    /// blocks of `block_size` tokens in each of `num_layers`.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        num_host_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvCacheDtype,
    ) -> KvCache {
        let per_block = block_size * num_kv_heads * head_dim;
        let (device, host) = (num_blocks * per_block, num_host_blocks * per_block);
        let storage = match dtype {
            KvCacheDtype::F32 => Storage::F32(Tiers::new(num_layers, device, host)),
            KvCacheDtype::F16 => Storage::F16(Tiers::new(num_layers, device, host)),
            KvCacheDtype::Fp8E4m3 => Storage::Fp8E4m3(Tiers::new(num_layers, device, host)),
        };
        KvCache {
            storage,
            block_size,
            num_blocks,
            num_host_blocks,
            num_kv_heads,
            head_dim,
        }
    }

    /// Bytes of storage for one block across all layers (K and V) in `dtype`.
    pub fn block_bytes(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: KvCacheDtype,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * dtype.bytes()
    }

    /// The element type of the storage.
    pub fn dtype(&self) -> KvCacheDtype {
        match self.storage {
            Storage::F32(_) => KvCacheDtype::F32,
            Storage::F16(_) => KvCacheDtype::F16,
            Storage::Fp8E4m3(_) => KvCacheDtype::Fp8E4m3,
        }
    }

    /// Values of one token's K (or V) in one layer.
    pub fn token_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Write the K and V rows of packed tokens to their device slots in `layer` (rounded to
    /// the cache's element type). V rows are stored as they are; K is stored transposed inside
    /// its block (see `KvCache`).
    pub fn write(&mut self, layer: usize, slot_mapping: &[u32], k: &[f32], v: &[f32]) {
        let (w, bs) = (self.token_width(), self.block_size);
        match &mut self.storage {
            Storage::F32(t) => t.write(layer, slot_mapping, k, v, w, bs),
            Storage::F16(t) => t.write(layer, slot_mapping, k, v, w, bs),
            Storage::Fp8E4m3(t) => t.write(layer, slot_mapping, k, v, w, bs),
        }
    }

    /// Device K and V storage of `layer`.
    pub fn layer(&self, layer: usize) -> KvLayer<'_> {
        match &self.storage {
            Storage::F32(t) => KvLayer::F32 {
                k: &t.device.k[layer],
                v: &t.device.v[layer],
            },
            Storage::F16(t) => KvLayer::F16 {
                k: &t.device.k[layer],
                v: &t.device.v[layer],
            },
            Storage::Fp8E4m3(t) => KvLayer::Fp8E4m3 {
                k: &t.device.k[layer],
                v: &t.device.v[layer],
            },
        }
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
        match &mut self.storage {
            Storage::F32(t) => t.apply(copies, w, bs),
            Storage::F16(t) => t.apply(copies, w, bs),
            Storage::Fp8E4m3(t) => t.apply(copies, w, bs),
        }
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
        let mut kv = KvCache::new(2, 4, 2, 4, 2, 3, KvCacheDtype::F32);
        let Storage::F32(tiers) = &mut kv.storage else {
            unreachable!("an f32 cache")
        };
        let block = 4 * 6;
        for layer in 0..2 {
            for is_k in [true, false] {
                for (host, tier) in [(false, &mut tiers.device), (true, &mut tiers.host)] {
                    for (j, x) in tier.plane(layer, is_k).iter_mut().enumerate() {
                        *x = tag(host, layer, is_k, j / block, j % block);
                    }
                }
            }
        }
        let before_device: Vec<Vec<f32>> = tiers
            .device
            .k
            .iter()
            .chain(&tiers.device.v)
            .cloned()
            .collect();
        tiers.apply(
            &[
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
            ],
            6,
            4,
        );
        for layer in 0..2 {
            for is_k in [true, false] {
                // Slot s of a block: V values s*6..s*6+6; K values row*4 + s for each row.
                let slot_of = |i: usize| if is_k { i % 4 } else { i / 6 };
                let host0 = &tiers.host.plane(layer, is_k)[..block];
                for (i, &x) in host0.iter().enumerate() {
                    let want = if slot_of(i) < 3 {
                        tag(false, layer, is_k, 1, i)
                    } else {
                        tag(true, layer, is_k, 0, i)
                    };
                    assert_eq!(x, want, "host block 0, layer {layer}, k {is_k}, value {i}");
                }
                let dev = tiers.device.plane(layer, is_k).to_vec();
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

    #[test]
    fn an_f16_cache_stores_the_rounded_values_in_the_same_layout_and_copies_them() {
        // 1 layer, 2 device and 1 host block of 2 slots, 1 KV head of dimension 2.
        let mut kv = KvCache::new(1, 2, 1, 2, 1, 2, KvCacheDtype::F16);
        assert_eq!(kv.dtype(), KvCacheDtype::F16);
        // Slots 1 and 2 (block 0 slot 1, block 1 slot 0); 1/3 is not an f16.
        let (k, v) = ([1.0 / 3.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, -1.0 / 3.0]);
        kv.write(0, &[1, 2], &k, &v);
        let r = |x: f32| f16::from_f32(x);
        let KvLayer::F16 { k: kc, v: vc } = kv.layer(0) else {
            panic!("an f16 cache")
        };
        // K transposed per block: [dim][slot].
        let z = f16::ZERO;
        assert_eq!(kc, [z, r(1.0 / 3.0), z, r(2.0), r(3.0), z, r(4.0), z]);
        assert_eq!(vc, [z, z, r(5.0), r(6.0), r(7.0), r(-1.0 / 3.0), z, z]);
        assert_ne!(r(1.0 / 3.0).to_f32(), 1.0 / 3.0);
        // Block 1 to the host and back into block 0.
        kv.apply(&[
            BlockCopy {
                src: Loc::Device(1),
                dst: Loc::Host(0),
                num_slots: 2,
            },
            BlockCopy {
                src: Loc::Host(0),
                dst: Loc::Device(0),
                num_slots: 1,
            },
        ]);
        let KvLayer::F16 { k: kc, v: vc } = kv.layer(0) else {
            panic!("an f16 cache")
        };
        assert_eq!(&kc[..4], [r(3.0), r(1.0 / 3.0), r(4.0), r(2.0)]);
        assert_eq!(&vc[..4], [r(7.0), r(-1.0 / 3.0), r(5.0), r(6.0)]);
        assert_eq!(
            KvCache::block_bytes(30, 16, 3, 64, KvCacheDtype::F16) * 2,
            KvCache::block_bytes(30, 16, 3, 64, KvCacheDtype::F32)
        );
        assert_eq!(KvCacheDtype::parse("F16"), Ok(KvCacheDtype::F16));
        assert!(KvCacheDtype::parse("bf16").is_err());
    }

    #[test]
    fn an_fp8_cache_stores_rounded_saturated_values_in_a_quarter_of_the_bytes() {
        let mut kv = KvCache::new(1, 2, 1, 2, 1, 2, KvCacheDtype::Fp8E4m3);
        assert_eq!(kv.dtype(), KvCacheDtype::Fp8E4m3);
        // 0.3 is not an E4M3 value; 1000 is past the largest (448).
        let (k, v) = ([0.3, 2.0, 3.0, 1000.0], [5.0, 6.0, -7.0, -0.3]);
        kv.write(0, &[1, 2], &k, &v);
        let KvLayer::Fp8E4m3 { k: kc, v: vc } = kv.layer(0) else {
            panic!("an fp8 cache")
        };
        let f = |c: &[F8E4M3]| c.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        // K transposed per block: [dim][slot]; 0.3 rounds to 0.3125 (4 significant bits).
        assert_eq!(f(kc), [0.0, 0.3125, 0.0, 2.0, 3.0, 0.0, 448.0, 0.0]);
        assert_eq!(f(vc), [0.0, 0.0, 5.0, 6.0, -7.0, -0.3125, 0.0, 0.0]);
        assert_eq!(
            KvCache::block_bytes(30, 16, 3, 64, KvCacheDtype::Fp8E4m3) * 4,
            KvCache::block_bytes(30, 16, 3, 64, KvCacheDtype::F32)
        );
        for name in ["fp8_e4m3", "FP8"] {
            assert_eq!(KvCacheDtype::parse(name), Ok(KvCacheDtype::Fp8E4m3));
        }
        assert_eq!(KvCacheDtype::Fp8E4m3.as_str(), "fp8_e4m3");
        assert!(KvCacheDtype::parse("fp8_e5m2").is_err());
    }
}
