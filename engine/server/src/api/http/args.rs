//! The `convoy serve` flags of the HTTP face (flattened into the `serve` subcommand).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;

use crate::api::http::HttpConfig;
use convoy_engine::options::parse_bytes;

/// The environment variable read for the API key when `--api-key` is not given.
pub const API_KEY_ENV: &str = "CONVOY_API_KEY";

/// HTTP flags of `convoy serve` (see docs/http.md).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct HttpArgs {
    /// Serve the OpenAI-compatible HTTP API (and /metrics) on this address, e.g.
    /// 127.0.0.1:8000. A non-loopback address needs an API key or --insecure-no-auth.
    #[arg(long, value_name = "ADDR", value_parser = resolve_addr)]
    pub http: Option<SocketAddr>,
    /// Serve the HTTP API on a Unix socket at this path too (mode and group of --socket).
    #[arg(long, value_name = "PATH")]
    pub http_socket: Option<PathBuf>,
    /// Serve /metrics (Prometheus) and /health alone on this address.
    #[arg(long, value_name = "ADDR", value_parser = resolve_addr)]
    pub metrics: Option<SocketAddr>,
    /// Require `Authorization: Bearer KEY` on every HTTP route but /health (default: the
    /// CONVOY_API_KEY environment variable, which keeps the key out of the process list).
    #[arg(long, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Allow a non-loopback HTTP or metrics address without an API key.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// Largest HTTP request body (413 beyond).
    #[arg(long, default_value = "8MiB")]
    pub http_max_body_bytes: String,
    /// Largest HTTP request head, request line and headers (431 beyond; at least 8KiB).
    #[arg(long, default_value = "64KiB")]
    pub http_max_header_bytes: String,
    /// Seconds a client may take to send a request head (408 and closed beyond).
    #[arg(long, default_value_t = 10.0)]
    pub http_header_timeout: f64,
    /// Seconds a client may take to send a request body once its head arrived (408 and
    /// closed beyond). At the connection limit, the slowest body is closed first.
    #[arg(long, default_value_t = 30.0)]
    pub http_body_timeout: f64,
    /// Most open HTTP connections; the next ones get 503.
    #[arg(long, default_value_t = 1024)]
    pub http_max_connections: usize,
    /// The model name of the HTTP API (default: the model file's or directory's name).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
}

/// The default model name: the GGUF file without its extension, or the directory's name.
pub fn model_name_of(path: &Path) -> String {
    let path = if path.file_name().is_some_and(|n| n == "config.json") {
        path.parent().unwrap_or(path)
    } else {
        path
    };
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "convoy".into())
}

/// A listen address: `IP:PORT`, or `HOST:PORT` resolved now (`localhost:8000`); the first
/// address a host name resolves to is used.
pub fn resolve_addr(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = text.parse() {
        return Ok(a);
    }
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not HOST:PORT or IP:PORT ({e})"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

impl HttpArgs {
    /// The checked configuration for a model at `model_path`.
    pub fn config(&self, model_path: &Path) -> anyhow::Result<HttpConfig> {
        if !(self.http_header_timeout > 0.0 && self.http_header_timeout.is_finite()) {
            bail!("--http-header-timeout must be a positive number of seconds");
        }
        if !(self.http_body_timeout > 0.0 && self.http_body_timeout.is_finite()) {
            bail!("--http-body-timeout must be a positive number of seconds");
        }
        let api_key = self
            .api_key
            .clone()
            .or_else(|| std::env::var(API_KEY_ENV).ok().filter(|k| !k.is_empty()));
        let cfg = HttpConfig {
            listen: self.http,
            unix_socket: self.http_socket.clone(),
            metrics: self.metrics,
            api_key,
            insecure_no_auth: self.insecure_no_auth,
            max_body_bytes: parse_bytes(&self.http_max_body_bytes)?,
            max_header_bytes: parse_bytes(&self.http_max_header_bytes)?,
            header_read_timeout: Duration::from_secs_f64(self.http_header_timeout),
            body_read_timeout: Duration::from_secs_f64(self.http_body_timeout),
            max_connections: self.http_max_connections,
            model_name: self
                .served_model_name
                .clone()
                .unwrap_or_else(|| model_name_of(model_path)),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_key_or_an_explicit_opt_out() {
        let args = |extra: &[&str]| {
            use clap::Parser;
            #[derive(clap::Parser)]
            struct T {
                #[command(flatten)]
                a: HttpArgs,
            }
            let mut v = vec!["t"];
            v.extend_from_slice(extra);
            T::try_parse_from(v).unwrap().a
        };
        let m = Path::new("models/x/SmolLM2.Q4_1.gguf");
        let c = args(&["--http", "127.0.0.1:8000"]).config(m).unwrap();
        assert_eq!(c.model_name, "SmolLM2.Q4_1");
        assert_eq!(c.max_body_bytes, 8 << 20);
        let open = args(&["--http", "0.0.0.0:8000"]);
        if std::env::var(API_KEY_ENV).is_err() {
            let e = open.config(m).unwrap_err().to_string();
            assert!(e.contains("--insecure-no-auth"), "{e}");
        }
        args(&["--http", "0.0.0.0:8000", "--api-key", "sk-x"])
            .config(m)
            .unwrap();
        args(&["--http", "0.0.0.0:8000", "--insecure-no-auth"])
            .config(m)
            .unwrap();
        assert!(args(&["--metrics", "[::]:9000", "--api-key", "a b"])
            .config(m)
            .is_err());
        assert!(args(&["--http-max-header-bytes", "1KiB"])
            .config(m)
            .is_err());
    }
}
