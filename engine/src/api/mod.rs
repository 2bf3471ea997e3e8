//! The daemon's public interface: the newline-delimited JSON protocol (`protocol`, the single
//! source of truth for the wire format), the Unix-socket server (`server`) and a small blocking
//! client (`client`) used by the benchmarks and tests.

pub mod client;
pub mod protocol;
pub mod server;
