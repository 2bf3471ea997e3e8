//! The truncation algorithm, over numbers only: each part's token count and priority in, which
//! parts stay out. See docs/prompts.md for the rules and a worked example.

use super::PromptError;

/// How many tokens the parts may take, and the step the cut is rounded up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Most tokens the kept parts may take together (each part counted alone).
    pub token_limit: usize,
    /// The cut is rounded up to a multiple of this (at least 1).
    pub truncation_step: usize,
}

impl Budget {
    /// A budget; `truncation_step` defaults to 1 (cut exactly to the limit). A step of 0 is
    /// refused.
    pub fn new(token_limit: usize, truncation_step: Option<usize>) -> Result<Budget, PromptError> {
        let truncation_step = truncation_step.unwrap_or(1);
        if truncation_step == 0 {
            return Err(PromptError::InvalidParameter {
                message: "truncation_step must be at least 1".to_string(),
            });
        }
        Ok(Budget {
            token_limit,
            truncation_step,
        })
    }
}

/// One part as the algorithm sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartSize {
    /// Tokens of the part's content, tokenized alone.
    pub tokens: usize,
    /// 0 = never cut; higher numbers are cut first.
    pub priority: u32,
}

/// What truncation kept, and the numbers behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    /// One flag per part, in document order: `true` when the part is kept.
    pub kept: Vec<bool>,
    /// Sum of all parts' tokens.
    pub tokens_before: usize,
    /// Sum of the kept parts' tokens.
    pub tokens_after: usize,
    /// `max(0, tokens_before - token_limit)` (0 without a budget).
    pub surplus: usize,
    /// The surplus rounded up to a multiple of the step: the tokens truncation set out to remove.
    pub cut_target: usize,
    /// Tokens actually removed (`tokens_before - tokens_after`); at least `cut_target` when
    /// something was cut, since parts are removed whole.
    pub tokens_removed: usize,
    /// Sum of the tokens of priority-0 parts, which are never cut.
    pub never_cut_tokens: usize,
}

impl Truncation {
    /// Keep everything (no budget).
    pub fn keep_all(parts: &[PartSize]) -> Truncation {
        let tokens_before = parts.iter().map(|p| p.tokens).sum();
        Truncation {
            kept: vec![true; parts.len()],
            tokens_before,
            tokens_after: tokens_before,
            surplus: 0,
            cut_target: 0,
            tokens_removed: 0,
            never_cut_tokens: never_cut(parts),
        }
    }

    /// Indices of the parts that were cut, in document order.
    pub fn cut_indices(&self) -> Vec<usize> {
        self.kept
            .iter()
            .enumerate()
            .filter(|(_, k)| !**k)
            .map(|(i, _)| i)
            .collect()
    }
}

fn never_cut(parts: &[PartSize]) -> usize {
    parts
        .iter()
        .filter(|p| p.priority == 0)
        .map(|p| p.tokens)
        .sum()
}

/// A run of adjacent parts with the same priority.
#[derive(Clone, Copy, Debug)]
struct Block {
    start: usize,
    end: usize,
    priority: u32,
    tokens: usize,
}

fn blocks(parts: &[PartSize]) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        match out.last_mut() {
            Some(b) if b.priority == p.priority => {
                b.end = i + 1;
                b.tokens += p.tokens;
            }
            _ => out.push(Block {
                start: i,
                end: i + 1,
                priority: p.priority,
                tokens: p.tokens,
            }),
        }
    }
    out
}

