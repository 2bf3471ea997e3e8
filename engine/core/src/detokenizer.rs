//! Incremental detokenisation: turn a growing list of token ids into text deltas without ever
//! emitting half a UTF-8 character.
//!
//! Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
//! U+FFFD. We decode a small window (`prefix_offset..`) and release only text that does not end
//! in U+FFFD, so the concatenation of all deltas equals the decoding of all ids.

use tokenizers::Tokenizer;

/// Per-sequence detokeniser state.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder that starts after a prompt (the prompt's text is never emitted).
    pub fn new() -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// Add one token; returns the new text, possibly empty.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let prefix = tok
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)
            .unwrap_or_default();
        let full = tok
            .decode(&self.ids[self.prefix_offset..], true)
            .unwrap_or_default();
        if full.len() > prefix.len()
            && !full.ends_with('\u{fffd}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }
}
