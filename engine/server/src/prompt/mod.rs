//! Prompt templates whose parts carry truncation priorities (see docs/prompts.md).
//!
//! A template is Jinja (`minijinja`, strict about undefined variables) rendered against a
//! request's variables; its output is a YAML list of parts, each with `name`, `role` (default
//! `user`), `content` and `truncation_priority` (default 0). Each part is tokenized alone and
//! the prompt's size is the sum; [`truncate`] removes parts to fit a token limit, and the kept
//! parts become chat messages for the model's chat template.
//!
//! Invariants:
//! - Parts of priority 0 are never cut; when they alone exceed the limit the prompt is refused
//!   ([`PromptError::PromptTooLong`]), never silently shortened.
//! - Parts are removed whole, never split, and the kept parts stay in document order.
//! - The cut is the surplus rounded up to a multiple of `truncation_step`, so while the surplus
//!   stays within one step the same parts are cut and the kept prefix is unchanged from turn to
//!   turn: the KV prefix cache stays warm.
//! - Truncation is a pure function of the token counts, the priorities and the budget.
//! - Consecutive kept parts with the same role are joined into one message, their contents
//!   separated by [`JOIN_SEPARATOR`].
//! - Every error names the template, the part (when known) and the line; none panics.

mod error;
mod parts;
mod sandbox;
mod template;
mod truncate;

use std::fmt;

use convoy_weights::ChatMessage;

pub use error::{PartRef, PromptError, SourceLine};
pub use parts::MAX_YAML_DEPTH;
pub use parts::{parse_parts, Part, Role, PART_KEYS};
pub use sandbox::{run_worker, RenderLimits, RenderPool, WorkerCommand};
pub use template::{
    cut, template_name, yaml_quote, TemplateRef, TemplateRegistry, TemplateSet,
    DEFAULT_MAX_OUTPUT_BYTES, INLINE_TEMPLATE_NAME, RENDER_FUEL, TEMPLATE_SUFFIXES,
};
pub use truncate::{truncate, Budget, PartSize, Truncation};

/// What goes between the contents of consecutive same-role parts joined into one message.
pub const JOIN_SEPARATOR: &str = "\n";

/// A rendered, counted and truncated prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// The template's name ([`INLINE_TEMPLATE_NAME`] for an inline one).
    pub template: String,
    /// Every part, kept or not, in document order.
    pub parts: Vec<Part>,
    /// Each part's tokens, counted alone.
    pub part_tokens: Vec<usize>,
    /// What truncation kept (`truncation.kept[i]` for `parts[i]`).
    pub truncation: Truncation,
    /// The kept parts as chat messages.
    pub messages: Vec<ChatMessage>,
}

impl Prompt {
    /// The kept parts, in document order.
    pub fn kept_parts(&self) -> impl Iterator<Item = &Part> {
        self.parts
            .iter()
            .zip(&self.truncation.kept)
            .filter(|(_, k)| **k)
            .map(|(p, _)| p)
    }

    /// The names of the parts that were cut, in document order (for the done event).
    pub fn cut_part_names(&self) -> Vec<String> {
        self.parts
            .iter()
            .zip(&self.truncation.kept)
            .filter(|(_, k)| !**k)
            .map(|(p, _)| p.name.clone())
            .collect()
    }
}

/// The kept parts as chat messages: consecutive kept parts with the same role become one
/// message, contents joined with [`JOIN_SEPARATOR`].
pub fn to_messages(parts: &[Part], kept: &[bool]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::new();
    for (p, _) in parts.iter().zip(kept).filter(|(_, k)| **k) {
        match out.last_mut() {
            Some(m) if m.role == p.role.as_str() => {
                m.content.push_str(JOIN_SEPARATOR);
                m.content.push_str(&p.content);
            }
            _ => out.push(ChatMessage::new(p.role.as_str(), p.content.clone())),
        }
    }
    out
}

/// Count each part's tokens with `count_tokens` (the model's tokenizer without special tokens,
/// in the engine), truncate to `budget` (none: keep everything) and build the messages.
pub fn build_prompt<E, F>(
    template: &str,
    parts: Vec<Part>,
    budget: Option<Budget>,
    count_tokens: F,
) -> Result<Prompt, PromptError>
where
    E: fmt::Display,
    F: Fn(&str) -> Result<usize, E>,
{
    let mut part_tokens = Vec::with_capacity(parts.len());
    for (index, p) in parts.iter().enumerate() {
        let n = count_tokens(&p.content).map_err(|e| PromptError::TokenCount {
            template: template.to_string(),
            part: PartRef {
                index,
                name: Some(p.name.clone()),
            },
            message: e.to_string(),
        })?;
        part_tokens.push(n);
    }
    let sizes: Vec<PartSize> = parts
        .iter()
        .zip(&part_tokens)
        .map(|(p, &tokens)| PartSize {
            tokens,
            priority: p.truncation_priority,
        })
        .collect();
    let truncation = match budget {
        Some(b) => truncate(&sizes, b)?,
        None => Truncation::keep_all(&sizes),
    };
    let messages = to_messages(&parts, &truncation.kept);
    Ok(Prompt {
        template: template.to_string(),
        parts,
        part_tokens,
        truncation,
        messages,
    })
}

/// A stand-in token counter for tests and examples: whitespace-separated words.
pub fn count_words(text: &str) -> Result<usize, std::convert::Infallible> {
    Ok(text.split_whitespace().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str, role: Role, content: &str, priority: u32) -> Part {
        Part {
            name: name.into(),
            role,
            content: content.into(),
            truncation_priority: priority,
            line: 1,
        }
    }

    #[test]
    fn consecutive_same_role_parts_are_joined_after_truncation() {
        let parts = vec![
            part("sys", Role::System, "be kind", 0),
            part("a", Role::User, "one two three", 1),
            part("b", Role::Assistant, "four five", 1),
            part("c", Role::User, "six", 1),
            part("d", Role::User, "seven eight", 0),
        ];
        let p = build_prompt("t", parts.clone(), Budget::new(9, None).ok(), count_words).unwrap();
        assert_eq!(p.part_tokens, vec![2, 3, 2, 1, 2]);
        assert_eq!(p.truncation.kept, vec![true, false, true, true, true]);
        assert_eq!(p.cut_part_names(), vec!["a".to_string()]);
        assert_eq!(
            p.messages,
            vec![
                ChatMessage::new("system", "be kind"),
                ChatMessage::new("assistant", "four five"),
                ChatMessage::new("user", "six\nseven eight"),
            ]
        );
        // Cut "a" and "b": the system part and the user parts are now adjacent but differ.
        let p = build_prompt("t", parts, Budget::new(5, None).ok(), count_words).unwrap();
        assert_eq!(p.truncation.kept, vec![true, false, false, true, true]);
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.kept_parts().count(), 3);
    }

    #[test]
    fn counter_errors_name_the_part() {
        let parts = vec![part("x", Role::User, "hi", 0)];
        let e = build_prompt("t", parts, None, |_| Err::<usize, _>("no tokenizer")).unwrap_err();
        assert_eq!(e.code(), "invalid_prompt");
        assert_eq!(
            e.to_string(),
            "template \"t\": counting the tokens of part #0 \"x\": no tokenizer"
        );
    }
}
