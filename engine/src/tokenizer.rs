//! Text in and out: the model's tokenizer, chat template and end-of-sequence ids together.

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
    #[error("the model has no chat template; pass a plain prompt instead")]
    NoChatTemplate,
    /// Encoding failed.
    #[error("tokenizer: {0}")]
    Encode(String),
    /// The chat template failed to render.
    #[error("{0}")]
    Template(String),
}

/// Tokenizer, chat template and stop ids of one model.
#[derive(Clone)]
pub struct TextCodec {
    tokenizer: Option<Arc<Tokenizer>>,
    template: Option<Arc<ChatTemplate>>,
    /// Tokens that end generation.
    pub eos_token_ids: Vec<u32>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<u32>,
}

impl TextCodec {
    /// Take the text parts out of a loaded model (its tensors stay for the model).
    pub fn take_from(model: &mut LoadedModel) -> TextCodec {
        TextCodec {
            tokenizer: model.tokenizer.take().map(Arc::new),
            template: model.chat_template.take().map(Arc::new),
            eos_token_ids: model.config.eos_token_ids.clone(),
            bos_token_id: model.config.bos_token_id,
        }
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

    /// The tokenizer, if any.
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_deref()
    }

    /// Encode plain text, without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, CodecError> {
        let tok = self.tokenizer.as_ref().ok_or(CodecError::NoTokenizer)?;
        let enc = tok
            .encode(text, false)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, CodecError> {
        let tok = self.tokenizer.as_ref().ok_or(CodecError::NoTokenizer)?;
        tok.decode(ids, true)
            .map_err(|e| CodecError::Encode(e.to_string()))
    }

    /// Render a conversation with the model's template (with the generation prompt).
    pub fn render_chat(&self, messages: &[ChatMessage]) -> Result<String, CodecError> {
        let t = self.template.as_ref().ok_or(CodecError::NoChatTemplate)?;
        t.render(messages, true)
            .map_err(|e| CodecError::Template(e.to_string()))
    }

    /// Render and encode a conversation.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, CodecError> {
        self.encode(&self.render_chat(messages)?)
    }
}
