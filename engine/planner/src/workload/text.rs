//! Synthetic prompt text: seeded sequences of common English words. Lengths are in words, not
//! tokens: SmolLM2's tokenizer makes 1.115 tokens of a word (a profile's `tokens_per_word`);
//! the real count is whatever the daemon reports in `usage`.
//! The same seed and length give the same text; a longer text with the same seed starts with
//! the shorter one, so a persona's text is a stable prefix.

use rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

const WORDS: [&str; 64] = [
    "the",
    "sea",
    "was",
    "calm",
    "and",
    "we",
    "walked",
    "along",
    "old",
    "harbour",
    "wall",
    "while",
    "gulls",
    "called",
    "over",
    "boats",
    "that",
    "rocked",
    "in",
    "grey",
    "water",
    "my",
    "friend",
    "told",
    "me",
    "about",
    "her",
    "village",
    "where",
    "every",
    "house",
    "had",
    "a",
    "red",
    "door",
    "small",
    "garden",
    "full",
    "of",
    "roses",
    "she",
    "said",
    "people",
    "there",
    "still",
    "bake",
    "bread",
    "each",
    "morning",
    "share",
    "it",
    "with",
    "their",
    "neighbours",
    "before",
    "going",
    "to",
    "work",
    "on",
    "fields",
    "near",
    "river",
    "long",
    "ago",
];

/// About `tokens` tokens of text drawn from `seed`.
pub fn synthetic_text(seed: u64, tokens: usize) -> String {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut s = String::with_capacity(tokens * 6);
    for i in 0..tokens {
        let w = WORDS[(rng.next_u32() % WORDS.len() as u32) as usize];
        if i > 0 {
            s.push(if i % 12 == 11 { '.' } else { ' ' });
            if i % 12 == 11 {
                s.push(' ');
            }
        }
        s.push_str(w);
    }
    s
}

/// `n` token ids in `lo..hi` drawn from `seed` (the simulator's stand-in for a text); a prefix
/// property like [`synthetic_text`]'s holds.
pub fn synthetic_ids(seed: u64, n: usize, lo: u32, hi: u32) -> Vec<u32> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let span = hi.saturating_sub(lo).max(1);
    (0..n).map(|_| lo + rng.next_u32() % span).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_and_prefix_stable() {
        assert_eq!(synthetic_text(7, 40), synthetic_text(7, 40));
        assert_ne!(synthetic_text(7, 40), synthetic_text(8, 40));
        assert!(synthetic_text(7, 40).starts_with(&synthetic_text(7, 20)));
        assert_eq!(synthetic_text(7, 40).split_whitespace().count(), 40);
        let ids = synthetic_ids(3, 50, 100, 200);
        assert!(ids.iter().all(|&t| (100..200).contains(&t)));
        assert_eq!(&synthetic_ids(3, 20, 100, 200)[..], &ids[..20]);
    }
}
