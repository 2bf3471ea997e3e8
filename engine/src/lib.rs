//! The convoy engine: a Llama-family forward pass over a paged KV cache, sampling, incremental
//! detokenisation and batched generation, plus the `convoy` binary.

pub mod api;
pub mod chart;
pub mod core;
pub mod detokenizer;
pub mod forward_batch;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod options;
pub mod plan;
pub mod prompt;
pub mod runner;
pub mod sampler;
pub mod service;
pub mod sim;
pub mod step_log;
pub mod tokenizer;
pub mod workload;

pub use convoy_scheduler::FinishReason;
pub use core::{EngineCore, EngineEvent, EngineRequest, EngineStats, EventKind};
pub use forward_batch::{ForwardBatch, SeqSlice};
pub use generate::{GenerationRequest, GenerationResult, Generator, GeneratorConfig};
pub use kv_cache::{KvCache, KvCacheDtype, KvLayer, UnknownKvCacheDtype};
pub use model::llama::LlamaModel;
pub use sampler::SamplingParams;
pub use tokenizer::TextCodec;
