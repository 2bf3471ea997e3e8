//! The convoy engine core: a Llama-family forward pass over a paged KV cache, the runners (CPU,
//! simulation), the engine thread, sampling, incremental detokenisation and batched generation.
//!
//! Nothing here does async I/O: the daemon's faces live in `convoy-server`, the capacity planner in
//! `convoy-planner`.

pub mod backend;
pub mod core;
pub mod detokenizer;
pub mod device;
pub mod forward_batch;
pub mod generate;
pub mod kv_cache;
pub mod model;
pub mod model_weights;
pub mod options;
pub mod paced_sim;
pub mod runner;
pub mod sampler;
pub mod service;
pub mod sim;
pub mod step_log;
pub mod tokenizer;

pub use convoy_scheduler::FinishReason;
pub use core::{EngineCore, EngineEvent, EngineRequest, EngineStats, EventKind};
pub use device::Device;
pub use forward_batch::{ForwardBatch, SeqSlice};
pub use generate::{GenerationRequest, GenerationResult, Generator, GeneratorConfig};
pub use kv_cache::{KvCache, KvCacheDtype, KvLayer, UnknownKvCacheDtype};
pub use model::llama::LlamaModel;
pub use model_weights::ModelWeights;
pub use sampler::SamplingParams;
pub use tokenizer::TextCodec;
