//! Text in and out: the model's tokenizer, chat template and end-of-sequence ids together.
//!
//! Control tokens come only from the chat template or from token ids the caller gives: text a
//! user typed (a `prompt`, a message's content, a `tokenize` text) is encoded as plain text, so
//! `<|im_end|>` typed into a message is the characters, never the control token. A caller who
//! means raw control-token text opts in explicitly ([`TextCodec::encode_with_special_tokens`]).

use std::sync::Arc;

use convoy_weights::{ChatMessage, ChatTemplate, LoadedModel};
use tokenizers::Tokenizer;

/// Why text could not be turned into tokens.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The model has no tokenizer.
    #[error("the model has no tokenizer; pass token ids instead")]
    NoTokenizer,
    /// The model has no chat template.
    #[error("the model has no chat template: give one with --chat-template FILE (a Jinja file), or pass a plain prompt")]
    NoChatTemplate,
    /// Encoding failed.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// The chat template failed to render.
    #[error("{0}")]
    Template(String),
    /// A message holds control-token text and the template changes message contents, so the
    /// contents cannot be kept apart from the template's own control tokens.
    #[error("message {index} contains control-token text ({token:?}) and the chat template rewrites message contents, so it cannot be encoded as plain text")]
    UnseparableControlText {
        /// Index of the message.
        index: usize,
        /// The control-token text found.
        token: String,
    },
}

impl CodecError {
    /// The protocol's error code (docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            CodecError::NoTokenizer => "no_tokenizer",
            CodecError::NoChatTemplate => "no_chat_template",
            CodecError::Template(_) => "template_error",
            CodecError::Encode(_) | CodecError::UnseparableControlText { .. } => "invalid_prompt",
        }
    }
}

/// The tokenizer in its two modes.
struct Tokenizers {
    /// Control-token text becomes control tokens (for template output).
    special: Tokenizer,
    /// Control-token text stays text (for what users typed).
    plain: Tokenizer,
    /// The text of every added (control) token, to spot it inside user text.
    control_texts: Vec<String>,
    /// Each token's bytes as `decode(.., skip_special_tokens)` joins them (special tokens
    /// empty), when the decoder is byte-level BPE: decoding is then concatenation, and the
    /// detokeniser's hot path needs no call into the tokenizer.
    decode_bytes: Option<Vec<Box<[u8]>>>,
}

/// The decode table of a byte-level tokenizer (see `Tokenizers::decode_bytes`), or `None`
/// when decoding is not plain concatenation of per-token bytes.
fn decode_table(tok: &Tokenizer) -> Option<Vec<Box<[u8]>>> {
    if !matches!(
        tok.get_decoder(),
        Some(tokenizers::DecoderWrapper::ByteLevel(_))
    ) {
        return None;
    }
    // Normalizers and post-processors act on encoding only; the decoder is the whole story.
    let added = tok.get_added_tokens_decoder();
    let n = tok.get_vocab_size(true);
    let mut table = Vec::with_capacity(n);
    for id in 0..n as u32 {
        let bytes: Vec<u8> = match added.get(&id) {
            Some(a) if a.special => Vec::new(),
            Some(a) => a.content.as_bytes().to_vec(),
            None => {
                let piece = tok.id_to_token(id)?;
                piece
                    .chars()
                    .map(byte_level_byte)
                    .collect::<Option<Vec<u8>>>()?
            }
        };
        table.push(bytes.into_boxed_slice());
    }
    Some(table)
}

/// Tokenizer, chat template and stop ids of one model.
#[derive(Clone)]
pub struct TextCodec {
    tokenizer: Option<Arc<Tokenizers>>,
    template: Option<Arc<ChatTemplate>>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
}

/// Stands in for message `i`'s content while the template renders, to find where contents go.
fn content_marker(i: usize) -> String {
    format!("\u{F8FF}convoy-content-{i}\u{F8FF}")
}

