//! Every CUDA kernel, run on the emulated device, against a float64 reference (or bitwise where
//! the operation is exact), at the shapes convoy serves: SmolLM2 (9 query / 3 KV heads, head
//! dimension 64), Llama-3-8B GQA (32 / 8, 128) and MQA (32 / 1, 128). The findings of the kernel
//! review each have a case here that failed before its fix.

use convoy_kernels::cuda::device::{
    launch, DeviceError, DeviceLayer, DeviceMemory, FaultKind, Stream,
};
use convoy_kernels::cuda::emulator::{kernel_names, EmulatedDevice};
use convoy_kernels::cuda::launch::*;
use convoy_kernels::cuda::op_cases::{bf16s, Rng};
use convoy_kernels::cuda::SOURCES;
use half::bf16;

/// The larger error, NaN (memory nothing wrote) above every number: `f64::max` would skip it.
fn worse(a: f64, b: f64) -> f64 {
    if b.is_nan() || b > a {
        b
    } else {
        a
    }
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, worse)
}

#[test]
fn the_emulator_registers_exactly_the_kernels_of_the_sources() {
    let mut want: Vec<String> = SOURCES
        .iter()
        .flat_map(|s| s.kernels.iter().map(|k| k.to_string()))
        .collect();
    want.sort();
    let mut have: Vec<String> = kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("emu_check_"))
        .collect();
    have.sort();
    assert_eq!(have, want);
}

#[test]
fn embedding_copies_rows_exactly() {
    let dev = EmulatedDevice::new();
    let (vocab, hidden) = (50, 576);
    let mut rng = Rng(1);
    let table = bf16s(&rng.vec(vocab * hidden, 1.0));
    let ids: Vec<i32> = vec![3, 0, 49, 3, 17];
    let t = dev.upload(&table).unwrap();
    let i = dev.upload(&ids).unwrap();
    let out = dev.alloc(ids.len() * hidden * 4).unwrap();
    let k = EmbeddingBf16 {
        table: t.slice(),
        ids: i.slice(),
        out: out.slice(),
        vocab,
        hidden,
        tokens: ids.len(),
    };
    // SAFETY: buffers of this device; every id is below `vocab`.
    unsafe { launch(&dev, &k) }.unwrap();
    let got: Vec<f32> = dev.download(&out).unwrap();
    for (r, &id) in ids.iter().enumerate() {
        for c in 0..hidden {
            assert_eq!(
                got[r * hidden + c],
                table[id as usize * hidden + c].to_f32()
            );
        }
    }
}

fn rmsnorm_case(hidden: usize, tokens: usize, with_delta: bool) {
    let dev = EmulatedDevice::new();
    let mut rng = Rng(hidden as u64);
    let residual = rng.vec(tokens * hidden, 2.0);
    let delta = rng.vec(tokens * hidden, 2.0);
    let weight = bf16s(&rng.vec(hidden, 1.5));
    let mut r = dev.upload(&residual).unwrap();
    let d = dev.upload(&delta).unwrap();
    let w = dev.upload(&weight).unwrap();
    let out = dev.alloc(tokens * hidden * 4).unwrap();
    let k = FusedAddRmsnorm {
        residual: r.slice(),
        delta: if with_delta {
            d.slice()
        } else {
            convoy_kernels::cuda::device::DeviceSlice::NULL
        },
        weight: w.slice(),
        out: out.slice(),
        hidden,
        tokens,
        eps: 1e-5,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(&dev, &k) }.unwrap();
    let new_residual: Vec<f32> = dev.download(&r).unwrap();
    let got: Vec<f32> = dev.download(&out).unwrap();
    let mut want = Vec::new();
    for t in 0..tokens {
        let row: Vec<f32> = (0..hidden)
            .map(|i| {
                residual[t * hidden + i]
                    + if with_delta {
                        delta[t * hidden + i]
                    } else {
                        0.0
                    }
            })
            .collect();
        // The residual is the f32 sum, bitwise.
        assert_eq!(&new_residual[t * hidden..(t + 1) * hidden], &row[..]);
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        want.extend((0..hidden).map(|i| weight[i].to_f64() * row[i] as f64 * inv));
    }
    let err = max_abs_diff(&got, &want);
    assert!(err < 2e-5, "rmsnorm hidden {hidden}: max error {err}");
    let _ = &mut r;
}

#[test]
fn fused_add_rmsnorm_matches_float64() {
    rmsnorm_case(576, 3, true);
    rmsnorm_case(4096, 2, true);
    rmsnorm_case(4096, 2, false);
    rmsnorm_case(100, 1, true); // fewer elements than threads
}

/// cos/sin rows as the host computes them (double, then rounded).
fn cos_sin_table(positions: usize, dim: usize, theta: f64) -> (Vec<f32>, Vec<f64>) {
    let half = dim / 2;
    let inv: Vec<f64> = (0..half)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / dim as f64))
        .collect();
    let mut table = Vec::with_capacity(positions * dim);
    for p in 0..positions {
        table.extend(inv.iter().map(|f| (p as f64 * f).cos() as f32));
        table.extend(inv.iter().map(|f| (p as f64 * f).sin() as f32));
    }
    (table, inv)
}

