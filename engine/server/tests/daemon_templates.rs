//! Prompt templates through the daemon: named templates from `--templates`, inline ones,
//! truncation reported in `done`, every template error code, and reloading on SIGHUP (a bad
//! reload keeps the templates in use).

mod support;

use std::path::Path;

use convoy_server::api::client::Client;
use convoy_server::api::protocol::ServerEvent;
use serde_json::{json, Value};
use support::{poll, smollm2, Daemon};

fn variables(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/templates")
        .join(format!("{name}.variables.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `(prompt_tokens, truncated_parts)` of a finished request, or the error code.
fn run(c: &mut Client, mut req: Value) -> Result<(usize, Option<Vec<String>>), String> {
    req["op"] = json!("generate");
    req["id"] = json!("t");
    req["max_tokens"] = json!(1);
    match c.generate(&req).unwrap() {
        (
            _,
            ServerEvent::Done {
                usage,
                truncated_parts,
                ..
            },
        ) => Ok((usage.prompt_tokens, truncated_parts)),
        (_, ServerEvent::Error { code, .. }) => Err(code),
        (_, other) => panic!("{other:?}"),
    }
}

#[test]
fn named_and_inline_templates_with_truncation_and_their_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/templates");
    let d = Daemon::start(
        "templates",
        &smollm2(),
        &["--templates", dir.to_str().unwrap()],
    );
    let mut c = d.client();
    let vars = variables("character");
    let (whole, cut) = run(&mut c, json!({"template":"character","variables":vars})).unwrap();
    assert_eq!(cut, Some(vec![]), "no limit, nothing cut");
    let (short, cut) = run(
        &mut c,
        json!({"template":"character","variables":vars,"token_limit":60,"truncation_step":16}),
    )
    .unwrap();
    let cut = cut.unwrap();
    assert!(
        !cut.is_empty() && short < whole,
        "{cut:?}: {short} vs {whole}"
    );
    assert!(
        cut.iter()
            .all(|p| p.starts_with("example_") || p.starts_with("history_")),
        "only cuttable parts go: {cut:?}"
    );
    // Inline, including a macro of the loaded set.
    let inline = "{% import \"_parts\" as p %}\n{{ p.part(\"q\", \"user\", question) }}\n";
    let (n, cut) = run(
        &mut c,
        json!({"template_yaml":inline,"variables":{"question":"What is two and two?"}}),
    )
    .unwrap();
    assert!(n > 5 && cut == Some(vec![]), "{n} {cut:?}");
    // Errors, each with its code.
    for (req, code) in [
        (json!({"template":"nope"}), "unknown_template"),
        (json!({"template_yaml":"{% if %}"}), "template_error"),
        (
            json!({"template":"character","variables":{}}),
            "template_error",
        ),
        (
            json!({"template_yaml":"- name: a\n  content: x\n  truncation_priority: high\n"}),
            "template_error",
        ),
        (
            json!({"template":"character","variables":vars,"truncation_step":4}),
            "invalid_parameter",
        ),
        (
            json!({"template":"character","variables":vars,"token_limit":5}),
            "prompt_too_long",
        ),
    ] {
        assert_eq!(run(&mut c, req.clone()), Err(code.to_string()), "{req}");
    }
}

#[test]
fn sighup_reloads_templates_and_a_bad_reload_keeps_the_old_set() {
    let dir = std::env::temp_dir().join(format!("convoy-templates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let part = |text: &str| format!("- name: q\n  content: {text}\n");
    std::fs::write(dir.join("one.yaml.j2"), part("one")).unwrap();
    let d = Daemon::start(
        "reload",
        &smollm2(),
        &["--templates", dir.to_str().unwrap()],
    );
    let mut c = d.client();
    assert!(run(&mut c, json!({"template":"one"})).is_ok());
    assert_eq!(
        run(&mut c, json!({"template":"two"})),
        Err("unknown_template".into())
    );
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(d.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    std::fs::write(dir.join("two.yaml.j2"), part("two")).unwrap();
    hup();
    poll("the reload", 30, || {
        run(&mut c, json!({"template":"two"})).ok()
    });
    // A broken file: the reload fails, the set in use stays.
    std::fs::write(dir.join("three.yaml.j2"), "{% for %}").unwrap();
    std::fs::remove_file(dir.join("one.yaml.j2")).unwrap();
    hup();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        run(&mut c, json!({"template":"one"})).is_ok(),
        "old set kept"
    );
    assert!(run(&mut c, json!({"template":"two"})).is_ok());
    c.send(&json!({"op":"health"})).unwrap();
    assert!(matches!(c.recv().unwrap(), Some(ServerEvent::Health { status }) if status == "ok"));
    std::fs::remove_dir_all(&dir).unwrap();
}
