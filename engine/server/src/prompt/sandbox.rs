//! Rendering untrusted templates in child processes, so that no render can take the daemon down.
//!
//! A template is code from a client (`template_yaml`) or runs over a client's variables: a
//! filter can be asked for 100 GB (`indent(100000000000)`), a YAML tree can be nested deep
//! enough to overflow a stack. Rust aborts the whole process when an allocation fails, and an
//! abort cannot be caught, so the daemon renders in **render workers**: child processes (the
//! `convoy` binary's hidden `render-worker` subcommand) that hold a copy of the template set,
//! run under an address-space limit (`RLIMIT_AS`) and render one job at a time.
//!
//! Invariants:
//! - A worker that exits, is killed by a signal, passes its memory limit, answers garbage or
//!   does not answer within the time limit is killed and reaped, its job gets a
//!   [`PromptError::Limit`] (wire code `template_error`), and the next job gets a fresh worker.
//!   No other job or connection is affected.
//! - A render's output is bounded while it is written (the set's output limit, in the worker),
//!   and so is the reply a worker may send.
//! - A worker renders only the template set it was started with: after a reload
//!   ([`TemplateSet::generation`] changed), idle workers of the old set are retired.
//! - At most [`RenderLimits::workers`] workers live at once; a job waits for a free one at most
//!   its time limit.

use std::io::{BufRead, Read, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};

use super::error::PromptError;
use super::template::{TemplateRef, TemplateSet};

/// What bounds one render.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderLimits {
    /// Most bytes a render may write.
    pub max_output_bytes: usize,
    /// Address space of a render worker (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Wall-clock time of one render, waiting for a worker included.
    pub timeout: Duration,
    /// Most render workers alive at once.
    pub workers: usize,
}

impl Default for RenderLimits {
    fn default() -> Self {
        RenderLimits {
            max_output_bytes: super::template::DEFAULT_MAX_OUTPUT_BYTES,
            memory_bytes: 1 << 30,
            timeout: Duration::from_secs(10),
            workers: 4,
        }
    }
}

/// How to start a render worker: a program that runs [`run_worker`] on its standard input and
/// output (the `convoy` binary with `render-worker`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// The first line a worker reads: its templates and limits.
#[derive(Serialize, Deserialize)]
struct Setup {
    templates: Vec<(String, String)>,
    max_output_bytes: usize,
    memory_bytes: u64,
}

/// One render job.
#[derive(Serialize, Deserialize)]
struct Job {
    /// `Some(name)` for a named template, `None` for `inline`.
    named: Option<String>,
    inline: Option<String>,
    variables: serde_json::Value,
}

/// A worker's answer to a job.
#[derive(Serialize, Deserialize)]
enum Reply {
    Text(String),
    Error(PromptError),
}

/// The worker's side: read the setup line, limit this process's address space, then render one
/// job per line until standard input closes. Returns the process's exit code.
pub fn run_worker(input: impl BufRead, mut output: impl Write) -> i32 {
    let mut lines = input.lines();
    let Some(Ok(first)) = lines.next() else {
        return 2;
    };
    let Ok(setup) = serde_json::from_str::<Setup>(&first) else {
        return 2;
    };
    if let Err(e) = limit_address_space(setup.memory_bytes) {
        tracing::error!(error = %e, "render worker: cannot limit its memory");
        return 2;
    }
    let mut set = TemplateSet::new();
    set.set_max_output_bytes(setup.max_output_bytes);
    let mut load_error = None;
    for (name, source) in &setup.templates {
        if let Err(e) = set.add(name, source) {
            load_error.get_or_insert(e);
        }
    }
    for line in lines {
        let Ok(line) = line else { return 2 };
        let reply = match (&load_error, serde_json::from_str::<Job>(&line)) {
            (Some(e), _) => Reply::Error(e.clone()),
            (None, Err(_)) => return 2,
            (None, Ok(job)) => {
                let which = match (&job.named, &job.inline) {
                    (Some(n), _) => TemplateRef::Named(n),
                    (None, Some(s)) => TemplateRef::Inline(s),
                    (None, None) => return 2,
                };
                match set.render_text(which, &job.variables) {
                    Ok(text) => Reply::Text(text),
                    Err(e) => Reply::Error(e),
                }
            }
        };
        let Ok(mut text) = serde_json::to_string(&reply) else {
            return 2;
        };
        text.push('\n');
        if output.write_all(text.as_bytes()).is_err() || output.flush().is_err() {
            return 0;
        }
    }
    0
}