#[test]
fn rope_matches_float64_at_long_positions_and_reads_strided_rows() {
    let dev = EmulatedDevice::new();
    let (heads, kv_heads, dim) = (4usize, 2usize, 128usize);
    let positions_max = 131_072usize;
    let (table, inv) = cos_sin_table(positions_max, dim, 500_000.0);
    let positions: Vec<i32> = vec![0, 4095, 131_071];
    let tokens = positions.len();
    // A fused QKV row: q heads, k heads, v heads.
    let stride = (heads + 2 * kv_heads) * dim;
    let mut rng = Rng(7);
    let qkv = rng.vec(tokens * stride, 1.0);
    let buf = dev.upload(&qkv).unwrap();
    let pos = dev.upload(&positions).unwrap();
    let cs = dev.upload(&table).unwrap();
    let base = buf.slice();
    let k_view = convoy_kernels::cuda::device::DeviceSlice {
        ptr: base.ptr + (heads * dim * 4) as u64,
        bytes: base.bytes - heads * dim * 4,
    };
    let k = RopeHalfSplit {
        q: base,
        k: k_view,
        positions: pos.slice(),
        cos_sin: cs.slice(),
        table_positions: positions_max,
        heads,
        kv_heads,
        dim,
        q_stride: stride,
        k_stride: stride,
        tokens,
    };
    // SAFETY: buffers of this device; every position is below the table's rows.
    unsafe { launch(&dev, &k) }.unwrap();
    let got: Vec<f32> = dev.download(&buf).unwrap();
    let half = dim / 2;
    let mut worst = 0.0f64;
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads + kv_heads {
            let x = &qkv[t * stride + h * dim..t * stride + (h + 1) * dim];
            let y = &got[t * stride + h * dim..t * stride + (h + 1) * dim];
            for i in 0..half {
                let a = p as f64 * inv[i];
                let (s, c) = a.sin_cos();
                let w1 = x[i] as f64 * c - x[i + half] as f64 * s;
                let w2 = x[i + half] as f64 * c + x[i] as f64 * s;
                worst = worst
                    .max((y[i] as f64 - w1).abs())
                    .max((y[i + half] as f64 - w2).abs());
            }
        }
        // V heads are untouched.
        let v0 = t * stride + (heads + kv_heads) * dim;
        assert_eq!(&got[v0..v0 + kv_heads * dim], &qkv[v0..v0 + kv_heads * dim]);
    }
    assert!(worst < 1e-6, "RoPE max error {worst} against float64");
}

#[test]
fn reshape_and_cache_rounds_to_bf16_exactly_and_skips_padding() {
    let dev = EmulatedDevice::new();
    let (kv_width, slots, tokens) = (3 * 64, 32usize, 4usize);
    let stride = 9 * 64 + 2 * kv_width;
    let mut rng = Rng(3);
    let mut qkv = rng.vec(tokens * stride, 3.0);
    qkv[9 * 64] = f32::NAN;
    let slot_mapping: Vec<i32> = vec![5, -1, 31, 0];
    let buf = dev.upload(&qkv).unwrap();
    let sm = dev.upload(&slot_mapping).unwrap();
    let zero = vec![bf16::ZERO; slots * kv_width];
    let kc = dev.upload(&zero).unwrap();
    let vc = dev.upload(&zero).unwrap();
    let view = |off: usize| convoy_kernels::cuda::device::DeviceSlice {
        ptr: buf.slice().ptr + (off * 4) as u64,
        bytes: buf.slice().bytes - off * 4,
    };
    let k = ReshapeAndCache {
        k: view(9 * 64),
        v: view(9 * 64 + kv_width),
        k_cache: kc.slice(),
        v_cache: vc.slice(),
        slot_mapping: sm.slice(),
        cache_slots: slots,
        kv_width,
        k_stride: stride,
        v_stride: stride,
        tokens,
    };
    // SAFETY: buffers of this device; every slot is -1 or below `slots`.
    unsafe { launch(&dev, &k) }.unwrap();
    let kg: Vec<bf16> = dev.download(&kc).unwrap();
    let vg: Vec<bf16> = dev.download(&vc).unwrap();
    for s in 0..slots {
        let token = slot_mapping.iter().position(|&x| x == s as i32);
        for i in 0..kv_width {
            let (wk, wv) = match token {
                Some(t) => (
                    bf16::from_f32(qkv[t * stride + 9 * 64 + i]),
                    bf16::from_f32(qkv[t * stride + 9 * 64 + kv_width + i]),
                ),
                None => (bf16::ZERO, bf16::ZERO),
            };
            assert_eq!(
                kg[s * kv_width + i].to_bits(),
                wk.to_bits(),
                "k slot {s} dim {i}"
            );
            assert_eq!(
                vg[s * kv_width + i].to_bits(),
                wv.to_bits(),
                "v slot {s} dim {i}"
            );
        }
    }
    assert!(kg[5 * kv_width].is_nan());
}

