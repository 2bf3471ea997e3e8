//! Model definitions. One family today: Llama-shaped decoders (Llama 2/3, Mistral, SmolLM2,
//! Qwen2).

pub mod llama;