/// Lower this process's address-space limit to `bytes` (never raise it).
fn limit_address_space(bytes: u64) -> nix::Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_AS)?;
    let limit = bytes.min(hard);
    setrlimit(Resource::RLIMIT_AS, limit, limit)
}

/// A running worker; killed and reaped when dropped.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// The template set it holds.
    generation: u64,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon's render workers.
#[derive(Debug)]
pub struct RenderPool {
    command: WorkerCommand,
    limits: RenderLimits,
    state: Mutex<PoolState>,
    freed: Condvar,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Worker>,
    /// Workers alive: idle ones and those rendering.
    alive: usize,
}

impl std::fmt::Debug for PoolState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolState")
            .field("idle", &self.idle.len())
            .field("alive", &self.alive)
            .finish()
    }
}

impl RenderPool {
    /// A pool that starts workers with `command`, lazily, as jobs need them.
    pub fn new(command: WorkerCommand, limits: RenderLimits) -> RenderPool {
        RenderPool {
            command,
            limits,
            state: Mutex::new(PoolState::default()),
            freed: Condvar::new(),
        }
    }

    /// The limits each render runs under.
    pub fn limits(&self) -> &RenderLimits {
        &self.limits
    }

    /// Render `which` of `set` against `variables` in a worker: the text, or the template's
    /// error, or a [`PromptError::Limit`] when the worker crashed, ran out of memory or time.
    /// Blocks the calling thread (call it off the I/O thread).
    pub fn render_text(
        &self,
        set: &TemplateSet,
        which: TemplateRef<'_>,
        variables: &serde_json::Value,
    ) -> Result<String, PromptError> {
        set.check_request(which, variables)?;
        let name = which.name().to_string();
        let limit = |message: String| PromptError::Limit {
            template: name.clone(),
            message,
        };
        let deadline = Instant::now() + self.limits.timeout;
        let mut worker = self.take(set, deadline).map_err(limit)?;
        let job = Job {
            named: match which {
                TemplateRef::Named(n) => Some(n.to_string()),
                TemplateRef::Inline(_) => None,
            },
            inline: match which {
                TemplateRef::Inline(s) => Some(s.to_string()),
                TemplateRef::Named(_) => None,
            },
            variables: variables.clone(),
        };
        match self.exchange(&mut worker, &job, deadline) {
            Ok(reply) => {
                self.give_back(worker);
                match reply {
                    Reply::Text(t) => Ok(t),
                    Reply::Error(e) => Err(e),
                }
            }
            Err(why) => {
                let message = self.describe_failure(worker, why);
                tracing::warn!(template = %name, reason = %message, "render worker stopped");
                Err(limit(message))
            }
        }
    }

    /// An idle worker holding `set`, a new one, or an error once `deadline` passes with every
    /// worker busy.
    fn take(&self, set: &TemplateSet, deadline: Instant) -> Result<Worker, String> {
        let mut state = self.state.lock();
        loop {
            // Retire workers of an older template set.
            let before = state.idle.len();
            state.idle.retain(|w| w.generation == set.generation());
            let retired = before - state.idle.len();
            state.alive -= retired;
            if let Some(w) = state.idle.pop() {
                return Ok(w);
            }
            if state.alive < self.limits.workers.max(1) {
                state.alive += 1;
                drop(state);
                return self.spawn(set).inspect_err(|_| {
                    self.state.lock().alive -= 1;
                    self.freed.notify_one();
                });
            }
            if self.freed.wait_until(&mut state, deadline).timed_out() {
                return Err(format!(
                    "all {} template render workers stayed busy for {:.1} s",
                    self.limits.workers,
                    self.limits.timeout.as_secs_f64()
                ));
            }
        }
    }

