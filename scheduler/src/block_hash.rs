//! Identity of cached KV blocks: a 64-bit hash chained over (parent hash, the block's key
//! tokens), rooted in the extra keys (model id, optional per-request cache salt).
//!
//! A hash only finds candidates: every hit is confirmed by comparing the stored key tokens and
//! parent, so a hash collision can never serve the wrong K/V.

use std::hash::{DefaultHasher, Hash, Hasher};

/// Hash of a block, chained over all tokens before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub u64);

/// Maps a token id to the id the cache key uses for it. The identity in production; tests
/// swap in a broken map (e.g. one that forgets message contents) to prove that the
/// cached-equals-recomputed oracle catches a wrong key.
pub type KeyFn = fn(u32) -> u32;

/// The production key: every token counts.
pub fn identity_key(t: u32) -> u32 {
    t
}

/// The hash every sequence's first block chains from.
pub fn root_hash(model_id: &str, cache_salt: Option<&str>) -> BlockHash {
    let mut h = DefaultHasher::new();
    "convoy-kv-root".hash(&mut h);
    model_id.hash(&mut h);
    cache_salt.hash(&mut h);
    BlockHash(h.finish())
}

/// The hash of a block holding `key_tokens` after the prefix hashed as `parent`.
pub fn chain_hash(parent: BlockHash, key_tokens: &[u32]) -> BlockHash {
    let mut h = DefaultHasher::new();
    parent.0.hash(&mut h);
    key_tokens.hash(&mut h);
    BlockHash(h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_depends_on_parent_tokens_and_salt() {
        let r = root_hash("m", None);
        assert_ne!(r, root_hash("m", Some("alice")));
        assert_ne!(r, root_hash("other", None));
        let a = chain_hash(r, &[1, 2, 3]);
        assert_eq!(a, chain_hash(r, &[1, 2, 3]));
        assert_ne!(a, chain_hash(r, &[1, 2, 4]));
        assert_ne!(chain_hash(a, &[5]), chain_hash(r, &[5]));
    }
}