#[test]
fn silu_mul_matches_float64_over_a_wide_range() {
    let dev = EmulatedDevice::new();
    let (inter, tokens) = (1536usize, 2usize);
    let gate_up: Vec<f32> = (0..tokens * 2 * inter)
        .map(|i| -120.0 + 240.0 * (i % (2 * inter)) as f32 / (2 * inter) as f32)
        .collect();
    let g = dev.upload(&gate_up).unwrap();
    let out = dev.alloc(tokens * inter * 4).unwrap();
    let k = SiluMul {
        gate_up: g.slice(),
        out: out.slice(),
        inter,
        tokens,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(&dev, &k) }.unwrap();
    let got: Vec<f32> = dev.download(&out).unwrap();
    for t in 0..tokens {
        for i in 0..inter {
            let x = gate_up[t * 2 * inter + i] as f64;
            let u = gate_up[t * 2 * inter + inter + i] as f64;
            let want = x / (1.0 + (-x).exp()) * u;
            let y = got[t * inter + i] as f64;
            assert!(
                (y - want).abs() <= 1e-6 * want.abs().max(1.0),
                "silu({x}) * {u}: {y} vs {want}"
            );
        }
    }
}

#[test]
fn copy_blocks_round_trips_bitwise() {
    let dev = EmulatedDevice::new();
    let (layers, blocks, block_elems, slot_elems) = (3usize, 4usize, 16 * 192, 192usize);
    let mut rng = Rng(11);
    let src = bf16s(&rng.vec(layers * blocks * block_elems, 2.0));
    let s = dev.upload(&src).unwrap();
    let host_tier = dev.alloc(layers * 2 * block_elems * 2).unwrap();
    let back = dev
        .upload(&vec![bf16::ZERO; layers * blocks * block_elems])
        .unwrap();
    let out = CopyBlocks {
        src: s.slice(),
        dst: host_tier.slice(),
        layers,
        layer_stride_src: blocks * block_elems,
        layer_stride_dst: 2 * block_elems,
        src_block: 2,
        dst_block: 1,
        block_elems,
        slot_elems,
        slots: 16,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(&dev, &out) }.unwrap();
    let back_in = CopyBlocks {
        src: host_tier.slice(),
        dst: back.slice(),
        layer_stride_src: 2 * block_elems,
        layer_stride_dst: blocks * block_elems,
        src_block: 1,
        dst_block: 3,
        slots: 11,
        ..out
    };
    // SAFETY: as above.
    unsafe { launch(&dev, &back_in) }.unwrap();
    let got: Vec<bf16> = dev.download(&back).unwrap();
    for l in 0..layers {
        for i in 0..block_elems {
            let g = got[l * blocks * block_elems + 3 * block_elems + i];
            let want = if i < 11 * slot_elems {
                src[l * blocks * block_elems + 2 * block_elems + i]
            } else {
                bf16::ZERO
            };
            assert_eq!(g.to_bits(), want.to_bits(), "layer {l} value {i}");
        }
    }
}

