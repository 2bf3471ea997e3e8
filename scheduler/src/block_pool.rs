//! One tier of KV blocks (device or host): reference counts, an O(1) LRU queue of free blocks,
//! and the index of cached contents.
//!
//! Invariants (checked by [`BlockPool::check_invariants`] in the tests):
//! - a block is in the LRU queue if and only if its reference count is 0;
//! - the queue runs from least to most recently freed; allocation takes the head;
//! - a block has a key (is cached) only if it is in `children[(key.parent, first token)]`, and,
//!   for full blocks, `full[key.hash]` points at it; nothing else is in either index. Children
//!   are indexed by their first token too: a prefix match needs at least that token in common.
//! - each list of siblings is sorted by key tokens, and no two siblings hold the same tokens.
//!   The sibling sharing the longest prefix with looked-up tokens is then one of the two
//!   neighbours of their place in that order, so a lookup costs a binary search however many
//!   conversations are cached after the same parent (every chat prompt starts with the same
//!   template tokens, so the first block's siblings are every cached conversation).
//! - a free block may still be cached: it is reused (and forgotten) only when it reaches the
//!   head of the queue and a new block is needed.

use rustc_hash::FxHashMap;

use crate::block_hash::BlockHash;

/// Index of a block within its tier.
pub type BlockId = u32;

const NIL: BlockId = BlockId::MAX;

/// Where a cached block is listed among its parent's children: the parent and its first token.
type ChildKey = (BlockHash, Option<u32>);

fn child_key(key: &BlockKey) -> ChildKey {
    (key.parent, key.tokens.first().copied())
}

/// The key tokens of a block listed among siblings (listed blocks are cached).
fn sibling_tokens(meta: &[Meta], id: BlockId) -> &[u32] {
    let key = meta[id as usize].key.as_ref();
    &key.expect("a listed sibling is cached").tokens
}

/// Where `tokens` are (`Ok`) or would go (`Err`) in a list of siblings sorted by tokens.
fn find_sibling(meta: &[Meta], siblings: &[BlockId], tokens: &[u32]) -> Result<usize, usize> {
    siblings.binary_search_by(|&s| sibling_tokens(meta, s).cmp(tokens))
}

/// What a cached block holds: the key tokens after the prefix `parent`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockKey {
    /// Hash of everything before this block.
    pub parent: BlockHash,
    /// Hash of this block chained on `parent` (the index key of full blocks).
    pub hash: BlockHash,
    /// Key tokens stored in the block's first slots (`tokens.len()` slots are valid).
    pub tokens: Vec<u32>,
    /// Whether every slot of the block is filled.
    pub full: bool,
}

#[derive(Clone, Debug)]
struct Meta {
    ref_cnt: u32,
    key: Option<BlockKey>,
    prev: BlockId,
    next: BlockId,
    in_queue: bool,
}

/// A tier of blocks.
#[derive(Clone, Debug)]
pub struct BlockPool {
    meta: Vec<Meta>,
    head: BlockId,
    tail: BlockId,
    num_free: usize,
    num_cached: usize,
    full: FxHashMap<BlockHash, BlockId>,
    children: FxHashMap<ChildKey, Vec<BlockId>>,
}

impl BlockPool {
    /// `num_blocks` free, uncached blocks, queued in id order.
    pub fn new(num_blocks: usize) -> BlockPool {
        let mut pool = BlockPool {
            meta: vec![
                Meta {
                    ref_cnt: 0,
                    key: None,
                    prev: NIL,
                    next: NIL,
                    in_queue: false
                };
                num_blocks
            ],
            head: NIL,
            tail: NIL,
            num_free: 0,
            num_cached: 0,
            full: FxHashMap::default(),
            children: FxHashMap::default(),
        };
        for id in 0..num_blocks as BlockId {
            pool.push_tail(id);
        }
        pool
    }

    /// Total blocks.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }

    /// Blocks with reference count 0 (cached or not).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// Blocks whose contents are indexed.
    pub fn num_cached(&self) -> usize {
        self.num_cached
    }

