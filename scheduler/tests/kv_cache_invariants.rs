//! Seeded random operations on the KV-cache manager (begin with prefix hits, grow, compute,
//! decode, free, abort, evict and swap through the host tier) against a model of the K/V data.
//!
//! Each simulated slot holds a tag: the hash of the whole token prefix that produced it. After
//! every operation: the pools' invariants hold (no negative or stray references, no block both
//! free and held, indexes consistent), every position a sequence counts as computed holds the
//! tag of that sequence's own prefix (so a wrong hit or a lost copy is caught), every cached
//! block on either tier holds the tags its key stands for (host and device agree), and device
//! LRU order is exact. At the end nothing leaks.

use std::collections::{BTreeMap, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};

use convoy_scheduler::block_hash::{chain_hash, root_hash};
use convoy_scheduler::{BlockCopy, BlockHash, KvCacheConfig, KvCacheManager, Loc};

use rand_core::{RngCore, SeedableRng};

struct Rng(rand_xoshiro::SplitMix64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(rand_xoshiro::SplitMix64::seed_from_u64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn tag(prefix: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    prefix.hash(&mut h);
    h.finish()
}

struct Sim {
    m: KvCacheManager,
    bs: usize,
    device: Vec<Vec<Option<u64>>>,
    host: Vec<Vec<Option<u64>>>,
    /// Token prefix behind each chain hash seen so far.
    prefix_of: HashMap<BlockHash, Vec<u32>>,
    seqs: BTreeMap<u64, (Vec<u32>, usize)>,
    used: Vec<u32>,
}

impl Sim {
    fn apply(&mut self, copies: &[BlockCopy]) {
        for c in copies {
            if let Loc::Device(b) = c.src {
                self.used.push(b);
            }
            let src: Vec<Option<u64>> = match c.src {
                Loc::Device(b) => self.device[b as usize][..c.num_slots].to_vec(),
                Loc::Host(b) => self.host[b as usize][..c.num_slots].to_vec(),
            };
            let dst = match c.dst {
                Loc::Device(b) => &mut self.device[b as usize],
                Loc::Host(b) => &mut self.host[b as usize],
            };
            dst[..c.num_slots].copy_from_slice(&src);
        }
    }

    /// The forward pass: write the tags of positions `from..to` into the sequence's slots.
    fn compute(&mut self, id: u64, from: usize, to: usize) {
        let table = self.m.block_table(id).to_vec();
        let tokens = self.seqs[&id].0.clone();
        for p in from..to {
            self.device[table[p / self.bs] as usize][p % self.bs] = Some(tag(&tokens[..=p]));
        }
        // Remember the prefix behind every full-block chain hash of this sequence.
        let mut parent = root_hash("", None);
        for b in 0..to / self.bs {
            self.prefix_of
                .entry(parent)
                .or_insert_with(|| tokens[..b * self.bs].to_vec());
            parent = chain_hash(parent, &tokens[b * self.bs..(b + 1) * self.bs]);
        }
        self.prefix_of
            .entry(parent)
            .or_insert_with(|| tokens[..to / self.bs * self.bs].to_vec());
    }

    /// `used`: device blocks this operation read as a copy source (a hit moves them to the
    /// most recently used end).
    fn check(&self, prev_lru: &[u32], used: &[u32]) -> Vec<u32> {
        self.m.check_invariants();
        for (id, (tokens, computed)) in &self.seqs {
            let table = self.m.block_table(*id);
            for p in 0..*computed {
                assert_eq!(
                    self.device[table[p / self.bs] as usize][p % self.bs],
                    Some(tag(&tokens[..=p])),
                    "seq {id} position {p}"
                );
            }
        }
        for (tier, slots) in [(self.m.device(), &self.device), (self.m.host(), &self.host)] {
            for (b, block_slots) in slots.iter().enumerate() {
                if let Some(key) = tier.key(b as u32) {
                    let prefix = &self.prefix_of[&key.parent];
                    for (i, _) in key.tokens.iter().enumerate() {
                        let mut full = prefix.clone();
                        full.extend_from_slice(&key.tokens[..=i]);
                        assert_eq!(
                            block_slots[i],
                            Some(tag(&full)),
                            "cached block {b} slot {i}"
                        );
                    }
                }
            }
        }
        // Exact LRU: blocks free before and after keep their order and precede newly freed ones.
        let now = self.m.device().lru_order();
        let before: std::collections::HashSet<u32> = prev_lru
            .iter()
            .copied()
            .filter(|b| !used.contains(b))
            .collect();
        let kept: Vec<u32> = prev_lru
            .iter()
            .copied()
            .filter(|b| now.contains(b) && !used.contains(b))
            .collect();
        let n_kept = now.iter().filter(|b| before.contains(b)).count();
        assert_eq!(
            &now[..n_kept],
            &kept[..],
            "LRU order of blocks that stayed free"
        );
        now
    }
}

fn run(seed: u64, ops: usize, bs: usize, device: usize, host: usize) {
    let mut rng = Rng::new(seed);
    let mut cfg = KvCacheConfig::new(bs, device);
    cfg.num_host_blocks = host;
    let mut sim = Sim {
        m: KvCacheManager::new(cfg),
        bs,
        device: vec![vec![None; bs]; device],
        host: vec![vec![None; bs]; host],
        prefix_of: HashMap::new(),
        seqs: BTreeMap::new(),
        used: Vec::new(),
    };
    // Conversations: sequences extend earlier ones, as chat turns do.
    let mut history: Vec<Vec<u32>> = vec![vec![]];
    let mut next_id = 0u64;
    let mut lru = sim.m.device().lru_order();
    let mut hits = 0usize;
    for _ in 0..ops {
        let op = rng.below(10);
        if op < 3 && sim.seqs.len() < 5 {
            let base = history[rng.below(history.len())].clone();
            let keep = if base.is_empty() {
                0
            } else {
                rng.below(base.len() + 1)
            };
            let mut tokens = base[..keep].to_vec();
            for _ in 0..1 + rng.below(3 * bs) {
                tokens.push(rng.below(4) as u32);
            }
            let mut copies = Vec::new();
            let id = next_id;
            next_id += 1;
            let hit = sim
                .m
                .begin(id, &tokens, None, tokens.len() - 1, &mut copies);
            hits += hit.total();
            sim.apply(&copies);
            sim.seqs.insert(id, (tokens, hit.total()));
        } else if op < 7 && !sim.seqs.is_empty() {
            // Compute a chunk, or decode one new token when the prompt is done.
            let id = *sim.seqs.keys().nth(rng.below(sim.seqs.len())).unwrap();
            let (len, computed) = (sim.seqs[&id].0.len(), sim.seqs[&id].1);
            if computed == len {
                let t = rng.below(4) as u32;
                sim.seqs.get_mut(&id).unwrap().0.push(t);
            }
            let len = sim.seqs[&id].0.len();
            let to = (computed + 1 + rng.below(2 * bs)).min(len);
            let mut copies = Vec::new();
            if sim.m.allocate(id, to, &mut copies).is_ok() {
                sim.apply(&copies);
                sim.compute(id, computed, to);
                sim.seqs.get_mut(&id).unwrap().1 = to;
                let tokens = sim.seqs[&id].0.clone();
                sim.m.commit(id, &tokens, to);
            } else {
                assert!(copies.is_empty(), "a refused allocation moves nothing");
            }
        } else if !sim.seqs.is_empty() {
            let id = *sim.seqs.keys().nth(rng.below(sim.seqs.len())).unwrap();
            let (tokens, computed) = sim.seqs.remove(&id).unwrap();
            if op == 9 {
                sim.m.discard(id); // abort
            } else {
                sim.m.free(id, &tokens, computed);
                history.push(tokens[..computed].to_vec());
                if history.len() > 12 {
                    history.remove(1);
                }
            }
        }
        lru = sim.check(&lru, &sim.used);
        sim.used.clear();
    }
    for (id, (tokens, computed)) in std::mem::take(&mut sim.seqs) {
        sim.m.free(id, &tokens, computed);
    }
    sim.check(&lru, &[]);
    assert_eq!(sim.m.device().num_free(), device, "no block leaks");
    assert!(hits > 0, "the workload must exercise prefix hits");
    let stats = sim.m.stats();
    if host > 0 {
        assert!(
            stats.swapped_out_blocks > 0 && stats.swapped_in_blocks > 0,
            "host tier exercised: {stats:?}"
        );
    }
}

#[test]
fn hundred_thousand_random_operations_keep_every_invariant() {
    run(1, 40_000, 4, 24, 16);
    run(2, 30_000, 1, 20, 10);
    run(3, 30_000, 3, 16, 32);
}

#[test]
fn without_a_host_tier() {
    run(4, 10_000, 2, 12, 0);
}
