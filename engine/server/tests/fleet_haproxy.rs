//! The fleet recipe of docs/deploy.md: two glassllm replicas behind HAProxy with
//! deploy/haproxy.cfg. Checks that a conversation key (the X-Session-ID header, else the
//! JSON `user` field) pins requests to one replica, and that a replica draining after
//! SIGTERM (its /health answers 503) gets no new requests while the other serves them all
//! without an error.
//!
//! Skipped with a message when `haproxy` is not installed, unless CONVOY_REQUIRE_HAPROXY=1.

mod support;

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use support::http::{free_addr, raw_request, read_response, request, Resp};
use support::{model, poll, Daemon};

fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

/// A short completion (glassllm has no chat template; routing does not look at the prompt).
fn completion(user: Option<&str>) -> Value {
    let mut v = json!({"prompt": "Once upon a time", "max_tokens": 2, "temperature": 0});
    if let Some(u) = user {
        v["user"] = json!(u);
    }
    v
}

/// Requests a replica finished (all reasons), from its /metrics.
fn finished(addr: SocketAddr) -> f64 {
    let m = get(addr, "/metrics");
    assert_eq!(m.status, 200);
    m.text()
        .lines()
        .filter(|l| l.starts_with("convoy:request_finished_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// HAProxy under test, killed on drop; its log is printed if the test fails.
struct Haproxy {
    child: Child,
    log: PathBuf,
    stats: SocketAddr,
    front: SocketAddr,
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            eprintln!("--- haproxy log ---\n{log}");
        }
    }
}

impl Haproxy {
    fn start(dir: &Path, replicas: &[SocketAddr]) -> Haproxy {
        let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/haproxy.cfg");
        let front = free_addr();
        let stats = free_addr();
        let log = dir.join("haproxy.log");
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&cfg)
            .env("CONVOY_BIND", front.to_string())
            .env("CONVOY_HAPROXY_STATS", stats.to_string())
            .env("CONVOY_HAPROXY_SOCKET", dir.join("haproxy.sock"))
            .env("CONVOY_BALANCE", "sticky")
            .env_remove("CONVOY_HAPROXY_USER")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::options().append(true).open(&log).unwrap());
        for i in 0..8 {
            cmd.env_remove(format!("CONVOY_REPLICA_{i}"));
        }
        for (i, a) in replicas.iter().enumerate() {
            cmd.env(format!("CONVOY_REPLICA_{i}"), a.to_string());
        }
        let child = cmd.spawn().expect("start haproxy");
        let mut h = Haproxy {
            child,
            log,
            stats,
            front,
        };
        poll("HAProxy to see every replica healthy", 20, || {
            if let Some(status) = h.child.try_wait().unwrap() {
                panic!("haproxy exited at start: {status}");
            }
            let st = h.server_states()?;
            (st.len() == replicas.len() && st.iter().all(|(_, s)| s == "UP")).then_some(())
        });
        h
    }

    /// (server name, status) of backend `convoy`, from the stats page's CSV, once every
    /// server has been checked at least once.
    fn server_states(&self) -> Option<Vec<(String, String)>> {
        let r = TcpStream::connect(self.stats).ok()?;
        let mut r = r;
        r.write_all(&raw_request("GET", "/;csv", &[], b"")).ok()?;
        let text = read_response(r).text();
        let mut lines = text.lines();
        let head: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let col = |name: &str| head.iter().position(|h| *h == name).unwrap();
        let (px, sv, status, check) = (
            col("pxname"),
            col("svname"),
            col("status"),
            col("check_status"),
        );
        let mut out = Vec::new();
        for l in lines {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() > check && f[px] == "convoy" && f[sv] != "BACKEND" && f[sv] != "FRONTEND" {
                if f[check].is_empty() || f[check].starts_with("INI") {
                    return None; // not checked yet
                }
                out.push((f[sv].to_string(), f[status].to_string()));
            }
        }
        Some(out)
    }

    /// Requests the backend re-sent to another replica (the stats page's `wredis`).
    fn redispatches(&self) -> u64 {
        let mut r = TcpStream::connect(self.stats).unwrap();
        r.write_all(&raw_request("GET", "/;csv", &[], b"")).unwrap();
        let text = read_response(r).text();
        let head: Vec<&str> = text
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = head.iter().position(|h| *h == "wredis").unwrap();
        text.lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > col && f[0] == "convoy" && f[1] == "BACKEND")
            .and_then(|f| f[col].parse().ok())
            .unwrap_or(0)
    }

    /// A completion through HAProxy; returns the replica that answered.
    fn send(&self, session: Option<&str>, user: Option<&str>) -> String {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(session.map(|s| ("x-session-id", s)));
        let r = request(
            self.front,
            "POST",
            "/v1/completions",
            &headers,
            completion(user).to_string().as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.header("x-convoy-replica")
            .expect("deploy/haproxy.cfg names the replica")
            .to_string()
    }
}

fn haproxy_installed() -> bool {
    match Command::new("haproxy").arg("-v").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            let msg = "haproxy is not installed (apt-get install -y haproxy)";
            if std::env::var("CONVOY_REQUIRE_HAPROXY").as_deref() == Ok("1") {
                panic!("{msg}, and CONVOY_REQUIRE_HAPROXY=1");
            }
            eprintln!("skipped: {msg}; set CONVOY_REQUIRE_HAPROXY=1 to make this a failure");
            false
        }
    }
}

