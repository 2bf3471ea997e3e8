//! Bad arguments to the safe kernels are refused before anything is read: an error or a panic
//! with a clear message, never an out-of-bounds access. Each attention case runs on both
//! kernel paths, since the AVX-512 one indexes without bounds checks once the call is admitted.

use convoy_kernels::{
    matmul, paged_attention, rms_norm, try_paged_attention, with_kernel_path, AttentionError,
    AttentionSeq, AttentionShape, KernelPath, Matrix, WeightFormat,
};

/// 4 query heads over 2 KV heads of 16 dims, blocks of 4 tokens, a cache of 3 blocks.
const SHAPE: AttentionShape = AttentionShape {
    num_heads: 4,
    num_kv_heads: 2,
    head_dim: 16,
    block_size: 4,
};
const NUM_BLOCKS: usize = 3;
const ROW: usize = 4 * 16;
const CACHE: usize = NUM_BLOCKS * 4 * 2 * 16;

struct Args {
    shape: AttentionShape,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    out_len: usize,
}

impl Args {
    /// A valid batch of two rows.
    fn new() -> Args {
        Args {
            shape: SHAPE,
            q: (0..2 * ROW).map(|i| (i % 7) as f32 * 0.1).collect(),
            k: (0..CACHE).map(|i| (i % 5) as f32 * 0.1).collect(),
            v: (0..CACHE).map(|i| (i % 3) as f32 * 0.1).collect(),
            out_len: 2 * ROW,
        }
    }

    /// `try_paged_attention` on both kernel paths: the same result on each, and on an error
    /// the output untouched.
    fn run(&self, seqs: &[AttentionSeq<'_>]) -> Result<(), AttentionError> {
        let go = || {
            let mut out = vec![7.0f32; self.out_len];
            let r = try_paged_attention(&self.q, &self.k, &self.v, self.shape, seqs, &mut out);
            if r.is_err() {
                assert!(out.iter().all(|&x| x == 7.0), "output written on error");
            } else {
                assert!(out.iter().all(|x| x.is_finite()));
            }
            r
        };
        let auto = with_kernel_path(KernelPath::Auto, go);
        let scalar = with_kernel_path(KernelPath::Scalar, go);
        assert_eq!(auto, scalar);
        auto
    }
}

fn seq(
    block_table: &[u32],
    query_start: usize,
    num_queries: usize,
    context_len: usize,
) -> AttentionSeq<'_> {
    AttentionSeq {
        block_table,
        query_start,
        num_queries,
        context_len,
    }
}

#[test]
fn a_valid_batch_is_accepted() {
    // Positions 0..6 in blocks 2 and 0; the two new tokens are rows 0 and 1.
    assert_eq!(Args::new().run(&[seq(&[2, 0], 0, 2, 6)]), Ok(()));
    // The last block of the cache, and an empty context with no queries.
    assert_eq!(
        Args::new().run(&[seq(&[2], 0, 1, 4), seq(&[], 1, 0, 0), seq(&[1], 1, 1, 1)]),
        Ok(())
    );
}

#[test]
fn a_block_id_equal_to_the_number_of_blocks_is_refused() {
    assert_eq!(
        Args::new().run(&[seq(&[2, 3], 0, 2, 6)]),
        Err(AttentionError::BlockOutOfRange {
            seq: 0,
            index: 1,
            block: 3,
            num_blocks: 3
        })
    );
    // Every entry is checked, also past the blocks the context uses.
    assert_eq!(
        Args::new().run(&[seq(&[0], 0, 1, 1), seq(&[2, 0, u32::MAX], 1, 1, 6)]),
        Err(AttentionError::BlockOutOfRange {
            seq: 1,
            index: 2,
            block: u32::MAX,
            num_blocks: 3
        })
    );
}

#[test]
fn a_block_table_too_short_for_the_context_is_refused() {
    assert_eq!(
        Args::new().run(&[seq(&[2, 0], 0, 1, 9)]),
        Err(AttentionError::BlockTableTooShort {
            seq: 0,
            len: 2,
            context_len: 9,
            needed: 3
        })
    );
    assert_eq!(
        Args::new().run(&[seq(&[], 0, 1, 1)]),
        Err(AttentionError::BlockTableTooShort {
            seq: 0,
            len: 0,
            context_len: 1,
            needed: 1
        })
    );
}

#[test]
fn query_rows_outside_the_batch_are_refused() {
    let rows = |query_start, num_queries| AttentionError::QueryRows {
        seq: 0,
        query_start,
        num_queries,
        rows: 2,
    };
    assert_eq!(Args::new().run(&[seq(&[0, 1], 1, 2, 6)]), Err(rows(1, 2)));
    assert_eq!(Args::new().run(&[seq(&[0, 1], 2, 1, 6)]), Err(rows(2, 1)));
    // `query_start + num_queries` overflowing is caught, not wrapped.
    assert_eq!(
        Args::new().run(&[seq(&[0, 1], usize::MAX, 2, 6)]),
        Err(rows(usize::MAX, 2))
    );
}

