//! Every kernel and the GEMM on seeded random inputs at the shapes convoy serves, runnable on
//! any [`DeviceLayer`], so two devices can be compared operation by operation (ggml's
//! `test-backend-ops`): `convoy-bench gpu ops` runs each case on a GPU and on the emulated
//! device and reports the normalised mean squared error; the test suite runs every case on the
//! emulator so the cases themselves stay valid.

use half::bf16;

use super::device::{launch, DeviceError, DeviceLayer, DeviceMemory, DeviceSlice};
use super::gemm::GemmBf16;
use super::launch as l;

/// Model geometry a case runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// Name for reports.
    pub name: &'static str,
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// MLP width.
    pub inter: usize,
}

/// SmolLM2-135M, Llama-3-8B (GQA: 8 KV heads) and its MQA variant (1 KV head).
pub const SHAPES: [Shape; 3] = [
    Shape {
        name: "smollm2",
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
        inter: 1536,
    },
    Shape {
        name: "llama3-8b-gqa",
        hidden: 4096,
        heads: 32,
        kv_heads: 8,
        head_dim: 128,
        inter: 14336,
    },
    Shape {
        name: "llama3-8b-mqa",
        hidden: 4096,
        heads: 32,
        kv_heads: 1,
        head_dim: 128,
        inter: 14336,
    },
];

/// The operations, in report order.
pub const OPS: [&str; 14] = [
    "embedding_bf16",
    "fused_add_rmsnorm",
    "rope_half_split",
    "reshape_and_cache",
    "attention",
    "attention_mma",
    "silu_mul",
    "gemm_bf16",
    "argmax_rows",
    "gumbel_sample_rows",
    "copy_blocks",
    "copy_block_list",
    "cast_bf16",
    "gather_add_bias",
];

/// Whether an operation's output must match bitwise across devices (integer results and pure
/// data movement), rather than within a floating-point tolerance.
pub fn is_exact(op: &str) -> bool {
    matches!(
        op,
        "embedding_bf16"
            | "reshape_and_cache"
            | "argmax_rows"
            | "gumbel_sample_rows"
            | "copy_blocks"
            | "cast_bf16"
    )
}

/// Paged attention over interleaved block tables: decode rows at contexts 1, 257 and 1,000, a
/// 40-row prefill chunk at positions 960-999 and a padding row. `tiled`: every row on the
/// tensor-core kernel (where the shape's head dimension allows), else on the decode kernel.
fn attention<D: DeviceLayer>(
    d: &D,
    s: Shape,
    rng: &mut Rng,
    tiled: bool,
) -> Result<Vec<f32>, DeviceError> {
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkv_width = qd + 2 * kvd;
    let bs = 16;
    let contexts = [1usize, 257, 1000];
    let max_blocks = 1000usize.div_ceil(bs);
    let cache_blocks = contexts.len() * max_blocks + 1;
    let mut tables = vec![-1i32; contexts.len() * max_blocks];
    for (sq, &c) in contexts.iter().enumerate() {
        for b in 0..c.div_ceil(bs) {
            // Interleaved, so no sequence's blocks are contiguous.
            tables[sq * max_blocks + b] = (b * contexts.len() + sq) as i32;
        }
    }
    let mut row_seq: Vec<i32> = vec![0, 1, 2];
    let mut row_pos: Vec<i32> = contexts.iter().map(|&c| c as i32 - 1).collect();
    for p in 960..1000 {
        row_seq.push(2);
        row_pos.push(p);
    }
    // A padding row.
    row_seq.push(0);
    row_pos.push(-1);
    let rows = row_seq.len();
    let group = s.heads / s.kv_heads;
    let tiled = tiled && l::attention_mma_head_dim_ok(s.head_dim);
    let runs: &[(usize, usize)] = if tiled {
        &[(0, 1), (1, 1), (2, 1), (3, 40)]
    } else {
        &[]
    };
    // Idle items (or tiles) past the work, as a graph's fixed grid has.
    let (min_items, min_tiles) = if tiled { (0, 80) } else { (60, 0) };
    let work = l::AttentionWork::tiled(
        &row_pos,
        runs,
        l::attention_mma_tile_tokens(group),
        min_items,
        min_tiles,
    );
    let q = d.upload(&rng.vec(rows * qkv_width, 1.0))?;
    let kc = d.upload(&bf16s(&rng.vec(cache_blocks * bs * kvd, 1.0)))?;
    let vc = d.upload(&bf16s(&rng.vec(cache_blocks * bs * kvd, 1.0)))?;
    let tb = d.upload(&tables)?;
    let rs = d.upload(&row_seq)?;
    let rp = d.upload(&row_pos)?;
    let (wk, ro) = (d.upload(&work.items)?, d.upload(&work.row_offset)?);
    let partials = d.alloc(work.slots * s.heads * (2 + s.head_dim) * 4)?;
    let out = d.alloc(rows * qd * 4)?;
    let inputs = l::AttentionInputs {
        q: q.slice(),
        k_cache: kc.slice(),
        v_cache: vc.slice(),
        block_tables: tb.slice(),
        row_seq: rs.slice(),
        row_pos: rp.slice(),
        cache_blocks,
        max_blocks_per_seq: max_blocks,
        sequences: contexts.len(),
        rows,
        heads: s.heads,
        kv_heads: s.kv_heads,
        head_dim: s.head_dim,
        block_size: bs,
        scale: 1.0 / (s.head_dim as f32).sqrt(),
        q_stride: qkv_width,
    };
    let tl = d.upload(&work.tiles)?;
    // SAFETY: the contracts name buffers allocated here on `d`, sized for them; the rows,
    // positions, tables, items and tiles are built above within their ranges.
    unsafe {
        if work.tile_count() == 0 {
            launch(
                d,
                &l::AttentionPartition {
                    inputs,
                    work: wk.slice(),
                    partials: partials.slice(),
                    items: work.len(),
                },
            )?;
        } else {
            launch(
                d,
                &l::AttentionMma {
                    inputs,
                    row_offset: ro.slice(),
                    tiles: tl.slice(),
                    partials: partials.slice(),
                    tile_count: work.tile_count(),
                    slots: work.slots,
                },
            )?;
        }
        launch(
            d,
            &l::AttentionCombine {
                partials: partials.slice(),
                row_pos: rp.slice(),
                row_offset: ro.slice(),
                items: work.slots,
                out: out.slice(),
                rows,
                heads: s.heads,
                head_dim: s.head_dim,
            },
        )?;
    }
    d.download::<f32>(&out)
}