/// Paged attention over a shuffled block table against a float64 softmax over the same bf16
/// K/V, for decode rows and a prefill chunk of `chunk` rows over a cached prefix; with
/// `tiled`, every row on the tensor-core kernel (its MMAs run on the emulator's model of the
/// instruction), else on the decode kernel.
fn attention_case(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    contexts: &[usize],
    chunk: usize,
    tiled: bool,
) -> f64 {
    let dev = EmulatedDevice::new();
    let mut rng = Rng((heads * 1000 + kv_heads * 10 + head_dim) as u64);
    let kv_width = kv_heads * head_dim;
    let seqs = contexts.len();
    let max_ctx = *contexts.iter().max().unwrap();
    let max_blocks = max_ctx.div_ceil(block_size);
    let cache_blocks = seqs * max_blocks + 3;
    // Shuffled block ids: no sequence's blocks are contiguous.
    let mut ids: Vec<i32> = (0..cache_blocks as i32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut tables = vec![-1i32; seqs * max_blocks];
    for s in 0..seqs {
        for b in 0..contexts[s].div_ceil(block_size) {
            tables[s * max_blocks + b] = ids[s * max_blocks + b];
        }
    }
    let kc = bf16s(&rng.vec(cache_blocks * block_size * kv_width, 1.0));
    let vc = bf16s(&rng.vec(cache_blocks * block_size * kv_width, 1.0));
    // Query rows: the last position of each sequence (decode), plus for the first sequence
    // the last min(40, ctx) positions (a prefill chunk over its cached prefix), plus a padding
    // row.
    let mut row_seq = Vec::new();
    let mut row_pos = Vec::new();
    for (s, &c) in contexts.iter().enumerate() {
        row_seq.push(s as i32);
        row_pos.push(c as i32 - 1);
    }
    let c0 = contexts[0];
    for p in c0.saturating_sub(chunk)..c0 {
        row_seq.push(0);
        row_pos.push(p as i32);
    }
    row_seq.push(0);
    row_pos.push(-1);
    let rows = row_seq.len();
    let stride = (heads + 2 * kv_heads) * head_dim;
    let q = rng.vec(rows * stride, 1.0);
    // Three idle items (or tiles) past the work, as a graph's fixed grid has.
    let chunk_rows = c0.min(chunk);
    let mut runs: Vec<(usize, usize)> = (0..seqs).map(|s| (s, 1)).collect();
    runs.push((seqs, chunk_rows));
    let runs: &[(usize, usize)] = if tiled { &runs } else { &[] };
    let tile_tokens = attention_mma_tile_tokens(heads / kv_heads);
    let work = AttentionWork::tiled(&row_pos, runs, tile_tokens, 0, 0);
    let work = AttentionWork::tiled(
        &row_pos,
        runs,
        tile_tokens,
        work.len() + 3 * usize::from(!tiled),
        work.tile_count() + 3 * usize::from(tiled),
    );
    assert_eq!(work.tile_count() > 0, tiled);
    let qb = dev.upload(&q).unwrap();
    let kb = dev.upload(&kc).unwrap();
    let vb = dev.upload(&vc).unwrap();
    let tb = dev.upload(&tables).unwrap();
    let rs = dev.upload(&row_seq).unwrap();
    let rp = dev.upload(&row_pos).unwrap();
    let wk = dev.upload(&work.items).unwrap();
    let ro = dev.upload(&work.row_offset).unwrap();
    let partials = dev.alloc(work.slots * heads * (2 + head_dim) * 4).unwrap();
    let tl = dev.upload(&work.tiles).unwrap();
    let out = dev.upload(&vec![0f32; rows * heads * head_dim]).unwrap();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let inputs = AttentionInputs {
        q: qb.slice(),
        k_cache: kb.slice(),
        v_cache: vb.slice(),
        block_tables: tb.slice(),
        row_seq: rs.slice(),
        row_pos: rp.slice(),
        cache_blocks,
        max_blocks_per_seq: max_blocks,
        sequences: seqs,
        rows,
        heads,
        kv_heads,
        head_dim,
        block_size,
        scale,
        q_stride: stride,
    };
    let part = AttentionPartition {
        inputs,
        work: wk.slice(),
        partials: partials.slice(),
        items: work.len(),
    };
    let mma = AttentionMma {
        inputs,
        row_offset: ro.slice(),
        tiles: tl.slice(),
        partials: partials.slice(),
        tile_count: work.tile_count(),
        slots: work.slots,
    };
    let combine = AttentionCombine {
        partials: partials.slice(),
        row_pos: rp.slice(),
        row_offset: ro.slice(),
        items: work.slots,
        out: out.slice(),
        rows,
        heads,
        head_dim,
    };
    // SAFETY: buffers of this device; row_seq, row_pos and the tables are in range.
    if tiled {
        // SAFETY: as above; the tiles are built for these rows.
        unsafe { launch(&dev, &mma) }.unwrap();
    } else {
        // SAFETY: as above.
        unsafe { launch(&dev, &part) }.unwrap();
    }
    // SAFETY: as above.
    unsafe { launch(&dev, &combine) }.unwrap();
    let got: Vec<f32> = dev.download(&out).unwrap();
    let group = heads / kv_heads;
    let mut worst = 0.0f64;
    for r in 0..rows {
        if row_pos[r] < 0 {
            let padding = &got[r * heads * head_dim..(r + 1) * heads * head_dim];
            assert!(
                padding.iter().all(|&v| v == 0.0),
                "a padding row's output is zero"
            );
            continue;
        }
        let ctx = row_pos[r] as usize + 1;
        let table = &tables[row_seq[r] as usize * max_blocks..];
        let slot = |p: usize| table[p / block_size] as usize * block_size + p % block_size;
        for h in 0..heads {
            let kvh = h / group;
            let qr = &q[r * stride + h * head_dim..r * stride + (h + 1) * head_dim];
            let scores: Vec<f64> = (0..ctx)
                .map(|p| {
                    let kr = &kc[slot(p) * kv_width + kvh * head_dim..];
                    (0..head_dim)
                        .map(|d| qr[d] as f64 * kr[d].to_f64())
                        .sum::<f64>()
                        * scale as f64
                })
                .collect();
            let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let l: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for d in 0..head_dim {
                let want: f64 = (0..ctx)
                    .map(|p| {
                        (scores[p] - m).exp() / l
                            * vc[slot(p) * kv_width + kvh * head_dim + d].to_f64()
                    })
                    .sum();
                let g = got[(r * heads + h) * head_dim + d] as f64;
                worst = worse(worst, (g - want).abs());
            }
        }
    }
    worst
}

#[test]
fn attention_matches_float64_at_smollm2_shape() {
    let err = attention_case(9, 3, 64, 16, &[1, 255, 256, 257, 700], 40, false);
    assert!(err < 2e-5, "max error {err}");
}

/// The tensor-core kernel (review finding 6): decode rows as tiles of one row, and a 300-row
/// chunk over 400 cached positions in tiles of 21 rows, some straddling a partition's start,
/// at SmolLM2's shape.
#[test]
fn attention_on_tensor_cores_matches_float64_at_smollm2_shape() {
    let err = attention_case(9, 3, 64, 16, &[700, 255, 256, 257, 1], 300, true);
    assert!(err < 2e-5, "max error {err}");
}

/// Llama-3-8B's GQA (4 heads per KV head: 16-row tiles) and MQA (32: 2-row tiles) shapes, a
/// chunk from position 0 (causal masking inside every tile) and one crossing a partition.
#[test]
fn attention_on_tensor_cores_matches_float64_at_llama3_shapes() {
    let err = attention_case(32, 8, 128, 16, &[40, 1], 40, true);
    assert!(err < 2e-5, "gqa max error {err}");
    let err = attention_case(32, 1, 128, 16, &[270, 17], 40, true);
    assert!(err < 2e-5, "mqa max error {err}");
}

/// What the cache oracle relies on: on the tensor-core kernel a row's output does not depend
/// on the other rows of its tile. The same 30 rows computed as one run (tiles of 21 and 9
/// rows) and as 30 runs of one row (as decode steps would) agree bit for bit.
#[test]
fn a_row_on_tensor_cores_does_not_depend_on_its_tile() {
    let (heads, kv_heads, head_dim, bs, ctx, n) =
        (9usize, 3usize, 64usize, 16usize, 300usize, 30usize);
    let dev = EmulatedDevice::new();
    let mut rng = Rng(77);
    let kv_width = kv_heads * head_dim;
    let blocks = ctx.div_ceil(bs);
    let tables: Vec<i32> = (0..blocks as i32).rev().collect();
    let kc = dev
        .upload(&bf16s(&rng.vec(blocks * bs * kv_width, 1.0)))
        .unwrap();
    let vc = dev
        .upload(&bf16s(&rng.vec(blocks * bs * kv_width, 1.0)))
        .unwrap();
    let stride = (heads + 2 * kv_heads) * head_dim;
    let qb = dev.upload(&rng.vec(n * stride, 2.0)).unwrap();
    let row_pos: Vec<i32> = ((ctx - n) as i32..ctx as i32).collect();
    let (tb, rs, rp) = (
        dev.upload(&tables).unwrap(),
        dev.upload(&vec![0i32; n]).unwrap(),
        dev.upload(&row_pos).unwrap(),
    );
    let outputs = |runs: &[(usize, usize)]| -> Vec<f32> {
        let work = AttentionWork::tiled(
            &row_pos,
            runs,
            attention_mma_tile_tokens(heads / kv_heads),
            0,
            0,
        );
        let ro = dev.upload(&work.row_offset).unwrap();
        let tl = dev.upload(&work.tiles).unwrap();
        let partials = dev.alloc(work.slots * heads * (2 + head_dim) * 4).unwrap();
        let out = dev.alloc(n * heads * head_dim * 4).unwrap();
        // SAFETY: buffers of this device sized for these launches; rows, positions, tables and
        // tiles are in range.
        unsafe {
            launch(
                &dev,
                &AttentionMma {
                    inputs: AttentionInputs {
                        q: qb.slice(),
                        k_cache: kc.slice(),
                        v_cache: vc.slice(),
                        block_tables: tb.slice(),
                        row_seq: rs.slice(),
                        row_pos: rp.slice(),
                        cache_blocks: blocks,
                        max_blocks_per_seq: blocks,
                        sequences: 1,
                        rows: n,
                        heads,
                        kv_heads,
                        head_dim,
                        block_size: bs,
                        scale: 1.0 / (head_dim as f32).sqrt(),
                        q_stride: stride,
                    },
                    row_offset: ro.slice(),
                    tiles: tl.slice(),
                    partials: partials.slice(),
                    tile_count: work.tile_count(),
                    slots: work.slots,
                },
            )
            .unwrap();
            launch(
                &dev,
                &AttentionCombine {
                    partials: partials.slice(),
                    row_pos: rp.slice(),
                    row_offset: ro.slice(),
                    items: work.slots,
                    out: out.slice(),
                    rows: n,
                    heads,
                    head_dim,
                },
            )
            .unwrap();
        }
        dev.download(&out).unwrap()
    };
    let together = outputs(&[(0, n)]);
    let alone: Vec<(usize, usize)> = (0..n).map(|r| (r, 1)).collect();
    let apart = outputs(&alone);
    assert!(together.iter().all(|v| v.is_finite()));
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&together), bits(&apart));
}