#[test]
fn inconsistent_sequences_are_refused() {
    assert_eq!(
        Args::new().run(&[seq(&[0], 0, 2, 1)]),
        Err(AttentionError::QueriesExceedContext {
            seq: 0,
            num_queries: 2,
            context_len: 1
        })
    );
    assert_eq!(
        Args::new().run(&[seq(&[0], 0, 2, 2), seq(&[1], 1, 1, 1)]),
        Err(AttentionError::SharedRow {
            seq: 1,
            other: 0,
            row: 1
        })
    );
}

#[test]
fn inconsistent_shapes_and_buffer_lengths_are_refused() {
    let ok = [seq(&[2, 0], 0, 2, 6)];

    let mut a = Args::new();
    a.v.pop();
    assert_eq!(
        a.run(&ok),
        Err(AttentionError::CacheLength {
            k_len: CACHE,
            v_len: CACHE - 1,
            block_floats: 128
        })
    );

    let mut a = Args::new();
    a.k.truncate(CACHE - 1);
    a.v.truncate(CACHE - 1);
    assert!(matches!(
        a.run(&ok),
        Err(AttentionError::CacheLength { .. })
    ));

    let mut a = Args::new();
    a.q.pop();
    assert_eq!(
        a.run(&ok),
        Err(AttentionError::QueryLength {
            q_len: 2 * ROW - 1,
            out_len: 2 * ROW
        })
    );

    let mut a = Args::new();
    a.out_len -= 1;
    a.q.pop();
    assert_eq!(
        a.run(&ok),
        Err(AttentionError::OutputLength {
            len: 2 * ROW - 1,
            row: ROW
        })
    );

    let mut a = Args::new();
    a.shape.num_heads = 3;
    assert_eq!(
        a.run(&ok),
        Err(AttentionError::HeadsNotGrouped {
            num_heads: 3,
            num_kv_heads: 2
        })
    );

    for zero in 0..4 {
        let mut a = Args::new();
        match zero {
            0 => a.shape.num_heads = 0,
            1 => a.shape.num_kv_heads = 0,
            2 => a.shape.head_dim = 0,
            _ => a.shape.block_size = 0,
        }
        assert_eq!(a.run(&ok), Err(AttentionError::ZeroDimension(a.shape)));
    }

    let mut a = Args::new();
    a.shape.num_heads = usize::MAX - 1;
    assert_eq!(a.run(&ok), Err(AttentionError::Overflow(a.shape)));
}

#[test]
#[should_panic(expected = "block table entry 1 is block 3, out of range for a cache of 3 blocks")]
fn paged_attention_panics_on_a_block_id_past_the_cache() {
    let a = Args::new();
    let mut out = vec![0f32; a.out_len];
    paged_attention(
        &a.q,
        &a.k,
        &a.v,
        a.shape,
        &[seq(&[2, 3], 0, 2, 6)],
        &mut out,
    );
}

#[test]
#[should_panic(expected = "block table has 2 blocks, context length 9 needs 3")]
fn paged_attention_panics_on_a_block_table_too_short() {
    let a = Args::new();
    let mut out = vec![0f32; a.out_len];
    paged_attention(
        &a.q,
        &a.k,
        &a.v,
        a.shape,
        &[seq(&[2, 0], 0, 1, 9)],
        &mut out,
    );
}

#[test]
#[should_panic(expected = "matmul shape mismatch")]
fn matmul_refuses_a_token_count_whose_size_overflows() {
    // n * cols wraps to 0 in usize: the check must not wrap with it.
    let w = Matrix::from_f32(2, 2, vec![1.0; 4]).unwrap();
    let mut y = vec![0f32; 4];
    matmul(&[1.0; 4], usize::MAX / 2 + 1, &w, &mut y);
}

#[test]
#[should_panic(expected = "matmul shape mismatch")]
fn matmul_refuses_a_short_output() {
    let w = Matrix::from_f32(3, 2, vec![1.0; 6]).unwrap();
    let mut y = vec![0f32; 5];
    matmul(&[1.0; 4], 2, &w, &mut y);
}

#[test]
fn matrices_whose_size_overflows_are_refused() {
    // rows * cols wraps to 0, the length of the data.
    assert!(Matrix::from_f32(1 << 33, 1 << 31, Vec::new()).is_err());
    // rows * cols / 32 * block_bytes wraps likewise.
    assert!(Matrix::from_blocks(WeightFormat::Q4_0, 1 << 61, 32 * 8, Vec::new()).is_err());
    assert!(Matrix::concat_rows(&[]).is_err());
    let tall = Matrix::from_f32(usize::MAX, 0, Vec::new()).unwrap();
    assert!(Matrix::concat_rows(&[&tall, &tall]).is_err());
}

#[test]
#[should_panic(expected = "row 2 of a 2x2 matrix")]
fn a_row_past_the_matrix_is_refused() {
    let w = Matrix::from_f32(2, 2, vec![1.0; 4]).unwrap();
    w.row_to_f32(2, &mut [0.0; 2]);
}

#[test]
#[should_panic(expected = "rms_norm")]
fn rms_norm_refuses_a_partial_row() {
    rms_norm(&[1.0; 5], &[1.0; 2], 1e-5, &mut [0.0; 5]);
}