/// Truncate `parts` to `budget`:
///
/// 1. `surplus = max(0, size - token_limit)`; 0 cuts nothing.
/// 2. `cut = ceil(surplus / step) * step`.
/// 3. Adjacent parts of equal priority form blocks; priority-0 blocks are never touched.
/// 4. Blocks are visited from the highest priority down, in document order among equal
///    priorities. A block of at most the remaining cut is removed whole; otherwise its parts are
///    removed from its start until the removed tokens reach the remaining cut, and truncation
///    stops. Truncation also stops when the remaining cut reaches 0.
/// 5. If the kept parts still exceed the limit, [`PromptError::PromptTooLong`].
pub fn truncate(parts: &[PartSize], budget: Budget) -> Result<Truncation, PromptError> {
    let mut t = Truncation::keep_all(parts);
    t.surplus = t.tokens_before.saturating_sub(budget.token_limit);
    if t.surplus == 0 {
        return Ok(t);
    }
    let step = budget.truncation_step.max(1);
    t.cut_target = t.surplus.div_ceil(step).saturating_mul(step);

    let mut order: Vec<Block> = blocks(parts)
        .into_iter()
        .filter(|b| b.priority > 0)
        .collect();
    // Stable sort: document order is kept among equal priorities.
    order.sort_by_key(|b| std::cmp::Reverse(b.priority));

    let mut remaining = t.cut_target;
    for block in order {
        if remaining == 0 {
            break;
        }
        if block.tokens <= remaining {
            t.kept[block.start..block.end].fill(false);
            remaining -= block.tokens;
            continue;
        }
        let mut removed = 0usize;
        let block_parts = parts[block.start..block.end].iter();
        for (kept, part) in t.kept[block.start..block.end].iter_mut().zip(block_parts) {
            if removed >= remaining {
                break;
            }
            *kept = false;
            removed += part.tokens;
        }
        remaining = 0;
    }

    t.tokens_after = parts
        .iter()
        .zip(&t.kept)
        .filter(|(_, k)| **k)
        .map(|(p, _)| p.tokens)
        .sum();
    t.tokens_removed = t.tokens_before - t.tokens_after;
    if t.tokens_after > budget.token_limit {
        return Err(PromptError::PromptTooLong {
            token_limit: budget.token_limit,
            never_cut_tokens: t.never_cut_tokens,
            tokens_before: t.tokens_before,
        });
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(spec: &[(usize, u32)]) -> Vec<PartSize> {
        spec.iter()
            .map(|&(tokens, priority)| PartSize { tokens, priority })
            .collect()
    }

    fn budget(limit: usize, step: usize) -> Budget {
        Budget::new(limit, Some(step)).unwrap()
    }

    fn kept(t: &Truncation) -> String {
        t.kept.iter().map(|k| if *k { 'K' } else { '-' }).collect()
    }

    #[test]
    fn nothing_is_cut_when_the_prompt_fits() {
        let p = parts(&[(10, 0), (20, 1), (30, 2)]);
        let t = truncate(&p, budget(60, 50)).unwrap();
        assert_eq!(kept(&t), "KKK");
        assert_eq!((t.tokens_before, t.tokens_after), (60, 60));
        assert_eq!((t.surplus, t.cut_target, t.tokens_removed), (0, 0, 0));
        assert_eq!(t.never_cut_tokens, 10);
        assert!(t.cut_indices().is_empty());
    }

    #[test]
    fn highest_priority_is_cut_first() {
        // Surplus 5: the priority-3 part goes, priorities 1 and 2 stay.
        let p = parts(&[(10, 0), (10, 1), (10, 3), (10, 2)]);
        let t = truncate(&p, budget(35, 1)).unwrap();
        assert_eq!(kept(&t), "KK-K");
        assert_eq!((t.surplus, t.cut_target, t.tokens_after), (5, 5, 30));
        assert_eq!(t.cut_indices(), vec![2]);
        // Surplus 15: priority 3 whole (10), then priority 2 (10 > 5 left) from its start.
        let t = truncate(&p, budget(25, 1)).unwrap();
        assert_eq!(kept(&t), "KK--");
        assert_eq!((t.surplus, t.cut_target, t.tokens_after), (15, 15, 20));
    }

    #[test]
    fn the_cut_is_rounded_up_to_the_step() {
        // Ten parts of 10 tokens at priority 1 after a 5-token part that is never cut.
        let mut spec = vec![(5, 0)];
        spec.extend(std::iter::repeat_n((10, 1), 10));
        let p = parts(&spec);
        // Surplus 1 with step 1: one part goes.
        let t = truncate(&p, budget(104, 1)).unwrap();
        assert_eq!((t.surplus, t.cut_target, t.tokens_after), (1, 1, 95));
        assert_eq!(kept(&t), "K-KKKKKKKKK");
        // Surplus 1 with step 32: the cut is 32, which takes four parts (40 >= 32).
        let t = truncate(&p, budget(104, 32)).unwrap();
        assert_eq!((t.surplus, t.cut_target, t.tokens_after), (1, 32, 65));
        assert_eq!(kept(&t), "K----KKKKKK");
        // Surplus 33 with step 32: the cut is 64, seven parts (70 >= 64).
        let t = truncate(&p, budget(72, 32)).unwrap();
        assert_eq!((t.surplus, t.cut_target, t.tokens_after), (33, 64, 35));
        assert_eq!(kept(&t), "K-------KKK");
        // A surplus that is a multiple of the step is not rounded further.
        let t = truncate(&p, budget(41, 32)).unwrap();
        assert_eq!((t.surplus, t.cut_target), (64, 64));
    }

    #[test]
    fn adjacent_equal_priorities_form_one_block_removed_whole() {
        // Priority 2 at 1..3 is one block of 12 tokens; the cut of 12 removes it whole and
        // stops, leaving the separate priority-2 part at 4 alone.
        let p = parts(&[(10, 0), (5, 2), (7, 2), (10, 0), (6, 2)]);
        let t = truncate(&p, budget(26, 1)).unwrap();
        assert_eq!(kept(&t), "K--KK");
        assert_eq!((t.cut_target, t.tokens_after), (12, 26));
    }

    #[test]
    fn equal_priority_blocks_are_visited_in_document_order() {
        // Two priority-1 blocks split by a never-cut part: the earlier block goes first.
        let p = parts(&[(8, 1), (8, 1), (4, 0), (8, 1), (8, 1)]);
        let t = truncate(&p, budget(20, 1)).unwrap();
        assert_eq!(kept(&t), "--KKK");
        // One more token of surplus: the first block whole (16), then one part of the second.
        let t = truncate(&p, budget(19, 1)).unwrap();
        assert_eq!(kept(&t), "--K-K");
        assert_eq!(
            (t.cut_target, t.tokens_removed, t.tokens_after),
            (17, 24, 12)
        );
    }

    #[test]
    fn a_block_larger_than_the_cut_loses_parts_from_its_start_only() {
        // Block of priority 1 with parts 3, 4, 5, 6; cut 6: 3 (<6), 3+4=7 (>=6) stop.
        let p = parts(&[(10, 0), (3, 1), (4, 1), (5, 1), (6, 1), (2, 0)]);
        let t = truncate(&p, budget(24, 1)).unwrap();
        assert_eq!(kept(&t), "K--KKK");
        assert_eq!((t.surplus, t.cut_target, t.tokens_removed), (6, 6, 7));
        assert_eq!(t.tokens_after, 23);
    }

    #[test]
    fn partial_removal_stops_truncation_even_if_lower_blocks_remain() {
        // Priority 2 block (20) is bigger than the cut (5): one of its parts goes and the
        // priority-1 part is not touched.
        let p = parts(&[(1, 1), (10, 2), (10, 2)]);
        let t = truncate(&p, budget(16, 1)).unwrap();
        assert_eq!(kept(&t), "K-K");
    }

    #[test]
    fn never_cut_parts_stay_even_when_the_cut_is_larger_than_the_rest() {
        let p = parts(&[(30, 0), (10, 1), (30, 0), (10, 2)]);
        // Surplus 1, step 100: the cut (100) exceeds all cuttable tokens (20); both go.
        let t = truncate(&p, budget(79, 100)).unwrap();
        assert_eq!(kept(&t), "K-K-");
        assert_eq!(
            (t.cut_target, t.tokens_removed, t.tokens_after),
            (100, 20, 60)
        );
        assert_eq!(t.never_cut_tokens, 60);
    }

    #[test]
    fn too_long_when_the_never_cut_parts_exceed_the_limit() {
        let p = parts(&[(30, 0), (10, 1), (30, 0)]);
        let e = truncate(&p, budget(59, 8)).unwrap_err();
        match &e {
            PromptError::PromptTooLong {
                token_limit,
                never_cut_tokens,
                tokens_before,
            } => assert_eq!(
                (*token_limit, *never_cut_tokens, *tokens_before),
                (59, 60, 70)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(e.code(), "prompt_too_long");
        let msg = e.to_string();
        assert!(msg.contains("token_limit 59"), "{msg}");
        assert!(msg.contains("60 tokens"), "{msg}");
        // Exactly at the limit is fine.
        let t = truncate(&p, budget(60, 8)).unwrap();
        assert_eq!(kept(&t), "K-K");
    }

    #[test]
    fn zero_step_is_refused_and_no_step_means_one() {
        let e = Budget::new(10, Some(0)).unwrap_err();
        assert_eq!(e.code(), "invalid_parameter");
        assert_eq!(Budget::new(10, None).unwrap().truncation_step, 1);
    }

    #[test]
    fn empty_prompt_and_zero_token_parts() {
        let t = truncate(&[], budget(0, 4)).unwrap();
        assert!(t.kept.is_empty());
        // A zero-token part at the start of a block is removed on the way.
        let p = parts(&[(0, 1), (5, 1), (5, 0)]);
        let t = truncate(&p, budget(6, 1)).unwrap();
        assert_eq!(kept(&t), "--K");
    }

    /// The worked example of docs/prompts.md: keep the two in step.
    #[test]
    fn worked_example_in_the_docs() {
        // system 40 (0), example_1 30 (2), example_2 25 (2), history_1..4 20 each (1),
        // memory 10 (2), latest 15 (0). Size 200; limit 120, step 32.
        let p = parts(&[
            (40, 0),
            (30, 2),
            (25, 2),
            (20, 1),
            (20, 1),
            (20, 1),
            (20, 1),
            (10, 2),
            (15, 0),
        ]);
        let t = truncate(&p, budget(120, 32)).unwrap();
        assert_eq!(t.tokens_before, 200);
        assert_eq!((t.surplus, t.cut_target), (80, 96));
        assert_eq!(kept(&t), "K----KK-K");
        assert_eq!((t.tokens_removed, t.tokens_after), (105, 95));
        assert_eq!(t.never_cut_tokens, 55);
        // Exact truncation (step 1) of the same prompt.
        let t = truncate(&p, budget(120, 1)).unwrap();
        assert_eq!((t.surplus, t.cut_target), (80, 80));
        assert_eq!(kept(&t), "K---KKK-K");
        assert_eq!(t.tokens_after, 115);
    }

    /// The turn-by-turn table of docs/prompts.md: a 50-token never-cut head, then a history of
    /// 20-token messages at priority 1, one more each turn, and a 10-token never-cut tail.
    /// Returns, per turn, the index of the oldest kept history message.
    fn first_kept_history(step: usize, turns: usize) -> Vec<usize> {
        (1..=turns)
            .map(|n| {
                let mut spec = vec![(50, 0)];
                spec.extend(std::iter::repeat_n((20, 1), n));
                spec.push((10, 0));
                let t = truncate(&parts(&spec), budget(200, step)).unwrap();
                (0..n).find(|i| t.kept[1 + i]).unwrap_or(n)
            })
            .collect()
    }

    #[test]
    fn worked_example_turn_by_turn() {
        // Exact: from turn 8 on the oldest kept message moves every turn.
        assert_eq!(
            first_kept_history(1, 14),
            vec![0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
        );
        // Step 100 (five messages): it moves every fifth turn.
        assert_eq!(
            first_kept_history(100, 14),
            vec![0, 0, 0, 0, 0, 0, 0, 5, 5, 5, 5, 5, 10, 10]
        );
    }
}
