//! Prompt templates end to end: the examples under examples/templates render and truncate as
//! documented (with a word counter, no model), and `convoy render --format json` agrees with the
//! model's codec.

use std::path::{Path, PathBuf};
use std::process::Command;

use convoy_server::prompt::{count_words, Budget, PromptError, TemplateRef, TemplateSet};
use convoy_weights::ChatMessage;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn examples() -> PathBuf {
    root().join("examples/templates")
}

fn variables(name: &str) -> Value {
    let path = examples().join(format!("{name}.variables.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// (name, role, priority, words, kept) of every part.
fn summary(p: &convoy_server::prompt::Prompt) -> Vec<(String, &'static str, u32, usize, bool)> {
    p.parts
        .iter()
        .zip(&p.part_tokens)
        .zip(&p.truncation.kept)
        .map(|((part, &n), &k)| {
            (
                part.name.clone(),
                part.role.as_str(),
                part.truncation_priority,
                n,
                k,
            )
        })
        .collect()
}

fn row(
    name: &str,
    role: &'static str,
    priority: u32,
    words: usize,
    kept: bool,
) -> (String, &'static str, u32, usize, bool) {
    (name.to_string(), role, priority, words, kept)
}

#[test]
fn example_directory_loads_with_documented_names() {
    let set = TemplateSet::load_dir(&examples()).unwrap();
    assert_eq!(set.names(), ["_parts", "character", "group_chat"]);
}

#[test]
fn character_example_cuts_examples_first_then_oldest_history() {
    let set = TemplateSet::load_dir(&examples()).unwrap();
    let vars = variables("character");
    let which = TemplateRef::Named("character");

    // No limit: all 107 words.
    let p = set.prompt(which, &vars, None, count_words).unwrap();
    assert_eq!(p.truncation.tokens_before, 107);
    assert!(p.truncation.kept.iter().all(|k| *k));

    // Limit 80, step 16: surplus 27, cut 32; the example block (33) is bigger than the cut, so
    // it loses parts from its start until 32 are gone: both examples. History is untouched.
    let p = set
        .prompt(
            which,
            &vars,
            Some(Budget::new(80, Some(16)).unwrap()),
            count_words,
        )
        .unwrap();
    assert_eq!(
        summary(&p),
        vec![
            row("definition", "system", 0, 29, true),
            row("example_1", "system", 2, 15, false),
            row("example_2", "system", 2, 18, false),
            row("history_1", "assistant", 1, 9, true),
            row("history_2", "user", 1, 5, true),
            row("history_3", "assistant", 1, 7, true),
            row("history_4", "user", 1, 4, true),
            row("history_5", "assistant", 1, 14, true),
            row("message", "user", 0, 6, true),
        ]
    );
    assert_eq!(
        (p.truncation.cut_target, p.truncation.tokens_after),
        (32, 74)
    );

    // Limit 60: surplus 47, cut 48; the examples go whole (33), then the oldest three history
    // messages (9 + 5 + 7 = 21 >= 15).
    let p = set
        .prompt(
            which,
            &vars,
            Some(Budget::new(60, Some(16)).unwrap()),
            count_words,
        )
        .unwrap();
    assert_eq!(
        p.cut_part_names(),
        [
            "example_1",
            "example_2",
            "history_1",
            "history_2",
            "history_3"
        ]
    );
    assert_eq!(
        (p.truncation.cut_target, p.truncation.tokens_after),
        (48, 53)
    );
    let roles: Vec<&str> = p.messages.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant", "user"]);
    assert_eq!(p.messages[3].content, "Can I see the engine room?");
}

#[test]
fn group_chat_example_keeps_scene_characters_and_pins() {
    let set = TemplateSet::load_dir(&examples()).unwrap();
    let vars = variables("group_chat");
    let which = TemplateRef::Named("group_chat");

    // Limit 100, step 8: surplus 15, cut 16: the two oldest history messages (8 + 10).
    let p = set
        .prompt(
            which,
            &vars,
            Some(Budget::new(100, Some(8)).unwrap()),
            count_words,
        )
        .unwrap();
    assert_eq!(
        summary(&p),
        vec![
            row("scene", "system", 0, 24, true),
            row("character_Mira", "system", 0, 12, true),
            row("character_Tomas", "system", 0, 9, true),
            row("character_Juno", "system", 0, 9, true),
            row("pinned_1", "system", 0, 10, true),
            row("history_1", "user", 1, 8, false),
            row("history_2", "user", 1, 10, false),
            row("history_3", "assistant", 1, 11, true),
            row("history_4", "user", 1, 9, true),
            row("history_5", "user", 1, 6, true),
            row("cue", "user", 0, 7, true),
        ]
    );
    assert_eq!(
        (
            p.truncation.tokens_before,
            p.truncation.tokens_after,
            p.truncation.never_cut_tokens
        ),
        (115, 97, 71)
    );
    // Scene, characters and pins join into one system message; the responder's message is the
    // assistant's; the rest, with the cue, one user message.
    assert_eq!(p.messages.len(), 3);
    assert_eq!(p.messages[0].role, "system");
    assert!(p.messages[0]
        .content
        .starts_with("This is a group chat between Sam and Mira, Tomas, Juno. Scene: The galley"));
    assert!(p.messages[0]
        .content
        .ends_with("\nPinned, from Mira: Nobody touches the port engine without Tomas."));
    assert_eq!(
        p.messages[1],
        ChatMessage::new(
            "assistant",
            "Tomas: She hums when she is happy. Forty hertz is happy."
        )
    );
    assert_eq!(
        p.messages[2].content,
        "Mira: Tomas, it is a reactor, not a cat.\nSam: Can I see it tomorrow?\n(Tomas speaks next. Reply as Tomas only.)"
    );

    // At the never-cut size the whole history goes; one token below, the prompt is refused.
    let p = set
        .prompt(
            which,
            &vars,
            Some(Budget::new(71, Some(8)).unwrap()),
            count_words,
        )
        .unwrap();
    assert_eq!(p.cut_part_names().len(), 5);
    let e = set
        .prompt(
            which,
            &vars,
            Some(Budget::new(70, Some(8)).unwrap()),
            count_words,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            PromptError::PromptTooLong {
                token_limit: 70,
                never_cut_tokens: 71,
                tokens_before: 115
            }
        ),
        "{e:?}"
    );
}

#[test]
fn group_chat_history_is_cut_oldest_first_at_every_limit() {
    let set = TemplateSet::load_dir(&examples()).unwrap();
    let vars = variables("group_chat");
    let mut last_cut = 0;
    for limit in (71..=115).rev() {
        let p = set
            .prompt(
                TemplateRef::Named("group_chat"),
                &vars,
                Some(Budget::new(limit, None).unwrap()),
                count_words,
            )
            .unwrap();
        let cut = p.cut_part_names();
        // Only history, and always a run from the oldest message.
        for (i, name) in cut.iter().enumerate() {
            assert_eq!(
                *name,
                format!("history_{}", i + 1),
                "limit {limit}: {cut:?}"
            );
        }
        assert!(cut.len() >= last_cut, "a lower limit never keeps more");
        last_cut = cut.len();
        assert!(p.truncation.tokens_after <= limit);
    }
    assert_eq!(last_cut, 5);
}

fn convoy(args: &[&str], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_convoy"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("convoy runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn model() -> PathBuf {
    let m = root().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(m.exists(), "run scripts/fetch_models.sh");
    m
}

#[test]
fn render_json_agrees_with_the_codec() {
    let template = examples().join("group_chat.yaml.j2");
    let vars_path = examples().join("group_chat.variables.json");
    let model = model();
    let (code, out, err) = convoy(
        &[
            "render",
            "--template",
            template.to_str().unwrap(),
            "--variables",
            vars_path.to_str().unwrap(),
            "--token-limit",
            "150",
            "--truncation-step",
            "16",
            "--model",
            model.to_str().unwrap(),
            "--format",
            "json",
        ],
        &root(),
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();

    // The same prompt through the library with the model's tokenizer.
    let mut loaded = convoy_weights::load_model(&model, convoy_weights::LoadFormat::Auto).unwrap();
    let codec = convoy_engine::TextCodec::take_from(&mut loaded);
    let set = TemplateSet::load_dir(&examples()).unwrap();
    let p = set
        .prompt(
            TemplateRef::Named("group_chat"),
            &variables("group_chat"),
            Some(Budget::new(150, Some(16)).unwrap()),
            |t| codec.encode(t).map(|ids| ids.len()),
        )
        .unwrap();

    let parts = v["parts"].as_array().unwrap();
    assert_eq!(parts.len(), p.parts.len());
    for (i, part) in parts.iter().enumerate() {
        assert_eq!(part["name"], p.parts[i].name.as_str());
        assert_eq!(part["role"], p.parts[i].role.as_str());
        assert_eq!(part["truncation_priority"], p.parts[i].truncation_priority);
        let tokens = codec.encode(&p.parts[i].content).unwrap().len();
        assert_eq!(part["tokens"], tokens, "part {i}");
        assert_eq!(part["kept"], p.truncation.kept[i], "part {i}");
    }
    let kept_tokens: usize = parts
        .iter()
        .filter(|p| p["kept"] == true)
        .map(|p| p["tokens"].as_u64().unwrap() as usize)
        .sum();
    assert_eq!(v["part_tokens_after"], kept_tokens);
    assert_eq!(v["part_tokens_before"], p.truncation.tokens_before);
    assert_eq!(v["part_tokens_after"], p.truncation.tokens_after);
    // SmolLM2's tokenizer: 176 tokens of parts, cut (surplus 26, step 16) by 32 or more.
    assert_eq!(
        (
            v["part_tokens_before"].as_u64(),
            v["part_tokens_after"].as_u64()
        ),
        (Some(176), Some(133))
    );
    assert_eq!(
        v["cut"],
        serde_json::json!(["history_1", "history_2", "history_3"])
    );

    let messages: Vec<ChatMessage> = serde_json::from_value(v["messages"].clone()).unwrap();
    assert_eq!(messages, p.messages);
    let ids: Vec<u32> = serde_json::from_value(v["prompt_ids"].clone()).unwrap();
    assert_eq!(ids, codec.encode_chat(&p.messages).unwrap());
    // The generation prompt ends the ids.
    let text = codec.decode(&ids).unwrap();
    assert!(text.trim_end().ends_with("assistant"), "{text:?}");
}

#[test]
fn render_text_needs_no_model_without_a_limit() {
    // Run where the default model does not exist: without --token-limit, --model or --format
    // json the model is not loaded.
    let cwd = std::env::temp_dir();
    let template = examples().join("character.yaml.j2");
    let vars = examples().join("character.variables.json");
    let (code, out, err) = convoy(
        &[
            "render",
            "--template",
            template.to_str().unwrap(),
            "--variables",
            vars.to_str().unwrap(),
        ],
        &cwd,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("definition"), "{out}");
    assert!(out.contains("[user]\nCan I see the engine room?"), "{out}");
    // With a limit it needs the model: found from this unrelated directory (the checkout the
    // binary was built in), and the limit applies.
    let (code, _, err) = convoy(
        &[
            "render",
            "--template",
            template.to_str().unwrap(),
            "--variables",
            vars.to_str().unwrap(),
            "--token-limit",
            "10",
        ],
        &cwd,
    );
    assert_eq!(code, 1);
    assert!(err.contains("prompt too long"), "{err}");
}

/// Without `--variables`, the error names what the template needed and was not given (the
/// user owns the template: a daemon's clients learn no named template's variable names).
#[test]
fn render_without_variables_names_the_ones_not_given() {
    let template = examples().join("character.yaml.j2");
    let (code, _, err) = convoy(
        &["render", "--template", template.to_str().unwrap()],
        &std::env::temp_dir(),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("undefined value"), "{err}");
    assert!(err.contains("(not given: "), "{err}");
    assert!(err.trim_end().ends_with("(not given: character)"), "{err}");
    // Each variable the example gives, taken away in turn, is the one named: at the top level
    // (one used inside a macro of the imported `_parts` too) and inside a given one.
    let full = variables("character");
    let d = std::env::temp_dir().join(format!("convoy-render-vars-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    for (path, lacking) in [
        (&["user_name"][..], "user_name"),
        (&["message"], "message"),
        (&["character", "name"], "character.name"),
    ] {
        let mut v = full.clone();
        let (last, parents) = path.split_last().unwrap();
        let mut at = &mut v;
        for p in parents {
            at = &mut at[*p];
        }
        at.as_object_mut().unwrap().remove(*last);
        let f = d.join(format!("{lacking}.json"));
        std::fs::write(&f, v.to_string()).unwrap();
        let (code, _, err) = convoy(
            &[
                "render",
                "--template",
                template.to_str().unwrap(),
                "--variables",
                f.to_str().unwrap(),
            ],
            &std::env::temp_dir(),
        );
        assert_eq!(code, 1, "{err}");
        assert!(
            err.trim_end().ends_with(&format!("(not given: {lacking})")),
            "{lacking}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn render_reports_a_bad_template_in_one_line() {
    let d = std::env::temp_dir().join(format!("convoy-render-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let cases = [
        (
            "badyaml.yaml.j2",
            "- name: a\n  content: {{ text }}\n",
            "template \"badyaml\": the rendered text is not a YAML list of parts",
        ),
        (
            "syntax.yaml.j2",
            "- name: a\n  content: {{ text }\n",
            "template \"syntax\": syntax error at \"syntax\" line 2",
        ),
        (
            "undefined.yaml.j2",
            "- name: a\n  content: {{ missing | yaml_escape }}\n",
            "template \"undefined\": rendering failed at \"undefined\" line 2: undefined value",
        ),
        (
            "nocontent.yaml.j2",
            "- name: a\n  content: x\n- name: b\n",
            "template \"nocontent\": part #1 \"b\" at rendered line 3: the part has no content",
        ),
        (
            "priority.yaml.j2",
            "- name: a\n  content: x\n  truncation_priority: soon\n",
            "template \"priority\": part #0 \"a\" at rendered line 3: truncation_priority must be a non-negative integer, got soon",
        ),
    ];
    let vars = d.join("vars.json");
    std::fs::write(&vars, r#"{"text": "a: b\n- c"}"#).unwrap();
    for (file, source, needle) in cases {
        std::fs::write(d.join(file), source).unwrap();
        let (code, out, err) = convoy(
            &[
                "render",
                "--template",
                d.join(file).to_str().unwrap(),
                "--variables",
                vars.to_str().unwrap(),
                "--format",
                "json",
            ],
            &d,
        );
        assert_eq!(code, 1, "{file}: {out}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{file}: {err:?}");
        assert!(
            lines[0].starts_with(&format!("error: {needle}")),
            "{file}: {err:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&d);
}
