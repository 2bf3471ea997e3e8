//! Model loading for convoy: configs, safetensors and GGUF files, tokenizers, chat templates and
//! dummy weights.
//!
//! Every loader returns a [`LoadedModel`] whose tensors use Hugging Face names and row-major
//! `[rows, cols]` shapes, whatever the file format, so the engine has one path to the model.
//! Nothing here panics on a bad file: every failure is a [`WeightsError`].

pub mod chat_template;
pub mod config;
pub mod dtype;
pub mod dummy;
pub mod error;
pub mod gguf;
pub mod loader;
pub mod safetensors;
pub mod tensor;
pub mod tokenizer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use dtype::DType;
pub use error::WeightsError;
pub use loader::{load_model, LoadFormat, LoadedModel};
pub use tensor::Tensor;

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, WeightsError>;
