//! A fixed set of KV-cache blocks handed out to sequences and taken back.
//!
//! Invariant: every block id in `0..num_blocks` is either in the free list or held by exactly
//! one owner; `num_free() + held == num_blocks`. Freed blocks are reused most-recently-freed
//! last (FIFO), which keeps allocation order deterministic.

use std::collections::VecDeque;

/// Index of a KV block in the cache storage.
pub type BlockId = u32;

/// The pool of KV blocks.
#[derive(Clone, Debug)]
pub struct BlockPool {
    num_blocks: usize,
    free: VecDeque<BlockId>,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks.
    pub fn new(num_blocks: usize) -> BlockPool {
        BlockPool {
            num_blocks,
            free: (0..num_blocks as BlockId).collect(),
        }
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks not held by anyone.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Take `n` blocks, or none at all when fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if n > self.free.len() {
            return None;
        }
        Some(self.free.drain(..n).collect())
    }

    /// Give blocks back.
    pub fn free(&mut self, blocks: impl IntoIterator<Item = BlockId>) {
        self.free.extend(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_in_order_and_refuses_when_short() {
        let mut pool = BlockPool::new(4);
        assert_eq!(pool.allocate(3), Some(vec![0, 1, 2]));
        assert_eq!(pool.allocate(2), None);
        pool.free([1, 0]);
        assert_eq!(pool.allocate(3), Some(vec![3, 1, 0]));
        assert_eq!(pool.num_free(), 0);
    }
}
