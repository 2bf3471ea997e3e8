//! The official `openai` Python package, unmodified, streams a multi-turn chat from the real
//! daemon's HTTP face, and `/metrics` parses with `prometheus_client` (tests/python/
//! openai_client.py holds the checks). scripts/test.sh installs both packages (pinned) and sets
//! CONVOY_REQUIRE_OPENAI=1; without that variable a machine lacking them skips this test.

mod support;

use std::net::TcpListener;
use std::process::Command;

use support::{smollm2, Daemon};

fn python_has_packages() -> bool {
    Command::new("python3")
        .args(["-c", "import openai, prometheus_client"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn openai_python_client_streams_a_cached_multi_turn_chat_and_metrics_parse() {
    if !python_has_packages() {
        assert!(
            std::env::var_os("CONVOY_REQUIRE_OPENAI").is_none(),
            "CONVOY_REQUIRE_OPENAI is set but python3 cannot import openai and prometheus_client"
        );
        eprintln!("skipped: pip install openai prometheus-client (scripts/test.sh does)");
        return;
    }
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let key = "sk-convoy-test";
    let _d = Daemon::start_with_env(
        "http-python",
        &smollm2(),
        &["--http", &addr.to_string()],
        &[("CONVOY_API_KEY", key)],
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_client.py");
    let out = Command::new("python3")
        .args([
            script,
            "--base-url",
            &format!("http://{addr}"),
            "--api-key",
            key,
        ])
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "openai_client.py failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