    fn give_back(&self, worker: Worker) {
        self.state.lock().idle.push(worker);
        self.freed.notify_one();
    }

    fn spawn(&self, set: &TemplateSet) -> Result<Worker, String> {
        let mut child = Command::new(&self.command.program)
            .args(&self.command.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start a template render worker ({}): {e}",
                    self.command.program.display()
                )
            })?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err("a template render worker has no pipes".to_string());
        };
        let mut worker = Worker {
            child,
            stdin,
            stdout,
            generation: set.generation(),
        };
        let setup = Setup {
            templates: set.sources().to_vec(),
            max_output_bytes: self.limits.max_output_bytes,
            memory_bytes: self.limits.memory_bytes,
        };
        let mut line = serde_json::to_string(&setup).map_err(|e| e.to_string())?;
        line.push('\n');
        worker
            .stdin
            .write_all(line.as_bytes())
            .map_err(|e| format!("a template render worker did not start: {e}"))?;
        Ok(worker)
    }

    /// Send `job`, read the reply line, by `deadline`.
    fn exchange(
        &self,
        worker: &mut Worker,
        job: &Job,
        deadline: Instant,
    ) -> Result<Reply, Failure> {
        let mut line = serde_json::to_vec(job).map_err(|_| Failure::Protocol)?;
        line.push(b'\n');
        worker.stdin.write_all(&line).map_err(|_| Failure::Exited)?;
        worker.stdin.flush().map_err(|_| Failure::Exited)?;
        // Text is JSON-escaped at most 6 bytes per byte; the rest is the envelope.
        let max_reply = self.limits.max_output_bytes.saturating_mul(6) + (64 << 10);
        let mut reply = Vec::new();
        let mut chunk = vec![0u8; 64 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Failure::Timeout);
            }
            if !readable(&worker.stdout, left) {
                continue;
            }
            let n = worker
                .stdout
                .read(&mut chunk)
                .map_err(|_| Failure::Exited)?;
            if n == 0 {
                return Err(Failure::Exited);
            }
            reply.extend_from_slice(&chunk[..n]);
            if reply.last() == Some(&b'\n') {
                break;
            }
            if reply.len() > max_reply {
                return Err(Failure::Protocol);
            }
        }
        serde_json::from_slice(&reply).map_err(|_| Failure::Protocol)
    }

    /// Kill and reap a failed worker, free its place, and say what happened.
    fn describe_failure(&self, mut worker: Worker, why: Failure) -> String {
        use std::os::unix::process::ExitStatusExt;
        let status = match why {
            // It is exiting (or has): its status says why.
            Failure::Exited => worker.child.wait().ok(),
            Failure::Timeout | Failure::Protocol => None,
        };
        drop(worker);
        self.state.lock().alive -= 1;
        self.freed.notify_one();
        let memory = bytesize::ByteSize::b(self.limits.memory_bytes)
            .display()
            .iec();
        match why {
            Failure::Timeout => format!(
                "rendering took longer than {:.1} s and was stopped",
                self.limits.timeout.as_secs_f64()
            ),
            Failure::Protocol => "the render worker answered out of protocol".to_string(),
            Failure::Exited => match status.and_then(|s| s.signal()) {
                // Rust aborts when an allocation fails or a stack overflows.
                Some(6) | Some(11) => {
                    format!("rendering ran out of memory (limit {memory}) or stack and was stopped")
                }
                Some(sig) => format!("rendering crashed (signal {sig}) and was stopped"),
                None => format!(
                    "rendering stopped: its worker exited ({}); memory limit {memory}",
                    status.map_or("unknown status".to_string(), |s| s.to_string())
                ),
            },
        }
    }
}

