//! Times paged attention of SmolLM2-135M's shape (9 query heads, 3 KV heads of 64, blocks of 16
//! tokens) on the active kernel path: a prompt chunk of `chunk` tokens on `context` cached
//! ones, and a decode step of `decode` sequences at that context; the median of `reps` runs, in
//! nanoseconds per (query, key) pair and query head. The sequences' blocks are interleaved in
//! the cache, as a batch that was prefilled together leaves them; with `shuffled` they lie in a
//! random order instead, as in a cache that has served and evicted for a while (no stride for
//! the hardware's prefetchers to find).
//!
//! `cargo run --release -p convoy-kernels --example attention_speed -- [context] [chunk]
//! [decode] [reps] [threads] [layers] [f32|f16|fp8_e4m3] [interleaved|shuffled]` (defaults
//! 1024 128 4 30, every core, 1 layer, f32, interleaved). With `layers` above 1 each run goes
//! through that many caches of its own, as a forward pass does, so the K and V come from
//! memory rather than from the last run's caches.

use std::time::Instant;

use convoy_kernels::cpu::attention::{paged_attention, AttentionSeq, AttentionShape};
use convoy_kernels::cpu::kv_elem::KvElem;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut arg = |default: usize| args.next().and_then(|s| s.parse().ok()).unwrap_or(default);
    let (context, chunk, decode, reps) = (arg(1024), arg(128), arg(4), arg(30));
    let threads = arg(0);
    let layers = arg(1).max(1);
    if threads > 0 {
        convoy_kernels::cpu::pool::set_num_threads(threads);
    }
    let shuffled = std::env::args().nth(8).as_deref() == Some("shuffled");
    match std::env::args().nth(7).as_deref() {
        Some("f16") => run::<half::f16>(context, chunk, decode, reps, layers, shuffled),
        Some("fp8_e4m3" | "fp8") => {
            run::<convoy_kernels::F8E4M3>(context, chunk, decode, reps, layers, shuffled)
        }
        _ => run::<f32>(context, chunk, decode, reps, layers, shuffled),
    }
}

fn run<E: KvElem>(
    context: usize,
    chunk: usize,
    decode: usize,
    reps: usize,
    layers: usize,
    shuffled: bool,
) {
    let shape = AttentionShape {
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        block_size: 16,
    };
    let mut seed = 7u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let per_block = shape.block_size * shape.num_kv_heads * shape.head_dim;
    let seq_blocks = (context + chunk).div_ceil(shape.block_size);
    let num_blocks = seq_blocks * (decode + 1);
    let caches: Vec<(Vec<E>, Vec<E>)> = (0..layers)
        .map(|_| {
            let mut fill = || -> Vec<E> {
                (0..num_blocks * per_block)
                    .map(|_| E::from_f32(rand()))
                    .collect()
            };
            (fill(), fill())
        })
        .collect();
    let row = shape.num_heads * shape.head_dim;
    // Block `j` of sequence `s` is block `j * (decode + 1) + s` of the cache, or of a
    // shuffled order of the blocks (Fisher-Yates with the same generator).
    let mut order: Vec<u32> = (0..num_blocks as u32).collect();
    if shuffled {
        for i in (1..order.len()).rev() {
            let j = ((rand() + 0.5) * (i + 1) as f32) as usize;
            order.swap(i, j.min(i));
        }
    }
    let tables: Vec<Vec<u32>> = (0..=decode)
        .map(|s| {
            (0..seq_blocks)
                .map(|j| order[j * (decode + 1) + s])
                .collect()
        })
        .collect();
    let time = |seqs: &[AttentionSeq<'_>], rows: usize, pairs: u64| {
        let q: Vec<f32> = (0..rows * row)
            .map(|i| (i % 13) as f32 * 0.05 - 0.3)
            .collect();
        let mut out = vec![0f32; rows * row];
        let mut t: Vec<f64> = (0..reps.max(1) + 1)
            .map(|_| {
                let s = Instant::now();
                for (k, v) in &caches {
                    paged_attention(&q, k, v, shape, seqs, &mut out);
                }
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.remove(0);
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        (
            med,
            med * 1e9 / (pairs as f64 * shape.num_heads as f64 * layers as f64),
        )
    };
    let kind = std::any::type_name::<E>();
    let prefill = [AttentionSeq {
        block_table: &tables[0],
        query_start: 0,
        num_queries: chunk,
        context_len: context + chunk,
    }];
    let pairs = (chunk * context + chunk * (chunk + 1) / 2) as u64;
    let (s, ns) = time(&prefill, chunk, pairs);
    println!(
        "path {:?}, {kind} cache, {layers} layer(s): chunk of {chunk} on {context} cached: {:.2} \
         ms, {ns:.2} ns per pair and head",
        convoy_kernels::active_kernel_path(),
        s * 1e3
    );
    let seqs: Vec<AttentionSeq<'_>> = (0..decode)
        .map(|i| AttentionSeq {
            block_table: &tables[i + 1],
            query_start: i,
            num_queries: 1,
            context_len: context,
        })
        .collect();
    let (s, ns) = time(&seqs, decode, (decode * context) as u64);
    println!(
        "decode x{decode} at {context}: {:.2} ms, {ns:.2} ns per pair and head",
        s * 1e3
    );
}
