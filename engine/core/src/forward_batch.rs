//! The input of one forward pass: a packed, variable-length batch of tokens from several
//! sequences (some prefilling a chunk, some decoding one token), vLLM style.
//!
//! Invariants: `input_ids`, `positions` and `slot_mapping` have one entry per packed row;
//! each sequence's rows are contiguous starting at `query_start`; the rows of a sequence are the
//! last `num_queries` positions of its `context_len` tokens; `slot_mapping[row]` is the cache
//! slot (`block * block_size + offset`) its K/V are written to, taken from the block table.

/// One sequence's part of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSlice {
    /// Cache blocks of the sequence, in position order; covers `context_len` tokens.
    pub block_table: Vec<u32>,
    /// First packed row of this sequence.
    pub query_start: usize,
    /// New tokens of this sequence in the batch.
    pub num_queries: usize,
    /// Tokens of the sequence in the cache once this step has run.
    pub context_len: usize,
}

/// A packed batch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// Token id of each packed row.
    pub input_ids: Vec<u32>,
    /// Position of each packed row in its sequence.
    pub positions: Vec<u32>,
    /// Cache slot each row's K/V go to.
    pub slot_mapping: Vec<u32>,
    /// The sequences, in row order.
    pub seqs: Vec<SeqSlice>,
    /// Rows whose logits are wanted (usually each sequence's last row), in output order.
    pub logits_rows: Vec<usize>,
}

impl ForwardBatch {
    /// Append `tokens` of a sequence whose first `num_cached` tokens are already in the cache,
    /// stored in `block_table` with `block_size` tokens per block. When `want_logits` (and
    /// `tokens` is not empty), the sequence's last row is added to `logits_rows`; returns
    /// whether it was, so a caller knows which logits row belongs to which sequence.
    ///
    /// # Panics
    /// When `block_table` does not cover `num_cached + tokens.len()` positions.
    pub fn push_seq(
        &mut self,
        tokens: &[u32],
        num_cached: usize,
        block_table: &[u32],
        block_size: usize,
        want_logits: bool,
    ) -> bool {
        let context_len = num_cached + tokens.len();
        assert!(
            block_table.len() * block_size >= context_len,
            "block table of {} blocks of {block_size} does not cover {context_len} positions",
            block_table.len()
        );
        let query_start = self.input_ids.len();
        for (i, &tok) in tokens.iter().enumerate() {
            let pos = num_cached + i;
            self.input_ids.push(tok);
            self.positions.push(pos as u32);
            self.slot_mapping.push(
                block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32,
            );
        }
        self.seqs.push(SeqSlice {
            block_table: block_table[..context_len.div_ceil(block_size)].to_vec(),
            query_start,
            num_queries: tokens.len(),
            context_len,
        });
        let wants = want_logits && !tokens.is_empty();
        if wants {
            self.logits_rows.push(query_start + tokens.len() - 1);
        }
        wants
    }

    /// Number of packed rows.
    pub fn num_tokens(&self) -> usize {
        self.input_ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_block_table() {
        let mut b = ForwardBatch::default();
        b.push_seq(&[10, 11, 12], 3, &[7, 2], 4, true);
        b.push_seq(&[5], 0, &[9], 4, true);
        assert_eq!(b.positions, vec![3, 4, 5, 0]);
        assert_eq!(b.slot_mapping, vec![7 * 4 + 3, 2 * 4, 2 * 4 + 1, 9 * 4]);
        assert_eq!(b.logits_rows, vec![2, 3]);
        assert_eq!(b.seqs[0].context_len, 6);
    }
}