#[test]
fn attention_matches_float64_at_llama3_gqa_shape() {
    let err = attention_case(32, 8, 128, 16, &[300, 1], 40, false);
    assert!(err < 2e-5, "max error {err}");
}

/// Review finding 2: 32 query heads per KV head overflowed the kernel's shared scores.
#[test]
fn attention_matches_float64_at_mqa_group_32() {
    let err = attention_case(32, 1, 128, 16, &[300, 17], 40, false);
    assert!(err < 2e-5, "max error {err}");
}

#[test]
fn attention_takes_block_size_48_and_head_dim_256() {
    let err = attention_case(8, 2, 256, 48, &[97, 260], 40, false);
    assert!(err < 2e-5, "max error {err}");
}

fn argmax_on(
    dev: &EmulatedDevice,
    logits: &[f32],
    vocab: usize,
    threads: u32,
) -> Result<Vec<i32>, DeviceError> {
    let rows = logits.len() / vocab;
    let l = dev.upload(logits).unwrap();
    let out = dev.alloc(rows * 4).unwrap();
    let k = ArgmaxRows {
        logits: l.slice(),
        out: out.slice(),
        vocab,
        rows,
        threads,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(dev, &k) }?;
    Ok(dev.download(&out).unwrap())
}

#[test]
fn argmax_takes_the_lowest_index_on_ties_and_zero_for_an_all_nan_row() {
    let dev = EmulatedDevice::new();
    let vocab = 5000;
    let mut logits = vec![0f32; 4 * vocab];
    logits[3001] = 2.0;
    logits[4999] = 2.0; // row 0: tie, lowest index wins
    logits[vocab + 17] = f32::INFINITY;
    logits[vocab + 100] = f32::NAN; // row 1: NaN is skipped
    for v in &mut logits[2 * vocab..3 * vocab] {
        *v = f32::NAN; // row 2: all NaN (review finding 8)
    }
    for v in &mut logits[3 * vocab..] {
        *v = f32::NEG_INFINITY; // row 3: all -inf
    }
    let got = argmax_on(&dev, &logits, vocab, 1024).unwrap();
    assert_eq!(got, vec![3001, 17, 0, 0]);
}

