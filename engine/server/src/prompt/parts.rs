//! The parts of a rendered template: the YAML list the Jinja output must be, read with
//! `saphyr-parser` so that every part and every value keeps its line.
//!
//! Only what the schema needs is supported: one document holding a list of mappings whose keys
//! and values are scalars. Anchors are allowed but aliases (`*name`) are refused, and tags are
//! ignored. Scalars keep their text as written (after YAML unescaping and folding), so
//! `content: 42` is the text `42`; only `truncation_priority` is read as a number.

use saphyr_parser::{Event, Parser, ScalarStyle, ScanError};
use serde::Serialize;

use super::error::{PartRef, PromptError};

/// Who a part speaks as. Other roles are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// `system`
    System,
    /// `user` (the default)
    User,
    /// `assistant`
    Assistant,
}

impl Role {
    /// The role as chat templates spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }

    /// `system`, `user` or `assistant` (exactly, lower case).
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One part of a prompt, as the template rendered it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Part {
    /// The part's `name` (need not be unique).
    pub name: String,
    /// The part's `role` (default `user`).
    pub role: Role,
    /// The part's `content`.
    pub content: String,
    /// 0 = never cut (the default); higher numbers are cut first.
    pub truncation_priority: u32,
    /// Line of the rendered text where the part starts, from 1.
    pub line: usize,
}

/// The keys a part may have.
pub const PART_KEYS: [&str; 4] = ["name", "role", "content", "truncation_priority"];

#[derive(Debug)]
enum Kind {
    Scalar { value: String, style: ScalarStyle },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

#[derive(Debug)]
struct Node {
    line: usize,
    col: usize,
    kind: Kind,
}

impl Node {
    fn describe(&self) -> String {
        match &self.kind {
            Kind::Scalar { .. } if self.is_null() => "null".to_string(),
            Kind::Scalar { value, .. } => {
                format!("the scalar {:?}", super::template::cut(value, 40))
            }
            Kind::Seq(_) => "a list".to_string(),
            Kind::Map(_) => "a mapping".to_string(),
        }
    }

    fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { value, style: ScalarStyle::Plain }
            if matches!(value.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The text of a non-null scalar.
    fn text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { value, .. } if !self.is_null() => Some(value),
            _ => None,
        }
    }
}

struct Frame {
    node: Node,
    key: Option<Node>,
}

fn yaml_error(template: &str, text: &str, line: usize, col: usize, message: String) -> PromptError {
    PromptError::Yaml {
        template: template.to_string(),
        line,
        column: col + 1,
        message,
        text: super::template::cut(text.lines().nth(line.saturating_sub(1)).unwrap_or(""), 200)
            .to_string(),
    }
}

fn scan_error(template: &str, text: &str, e: &ScanError) -> PromptError {
    let m = e.marker();
    yaml_error(template, text, m.line(), m.col(), e.info().to_string())
}

/// Deepest nesting of YAML collections a rendered text may have. A list of parts needs 2 (the
/// list, a part's mapping); the bound keeps building, walking and dropping the tree shallow
/// whatever a template renders.
pub const MAX_YAML_DEPTH: usize = 16;

/// Read the YAML text into one tree, at most [`MAX_YAML_DEPTH`] collections deep.
fn load(template: &str, text: &str) -> Result<Option<Node>, PromptError> {
    let mut stack: Vec<Frame> = Vec::new();
    let mut root: Option<Node> = None;
    for ev in Parser::new_from_str(text) {
        let (event, span) = ev.map_err(|e| scan_error(template, text, &e))?;
        let (line, col) = (span.start.line(), span.start.col());
        let done = match event {
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart(_)
            | Event::DocumentEnd => continue,
            Event::Alias(_) => {
                return Err(yaml_error(
                    template,
                    text,
                    line,
                    col,
                    "YAML aliases (*name) are not supported; use Jinja variables or macros"
                        .to_string(),
                ))
            }
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if stack.len() >= MAX_YAML_DEPTH {
                    return Err(yaml_error(
                        template,
                        text,
                        line,
                        col,
                        format!("YAML nested more than {MAX_YAML_DEPTH} levels deep"),
                    ));
                }
                let kind = match event {
                    Event::SequenceStart(..) => Kind::Seq(Vec::new()),
                    _ => Kind::Map(Vec::new()),
                };
                stack.push(Frame {
                    node: Node { line, col, kind },
                    key: None,
                });
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => match stack.pop() {
                Some(f) => f.node,
                None => continue,
            },
            Event::Scalar(value, style, _, _) => Node {
                line,
                col,
                kind: Kind::Scalar {
                    value: value.into_owned(),
                    style,
                },
            },
        };
        match stack.last_mut() {
            None => {
                if root.is_some() {
                    return Err(yaml_error(
                        template,
                        text,
                        line,
                        col,
                        "more than one YAML document; render one list of parts".to_string(),
                    ));
                }
                root = Some(done);
            }
            Some(frame) => match &mut frame.node.kind {
                Kind::Seq(items) => items.push(done),
                Kind::Map(entries) => match frame.key.take() {
                    None => frame.key = Some(done),
                    Some(k) => entries.push((k, done)),
                },
                Kind::Scalar { .. } => unreachable!("scalars are never on the stack"),
            },
        }
    }
    Ok(root)
}

/// Parse the rendered text of `template` into parts, checking the schema.
pub fn parse_parts(template: &str, text: &str) -> Result<Vec<Part>, PromptError> {
    let root = load(template, text)?;
    let Some(root) = root else {
        return Err(yaml_error(
            template,
            text,
            1,
            0,
            "the template rendered no parts (empty text)".to_string(),
        ));
    };
    let items = match root.kind {
        Kind::Seq(items) => items,
        _ => {
            return Err(yaml_error(
                template,
                text,
                root.line,
                root.col,
                format!(
                    "expected a list of parts (each starting with \"- name: ...\"), got {}",
                    root.describe()
                ),
            ))
        }
    };
    if items.is_empty() {
        return Err(yaml_error(
            template,
            text,
            root.line,
            root.col,
            "the list of parts is empty".to_string(),
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(index, node)| part(template, index, node))
        .collect()
}

fn part(template: &str, index: usize, node: Node) -> Result<Part, PromptError> {
    let part_line = node.line;
    let entries = match node.kind {
        Kind::Map(entries) => entries,
        _ => {
            return Err(PromptError::Part {
                template: template.to_string(),
                part: PartRef { index, name: None },
                line: part_line,
                message: format!(
                    "a part must be a mapping with {}, got {}",
                    PART_KEYS.join(", "),
                    node.describe()
                ),
            })
        }
    };
    // The name first, so that every later error can say which part it is about.
    let name_node = entries
        .iter()
        .find(|(k, _)| k.text() == Some("name"))
        .map(|(_, v)| v);
    let mut pref = PartRef {
        index,
        name: name_node.and_then(|n| n.text()).map(str::to_string),
    };
    let err = |pref: &PartRef, line: usize, message: String| PromptError::Part {
        template: template.to_string(),
        part: pref.clone(),
        line,
        message,
    };

    let mut name: Option<String> = None;
    let mut role: Option<Role> = None;
    let mut content: Option<String> = None;
    let mut priority: Option<u32> = None;
    let mut seen: Vec<&'static str> = Vec::new();
    for (key, value) in &entries {
        let Some(k) = key.text() else {
            return Err(err(
                &pref,
                key.line,
                format!("keys must be strings, got {}", key.describe()),
            ));
        };
        let Some(&k) = PART_KEYS.iter().find(|p| **p == k) else {
            return Err(err(
                &pref,
                key.line,
                format!("unknown key {k:?} (a part has {})", PART_KEYS.join(", ")),
            ));
        };
        if seen.contains(&k) {
            return Err(err(&pref, key.line, format!("the key {k:?} appears twice")));
        }
        seen.push(k);
        let scalar = |what: &str| -> Result<String, PromptError> {
            match (&value.kind, value.text()) {
                (Kind::Scalar { .. }, Some(t)) => Ok(t.to_string()),
                _ => Err(err(
                    &pref,
                    value.line,
                    format!("{k} must be {what}, got {}", value.describe()),
                )),
            }
        };
        match k {
            "name" => {
                let n = scalar("a string")?;
                if n.trim().is_empty() {
                    return Err(err(&pref, value.line, "name is empty".to_string()));
                }
                name = Some(n);
            }
            "role" => {
                let r = scalar("system, user or assistant")?;
                role = Some(Role::parse(&r).ok_or_else(|| {
                    err(
                        &pref,
                        value.line,
                        format!("role must be system, user or assistant, got {r:?}"),
                    )
                })?);
            }
            "content" => {
                content = Some(scalar("a string (write content: \"\" for an empty part)")?)
            }
            _ => priority = Some(parse_priority(value).map_err(|m| err(&pref, value.line, m))?),
        }
    }
    let Some(name) = name else {
        return Err(err(&pref, part_line, "the part has no name".to_string()));
    };
    pref.name = Some(name.clone());
    let Some(content) = content else {
        return Err(err(&pref, part_line, "the part has no content".to_string()));
    };
    Ok(Part {
        name,
        role: role.unwrap_or(Role::User),
        content,
        truncation_priority: priority.unwrap_or(0),
        line: part_line,
    })
}

/// `truncation_priority`: a plain (unquoted) non-negative integer up to 2^32 - 1, decimal or
/// `0x`/`0o` as in YAML's core schema.
fn parse_priority(value: &Node) -> Result<u32, String> {
    const WHAT: &str = "truncation_priority must be a non-negative integer";
    let (text, style) = match &value.kind {
        Kind::Scalar { value: t, style } if !value.is_null() => (t.as_str(), *style),
        _ => return Err(format!("{WHAT}, got {}", value.describe())),
    };
    if style != ScalarStyle::Plain {
        return Err(format!(
            "{WHAT}, got the string {text:?} (remove the quotes)"
        ));
    }
    let parsed = if let Some(hex) = text.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else if let Some(oct) = text.strip_prefix("0o") {
        u64::from_str_radix(oct, 8).ok()
    } else {
        let digits = text.strip_prefix('+').unwrap_or(text);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            digits.parse::<u64>().ok().or(Some(u64::MAX))
        } else {
            None
        }
    };
    match parsed {
        Some(n) => u32::try_from(n).map_err(|_| format!("{WHAT} below 2^32, got {text}")),
        None => Err(format!("{WHAT}, got {text}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Vec<Part> {
        parse_parts("t", text).unwrap_or_else(|e| panic!("{e}"))
    }

    fn bad(text: &str) -> PromptError {
        parse_parts("t", text).expect_err("an error")
    }

    #[test]
    fn parts_with_defaults_and_lines() {
        let p = ok("# parts\n- name: a\n  content: hello\n- name: b\n  role: system\n  truncation_priority: 3\n  content: |\n    two\n    lines\n");
        assert_eq!(p.len(), 2);
        assert_eq!(
            p[0],
            Part {
                name: "a".into(),
                role: Role::User,
                content: "hello".into(),
                truncation_priority: 0,
                line: 2
            }
        );
        assert_eq!(p[1].role, Role::System);
        assert_eq!(p[1].truncation_priority, 3);
        assert_eq!(p[1].content, "two\nlines\n");
        assert_eq!(p[1].line, 4);
    }

    #[test]
    fn scalars_keep_their_text() {
        let p = ok("- {name: 7, content: 42, truncation_priority: 0x10}\n- name: x\n  content: ''\n  truncation_priority: +2\n");
        assert_eq!((p[0].name.as_str(), p[0].content.as_str()), ("7", "42"));
        assert_eq!(p[0].truncation_priority, 16);
        assert_eq!((p[1].content.as_str(), p[1].truncation_priority), ("", 2));
    }

    #[test]
    fn schema_errors_name_the_part_and_line() {
        let e = bad("- name: a\n  content: x\n- name: b\n  role: user\n");
        assert_eq!(
            e.to_string(),
            "template \"t\": part #1 \"b\" at rendered line 3: the part has no content"
        );
        let e = bad("- name: a\n  content:\n");
        assert!(e.to_string().contains("content must be a string"), "{e}");
        let e = bad("- name: a\n  content: x\n  truncation_priority: high\n");
        assert_eq!(e.line(), Some(3));
        assert!(
            e.to_string()
                .contains("truncation_priority must be a non-negative integer, got high"),
            "{e}"
        );
        let e = bad("- name: a\n  content: x\n  truncation_priority: '2'\n");
        assert!(e.to_string().contains("remove the quotes"), "{e}");
        let e = bad("- name: a\n  content: x\n  truncation_priority: -1\n");
        assert!(e.to_string().contains("got -1"), "{e}");
        let e = bad("- name: a\n  content: x\n  truncation_priority: 1.5\n");
        assert!(e.to_string().contains("got 1.5"), "{e}");
        let e = bad("- name: a\n  content: x\n  truncation_priority: 4294967296\n");
        assert!(e.to_string().contains("below 2^32"), "{e}");
        let e = bad("- name: a\n  role: narrator\n  content: x\n");
        assert!(
            e.to_string()
                .contains("role must be system, user or assistant, got \"narrator\""),
            "{e}"
        );
        let e = bad("- name: a\n  content: x\n  priority: 1\n");
        assert!(e.to_string().contains("unknown key \"priority\""), "{e}");
        let e = bad("- name: a\n  content: x\n  content: y\n");
        assert!(e.to_string().contains("appears twice"), "{e}");
        let e = bad("- content: x\n");
        assert_eq!(
            e.to_string(),
            "template \"t\": part #0 at rendered line 1: the part has no name"
        );
        let e = bad("- just text\n");
        assert!(e.to_string().contains("a part must be a mapping"), "{e}");
        let e = bad("- name: a\n  content: [1, 2]\n");
        assert!(e.to_string().contains("got a list"), "{e}");
        for e in [bad("- name: a\n  content:\n"), bad("- content: x\n")] {
            assert_eq!(e.code(), "template_error");
        }
    }

    #[test]
    fn yaml_errors_give_the_rendered_line() {
        let e = bad("- name: a\n  content: x\n - name: b\n");
        match &e {
            PromptError::Yaml { line, text, .. } => {
                assert_eq!(*line, 3);
                assert_eq!(text, " - name: b");
            }
            other => panic!("{other:?}"),
        }
        let e = bad("name: a\ncontent: x\n");
        assert!(e.to_string().contains("expected a list of parts"), "{e}");
        let e = bad("");
        assert!(e.to_string().contains("no parts"), "{e}");
        let e = bad("[]");
        assert!(e.to_string().contains("empty"), "{e}");
        let e = bad("- &a {name: a, content: x}\n- *a\n");
        assert!(e.to_string().contains("aliases"), "{e}");
        let e = bad("- {name: a, content: x}\n---\n- {name: b, content: y}\n");
        assert!(e.to_string().contains("more than one"), "{e}");
    }
}
