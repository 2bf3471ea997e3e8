//! A small blocking client for the daemon's protocol, used by the benchmarks and tests.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde_json::Value;

use crate::api::protocol::{ServerEvent, StatsReport};

/// One connection to the daemon.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Client {
    /// Connect to the daemon's socket.
    pub fn connect(path: &Path) -> io::Result<Client> {
        let s = UnixStream::connect(path)?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Give up waiting for an event after `limit` (`recv` then fails with `WouldBlock` or
    /// `TimedOut`) instead of waiting forever; tests use it so a hang fails.
    pub fn set_read_timeout(&mut self, limit: Option<std::time::Duration>) -> io::Result<()> {
        self.reader.get_ref().set_read_timeout(limit)
    }

    /// Send one JSON object as a line.
    pub fn send(&mut self, v: &Value) -> io::Result<()> {
        let mut line = serde_json::to_vec(v).map_err(invalid)?;
        line.push(b'\n');
        self.writer.write_all(&line)
    }

    /// Send raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// The next event, or `None` when the daemon closed the connection.
    pub fn recv(&mut self) -> io::Result<Option<ServerEvent>> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        serde_json::from_str(&line).map(Some).map_err(invalid)
    }

    /// Send a `generate` request and read its events up to the final one (`done` or `error`).
    /// Events of other requests on this connection are skipped.
    pub fn generate(&mut self, request: &Value) -> io::Result<(Vec<ServerEvent>, ServerEvent)> {
        let id = request
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        self.send(request)?;
        let mut tokens = Vec::new();
        loop {
            let ev = self
                .recv()?
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"))?;
            match &ev {
                ServerEvent::Token { id: eid, .. } if *eid == id => tokens.push(ev),
                ServerEvent::Done { id: eid, .. } if *eid == id => return Ok((tokens, ev)),
                ServerEvent::Error { id: eid, .. }
                    if eid.as_deref() == Some(&id) || eid.is_none() =>
                {
                    return Ok((tokens, ev))
                }
                _ => {}
            }
        }
    }

    /// Ask for `stats` and return the figures.
    pub fn stats(&mut self) -> io::Result<StatsReport> {
        self.send(&serde_json::json!({"op": "stats"}))?;
        loop {
            match self.recv()? {
                Some(ServerEvent::Stats { stats }) => return Ok(*stats),
                Some(_) => continue,
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ))
                }
            }
        }
    }
}