/// Review finding 12: the argmax reduction shuffles with a full mask, so a block that is not a
/// multiple of 32 threads is wrong on a GPU. The contract refuses it; launched raw anyway, the
/// emulator names the absent lanes.
#[test]
fn a_partial_warp_is_refused_by_the_contract_and_caught_by_the_emulator() {
    let dev = EmulatedDevice::new();
    let logits = vec![1f32; 2000];
    let err = argmax_on(&dev, &logits, 2000, 1000).unwrap_err();
    assert!(matches!(err, DeviceError::Contract { .. }), "{err}");
    let l = dev.upload(&logits).unwrap();
    let out = dev.alloc(4).unwrap();
    let k = ArgmaxRows {
        logits: l.slice(),
        out: out.slice(),
        vocab: 2000,
        rows: 1,
        threads: 1024,
    };
    let mut config = k.config().unwrap();
    config.block[0] = 1000;
    // SAFETY: buffers of this device, sized for the kernel's accesses.
    let err = unsafe { dev.launch_raw(Stream::Compute, ArgmaxRows::NAME, &config, &k.args()) }
        .unwrap_err();
    match err {
        DeviceError::Fault { kind, message } => {
            assert_eq!(kind, FaultKind::Shuffle, "{message}");
            assert!(message.contains("absent"), "{message}");
        }
        other => panic!("{other}"),
    }
}

fn gumbel_on(
    dev: &EmulatedDevice,
    logits: &[f32],
    vocab: usize,
    temps: &[f32],
    seeds: &[u64],
    steps: &[u64],
) -> Vec<i32> {
    let rows = temps.len();
    let l = dev.upload(logits).unwrap();
    let t = dev.upload(temps).unwrap();
    let s = dev.upload(seeds).unwrap();
    let st = dev.upload(steps).unwrap();
    let top_k = dev.upload(&vec![0i32; rows]).unwrap();
    let top_p = dev.upload(&vec![1f32; rows]).unwrap();
    let out = dev.alloc(rows * 4).unwrap();
    let k = GumbelSampleRows {
        logits: l.slice(),
        temperature: t.slice(),
        top_k: top_k.slice(),
        top_p: top_p.slice(),
        seeds: s.slice(),
        steps: st.slice(),
        out: out.slice(),
        vocab,
        rows,
        threads: 1024,
    };
    // SAFETY: buffers of this device, sized by the contract.
    unsafe { launch(dev, &k) }.unwrap();
    dev.download(&out).unwrap()
}

/// Review finding 1: the uniform draw reached exactly 1.0, whose Gumbel noise is +inf, so a
/// token 30 logits behind the best won about 0.4% of draws at a 128k vocabulary.
#[test]
fn gumbel_never_draws_a_token_thirty_logits_behind() {
    let dev = EmulatedDevice::new();
    let vocab = 128_256;
    let rows = 48;
    let mut logits = vec![0f32; rows * vocab];
    for r in 0..rows {
        logits[r * vocab] = 30.0;
    }
    let temps = vec![1.0f32; rows];
    let seeds: Vec<u64> = (0..rows as u64).map(|r| r * 7919 + 1).collect();
    let mut others = 0;
    for step in 0..4u64 {
        let steps = vec![step; rows];
        let got = gumbel_on(&dev, &logits, vocab, &temps, &seeds, &steps);
        others += got.iter().filter(|&&t| t != 0).count();
    }
    assert_eq!(others, 0, "{others} of {} draws were not token 0", rows * 4);
}

#[test]
fn gumbel_is_reproducible_greedy_at_zero_temperature_and_follows_the_distribution() {
    let dev = EmulatedDevice::new();
    let vocab = 8;
    let rows = 512;
    // p(i) proportional to exp(logit): logits ln(1..=8).
    let row: Vec<f32> = (1..=vocab).map(|i| (i as f32).ln()).collect();
    let logits: Vec<f32> = (0..rows).flat_map(|_| row.clone()).collect();
    let seeds: Vec<u64> = (0..rows as u64).collect();
    let mut counts = [0usize; 8];
    let draws = 8;
    for step in 0..draws {
        let steps = vec![step as u64; rows];
        let a = gumbel_on(&dev, &logits, vocab, &vec![1.0; rows], &seeds, &steps);
        let b = gumbel_on(&dev, &logits, vocab, &vec![1.0; rows], &seeds, &steps);
        assert_eq!(a, b, "same seed and step, same token");
        for &t in &a {
            counts[t as usize] += 1;
        }
    }
    let n = (rows * draws) as f64;
    let chi2: f64 = (0..vocab)
        .map(|i| {
            let e = n * (i + 1) as f64 / 36.0;
            (counts[i] as f64 - e).powi(2) / e
        })
        .sum();
    // 7 degrees of freedom: p = 0.001 at 24.3.
    assert!(chi2 < 24.3, "chi-square {chi2}, counts {counts:?}");
    let greedy = gumbel_on(
        &dev,
        &logits,
        vocab,
        &vec![0.0; rows],
        &seeds,
        &vec![0; rows],
    );
    assert!(greedy.iter().all(|&t| t == 7));
}

