//! The convoy daemon and its faces: the JSON-lines Unix socket, the OpenAI-compatible HTTP server,
//! Prometheus metrics, and prompt templates; the `convoy` binary lives in `src/bin/`.
//!
//! All async I/O (tokio) lives in this crate; the engine core runs on its own thread.

pub mod api;
pub mod prompt;
