//! Pure bookkeeping for convoy's engine: no tensors, no threads, no I/O. Everything here is
//! deterministic and unit-tested.
//!
//! - [`block_hash`]: identity of cached blocks (chained hashes, extra keys).
//! - [`block_pool`]: one tier of blocks, reference counts, the LRU queue, the cache index.
//! - [`kv_cache_manager`]: prefix matching, allocation, commit, eviction to the host tier.
//! - [`request`], [`sampling`], [`output`]: requests and the named types at each step boundary.
//! - [`scheduler`]: continuous batching, chunked prefill, preemption, priorities with aging.

pub mod block_hash;
pub mod block_pool;
pub mod kv_cache_manager;
pub mod output;
pub mod request;
pub mod sampling;
pub mod scheduler;

pub use block_hash::{BlockHash, KeyFn};
pub use block_pool::{BlockId, BlockKey, BlockPool};
pub use kv_cache_manager::{
    BlockCopy, CacheStats, KvCacheConfig, KvCacheManager, Loc, OutOfBlocks, PrefixMatch, SeqId,
};
pub use output::{
    ModelOutput, NewRequestData, OutputMismatch, RequestOutput, SampledToken, ScheduledRequest,
    SchedulerOutput,
};
pub use request::{FinishReason, NewRequest, Request, RequestId, RequestStatus};
pub use sampling::SamplingSpec;
pub use scheduler::{AddError, Scheduler, SchedulerConfig};
