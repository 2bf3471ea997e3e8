//! Incremental detokenisation: turn a growing list of token ids into text deltas without ever
//! emitting half a UTF-8 character.
//!
//! Byte-level BPE tokens can end inside a multi-byte character; decoding such a prefix yields
//! U+FFFD. Two paths, one result: for a byte-level tokenizer each token's bytes are known
//! (`TextCodec::decode_step` looks them up) and [`IncrementalDecoder::push_bytes`] releases the
//! complete characters, keeping an unfinished one's bytes for the next token; otherwise
//! [`IncrementalDecoder::push`] decodes a small window (`prefix_offset..`) and releases only
//! text that does not end in U+FFFD. Either way the concatenation of all deltas equals the
//! decoding of all ids (bytes that can never form a character come out as U+FFFD, as decoding
//! writes them).

use tokenizers::Tokenizer;

/// Per-sequence detokeniser state.
#[derive(Clone, Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Bytes of an unfinished character (the byte path).
    pending: Vec<u8>,
}

impl IncrementalDecoder {
    /// A decoder that starts after a prompt (the prompt's text is never emitted).
    pub fn new() -> IncrementalDecoder {
        IncrementalDecoder::default()
    }

    /// Add one token by its bytes; returns the complete characters they finish.
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(text) => {
                    out.push_str(text);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The first `valid` bytes were just checked as UTF-8.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An unfinished character at the end: wait for its next byte.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Bytes that can never be a character: U+FFFD, as decoding writes.
                        Some(bad) => {
                            out.push('\u{fffd}');
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
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
