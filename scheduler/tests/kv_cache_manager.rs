//! Hand-written sequences of requests with exact expectations: which blocks are allocated,
//! hit, copied, evicted and in which order.

use convoy_scheduler::{BlockCopy, KvCacheConfig, KvCacheManager, Loc, PrefixMatch};

fn manager(bs: usize, device: usize, host: usize) -> KvCacheManager {
    let mut cfg = KvCacheConfig::new(bs, device);
    cfg.num_host_blocks = host;
    KvCacheManager::new(cfg)
}

fn run(m: &mut KvCacheManager, seq: u64, tokens: &[u32]) -> (PrefixMatch, Vec<BlockCopy>) {
    let mut copies = Vec::new();
    let hit = m.begin(seq, tokens, None, tokens.len() - 1, &mut copies);
    m.allocate(seq, tokens.len(), &mut copies).unwrap();
    m.commit(seq, tokens, tokens.len());
    m.check_invariants();
    (hit, copies)
}

#[test]
fn second_turn_hits_full_blocks_and_adopts_the_partial_tail() {
    let mut m = manager(4, 8, 0);
    let turn1: Vec<u32> = (1..=10).collect();
    let (hit, copies) = run(&mut m, 1, &turn1);
    assert_eq!(hit, PrefixMatch::default());
    assert!(copies.is_empty());
    assert_eq!(m.block_table(1), &[0, 1, 2]);
    m.free(1, &turn1, 10);
    // Released tail first: block 2 is the least recently used of the three.
    assert_eq!(m.device().lru_order(), vec![3, 4, 5, 6, 7, 2, 1, 0]);
    assert_eq!(m.device().num_cached(), 3);

    // Turn 2 = turn 1 + 3 new tokens: two full blocks hit, the partial block [9, 10] is
    // adopted (nobody holds it), so 10 of 13 tokens come from cache.
    let turn2: Vec<u32> = (1..=13).collect();
    let (hit, copies) = run(&mut m, 2, &turn2);
    assert_eq!(
        hit,
        PrefixMatch {
            device_tokens: 10,
            host_tokens: 0
        }
    );
    assert!(copies.is_empty());
    assert_eq!(m.block_table(2), &[0, 1, 2, 3]);
    m.free(2, &turn2, 13);
    assert_eq!(m.device().num_free(), 8);
}

#[test]
fn a_held_block_is_copied_not_adopted() {
    let mut m = manager(4, 8, 0);
    let a: Vec<u32> = (1..=12).collect();
    run(&mut m, 1, &a); // holds full blocks 0, 1, 2
                        // B's prompt ends inside A's third block: full blocks 0 and 1 are shared, the one matching
                        // slot of block 2 is copied into a fresh block (A still holds block 2).
    let b: Vec<u32> = (1..=10).collect();
    let mut copies = Vec::new();
    let hit = m.begin(2, &b, None, 9, &mut copies);
    assert_eq!(hit.device_tokens, 9);
    assert_eq!(
        copies,
        vec![BlockCopy {
            src: Loc::Device(2),
            dst: Loc::Device(3),
            num_slots: 1
        }]
    );
    assert_eq!(m.block_table(2), &[0, 1, 3]);
    assert_eq!(m.device().ref_count(0), 2);
    m.check_invariants();
    m.free(1, &a, 12);
    m.free(2, &b, 10);
    assert_eq!(m.device().num_free(), 8);
    m.check_invariants();
}

#[test]
fn different_salts_never_share() {
    let mut m = manager(2, 8, 0);
    let t: Vec<u32> = vec![5, 6, 7, 8, 9];
    let mut copies = Vec::new();
    m.begin(1, &t, Some("alice"), 4, &mut copies);
    m.allocate(1, 5, &mut copies).unwrap();
    m.free(1, &t, 5);
    assert_eq!(m.begin(2, &t, Some("bob"), 4, &mut copies).total(), 0);
    assert_eq!(m.begin(3, &t, Some("alice"), 4, &mut copies).total(), 4);
}

#[test]
fn evicted_blocks_go_to_the_host_tier_and_come_back() {
    let mut m = manager(2, 4, 4);
    let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6];
    run(&mut m, 1, &a); // blocks 0 [1,2], 1 [3,4], 2 [5,6]
    m.free(1, &a, 6);
    assert_eq!(m.device().lru_order(), vec![3, 2, 1, 0]);
    // B needs three blocks: 3 (uncached), then 2 and 1, whose contents go to host blocks 0, 1.
    let b: Vec<u32> = vec![9, 9, 9, 9, 9, 9];
    let (_, copies) = run(&mut m, 2, &b);
    assert_eq!(m.block_table(2), &[3, 2, 1]);
    assert_eq!(
        copies,
        vec![
            BlockCopy {
                src: Loc::Device(2),
                dst: Loc::Host(0),
                num_slots: 2
            },
            BlockCopy {
                src: Loc::Device(1),
                dst: Loc::Host(1),
                num_slots: 2
            },
        ]
    );
    m.free(2, &b, 6);
    // A again: block 0 is still on the device, [3,4] and [5,6] come back from the host; the last
    // prompt token is computed, so 5 of 6 tokens are served (one slot of the last block).
    let mut copies = Vec::new();
    let hit = m.begin(3, &a, None, 5, &mut copies);
    assert_eq!(
        hit,
        PrefixMatch {
            device_tokens: 2,
            host_tokens: 3
        }
    );
    // Bringing them back needs device blocks; the least recently used ones hold B's blocks,
    // which in turn are saved to the host before being overwritten.
    let swap_ins: Vec<BlockCopy> = copies
        .iter()
        .copied()
        .filter(|c| matches!(c.src, Loc::Host(_)))
        .collect();
    assert_eq!(
        swap_ins,
        vec![
            BlockCopy {
                src: Loc::Host(1),
                dst: Loc::Device(1),
                num_slots: 2
            },
            BlockCopy {
                src: Loc::Host(0),
                dst: Loc::Device(2),
                num_slots: 1
            },
        ]
    );
    assert_eq!(
        copies[0],
        BlockCopy {
            src: Loc::Device(1),
            dst: Loc::Host(2),
            num_slots: 2
        }
    );
    // Every swap-out of a block comes before the swap-in that overwrites it.
    for (i, c) in copies.iter().enumerate() {
        if let Loc::Device(d) = c.dst {
            assert!(
                copies[..i].iter().any(|o| o.src == Loc::Device(d)),
                "block {d} saved first"
            );
        }
    }
    m.check_invariants();
}

#[test]
fn allocation_is_all_or_nothing() {
    let mut m = manager(4, 2, 0);
    let mut copies = Vec::new();
    m.begin(1, &[1; 12], None, 0, &mut copies);
    let err = m.allocate(1, 12, &mut copies).unwrap_err();
    assert_eq!((err.needed, err.free), (3, 2));
    assert_eq!(m.block_table(1), &[] as &[u32]);
    assert_eq!(m.device().num_free(), 2);
}