/// Why a job got no reply.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// The worker closed its output or its input: it exited or was killed.
    Exited,
    /// No whole reply by the deadline.
    Timeout,
    /// A reply that is not one JSON line of the protocol, or too large.
    Protocol,
}

/// Whether `stdout` has bytes (or EOF) within `wait` (at most a minute; the caller loops).
fn readable(stdout: &ChildStdout, wait: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let millis = wait.as_millis().clamp(1, 60_000) as u16;
    let mut fds = [PollFd::new(stdout.as_fd(), PollFlags::POLLIN)];
    loop {
        match poll(&mut fds, PollTimeout::from(millis)) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            // Let the read find out what is wrong.
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool whose "worker" is a shell script: what a worker that crashes, hangs or answers
    /// garbage does to the job and to the next one.
    fn pool(script: &str, timeout_ms: u64) -> RenderPool {
        RenderPool::new(
            WorkerCommand {
                program: PathBuf::from("/bin/sh"),
                args: vec!["-c".to_string(), script.to_string()],
            },
            RenderLimits {
                timeout: Duration::from_millis(timeout_ms),
                workers: 1,
                ..RenderLimits::default()
            },
        )
    }

    fn limit_message(r: Result<String, PromptError>) -> String {
        match r {
            Err(PromptError::Limit { template, message }) => {
                assert_eq!(template, "inline");
                message
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_worker_that_crashes_hangs_or_babbles_fails_its_job_alone() {
        let set = TemplateSet::new();
        let vars = serde_json::json!({});
        let job = TemplateRef::Inline("- name: a\n  content: b\n");
        // Aborts (as Rust does when an allocation fails) after reading its job.
        let p = pool("read setup; read job; kill -ABRT $$", 5000);
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("out of memory"), "{m}");
        // The place it held is free again: the next job gets a new worker (and fails alike).
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("out of memory"), "{m}");
        // Panics (exit 101).
        let p = pool("read setup; read job; exit 101", 5000);
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("exited") && m.contains("101"), "{m}");
        // Never answers.
        let p = pool("read setup; read job; sleep 30", 300);
        let started = Instant::now();
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("longer than 0.3 s"), "{m}");
        assert!(started.elapsed() < Duration::from_secs(5));
        // Answers garbage.
        let p = pool("read setup; read job; echo nonsense; sleep 30", 5000);
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("out of protocol"), "{m}");
        // Cannot be started.
        let p = RenderPool::new(
            WorkerCommand {
                program: PathBuf::from("/nonexistent/convoy"),
                args: Vec::new(),
            },
            RenderLimits::default(),
        );
        let m = limit_message(p.render_text(&set, job, &vars));
        assert!(m.contains("cannot start"), "{m}");
    }

    #[test]
    fn the_worker_loop_renders_jobs_and_reports_template_errors() {
        let mut set = TemplateSet::new();
        set.add("q", "- name: q\n  content: {{ q }}\n").unwrap();
        let setup = Setup {
            templates: set.sources().to_vec(),
            max_output_bytes: 64,
            memory_bytes: u64::MAX,
        };
        let jobs = [
            Job {
                named: Some("q".into()),
                inline: None,
                variables: serde_json::json!({"q": "hi"}),
            },
            Job {
                named: None,
                inline: Some("{{ 'x' * 100 }}".into()),
                variables: serde_json::Value::Null,
            },
        ];
        let mut input = serde_json::to_string(&setup).unwrap() + "\n";
        for j in &jobs {
            input += &(serde_json::to_string(j).unwrap() + "\n");
        }
        let mut out = Vec::new();
        assert_eq!(run_worker(input.as_bytes(), &mut out), 0);
        let replies: Vec<Reply> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(matches!(&replies[0], Reply::Text(t) if t == "- name: q\n  content: hi\n"));
        assert!(
            matches!(&replies[1], Reply::Error(PromptError::Limit { message, .. }) if message.contains("64 bytes")),
            "the output limit holds in the worker"
        );
    }
}
