//! Helpers shared by the daemon tests: start the real `convoy serve` binary on a private
//! socket, connect to it, and wait for conditions with a bound (a test fails, never hangs).

#![allow(dead_code)] // each test file uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use convoy_server::api::client::Client;

pub mod http;

pub fn model(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run scripts/fetch_models.sh",
        p.display()
    );
    p
}

pub fn smollm2() -> PathBuf {
    model("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub struct Daemon {
    pub child: Child,
    pub socket: PathBuf,
}

impl Daemon {
    pub fn start(name: &str, model: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with_env(name, model, extra, &[])
    }

    pub fn start_with_env(
        name: &str,
        model: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        let dir = std::env::temp_dir().join(format!("convoy-daemon-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("convoy.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_convoy"));
        cmd.args(["serve", "--model", model.to_str().unwrap()])
            .args(["--socket", socket.to_str().unwrap()]);
        if !extra.contains(&"--kv-cache-memory") {
            cmd.args(["--kv-cache-memory", "256MiB"]);
        }
        let child = cmd
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .envs(env.iter().copied())
            .spawn()
            .expect("start convoy serve");
        let mut d = Daemon { child, socket };
        poll("the daemon to come up", 60, || {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("convoy serve {extra:?} exited at start: {status}");
            }
            Client::connect(&d.socket).ok()
        });
        d
    }

    /// Wait for the daemon to exit.
    pub fn wait_exit(&mut self, what: &str, limit_s: u64) -> std::process::ExitStatus {
        poll(what, limit_s, || self.child.try_wait().unwrap())
    }

    /// A connection whose reads fail after two minutes without an event (a hang fails the test).
    pub fn client(&self) -> Client {
        let mut c = Client::connect(&self.socket).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        c
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).expect("signal the daemon");
        self.wait_exit("the daemon to stop", 60)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn held_blocks(c: &mut Client) -> u64 {
    c.stats().unwrap().kv.device_blocks_held as u64
}

/// Call `f` every 20 ms until it gives a value; fail after `limit_s` seconds.
pub fn poll<T>(what: &str, limit_s: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let t = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(limit_s),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_for_zero_held(c: &mut Client) {
    poll("every KV block to be released", 30, || {
        let s = c.stats().unwrap();
        (s.kv.device_blocks_held == 0 && s.running == 0).then_some(())
    });
}

/// Allow as many open files as the hard limit permits.
pub fn raise_fd_limit() {
    convoy_server::api::raise_fd_limit();
}
