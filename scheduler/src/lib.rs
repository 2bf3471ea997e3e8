//! Pure bookkeeping for convoy's engine: no tensors, no threads, no I/O. Everything here is
//! deterministic and unit-tested.

pub mod block_pool;

pub use block_pool::{BlockId, BlockPool};