fn gemm_case(transa: bool, transb: bool, m: usize, n: usize, k: usize) {
    use convoy_kernels::cuda::gemm::GemmBf16;
    let dev = EmulatedDevice::new();
    let mut rng = Rng((m * n * k) as u64 + transa as u64 * 2 + transb as u64);
    let (a_rows, a_cols) = if transa { (k, m) } else { (m, k) };
    let (b_rows, b_cols) = if transb { (n, k) } else { (k, n) };
    let (lda, ldb, ldc) = (a_rows + 3, b_rows + 1, m + 2);
    let a = bf16s(&rng.vec(lda * a_cols, 1.0));
    let b = bf16s(&rng.vec(ldb * b_cols, 1.0));
    let c0 = rng.vec(ldc * n, 1.0);
    let (ab, bb, cb) = (
        dev.upload(&a).unwrap(),
        dev.upload(&b).unwrap(),
        dev.upload(&c0).unwrap(),
    );
    let g = GemmBf16 {
        transa,
        transb,
        m,
        n,
        k,
        alpha: 0.5,
        a: ab.slice(),
        lda,
        b: bb.slice(),
        ldb,
        beta: 2.0,
        c: cb.slice(),
        ldc,
    };
    // SAFETY: buffers of this device.
    unsafe { dev.gemm_bf16(&g) }.unwrap();
    let got: Vec<f32> = dev.download(&cb).unwrap();
    let op_a = |i: usize, p: usize| {
        if transa {
            a[p + i * lda]
        } else {
            a[i + p * lda]
        }
        .to_f64()
    };
    let op_b = |p: usize, j: usize| {
        if transb {
            b[j + p * ldb]
        } else {
            b[p + j * ldb]
        }
        .to_f64()
    };
    let mut worst = 0.0f64;
    for j in 0..n {
        for i in 0..m {
            let dot: f64 = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
            let want = 0.5 * dot + 2.0 * c0[i + j * ldc] as f64;
            worst = worse(worst, (got[i + j * ldc] as f64 - want).abs());
        }
        // Padding rows of C (between m and ldc) are untouched.
        for i in m..ldc {
            assert_eq!(got[i + j * ldc], c0[i + j * ldc]);
        }
    }
    assert!(worst < 1e-4, "GEMM ({transa}, {transb}) max error {worst}");
}

#[test]
fn the_reference_gemm_keeps_cublas_contract() {
    use convoy_kernels::cuda::gemm::GemmBf16;
    gemm_case(true, false, 70, 5, 130);
    gemm_case(false, true, 33, 9, 64);
    gemm_case(false, false, 16, 3, 7);
    gemm_case(true, true, 8, 8, 8);
    // The row-major linear layer: y = x . W^T.
    let dev = EmulatedDevice::new();
    let (tokens, inp, out) = (3usize, 40usize, 24usize);
    let mut rng = Rng(5);
    let x = bf16s(&rng.vec(tokens * inp, 1.0));
    let w = bf16s(&rng.vec(out * inp, 1.0));
    let (xb, wb) = (dev.upload(&x).unwrap(), dev.upload(&w).unwrap());
    let yb = dev.alloc(tokens * out * 4).unwrap();
    let g = GemmBf16::linear(xb.slice(), wb.slice(), yb.slice(), tokens, inp, out);
    // SAFETY: buffers of this device.
    unsafe { dev.gemm_bf16(&g) }.unwrap();
    let y: Vec<f32> = dev.download(&yb).unwrap();
    for t in 0..tokens {
        for o in 0..out {
            let want: f64 = (0..inp)
                .map(|i| x[t * inp + i].to_f64() * w[o * inp + i].to_f64())
                .sum();
            assert!((y[t * out + o] as f64 - want).abs() < 1e-4);
        }
    }
    // A leading dimension shorter than the stored rows is refused, as cuBLAS refuses it.
    let bad = GemmBf16 { lda: inp - 1, ..g };
    // SAFETY: as above; nothing runs.
    let err = unsafe { dev.gemm_bf16(&bad) }.unwrap_err();
    assert!(
        matches!(err, DeviceError::Contract { .. }) && err.to_string().contains("lda"),
        "{err}"
    );
}