#[test]
fn sticky_routing_and_drain_behind_haproxy() {
    if !haproxy_installed() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("convoy-fleet-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let addrs = [free_addr(), free_addr()];
    // One request at a time on r0, so the drain below has queued streams to finish.
    let mut replicas: Vec<Daemon> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Daemon::start(
                &format!("fleet-r{i}"),
                &model("glassllm"),
                &[
                    "--http",
                    &a.to_string(),
                    "--threads",
                    "1",
                    "--max-running",
                    "1",
                    "--kv-cache-memory",
                    "16MiB",
                ],
            )
        })
        .collect();
    let lb = Haproxy::start(&dir, &addrs);
    let counters = || [finished(addrs[0]), finished(addrs[1])];

    // (a) and (b): every request of one key lands on one replica, by the replicas' own
    // counters and by HAProxy's X-Convoy-Replica header; the keys spread over both.
    let mut owner = std::collections::HashMap::new();
    for by_header in [true, false] {
        let mut used = std::collections::HashSet::new();
        for k in 0..12 {
            let key = format!("conversation-{k}");
            let before = counters();
            let mut seen = std::collections::HashSet::new();
            for _ in 0..4 {
                seen.insert(if by_header {
                    lb.send(Some(&key), None)
                } else {
                    lb.send(None, Some(&key))
                });
            }
            let after = counters();
            let delta = [after[0] - before[0], after[1] - before[1]];
            assert!(
                delta == [4.0, 0.0] || delta == [0.0, 4.0],
                "key {key} (by header: {by_header}): finished requests per replica went up by {delta:?}"
            );
            assert_eq!(seen.len(), 1, "key {key}: answered by {seen:?}");
            let r = seen.into_iter().next().unwrap();
            assert_eq!(r, if delta[0] > 0.0 { "r0" } else { "r1" });
            // The same key maps to the same replica whether it comes as header or `user`.
            if let Some(prev) = owner.insert(key.clone(), r.clone()) {
                assert_eq!(prev, r, "key {key}: header and user field disagree");
            }
            used.insert(r);
        }
        assert_eq!(used.len(), 2, "12 keys all hashed to {used:?}");
    }

    // (c) Drain: queue streams on r0 directly, SIGTERM it; while it finishes them, its
    // /health says 503 and every new request, its own conversations' included, goes to r1.
    let r0_finished = finished(addrs[0]);
    let streams: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(addrs[0]).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let body = json!({"prompt": "Once upon a time", "max_tokens": 100, "ignore_eos": true, "stream": true});
            s.write_all(&raw_request(
                "POST",
                "/v1/completions",
                &[("content-type", "application/json")],
                body.to_string().as_bytes(),
            ))
            .unwrap();
            s
        })
        .collect();
    // SIGTERM only once r0 has admitted all 64 (a stream it has not read yet would be refused
    // as shutting_down) and at least 10 still wait.
    poll("r0 to admit the streams", 10, || {
        let m = get(addrs[0], "/metrics").text();
        let gauge = |name: &str| {
            m.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let waiting = gauge("convoy:num_requests_waiting{");
        let admitted =
            gauge("convoy:num_requests_running{") + waiting + finished(addrs[0]) - r0_finished;
        (admitted >= 64.0 && waiting >= 10.0).then_some(())
    });
    {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        kill(
            Pid::from_raw(replicas[0].child.id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
    }
    poll("r0's /health to answer 503", 10, || {
        (get(addrs[0], "/health").status == 503).then_some(())
    });
    let r1_before = finished(addrs[1]);
    let mut sent = 0.0;
    for (key, _) in owner.iter() {
        for by_header in [true, false] {
            let r = if by_header {
                lb.send(Some(key), None)
            } else {
                lb.send(None, Some(key))
            };
            assert_eq!(r, "r1", "key {key} went to the draining replica");
            sent += 1.0;
        }
    }
    assert_eq!(finished(addrs[1]) - r1_before, sent);
    // Informational: how many of them reached r0 first (503) and were re-sent by HAProxy
    // before its health check marked r0 down.
    eprintln!(
        "{sent} requests during r0's drain, {} re-sent from r0 to r1 by HAProxy",
        lb.redispatches()
    );
    assert!(
        replicas[0].child.try_wait().unwrap().is_none(),
        "r0 finished draining before the checks ran: give it more queued streams"
    );
    // HAProxy's health check marks it down (fall 2, inter 1s).
    poll("HAProxy to mark r0 down", 10, || {
        let st = lb.server_states()?;
        st.iter()
            .any(|(s, status)| s == "r0" && status.starts_with("DOWN"))
            .then_some(())
    });
    // The streams r0 held when SIGTERM came all run to their end.
    for s in streams {
        let r = read_response(s);
        let text = r.text();
        assert_eq!(r.status, 200, "{text}");
        assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
        assert!(text.contains("data: [DONE]"), "{text}");
    }
    let status = replicas[0].wait_exit("r0 to exit after its drain", 30);
    assert!(status.success(), "{status}");
    // With r0 gone, r1 still serves everything.
    for (key, _) in owner.iter().take(4) {
        assert_eq!(lb.send(Some(key), None), "r1");
    }
    drop(lb);
    let _ = std::fs::remove_dir_all(&dir);
}
