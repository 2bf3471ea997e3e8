//! The daemon's public interface: the newline-delimited JSON protocol (`protocol`, the single
//! source of truth for the wire format), the Unix-socket server and a small blocking client
//! (`client`) used by the benchmarks and tests.
//!
//! The server is split by concern: `socket` (creating the listening socket safely, file
//! limits), `framing` (reading bounded lines), `translate` (wire requests to engine requests,
//! prompt encoding, engine events to wire events), `stats` (latency histograms and the `stats`
//! answer), `connection` (one client's loop, its outbound queue and live requests) and `server`
//! (accepting, signals, drain). Beside the socket, `http` is the OpenAI-compatible HTTP face
//! (docs/http.md) and `metrics` the Prometheus exposition (docs/metrics.md).

pub mod client;
mod connection;
mod framing;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod socket;
pub mod stats;
mod translate;

pub use socket::raise_fd_limit;
