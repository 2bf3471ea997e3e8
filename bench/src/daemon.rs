//! A `convoy serve` child process on a private socket, for benchmarks that drive the real
//! daemon. Dropping it sends SIGTERM, waits, and removes its directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use convoy_server::api::client::Client;

/// A running daemon.
pub struct Spawned {
    /// The child process.
    pub child: Child,
    /// Its socket.
    pub socket: PathBuf,
    dir: PathBuf,
}

impl Spawned {
    /// Start `convoy serve --model MODEL --socket ... EXTRA` and wait until it answers.
    pub fn start(convoy: &Path, model: &Path, name: &str, extra: &[String]) -> Result<Spawned> {
        let dir = std::env::temp_dir().join(format!("convoy-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("convoy.sock");
        let child = Command::new(convoy)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", convoy.display()))?;
        let mut d = Spawned { child, socket, dir };
        let t = Instant::now();
        while Client::connect(&d.socket).is_err() {
            if let Some(status) = d.child.try_wait()? {
                bail!("the daemon exited at start ({status})");
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("the daemon did not start within a minute");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(d)
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