    /// Reference count of a block.
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.meta[id as usize].ref_cnt
    }

    /// The cached key of a block, if any.
    pub fn key(&self, id: BlockId) -> Option<&BlockKey> {
        self.meta[id as usize].key.as_ref()
    }

    /// Free blocks from least to most recently used.
    pub fn lru_order(&self) -> Vec<BlockId> {
        let mut out = Vec::with_capacity(self.num_free);
        let mut at = self.head;
        while at != NIL {
            out.push(at);
            at = self.meta[at as usize].next;
        }
        out
    }

    fn push_tail(&mut self, id: BlockId) {
        let m = &mut self.meta[id as usize];
        debug_assert!(!m.in_queue);
        m.in_queue = true;
        m.prev = self.tail;
        m.next = NIL;
        if self.tail != NIL {
            self.meta[self.tail as usize].next = id;
        } else {
            self.head = id;
        }
        self.tail = id;
        self.num_free += 1;
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let m = &mut self.meta[id as usize];
            debug_assert!(m.in_queue);
            m.in_queue = false;
            (m.prev, m.next)
        };
        if prev != NIL {
            self.meta[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.meta[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
        self.num_free -= 1;
    }

    /// Take the least recently used free block (reference count becomes 1). Its cached key,
    /// if it had one, is forgotten and returned so the caller can save the contents elsewhere.
    pub fn pop_lru(&mut self) -> Option<(BlockId, Option<BlockKey>)> {
        let id = self.head;
        if id == NIL {
            return None;
        }
        self.unlink(id);
        let evicted = self.unregister(id);
        self.meta[id as usize].ref_cnt = 1;
        Some((id, evicted))
    }

    /// Take a reference to a block (a cache hit or a pin); a free block leaves the queue.
    pub fn acquire(&mut self, id: BlockId) {
        if self.meta[id as usize].ref_cnt == 0 {
            self.unlink(id);
        }
        self.meta[id as usize].ref_cnt += 1;
    }

    /// Drop a reference; at zero the block becomes the most recently used free block.
    pub fn release(&mut self, id: BlockId) {
        let m = &mut self.meta[id as usize];
        assert!(m.ref_cnt > 0, "release of free block {id}");
        m.ref_cnt -= 1;
        if m.ref_cnt == 0 {
            self.push_tail(id);
        }
    }

    /// Move a free block to the most recently used end (a hit on a block nobody holds).
    pub fn touch(&mut self, id: BlockId) {
        if self.meta[id as usize].in_queue {
            self.unlink(id);
            self.push_tail(id);
        }
    }

    /// Index a block's contents. Returns false (and indexes nothing) when an identical block
    /// is already indexed: the duplicate simply stays uncached.
    pub fn register(&mut self, id: BlockId, key: BlockKey) -> bool {
        if let Some(siblings) = self.children.get(&child_key(&key)) {
            if let Ok(at) = find_sibling(&self.meta, siblings, &key.tokens) {
                if siblings[at] != id {
                    return false;
                }
            }
        }
        if key.full && self.full.get(&key.hash).is_some_and(|&b| b != id) {
            return false;
        }
        self.unregister(id);
        if key.full {
            self.full.insert(key.hash, id);
        }
        let siblings = self.children.entry(child_key(&key)).or_default();
        let at = find_sibling(&self.meta, siblings, &key.tokens).unwrap_or_else(|at| at);
        siblings.insert(at, id);
        self.meta[id as usize].key = Some(key);
        self.num_cached += 1;
        true
    }

    /// Forget a block's contents; returns the key it had.
    pub fn unregister(&mut self, id: BlockId) -> Option<BlockKey> {
        let key = self.meta[id as usize].key.as_ref()?;
        let ck = child_key(key);
        if let Some(siblings) = self.children.get_mut(&ck) {
            if let Ok(at) = find_sibling(&self.meta, siblings, &key.tokens) {
                siblings.remove(at);
            }
            if siblings.is_empty() {
                self.children.remove(&ck);
            }
        }
        let key = self.meta[id as usize].key.take()?;
        self.num_cached -= 1;
        if key.full && self.full.get(&key.hash) == Some(&id) {
            self.full.remove(&key.hash);
        }
        Some(key)
    }

    /// The full block holding exactly `tokens` after `parent`, confirmed by comparing tokens.
    pub fn lookup_full(
        &self,
        parent: BlockHash,
        hash: BlockHash,
        tokens: &[u32],
    ) -> Option<BlockId> {
        let id = *self.full.get(&hash)?;
        let key = self.meta[id as usize].key.as_ref()?;
        (key.parent == parent && key.tokens == tokens).then_some(id)
    }

    /// The cached block after `parent` sharing the longest common prefix with `tokens` (at
    /// least one token), with its length. Of several sharing that longest prefix, the one
    /// following `tokens` in token order wins, else the one before them (a choice fixed by the
    /// cached contents alone, whatever order they were cached in).
    pub fn best_child(&self, parent: BlockHash, tokens: &[u32]) -> Option<(BlockId, usize)> {
        let first = *tokens.first()?;
        let siblings = self.children.get(&(parent, Some(first)))?;
        let at = find_sibling(&self.meta, siblings, tokens).unwrap_or_else(|at| at);
        let common = |id: BlockId| {
            sibling_tokens(&self.meta, id)
                .iter()
                .zip(tokens)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let after = siblings.get(at).map(|&id| (id, common(id)));
        let before = at
            .checked_sub(1)
            .map(|i| (siblings[i], common(siblings[i])));
        match (after, before) {
            (Some(a), Some(b)) => Some(if a.1 >= b.1 { a } else { b }),
            (a, b) => a.or(b),
        }
        .filter(|&(_, c)| c > 0)
    }

    /// Check every invariant of the module header; panics with a description on failure.
    pub fn check_invariants(&self) {
        let order = self.lru_order();
        assert_eq!(order.len(), self.num_free, "queue length");
        let mut seen = vec![false; self.meta.len()];
        let mut prev = NIL;
        for &id in &order {
            let m = &self.meta[id as usize];
            assert!(!seen[id as usize], "block {id} twice in the queue");
            seen[id as usize] = true;
            assert_eq!(m.ref_cnt, 0, "queued block {id} is held");
            assert_eq!(m.prev, prev, "queue links of block {id}");
            prev = id;
        }
        for (id, m) in self.meta.iter().enumerate() {
            assert_eq!(m.in_queue, seen[id], "in_queue flag of block {id}");
            assert_eq!(
                m.ref_cnt == 0,
                seen[id],
                "block {id}: free if and only if unreferenced"
            );
            if let Some(k) = &m.key {
                assert!(
                    self.children
                        .get(&child_key(k))
                        .is_some_and(|c| c.contains(&(id as BlockId))),
                    "block {id} missing from children"
                );
                if k.full {
                    assert_eq!(
                        self.full.get(&k.hash),
                        Some(&(id as BlockId)),
                        "block {id} missing from full index"
                    );
                }
            }
        }
        assert_eq!(
            self.num_cached,
            self.meta.iter().filter(|m| m.key.is_some()).count(),
            "cached count"
        );
        for (h, &id) in &self.full {
            assert_eq!(
                self.meta[id as usize].key.as_ref().map(|k| k.hash),
                Some(*h),
                "stale full entry"
            );
        }
        for (ck, ids) in &self.children {
            assert!(
                ids.windows(2)
                    .all(|w| sibling_tokens(&self.meta, w[0]) < sibling_tokens(&self.meta, w[1])),
                "siblings under {ck:?} not sorted by distinct tokens"
            );
            for &id in ids {
                assert_eq!(
                    self.meta[id as usize].key.as_ref().map(child_key),
                    Some(*ck),
                    "stale child entry"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_hash::{chain_hash, root_hash};

    fn key(parent: BlockHash, tokens: &[u32], full: bool) -> BlockKey {
        BlockKey {
            parent,
            hash: chain_hash(parent, tokens),
            tokens: tokens.to_vec(),
            full,
        }
    }

    #[test]
    fn lru_takes_the_least_recently_freed_and_forgets_its_key() {
        let mut pool = BlockPool::new(4);
        let a = pool.pop_lru().unwrap();
        let b = pool.pop_lru().unwrap();
        assert_eq!((a.0, b.0), (0, 1));
        let root = root_hash("m", None);
        assert!(pool.register(1, key(root, &[1, 2], true)));
        pool.release(1);
        pool.release(0);
        assert_eq!(pool.lru_order(), vec![2, 3, 1, 0]);
        pool.pop_lru();
        pool.pop_lru();
        let (id, evicted) = pool.pop_lru().unwrap();
        assert_eq!(id, 1);
        assert_eq!(evicted.unwrap().tokens, vec![1, 2]);
        assert_eq!(
            pool.lookup_full(root, chain_hash(root, &[1, 2]), &[1, 2]),
            None
        );
        pool.check_invariants();
    }

    #[test]
    fn hits_are_confirmed_by_tokens_and_duplicates_stay_uncached() {
        let mut pool = BlockPool::new(3);
        let root = root_hash("m", None);
        let (a, _) = pool.pop_lru().unwrap();
        let (b, _) = pool.pop_lru().unwrap();
        assert!(pool.register(a, key(root, &[7, 8], true)));
        assert!(
            !pool.register(b, key(root, &[7, 8], true)),
            "duplicate content is not indexed twice"
        );
        let h = chain_hash(root, &[7, 8]);
        assert_eq!(pool.lookup_full(root, h, &[7, 8]), Some(a));
        // Same hash presented with other tokens (a forged collision) is refused.
        assert_eq!(pool.lookup_full(root, h, &[7, 9]), None);
        pool.check_invariants();
    }

    #[test]
    fn best_child_prefers_the_longest_common_prefix() {
        let mut pool = BlockPool::new(3);
        let root = root_hash("m", None);
        for (tokens, full) in [
            (&[1u32, 2, 3, 4][..], true),
            (&[1, 2, 9][..], false),
            (&[5][..], false),
        ] {
            let (id, _) = pool.pop_lru().unwrap();
            pool.register(id, key(root, tokens, full));
            pool.release(id);
        }
        assert_eq!(pool.best_child(root, &[1, 2, 9, 9]), Some((1, 3)));
        assert_eq!(pool.best_child(root, &[1, 2, 3, 7]), Some((0, 3)));
        assert_eq!(pool.best_child(root, &[8]), None);
        // [1, 2, 5] shares two tokens with both [1, 2, 3, 4] and [1, 2, 9]: the tie goes to the
        // one after it in token order.
        assert_eq!(pool.best_child(root, &[1, 2, 5]), Some((1, 2)));
        assert_eq!(pool.best_child(root, &[1, 2, 9, 9, 9]), Some((1, 3)));
        pool.check_invariants();
    }

    #[test]
    fn best_child_finds_the_longest_prefix_among_many_siblings() {
        // Random blocks under one parent, all starting with the same token (as every chat
        // prompt starts with the template's): the sorted lookup agrees with a scan of them all.
        let mut pool = BlockPool::new(64);
        let root = root_hash("m", None);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let mut held = Vec::new();
        for round in 0..2000 {
            let tokens: Vec<u32> = std::iter::once(1)
                .chain((0..next(6)).map(|_| next(3) as u32))
                .collect();
            if held.len() < 48 && next(3) > 0 {
                let (id, _) = pool.pop_lru().unwrap();
                let fresh = !held
                    .iter()
                    .any(|&h| pool.key(h).is_some_and(|k| k.tokens == tokens));
                assert_eq!(pool.register(id, key(root, &tokens, false)), fresh);
                held.push(id);
            } else if !held.is_empty() {
                let id = held.swap_remove(next(held.len() as u64) as usize);
                pool.unregister(id);
                pool.release(id);
            }
            let longest = held
                .iter()
                .filter_map(|&id| pool.key(id))
                .map(|k| {
                    k.tokens
                        .iter()
                        .zip(&tokens)
                        .take_while(|(a, b)| a == b)
                        .count()
                })
                .max();
            let found = pool.best_child(root, &tokens);
            assert_eq!(found.map(|(_, c)| c), longest, "round {round}: {tokens:?}");
            if let Some((id, c)) = found {
                assert!(held.contains(&id));
                assert_eq!(pool.key(id).unwrap().tokens[..c], tokens[..c]);
            }
            if round % 100 == 0 {
                pool.check_invariants();
            }
        }
        pool.check_invariants();
    }
}