#[test]
fn cast_gather_add_and_bias_kernels_are_exact() {
    let dev = EmulatedDevice::new();
    let (rows, width) = (5usize, 300usize);
    let mut rng = Rng(9);
    let x = rng.vec(rows * width, 4.0);
    let d = rng.vec(rows * width, 4.0);
    let bias = rng.vec(width, 1.0);
    let xb = dev.upload(&x).unwrap();
    let db = dev.upload(&d).unwrap();
    let bb = dev.upload(&bias).unwrap();
    let yb = dev.alloc(rows * width * 2).unwrap();
    // SAFETY: buffers of this device, sized by the contract.
    unsafe {
        launch(
            &dev,
            &CastBf16 {
                x: xb.slice(),
                y: yb.slice(),
                n: rows * width,
            },
        )
        .unwrap();
    }
    let y: Vec<bf16> = dev.download(&yb).unwrap();
    assert!(y
        .iter()
        .zip(&x)
        .all(|(a, b)| a.to_bits() == bf16::from_f32(*b).to_bits()));
    let idx = dev.upload(&[4i32, 0, 4]).unwrap();
    let gb = dev.alloc(3 * width * 4).unwrap();
    let gather = GatherRows {
        src: xb.slice(),
        rows: idx.slice(),
        dst: gb.slice(),
        src_rows: rows,
        count: 3,
        width,
    };
    // SAFETY: buffers of this device, sized by the contract; row indices are below `rows`.
    unsafe { launch(&dev, &gather) }.unwrap();
    let g: Vec<f32> = dev.download(&gb).unwrap();
    assert_eq!(&g[..width], &x[4 * width..5 * width]);
    assert_eq!(&g[width..2 * width], &x[..width]);
    let add = AddRows {
        x: xb.slice(),
        delta: db.slice(),
        width,
        tokens: rows,
    };
    // SAFETY: buffers of this device, sized by the contract; row indices are below `rows`.
    unsafe { launch(&dev, &add) }.unwrap();
    let bias_add = AddBiasRows {
        x: xb.slice(),
        bias: bb.slice(),
        width,
        tokens: rows,
    };
    // SAFETY: buffers of this device, sized by the contract; row indices are below `rows`.
    unsafe { launch(&dev, &bias_add) }.unwrap();
    let got: Vec<f32> = dev.download(&xb).unwrap();
    for i in 0..rows * width {
        assert_eq!(got[i], x[i] + d[i] + bias[i % width]);
    }
}

/// The cases `convoy-bench gpu-ops` compares between a GPU and the emulator all run on the
/// emulator, give finite outputs (NaN only where a case feeds NaN to argmax), and repeat
/// bitwise.
#[test]
fn every_gpu_check_case_runs_on_the_emulator_and_repeats() {
    use convoy_kernels::cuda::op_cases::{nmse, run, OPS, SHAPES};
    let dev = EmulatedDevice::new();
    for shape in SHAPES.iter().take(2) {
        for op in OPS {
            let a = run(&dev, op, *shape).unwrap_or_else(|e| panic!("{op} at {}: {e}", shape.name));
            assert!(
                !a.is_empty() && a.iter().all(|v| v.is_finite()),
                "{op} at {}",
                shape.name
            );
            let b = run(&dev, op, *shape).unwrap();
            assert_eq!(nmse(&a, &b), (0.0, 0), "{op} at {}", shape.name);
        }
    }
}

/// All of a step's copies between two tiers in one launch: full and partial blocks, every
/// layer, bitwise; a destination not in the list is untouched.
#[test]
fn copy_block_list_copies_every_listed_prefix_bitwise() {
    let dev = EmulatedDevice::new();
    let (layers, blocks, host_blocks, bs, kv_width) = (3usize, 7usize, 4usize, 16usize, 192usize);
    let block_elems = bs * kv_width;
    let mut rng = Rng(21);
    let src = bf16s(&rng.vec(layers * blocks * block_elems, 2.0));
    let s = dev.upload(&src).unwrap();
    let fill = bf16::from_f32(-7.0);
    let d = dev
        .upload(&vec![fill; layers * host_blocks * block_elems])
        .unwrap();
    let list = [(6usize, 0usize, 16usize), (2, 3, 5), (0, 1, 1)];
    let flat: Vec<i32> = list
        .iter()
        .flat_map(|&(a, b, c)| [a as i32, b as i32, c as i32])
        .collect();
    let lb = dev.upload(&flat).unwrap();
    let k = CopyBlockList {
        src: s.slice(),
        dst: d.slice(),
        list: lb.slice(),
        copies: list.len(),
        layers,
        src_blocks: blocks,
        dst_blocks: host_blocks,
        block_elems,
        slot_elems: kv_width,
    };
    // SAFETY: buffers of this device, sized by the contract; the listed blocks and slots are
    // in range and no destination repeats.
    unsafe { launch(&dev, &k) }.unwrap();
    let got: Vec<bf16> = dev.download(&d).unwrap();
    for l in 0..layers {
        for hb in 0..host_blocks {
            let copy = list.iter().find(|c| c.1 == hb);
            for i in 0..block_elems {
                let g = got[(l * host_blocks + hb) * block_elems + i];
                let want = match copy {
                    Some(&(sb, _, slots)) if i < slots * kv_width => {
                        src[(l * blocks + sb) * block_elems + i]
                    }
                    _ => fill,
                };
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "layer {l} host block {hb} value {i}"
                );
            }
        }
    }
    // Slots that are not whole 16-byte chunks are refused.
    let bad = CopyBlockList {
        slot_elems: 12,
        block_elems: 12 * bs,
        ..k
    };
    assert!(bad.config().is_err());
}
