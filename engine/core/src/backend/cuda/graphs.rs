//! CUDA graphs for decode passes. A decode pass (one query row per sequence, the logits of
//! every row) of up to the largest bucket's sequences, over contexts of up to `max_context`
//! tokens, runs as the replay of a graph recorded for its bucket: the smallest bucket that holds
//! its sequences, the rows beyond them padded (token 0, position -1, slot -1: a padding row
//! writes no K/V and attends to nothing, and its logits are never read).
//!
//! Invariants: a graph keeps the addresses and scalar arguments it was recorded with, so a
//! padded pass has the same shape every time (the bucket's rows and sequences, block tables
//! and attention partitions for `max_context`), and a graph is replayed only while every buffer
//! it may name is where it was when it was recorded ([`Layout`]); otherwise it is recorded
//! again. A bucket's first pass (and its first after a buffer moved) runs eagerly, then is
//! recorded (as vLLM warms each shape up before capturing it: a library's one-time setup never
//! happens inside a capture); later passes replay the recording.

/// Which decode passes run as graphs (`--enforce-eager` turns them off).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphPolicy {
    /// Row counts that have a graph, ascending; empty: every pass runs eagerly.
    buckets: Vec<usize>,
    /// Longest context a graphed decode pass may attend to.
    max_context: usize,
}

/// Largest decode batch recorded as a graph by default (vLLM's default is 512).
pub const DEFAULT_MAX_GRAPH_ROWS: usize = 256;
/// Longest context recorded as a graph by default (vLLM's `max_seq_len_to_capture`).
pub const DEFAULT_MAX_GRAPH_CONTEXT: usize = 8192;

impl GraphPolicy {
    /// Buckets 1, 2, 4, 8, then every multiple of 16, up to `max_rows`; contexts up to
    /// `max_context`.
    pub fn new(max_rows: usize, max_context: usize) -> GraphPolicy {
        let buckets = [1, 2, 4, 8]
            .into_iter()
            .chain((16..).step_by(16))
            .take_while(|&b| b <= max_rows)
            .collect();
        GraphPolicy {
            buckets,
            max_context,
        }
    }

    /// No graphs: every pass runs eagerly.
    pub fn eager() -> GraphPolicy {
        GraphPolicy {
            buckets: Vec::new(),
            max_context: 0,
        }
    }

    /// The bucket for a decode pass of `rows` rows over contexts of up to `context` tokens.
    pub fn bucket(&self, rows: usize, context: usize) -> Option<usize> {
        if context > self.max_context {
            return None;
        }
        self.buckets.iter().copied().find(|&b| b >= rows)
    }

    /// The buckets, smallest first (none when eager).
    pub fn buckets(&self) -> &[usize] {
        &self.buckets
    }

    /// The largest bucket (0 when eager).
    pub fn max_rows(&self) -> usize {
        self.buckets.last().copied().unwrap_or(0)
    }

    /// Longest context a graphed pass attends to.
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Block-table columns of a graphed pass (blocks of `block_size` tokens).
    pub fn table_blocks(&self, block_size: usize) -> usize {
        self.max_context.div_ceil(block_size.max(1))
    }

    /// Attention work items of a graphed pass of `rows` rows: every partition they may reach.
    pub fn attention_items(&self, rows: usize) -> usize {
        rows * self
            .max_context
            .div_ceil(convoy_kernels::cuda::launch::ATTENTION_PARTITION)
    }
}

/// Where every buffer a graph may name lies: a graph recorded under one layout is replayed only
/// under the same one.
pub(super) type Layout = Vec<u64>;

/// Graphs recorded so far, by bucket, and how they were used.
pub(super) struct DecodeGraphs<G> {
    pub(super) policy: GraphPolicy,
    recorded: Vec<(usize, Layout, G)>,
    stats: GraphStats,
}

/// How often decode passes were recorded and replayed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs recorded (after a bucket's first pass, or its first after a buffer moved, ran
    /// eagerly).
    pub recorded: usize,
    /// Passes run as a graph's replay.
    pub replayed: usize,
}

impl<G> DecodeGraphs<G> {
    pub(super) fn new(policy: GraphPolicy) -> DecodeGraphs<G> {
        DecodeGraphs {
            policy,
            recorded: Vec::new(),
            stats: GraphStats::default(),
        }
    }

    /// The graph of `bucket`, if it was recorded under `layout`.
    pub(super) fn get(&self, bucket: usize, layout: &Layout) -> Option<&G> {
        self.recorded
            .iter()
            .find(|(b, l, _)| *b == bucket && l == layout)
            .map(|(_, _, g)| g)
    }

    /// Keep `graph` for `bucket`, replacing one recorded under an older layout.
    pub(super) fn insert(&mut self, bucket: usize, layout: Layout, graph: G) {
        self.recorded.retain(|(b, _, _)| *b != bucket);
        self.recorded.push((bucket, layout, graph));
        self.stats.recorded += 1;
    }

    pub(super) fn count_replay(&mut self) {
        self.stats.replayed += 1;
    }

    pub(super) fn stats(&self) -> GraphStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::GraphPolicy;

    #[test]
    fn buckets_cover_every_row_count_up_to_the_largest() {
        let p = GraphPolicy::new(100, 4096);
        assert_eq!(p.bucket(1, 10), Some(1));
        assert_eq!(p.bucket(3, 10), Some(4));
        assert_eq!(p.bucket(9, 10), Some(16));
        assert_eq!(p.bucket(33, 4096), Some(48));
        assert_eq!(p.bucket(96, 10), Some(96));
        assert_eq!(p.bucket(97, 10), None, "beyond the largest bucket");
        assert_eq!(p.bucket(1, 4097), None, "beyond the graphed context");
        assert_eq!(p.max_rows(), 96);
        assert_eq!(GraphPolicy::eager().bucket(1, 1), None);
    }
}