/// A small deterministic generator (SplitMix64) for test inputs.
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// `n` values uniform in [-scale, scale).
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Round to bf16.
pub fn bf16s(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

fn view(s: DeviceSlice, offset_floats: usize) -> DeviceSlice {
    DeviceSlice {
        ptr: s.ptr + (offset_floats * 4) as u64,
        bytes: s.bytes - offset_floats * 4,
    }
}

/// Run operation `op` at `shape` on `d`; its outputs, flattened to f32.
pub fn run<D: DeviceLayer>(d: &D, op: &str, shape: Shape) -> Result<Vec<f32>, DeviceError> {
    let mut rng = Rng(0x5eed ^ shape.hidden as u64 ^ ((shape.kv_heads as u64) << 20));
    let s = shape;
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let qkv_width = qd + 2 * kvd;
    // SAFETY: every launch below: each contract names buffers allocated here on `d`, sized for
    // it; the indices held in device memory (ids, positions, slots, tables, rows) are built
    // below within their ranges.
    unsafe {
        match op {
            "embedding_bf16" => {
                let vocab = 1000;
                let table = d.upload(&bf16s(&rng.vec(vocab * s.hidden, 1.0)))?;
                let ids = d.upload(&[0i32, 999, 17, 17, 512, 3, 700])?;
                let out = d.alloc(7 * s.hidden * 4)?;
                launch(
                    d,
                    &l::EmbeddingBf16 {
                        table: table.slice(),
                        ids: ids.slice(),
                        out: out.slice(),
                        vocab,
                        hidden: s.hidden,
                        tokens: 7,
                    },
                )?;
                d.download::<f32>(&out)
            }
            "fused_add_rmsnorm" => {
                let t = 5;
                let residual = d.upload(&rng.vec(t * s.hidden, 2.0))?;
                let delta = d.upload(&rng.vec(t * s.hidden, 2.0))?;
                let w = d.upload(&bf16s(&rng.vec(s.hidden, 1.5)))?;
                let out = d.alloc(t * s.hidden * 4)?;
                launch(
                    d,
                    &l::FusedAddRmsnorm {
                        residual: residual.slice(),
                        delta: delta.slice(),
                        weight: w.slice(),
                        out: out.slice(),
                        hidden: s.hidden,
                        tokens: t,
                        eps: 1e-5,
                    },
                )?;
                let mut v = d.download::<f32>(&out)?;
                v.extend(d.download::<f32>(&residual)?);
                Ok(v)
            }
            "rope_half_split" => {
                let positions = [0i32, 1, 4095, 8191, 77];
                let t = positions.len();
                let table_positions = 8192;
                let half = s.head_dim / 2;
                let mut cs = vec![0f32; table_positions * s.head_dim];
                for p in 0..table_positions {
                    for i in 0..half {
                        let a = p as f64 / 500000f64.powf(2.0 * i as f64 / s.head_dim as f64);
                        cs[p * s.head_dim + i] = a.cos() as f32;
                        cs[p * s.head_dim + half + i] = a.sin() as f32;
                    }
                }
                let qkv = d.upload(&rng.vec(t * qkv_width, 1.0))?;
                let pos = d.upload(&positions)?;
                let table = d.upload(&cs)?;
                launch(
                    d,
                    &l::RopeHalfSplit {
                        q: qkv.slice(),
                        k: view(qkv.slice(), qd),
                        positions: pos.slice(),
                        cos_sin: table.slice(),
                        table_positions,
                        heads: s.heads,
                        kv_heads: s.kv_heads,
                        dim: s.head_dim,
                        q_stride: qkv_width,
                        k_stride: qkv_width,
                        tokens: t,
                    },
                )?;
                d.download::<f32>(&qkv)
            }
            "reshape_and_cache" => {
                let (t, slots) = (6, 64);
                let qkv = d.upload(&rng.vec(t * qkv_width, 3.0))?;
                let sm = d.upload(&[5i32, -1, 63, 0, 17, 40])?;
                let kc = d.upload(&vec![bf16::ZERO; slots * kvd])?;
                let vc = d.upload(&vec![bf16::ZERO; slots * kvd])?;
                launch(
                    d,
                    &l::ReshapeAndCache {
                        k: view(qkv.slice(), qd),
                        v: view(qkv.slice(), qd + kvd),
                        k_cache: kc.slice(),
                        v_cache: vc.slice(),
                        slot_mapping: sm.slice(),
                        cache_slots: slots,
                        kv_width: kvd,
                        k_stride: qkv_width,
                        v_stride: qkv_width,
                        tokens: t,
                    },
                )?;
                let mut v: Vec<f32> = d
                    .download::<bf16>(&kc)?
                    .into_iter()
                    .map(f32::from)
                    .collect();
                v.extend(d.download::<bf16>(&vc)?.into_iter().map(f32::from));
                Ok(v)
            }
            "attention" => attention(d, s, &mut rng, false),
            "attention_mma" => attention(d, s, &mut rng, true),
            "silu_mul" => {
                let t = 3;
                let gu = d.upload(&rng.vec(t * 2 * s.inter, 12.0))?;
                let out = d.alloc(t * s.inter * 4)?;
                launch(
                    d,
                    &l::SiluMul {
                        gate_up: gu.slice(),
                        out: out.slice(),
                        inter: s.inter,
                        tokens: t,
                    },
                )?;
                d.download::<f32>(&out)
            }
            "gemm_bf16" => {
                let (t, out_dim) = (7, 1024);
                let x = d.upload(&bf16s(&rng.vec(t * s.hidden, 1.0)))?;
                let w = d.upload(&bf16s(&rng.vec(out_dim * s.hidden, 0.05)))?;
                let y = d.alloc(t * out_dim * 4)?;
                d.gemm_bf16(&GemmBf16::linear(
                    x.slice(),
                    w.slice(),
                    y.slice(),
                    t,
                    s.hidden,
                    out_dim,
                ))?;
                d.download::<f32>(&y)
            }
            "argmax_rows" | "gumbel_sample_rows" => {
                let (rows, vocab) = (8, 32_000);
                let mut logits = rng.vec(rows * vocab, 4.0);
                logits[vocab + 5] = f32::NAN;
                for v in &mut logits[2 * vocab..3 * vocab] {
                    *v = f32::NAN;
                }
                let lb = d.upload(&logits)?;
                let out = d.alloc(rows * 4)?;
                if op == "argmax_rows" {
                    launch(
                        d,
                        &l::ArgmaxRows {
                            logits: lb.slice(),
                            out: out.slice(),
                            vocab,
                            rows,
                            threads: 1024,
                        },
                    )?;
                } else {
                    let temps: Vec<f32> =
                        (0..rows).map(|r| if r == 3 { 0.0 } else { 0.7 }).collect();
                    let seeds: Vec<u64> = (0..rows as u64).map(|r| r * 31 + 7).collect();
                    let steps = vec![42u64; rows];
                    // Every filter: none, top-k, top-p, both.
                    let top_k: Vec<i32> = (0..rows as i32)
                        .map(|r| [0, 40, 0, 7][r as usize % 4])
                        .collect();
                    let top_p: Vec<f32> = (0..rows).map(|r| [1.0, 1.0, 0.8, 0.5][r % 4]).collect();
                    let (tb, sb, stb) = (d.upload(&temps)?, d.upload(&seeds)?, d.upload(&steps)?);
                    let (kb, pb) = (d.upload(&top_k)?, d.upload(&top_p)?);
                    launch(
                        d,
                        &l::GumbelSampleRows {
                            logits: lb.slice(),
                            temperature: tb.slice(),
                            top_k: kb.slice(),
                            top_p: pb.slice(),
                            seeds: sb.slice(),
                            steps: stb.slice(),
                            out: out.slice(),
                            vocab,
                            rows,
                            threads: 1024,
                        },
                    )?;
                }
                Ok(d.download::<i32>(&out)?
                    .into_iter()
                    .map(|x| x as f32)
                    .collect())
            }
            "copy_blocks" => {
                let (layers, blocks, bs) = (4, 6, 16);
                let block_elems = bs * kvd;
                let src = d.upload(&bf16s(&rng.vec(layers * blocks * block_elems, 2.0)))?;
                let dst = d.upload(&vec![bf16::ZERO; layers * 3 * block_elems])?;
                launch(
                    d,
                    &l::CopyBlocks {
                        src: src.slice(),
                        dst: dst.slice(),
                        layers,
                        layer_stride_src: blocks * block_elems,
                        layer_stride_dst: 3 * block_elems,
                        src_block: 4,
                        dst_block: 1,
                        block_elems,
                        slot_elems: kvd,
                        slots: 11,
                    },
                )?;
                Ok(d.download::<bf16>(&dst)?
                    .into_iter()
                    .map(f32::from)
                    .collect())
            }
            "copy_block_list" => {
                let (layers, blocks, host_blocks, bs) = (4, 6, 5, 16);
                let block_elems = bs * kvd;
                let src = d.upload(&bf16s(&rng.vec(layers * blocks * block_elems, 2.0)))?;
                let dst = d.upload(&vec![bf16::ZERO; layers * host_blocks * block_elems])?;
                let list = d.upload(&[4i32, 1, 16, 0, 3, 5, 5, 0, 1])?;
                launch(
                    d,
                    &l::CopyBlockList {
                        src: src.slice(),
                        dst: dst.slice(),
                        list: list.slice(),
                        copies: 3,
                        layers,
                        src_blocks: blocks,
                        dst_blocks: host_blocks,
                        block_elems,
                        slot_elems: kvd,
                    },
                )?;
                Ok(d.download::<bf16>(&dst)?
                    .into_iter()
                    .map(f32::from)
                    .collect())
            }
            "cast_bf16" => {
                let n = 3 * s.hidden + 5;
                let x = d.upload(&rng.vec(n, 100.0))?;
                let y = d.alloc(n * 2)?;
                launch(
                    d,
                    &l::CastBf16 {
                        x: x.slice(),
                        y: y.slice(),
                        n,
                    },
                )?;
                Ok(d.download::<bf16>(&y)?.into_iter().map(f32::from).collect())
            }
            "gather_add_bias" => {
                let (t, width) = (6, qkv_width);
                let x = d.upload(&rng.vec(t * width, 1.0))?;
                let delta = d.upload(&rng.vec(t * width, 1.0))?;
                let bias = d.upload(&rng.vec(width, 1.0))?;
                let rows = d.upload(&[5i32, 0, 2])?;
                let out = d.alloc(3 * width * 4)?;
                launch(
                    d,
                    &l::AddRows {
                        x: x.slice(),
                        delta: delta.slice(),
                        width,
                        tokens: t,
                    },
                )?;
                launch(
                    d,
                    &l::AddBiasRows {
                        x: x.slice(),
                        bias: bias.slice(),
                        width,
                        tokens: t,
                    },
                )?;
                launch(
                    d,
                    &l::GatherRows {
                        src: x.slice(),
                        rows: rows.slice(),
                        dst: out.slice(),
                        src_rows: t,
                        count: 3,
                        width,
                    },
                )?;
                d.download::<f32>(&out)
            }
            other => Err(DeviceError::Contract {
                kernel: "op_cases",
                problem: format!("no case named {other}"),
            }),
        }
    }
}

/// Normalised mean squared error of `got` against `want` (0 when both are all zero), and the
/// number of positions where one is NaN and the other is not.
pub fn nmse(want: &[f32], got: &[f32]) -> (f64, usize) {
    let (mut num, mut den, mut nan) = (0f64, 0f64, 0usize);
    for (&w, &g) in want.iter().zip(got) {
        if w.is_nan() || g.is_nan() {
            nan += usize::from(w.is_nan() != g.is_nan());
            continue;
        }
        let e = (g - w) as f64;
        num += e * e;
        den += (w as f64) * (w as f64);
    }
    nan += want.len().abs_diff(got.len());
    (if den == 0.0 { num } else { num / den }, nan)
}