impl TextCodec {
    /// Take the text parts out of a loaded model (its tensors stay for the model).
    pub fn take_from(model: &mut LoadedModel) -> TextCodec {
        TextCodec {
            tokenizer: model.tokenizer.take().map(|special| {
                let mut plain = special.clone();
                plain.set_encode_special_tokens(true);
                let mut control_texts: Vec<String> = special
                    .get_added_tokens_decoder()
                    .into_values()
                    .map(|t| t.content)
                    .filter(|c| !c.is_empty())
                    .collect();
                control_texts.sort();
                let decode_bytes = decode_table(&special);
                Arc::new(Tokenizers {
                    special,
                    plain,
                    control_texts,
                    decode_bytes,
                })
            }),
            template: model.chat_template.take().map(Arc::new),
            eos_token_ids: model.config.eos_token_ids.clone(),
            bos_token_id: model.config.bos_token_id,
        }
    }

    /// Whether the codec has a chat template (the model's own or `--chat-template`'s).
    pub fn has_chat_template(&self) -> bool {
        self.template.is_some()
    }

    /// Use `source` as the chat template instead of the model's own (`--chat-template`). The
    /// template may insert `bos_token` and `eos_token`: the texts of the model's ids.
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), CodecError> {
        let text_of = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer().and_then(|t| t.id_to_token(i)))
                .unwrap_or_default()
        };
        let bos = text_of(self.bos_token_id);
        let eos = text_of(self.eos_token_ids.first().copied());
        let t = ChatTemplate::new(source, &bos, &eos)
            .map_err(|e| CodecError::Template(e.to_string()))?;
        self.template = Some(Arc::new(t));
        Ok(())
    }

    /// A codec with no tokenizer or template (token ids only), for simulations and dummy models.
    pub fn without_tokenizer(eos_token_ids: Vec<u32>) -> TextCodec {
        TextCodec {
            tokenizer: None,
            template: None,
            eos_token_ids,
            bos_token_id: None,
        }
    }

    fn tokenizers(&self) -> Result<&Tokenizers, CodecError> {
        self.tokenizer.as_deref().ok_or(CodecError::NoTokenizer)
    }

    /// The tokenizer (control-token text parsed), if any; for decoding.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref().map(|t| &t.special)
    }

    fn encode_in(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, CodecError> {
        let enc = tok
            .encode(text, false)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode text a user typed: no special tokens added, and control-token text (such as
    /// `<|im_start|>`) encoded as the characters it is made of.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CodecError> {
        Self::encode_in(&self.tokenizers()?.plain, text)
    }

    /// Encode raw prompt text whose control-token text is meant as control tokens (the opt-in
    /// `special_tokens` of the protocol; what Hugging Face tokenizers do by default). No
    /// special tokens are added.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, CodecError> {
        Self::encode_in(&self.tokenizers()?.special, text)
    }

    /// The first control-token text inside `text`, if any.
    fn control_text_in(&self, text: &str) -> Option<&str> {
        let t = self.tokenizer.as_deref()?;
        t.control_texts
            .iter()
            .find(|c| text.contains(c.as_str()))
            .map(|c| c.as_str())
    }

    /// Decode ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, CodecError> {
        self.tokenizers()?
            .special
            .decode(ids, true)
            .map_err(|e| CodecError::Encode(e.to_string()))
    }

    /// The text `id` adds to a sequence being detokenised by `d` (possibly empty: a character
    /// split across tokens waits for its last byte). The deltas of a sequence put together are
    /// its decoding.
    pub fn decode_step(&self, d: &mut crate::detokenizer::IncrementalDecoder, id: u32) -> String {
        let Some(t) = self.tokenizer.as_deref() else {
            return String::new();
        };
        match &t.decode_bytes {
            Some(table) => match table.get(id as usize) {
                Some(bytes) => d.push_bytes(bytes),
                None => String::new(),
            },
            None => d.push(&t.special, id),
        }
    }

    /// Whether detokenising goes by each token's known bytes (a byte-level tokenizer) rather
    /// than by calls into the tokenizer.
    pub fn decodes_by_bytes(&self) -> bool {
        self.tokenizer
            .as_deref()
            .is_some_and(|t| t.decode_bytes.is_some())
    }

    /// The bytes one token stands for, as OpenAI's `bytes` reports them: a byte-fallback token
    /// (`<0xF0>`) or a byte-level piece of a multi-byte character is its raw bytes, which
    /// decoding it alone would turn into U+FFFD. Special tokens give their text; an unknown id
    /// gives nothing.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(tok) = self.tokenizer() else {
            return Vec::new();
        };
        let decoded = tok.decode(&[id], false).unwrap_or_default();
        if !decoded.contains('\u{fffd}') {
            return decoded.into_bytes();
        }
        let Some(piece) = tok.id_to_token(id) else {
            return decoded.into_bytes();
        };
        if let Some(byte) = byte_fallback(&piece) {
            return vec![byte];
        }
        let byte_level = matches!(
            tok.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        if byte_level {
            if let Some(bytes) = piece
                .chars()
                .map(byte_level_byte)
                .collect::<Option<Vec<u8>>>()
            {
                return bytes;
            }
        }
        decoded.into_bytes()
    }

    /// Render a conversation with the model's template (with the generation prompt).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        let t = self.template.as_ref().ok_or(CodecError::NoChatTemplate)?;
        t.render(messages, true)
            .map_err(|e| CodecError::Template(e.to_string()))
    }

    /// Render and encode a conversation. The template's own text is encoded with control
    /// tokens; message contents are plain text. When no content holds control-token text the
    /// whole rendering is encoded at once (exactly what transformers' `apply_chat_template`
    /// gives); otherwise the rendering is cut at the contents, which are encoded apart.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, CodecError> {
        let rendered = self.render_chat(messages)?;
        let tokenizers = self.tokenizers()?;
        let Some((index, token)) = messages
            .iter()
            .enumerate()
            .find_map(|(i, m)| self.control_text_in(&m.content).map(|c| (i, c.to_string())))
        else {
            return Self::encode_in(&tokenizers.special, &rendered);
        };
        // Render again with a marker for each content, then cut the real rendering there.
        let marked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage::new(m.role.clone(), content_marker(i)))
            .collect();
        let skeleton = self.render_chat(&marked)?;
        let mut pieces: Vec<(&str, bool)> = Vec::new(); // (text, is user content)
        let mut rest = skeleton.as_str();
        let mut rebuilt = String::new();
        for (i, m) in messages.iter().enumerate() {
            let marker = content_marker(i);
            let Some(at) = rest.find(&marker) else {
                // The template dropped or rewrote this message: it renders no content to guard.
                continue;
            };
            pieces.push((&rest[..at], false));
            pieces.push((m.content.as_str(), true));
            rebuilt.push_str(&rest[..at]);
            rebuilt.push_str(&m.content);
            rest = &rest[at + marker.len()..];
        }
        pieces.push((rest, false));
        rebuilt.push_str(rest);
        if rebuilt != rendered {
            return Err(CodecError::UnseparableControlText { index, token });
        }
        let mut ids = Vec::new();
        for (text, user) in pieces {
            if text.is_empty() {
                continue;
            }
            let tok = if user {
                &tokenizers.plain
            } else {
                &tokenizers.special
            };
            ids.extend(Self::encode_in(tok, text)?);
        }
        Ok(ids)
    }
}

/// The byte of a SentencePiece byte-fallback piece such as `<0xF0>`.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// The byte a GPT-2 byte-level character stands for: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100 onwards in byte order.
fn byte_level_byte(c: char) -> Option<u8> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let code = c as u32;
    if code < 256 {
        return printable(code).then_some(code as u8);
    }
    let n = (code - 256) as usize;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n)
        .map(|b| b as u8)
}
