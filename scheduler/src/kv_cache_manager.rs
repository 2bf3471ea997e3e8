//! Per-sequence KV-cache policy over two tiers of blocks: prefix matching (full blocks by
//! chained hash, then token-granular reuse of a partially matching block), growth, commit of
//! computed blocks to the cache, LRU eviction to the host tier, and release.
//!
//! The manager never touches K/V data. Whenever data must move it appends a [`BlockCopy`] to
//! the caller's list; the runner executes the list in order before the step's forward pass.
//! Order matters and is respected by construction: a device block evicted to the host is copied
//! out before anything is copied into it, and every copy source is pinned while the copy's
//! destination is allocated.
//!
//! Invariants: a sequence's `blocks` cover its allocated positions in order; its first
//! `full_hashes.len()` blocks are full and indexed (or duplicates of indexed blocks); every block
//! a sequence holds has one reference from it. When all sequences are freed every device block
//! is free (cached or not): nothing leaks.

use rustc_hash::FxHashMap;

use crate::block_hash::{chain_hash, identity_key, root_hash, BlockHash, KeyFn};
use crate::block_pool::{BlockId, BlockKey, BlockPool};

/// Which tier a block is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loc {
    /// The compute device's KV storage.
    Device(BlockId),
    /// The host-memory second tier.
    Host(BlockId),
}

/// Copy the first `num_slots` slots of one block to another (all layers, K and V).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockCopy {
    /// Source block.
    pub src: Loc,
    /// Destination block.
    pub dst: Loc,
    /// Slots to copy.
    pub num_slots: usize,
}

/// How much of a prompt the cache served.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    /// Tokens whose K/V were already on the device.
    pub device_tokens: usize,
    /// Tokens whose K/V were brought back from the host tier.
    pub host_tokens: usize,
}

impl PrefixMatch {
    /// All tokens served from cache.
    pub fn total(&self) -> usize {
        self.device_tokens + self.host_tokens
    }
}

/// Not enough free device blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{needed} KV blocks needed, {free} free")]
pub struct OutOfBlocks {
    /// Blocks the request needed.
    pub needed: usize,
    /// Blocks that were free.
    pub free: usize,
}

/// Identifies a sequence to the manager.
pub type SeqId = u64;

/// Settings of the cache.
#[derive(Clone, Debug)]
pub struct KvCacheConfig {
    /// Tokens per block.
    pub block_size: usize,
    /// Blocks on the device.
    pub num_device_blocks: usize,
    /// Blocks in host memory (0 disables the tier).
    pub num_host_blocks: usize,
    /// Share prefixes between sequences.
    pub enable_prefix_caching: bool,
    /// Model identity, part of every key.
    pub model_id: String,
    /// Token-to-key map; [`identity_key`] except in tests that break it on purpose.
    pub key_fn: KeyFn,
}

impl KvCacheConfig {
    /// A config with prefix caching on, no host tier and the production key.
    pub fn new(block_size: usize, num_device_blocks: usize) -> KvCacheConfig {
        KvCacheConfig {
            block_size,
            num_device_blocks,
            num_host_blocks: 0,
            enable_prefix_caching: true,
            model_id: String::new(),
            key_fn: identity_key,
        }
    }
}

/// Counters of the cache since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Prompt tokens served from the device tier.
    pub device_hit_tokens: u64,
    /// Prompt tokens served from the host tier.
    pub host_hit_tokens: u64,
    /// Prompt tokens looked up.
    pub queried_tokens: u64,
    /// Device blocks copied out to the host tier.
    pub swapped_out_blocks: u64,
    /// Host blocks copied back to the device.
    pub swapped_in_blocks: u64,
    /// Cached device blocks whose contents were dropped without a host copy.
    pub evicted_blocks: u64,
}

#[derive(Clone, Debug)]
struct SeqState {
    root: BlockHash,
    blocks: Vec<BlockId>,
    full_hashes: Vec<BlockHash>,
}

/// The KV-cache manager.
#[derive(Clone, Debug)]
pub struct KvCacheManager {
    cfg: KvCacheConfig,
    device: BlockPool,
    host: BlockPool,
    seqs: FxHashMap<SeqId, SeqState>,
    stats: CacheStats,
}

