//! Paged attention on the CPU: queries of a packed batch against keys and values stored in
//! fixed-size blocks, found through each sequence's block table.
//!
//! Cache layout per layer: `[num_blocks][block_size][num_kv_heads][head_dim]` for K and for V;
//! token position `p` of a sequence lives in block `block_table[p / block_size]`, slot
//! `p % block_size`. The work item is one (query token, KV head): the K and V rows of that head
//! are loaded once for all query heads that share it (GQA/MQA). Query `i` of a sequence with
//! `num_queries` new tokens and `context_len` tokens in all sits at position
//! `context_len - num_queries + i` and attends causally to positions `0..=` that.

use rayon::prelude::*;

use super::ops::{axpy, dot};

/// One sequence of a packed batch, as attention sees it.
#[derive(Clone, Copy, Debug)]
pub struct AttentionSeq<'a> {
    /// Blocks holding the sequence's K/V, in position order.
    pub block_table: &'a [u32],
    /// Row of the sequence's first query in the packed batch.
    pub query_start: usize,
    /// Number of query rows (new tokens this step).
    pub num_queries: usize,
    /// Tokens in the cache after this step's K/V were written (cached prefix + new tokens).
    pub context_len: usize,
}

/// Geometry of the cache and heads.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Dimension of a head.
    pub head_dim: usize,
    /// Tokens per cache block.
    pub block_size: usize,
}

/// `out` (rows x num_heads x head_dim) = softmax(q k^T * scale) v, causal, per sequence.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    shape: AttentionShape,
    seqs: &[AttentionSeq<'_>],
    out: &mut [f32],
) {
    let AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
    } = shape;
    let group = num_heads / num_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let row = num_heads * head_dim;
    // (sequence, query index) for each packed row.
    let mut owner = vec![(usize::MAX, 0usize); out.len() / row];
    for (s, seq) in seqs.iter().enumerate() {
        for i in 0..seq.num_queries {
            owner[seq.query_start + i] = (s, i);
        }
    }
    let kv_stride = num_kv_heads * head_dim;
    out.par_chunks_mut(group * head_dim)
        .enumerate()
        .for_each(|(item, o)| {
            let t = item / num_kv_heads;
            let kvh = item % num_kv_heads;
            let (s, i) = owner[t];
            if s == usize::MAX {
                o.fill(0.0);
                return;
            }
            let seq = &seqs[s];
            let ctx = seq.context_len - seq.num_queries + i + 1;
            let qrow = &q[t * row + kvh * group * head_dim..t * row + (kvh + 1) * group * head_dim];
            let mut scores = vec![0f32; group * ctx];
            for j in 0..ctx {
                let slot = seq.block_table[j / block_size] as usize * block_size + j % block_size;
                let kp = &k_cache[slot * kv_stride + kvh * head_dim..][..head_dim];
                for g in 0..group {
                    scores[g * ctx + j] = dot(&qrow[g * head_dim..(g + 1) * head_dim], kp) * scale;
                }
            }
            for g in 0..group {
                let sc = &mut scores[g * ctx..(g + 1) * ctx];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for v in sc.iter_mut() {
                    *v = (*v - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                sc.iter_mut().for_each(|v| *v *= inv);
            }
            o.fill(0.0);
            for j in 0..ctx {
                let slot = seq.block_table[j / block_size] as usize * block_size + j % block_size;
                let vp = &v_cache[slot * kv_stride + kvh * head_dim..][..head_dim];
                for g in 0..group {
                    axpy(
                        scores[g * ctx + j],
                        vp,
                        &mut o[g * head_dim..(g + 1) * head_dim],
                    );
                }
            }
        });
}