impl KvCacheManager {
    /// An empty cache.
    pub fn new(cfg: KvCacheConfig) -> KvCacheManager {
        KvCacheManager {
            device: BlockPool::new(cfg.num_device_blocks),
            host: BlockPool::new(cfg.num_host_blocks),
            cfg,
            seqs: FxHashMap::default(),
            stats: CacheStats::default(),
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.cfg.block_size
    }

    /// The device tier.
    pub fn device(&self) -> &BlockPool {
        &self.device
    }

    /// The host tier.
    pub fn host(&self) -> &BlockPool {
        &self.host
    }

    /// Counters.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Device blocks held by live sequences.
    pub fn num_held_blocks(&self) -> usize {
        self.device.num_blocks() - self.device.num_free()
    }

    /// A sequence's block table.
    pub fn block_table(&self, seq: SeqId) -> &[BlockId] {
        self.seqs
            .get(&seq)
            .map(|s| s.blocks.as_slice())
            .unwrap_or(&[])
    }

    fn key_tokens(&self, tokens: &[u32]) -> Vec<u32> {
        tokens.iter().map(|&t| (self.cfg.key_fn)(t)).collect()
    }

    /// A fresh device block, evicting the least recently used free one; its cached contents
    /// go to the host tier when there is one.
    fn pop_device(&mut self, copies: &mut Vec<BlockCopy>) -> Option<BlockId> {
        let (id, evicted) = self.device.pop_lru()?;
        if let Some(key) = evicted {
            self.save_to_host(id, key, copies);
        }
        Some(id)
    }

    fn save_to_host(&mut self, id: BlockId, key: BlockKey, copies: &mut Vec<BlockCopy>) {
        if self.host.num_blocks() == 0 {
            self.stats.evicted_blocks += 1;
            return;
        }
        let existing = if key.full {
            self.host.lookup_full(key.parent, key.hash, &key.tokens)
        } else {
            self.host
                .best_child(key.parent, &key.tokens)
                .filter(|&(h, _)| self.host.key(h).is_some_and(|k| k.tokens == key.tokens))
                .map(|(h, _)| h)
        };
        if let Some(h) = existing {
            self.host.touch(h);
            return;
        }
        let Some((h, _)) = self.host.pop_lru() else {
            self.stats.evicted_blocks += 1;
            return;
        };
        copies.push(BlockCopy {
            src: Loc::Device(id),
            dst: Loc::Host(h),
            num_slots: key.tokens.len(),
        });
        self.host.register(h, key);
        self.host.release(h);
        self.stats.swapped_out_blocks += 1;
    }

    /// A fresh device block holding a copy of the first `num_slots` slots of `src`. The source
    /// is pinned while the destination is chosen, so eviction cannot pick it; `None` when no
    /// device block is free.
    fn copy_to_fresh_block(
        &mut self,
        src: Loc,
        num_slots: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Option<BlockId> {
        match src {
            Loc::Device(b) => self.device.acquire(b),
            Loc::Host(h) => self.host.acquire(h),
        }
        let fresh = self.pop_device(copies);
        match src {
            Loc::Device(b) => self.device.release(b),
            Loc::Host(h) => self.host.release(h),
        }
        let d = fresh?;
        copies.push(BlockCopy {
            src,
            dst: Loc::Device(d),
            num_slots,
        });
        if matches!(src, Loc::Host(_)) {
            self.stats.swapped_in_blocks += 1;
        }
        Some(d)
    }

    /// Start a sequence: take the longest cached prefix of `tokens`, at most `max_match`
    /// tokens, and return how much was served. Blocks for the matched prefix are held by the
    /// sequence; data movement (host tier, partial copies) is appended to `copies`.
    pub fn begin(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        cache_salt: Option<&str>,
        max_match: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> PrefixMatch {
        let root = root_hash(&self.cfg.model_id, cache_salt);
        let mut state = SeqState {
            root,
            blocks: Vec::new(),
            full_hashes: Vec::new(),
        };
        let mut m = PrefixMatch::default();
        let bs = self.cfg.block_size;
        let max_match = max_match.min(tokens.len());
        if self.cfg.enable_prefix_caching {
            let mut parent = root;
            let mut matched = 0;
            // Whole blocks, by chained hash.
            while matched + bs <= max_match {
                let key = self.key_tokens(&tokens[matched..matched + bs]);
                let hash = chain_hash(parent, &key);
                if let Some(b) = self.device.lookup_full(parent, hash, &key) {
                    self.device.acquire(b);
                    state.blocks.push(b);
                    m.device_tokens += bs;
                } else if let Some(h) = self.host.lookup_full(parent, hash, &key) {
                    let Some(d) = self.copy_to_fresh_block(Loc::Host(h), bs, copies) else {
                        break;
                    };
                    self.device.register(
                        d,
                        BlockKey {
                            parent,
                            hash,
                            tokens: key,
                            full: true,
                        },
                    );
                    state.blocks.push(d);
                    m.host_tokens += bs;
                } else {
                    break;
                }
                state.full_hashes.push(hash);
                parent = hash;
                matched += bs;
            }
            // Then the longest partial match inside one more block.
            if matched < max_match {
                let want = self.key_tokens(&tokens[matched..(matched + bs).min(max_match)]);
                let dev = self.device.best_child(parent, &want);
                let host = self.host.best_child(parent, &want);
                match (dev, host) {
                    (Some((b, c)), h) if h.is_none_or(|(_, hc)| c >= hc) => {
                        let adoptable = self.device.ref_count(b) == 0
                            && self.device.key(b).is_some_and(|k| !k.full);
                        if adoptable {
                            // Nobody holds it: take the block itself and overwrite its tail.
                            self.device.unregister(b);
                            self.device.acquire(b);
                            state.blocks.push(b);
                            m.device_tokens += c;
                        } else if let Some(d) = self.copy_to_fresh_block(Loc::Device(b), c, copies)
                        {
                            state.blocks.push(d);
                            m.device_tokens += c;
                        }
                    }
                    (_, Some((h, c))) => {
                        if let Some(d) = self.copy_to_fresh_block(Loc::Host(h), c, copies) {
                            state.blocks.push(d);
                            m.host_tokens += c;
                        }
                    }
                    _ => {}
                }
            }
        }
        self.stats.device_hit_tokens += m.device_tokens as u64;
        self.stats.host_hit_tokens += m.host_tokens as u64;
        self.stats.queried_tokens += tokens.len() as u64;
        self.seqs.insert(seq, state);
        m
    }

    /// Grow a sequence's blocks to cover `num_tokens` positions; all or nothing.
    pub fn allocate(
        &mut self,
        seq: SeqId,
        num_tokens: usize,
        copies: &mut Vec<BlockCopy>,
    ) -> Result<(), OutOfBlocks> {
        let have = self.seqs.get(&seq).map(|s| s.blocks.len());
        let needed = num_tokens
            .div_ceil(self.cfg.block_size)
            .saturating_sub(have.unwrap_or(0));
        if needed == 0 && have.is_some() {
            // A decode inside its last block: nothing to do (most steps of most sequences).
            return Ok(());
        }
        if needed > self.device.num_free() {
            return Err(OutOfBlocks {
                needed,
                free: self.device.num_free(),
            });
        }
        let mut fresh = Vec::with_capacity(needed);
        for _ in 0..needed {
            fresh.push(self.pop_device(copies).expect("free count checked above"));
        }
        self.seqs
            .entry(seq)
            .or_insert_with(|| SeqState {
                root: root_hash(&self.cfg.model_id, None),
                blocks: Vec::new(),
                full_hashes: Vec::new(),
            })
            .blocks
            .extend(fresh);
        Ok(())
    }

    /// Index block `i` of a sequence as holding `tokens` (all its slots when there are
    /// `block_size` of them) after the sequence's full blocks; returns its hash.
    fn index_block(&mut self, state: &SeqState, i: usize, tokens: &[u32]) -> BlockHash {
        let parent = state.full_hashes.last().copied().unwrap_or(state.root);
        let key = self.key_tokens(tokens);
        let hash = chain_hash(parent, &key);
        let full = tokens.len() == self.cfg.block_size;
        self.device.register(
            state.blocks[i],
            BlockKey {
                parent,
                hash,
                tokens: key,
                full,
            },
        );
        hash
    }

    /// Index the blocks that `num_computed` computed tokens have filled, so other sequences can
    /// share them. `tokens` are the sequence's tokens (at least `num_computed`).
    pub fn commit(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let bs = self.cfg.block_size;
        // Most steps fill no new block: nothing to index (and the entry stays where it is).
        let Some(state) = self.seqs.get(&seq) else {
            return;
        };
        if state.full_hashes.len() >= (num_computed / bs).min(state.blocks.len()) {
            return;
        }
        let Some(mut state) = self.seqs.remove(&seq) else {
            return;
        };
        while state.full_hashes.len() < num_computed / bs
            && state.full_hashes.len() < state.blocks.len()
        {
            let i = state.full_hashes.len();
            let hash = self.index_block(&state, i, &tokens[i * bs..(i + 1) * bs]);
            state.full_hashes.push(hash);
        }
        self.seqs.insert(seq, state);
    }

    /// End a sequence: index its computed blocks, including the last partial one, then release
    /// every block, tail first, so shared heads stay cached longest.
    pub fn free(&mut self, seq: SeqId, tokens: &[u32], num_computed: usize) {
        self.commit(seq, tokens, num_computed);
        let Some(state) = self.seqs.remove(&seq) else {
            return;
        };
        let bs = self.cfg.block_size;
        let i = state.full_hashes.len();
        if self.cfg.enable_prefix_caching
            && i == num_computed / bs
            && !num_computed.is_multiple_of(bs)
            && i < state.blocks.len()
        {
            self.index_block(&state, i, &tokens[i * bs..num_computed]);
        }
        for &b in state.blocks.iter().rev() {
            self.device.release(b);
        }
    }

    /// End a sequence without indexing anything more of it (scratch work): its blocks are
    /// released, tail first; blocks it shared through the cache stay cached.
    pub fn discard(&mut self, seq: SeqId) {
        let Some(state) = self.seqs.remove(&seq) else {
            return;
        };
        for &b in state.blocks.iter().rev() {
            self.device.release(b);
        }
    }

    /// Check the pools' invariants and that references equal the sequences' holdings.
    pub fn check_invariants(&self) {
        self.device.check_invariants();
        self.host.check_invariants();
        let mut refs = vec![0u32; self.device.num_blocks()];
        for s in self.seqs.values() {
            for &b in &s.blocks {
                refs[b as usize] += 1;
            }
        }
        for (b, &r) in refs.iter().enumerate() {
            assert_eq!(
                self.device.ref_count(b as BlockId),
                r,
                "device block {b}: references vs holders"
            );
        }
        for h in 0..self.host.num_blocks() {
            assert_eq!(
                self.host.ref_count(h as BlockId),
                0,
                "host block {h} is held outside a copy"
            );
        }
    }
}
