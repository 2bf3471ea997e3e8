//! Named prompt templates: Jinja sources loaded from a directory, rendered with `minijinja`
//! against a request's variables, whose output is the YAML list of parts.
//!
//! Naming: every regular file directly in the directory (not in subdirectories, not hidden)
//! whose name ends in `.yaml.j2`, `.yml.j2` or `.j2` is a template, named by its file name
//! without that ending: `group_chat.yaml.j2` is `group_chat`. `{% include %}`, `{% import %}`
//! and `{% from ... import %}` use the same names. Two files with one name are refused.
//! Templates are strict: an undefined variable is an error (test with `is defined` or give a
//! `default`). Blocks trim their newline (`trim_blocks`) and leading spaces (`lstrip_blocks`),
//! and a template's last newline is kept, so an included template's lines stay lines.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::ValueKind;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

use super::error::{PromptError, SourceLine};
use super::parts::{parse_parts, Part};
use super::{build_prompt, Budget, Prompt};

/// File name endings of templates, tried in this order.
pub const TEMPLATE_SUFFIXES: [&str; 3] = [".yaml.j2", ".yml.j2", ".j2"];

/// The name inline templates go by in errors.
pub const INLINE_TEMPLATE_NAME: &str = "inline";

/// Most minijinja instructions one render may run: a runaway loop in a template is an error,
/// not a hung request.
pub const RENDER_FUEL: u64 = 20_000_000;

/// Default cap on a render's output: rendering stops with an error as soon as its text would
/// pass it (checked as the text is written, not after).
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 1 << 20;

/// Longest quote of an inline template's source line in an error.
const QUOTE_BYTES: usize = 80;

/// Longest detail of a minijinja error kept in an error (its messages may quote values).
const DETAIL_BYTES: usize = 240;

/// `text` cut to at most `max` bytes on a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// An `io::Write` into a `String` that refuses to grow past `limit` bytes, so an oversized
/// render stops at the write that would pass the limit.
struct LimitedOutput {
    text: Vec<u8>,
    limit: usize,
    exceeded: bool,
}

impl std::io::Write for LimitedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.text.len() + buf.len() > self.limit {
            self.exceeded = true;
            return Err(std::io::Error::other("render output limit"));
        }
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The template name a file name gives, or `None` when the file is not a template.
pub fn template_name(file_name: &str) -> Option<&str> {
    if file_name.starts_with('.') {
        return None;
    }
    TEMPLATE_SUFFIXES
        .iter()
        .find_map(|s| file_name.strip_suffix(s))
        .filter(|n| !n.is_empty())
}

/// Which template a request renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateRef<'a> {
    /// One of the set, by name.
    Named(&'a str),
    /// Jinja source given with the request; it may include and import the set's templates.
    Inline(&'a str),
}

impl TemplateRef<'_> {
    /// The name errors use: the template's, or [`INLINE_TEMPLATE_NAME`].
    pub fn name(&self) -> &str {
        match self {
            TemplateRef::Named(n) => n,
            TemplateRef::Inline(_) => INLINE_TEMPLATE_NAME,
        }
    }
}

/// Quote a text as a YAML double-quoted scalar, escaping what YAML would otherwise read:
/// quotes, backslashes, line breaks, tabs and every non-printable character. The result is one
/// line, safe wherever a YAML value goes.
pub fn yaml_quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c < ' '
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || matches!(
                    c,
                    '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}'
                ) =>
            {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `yaml_escape` filter: a string, number or boolean as a YAML double-quoted scalar.
fn yaml_escape(value: Value) -> Result<String, minijinja::Error> {
    match value.kind() {
        ValueKind::String => Ok(yaml_quote(value.as_str().unwrap_or_default())),
        ValueKind::Number => Ok(yaml_quote(&value.to_string())),
        ValueKind::Bool => Ok(yaml_quote(if value.is_true() { "true" } else { "false" })),
        ValueKind::Undefined => Err(minijinja::Error::new(
            ErrorKind::UndefinedError,
            "yaml_escape got an undefined value",
        )),
        ValueKind::None => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "yaml_escape got none; give a string or use default(\"\")",
        )),
        other => Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("yaml_escape takes a string, number or boolean, got {other}"),
        )),
    }
}

fn new_env() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    // No debug mode: after an error it looks up every variable the template referenced again,
    // which would hide which lookup failed (see `RootVariables`); `describe` quotes an inline
    // template's line from the source it was given.
    env.set_debug(false);
    env.set_fuel(Some(RENDER_FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("yaml_escape", yaml_escape);
    env
}

/// The innermost minijinja error of a chain (an include's error wraps the included one's).
fn innermost(e: &minijinja::Error) -> &minijinja::Error {
    let mut cur = e;
    while let Some(next) =
        std::error::Error::source(cur).and_then(|s| s.downcast_ref::<minijinja::Error>())
    {
        cur = next;
    }
    cur
}

/// `inline`: the source of the inline template being rendered, if one is (the engine keeps no
/// sources of its own: debug mode would look every referenced variable up again after an
/// error, which the error's naming of a missing variable cannot tell from the render's own).
fn describe(template: &str, e: &minijinja::Error, inline: Option<&str>) -> (SourceLine, String) {
    let inner = innermost(e);
    let mut message = match inner.detail() {
        Some(d) => format!("{}: {d}", inner.kind()),
        None => inner.kind().to_string(),
    };
    let at = SourceLine {
        template: inner.name().unwrap_or(template).to_string(),
        line: inner.line(),
    };
    // Only the client's own (inline) source is quoted back: a named template's lines are the
    // deployer's files, and no error carries file contents to a client.
    if at.template == INLINE_TEMPLATE_NAME {
        if let (Some(src), Some(line)) = (inline, inner.line()) {
            if let Some(text) = src.lines().nth(line - 1).filter(|t| !t.trim().is_empty()) {
                message.push_str(&format!(" (in `{}`)", cut(text.trim(), QUOTE_BYTES)));
            }
        }
    }
    (at, cut(&message, DETAIL_BYTES).to_string())
}

fn syntax_error(template: &str, e: &minijinja::Error, inline: Option<&str>) -> PromptError {
    let (at, message) = describe(template, e, inline);
    PromptError::Syntax {
        template: template.to_string(),
        at,
        message,
    }
}

/// `missing`: the variables the failing template uses that the caller did not give (named in
/// the message of an undefined-value error).
fn render_error(
    template: &str,
    e: &minijinja::Error,
    inline: Option<&str>,
    missing: &[String],
) -> PromptError {
    let (at, mut message) = describe(template, e, inline);
    if !missing.is_empty() {
        let list = cut(&missing.join(", "), QUOTE_BYTES).to_string();
        message.push_str(&format!(" (not given: {list})"));
    }
    if e.kind() == ErrorKind::SyntaxError || innermost(e).kind() == ErrorKind::SyntaxError {
        return PromptError::Syntax {
            template: template.to_string(),
            at,
            message,
        };
    }
    PromptError::Render {
        template: template.to_string(),
        at,
        message,
    }
}

/// Whether `source` holds `name` as a whole identifier.
fn spells(source: &str, name: &str) -> bool {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    source.match_indices(name).any(|(at, _)| {
        let before = source[..at].chars().next_back();
        let after = source[at + name.len()..].chars().next();
        !before.is_some_and(ident) && !after.is_some_and(ident)
    })
}

/// Names [`RootVariables`] remembers at most.
const MAX_MISSES: usize = 64;

/// A render's variables as its root context: each name the template looks up and does not find
/// is remembered (each once, the latest last), so an undefined-value error can say which it
/// was. Lookups and iteration are the variables' own.
#[derive(Debug)]
struct RootVariables {
    vars: Value,
    misses: Arc<parking_lot::Mutex<Vec<String>>>,
}

impl minijinja::value::Object for RootVariables {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        match key.as_str() {
            Some(name) => self.get_value_by_str(name),
            None => None,
        }
    }

    fn get_value_by_str(self: &Arc<Self>, name: &str) -> Option<Value> {
        let v = self.vars.get_attr(name).ok().filter(|v| !v.is_undefined());
        if v.is_none() {
            // Each name once, the latest last; a loop probing names costs no memory.
            let mut misses = self.misses.lock();
            misses.retain(|m| m != name);
            if misses.len() < MAX_MISSES {
                misses.push(name.to_string());
            }
        }
        v
    }

    fn enumerate(self: &Arc<Self>) -> minijinja::value::Enumerator {
        match self.vars.try_iter() {
            Ok(keys) => minijinja::value::Enumerator::Values(keys.collect()),
            Err(_) => minijinja::value::Enumerator::Empty,
        }
    }
}

/// A set of named templates that can include and import one another.
pub struct TemplateSet {
    env: Environment<'static>,
    names: Vec<String>,
    /// Every template's source, by name, as added (what a render worker loads).
    sources: Vec<(String, String)>,
    dir: Option<PathBuf>,
    max_output_bytes: usize,
    /// Changes whenever the set's templates do (see [`TemplateSet::generation`]).
    generation: u64,
    /// Whether errors of named templates name the variables a render lacks (see
    /// [`TemplateSet::explain_named_templates`]).
    explain_named: bool,
}

/// Source of [`TemplateSet::generation`] values.
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl fmt::Debug for TemplateSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateSet")
            .field("names", &self.names)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Default for TemplateSet {
    fn default() -> Self {
        TemplateSet::new()
    }
}

impl TemplateSet {
    /// An empty set (inline templates only).
    pub fn new() -> TemplateSet {
        TemplateSet {
            env: new_env(),
            names: Vec::new(),
            sources: Vec::new(),
            dir: None,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            generation: next_generation(),
            explain_named: false,
        }
    }

    /// Let an undefined-value error in a named template name the variables the render lacks
    /// (`convoy render`, whose user owns the files). By default only an inline template's
    /// errors do: a daemon's clients learn a named template's line number, never its text,
    /// variable names included.
    pub fn explain_named_templates(&mut self) {
        self.explain_named = true;
    }

    /// Load every template in `dir` (see the module docs for the naming). Every template is
    /// compiled, so a syntax error anywhere fails the whole load.
    pub fn load_dir(dir: &Path) -> Result<TemplateSet, PromptError> {
        let load_err = |path: &Path, e: &dyn fmt::Display| PromptError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| load_err(dir, &e))? {
            let entry = entry.map_err(|e| load_err(dir, &e))?;
            let path = entry.path();
            let Some(file_name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if template_name(&file_name).is_none() {
                continue;
            }
            // The entry's own type, not its target's: a symbolic link is refused, so nothing
            // outside the directory is ever read as a template.
            let kind = entry.file_type().map_err(|e| load_err(&path, &e))?;
            if kind.is_symlink() {
                return Err(load_err(
                    &path,
                    &"a symbolic link; templates must be regular files in the directory",
                ));
            }
            if kind.is_file() {
                files.push((file_name, path));
            }
        }
        files.sort();
        let mut set = TemplateSet::new();
        set.dir = Some(dir.to_path_buf());
        let mut owners: Vec<(String, String)> = Vec::new();
        for (file_name, path) in files {
            let name = template_name(&file_name).unwrap_or(&file_name).to_string();
            if let Some((_, other)) = owners.iter().find(|(n, _)| *n == name) {
                return Err(load_err(
                    dir,
                    &format!("{other} and {file_name} both define the template {name:?}"),
                ));
            }
            let source = std::fs::read_to_string(&path).map_err(|e| load_err(&path, &e))?;
            set.add(&name, &source)?;
            owners.push((name, file_name));
        }
        Ok(set)
    }

    /// Load the template in `file`, returning the set and the template's name. The other
    /// templates of its directory are loaded when it includes or imports them (so one broken
    /// sibling does not stop the rest). A file whose name has no template ending is named by its
    /// whole file name.
    pub fn load_file(file: &Path) -> Result<(TemplateSet, String), PromptError> {
        let load_err = |e: &dyn fmt::Display| PromptError::Load {
            path: file.to_path_buf(),
            message: e.to_string(),
        };
        let file_name = file
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| load_err(&"not a file name"))?
            .to_string();
        match std::fs::symlink_metadata(file) {
            Ok(m) if m.is_file() => {}
            Ok(m) if m.is_symlink() => {
                return Err(load_err(&"a symbolic link; give the template file itself"))
            }
            _ => return Err(load_err(&"no such file")),
        }
        let source = std::fs::read_to_string(file).map_err(|e| load_err(&e))?;
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = template_name(&file_name).unwrap_or(&file_name).to_string();
        let mut set = TemplateSet::new();
        let lookup_dir = dir.clone();
        set.env.set_loader(move |wanted: &str| {
            if wanted.contains(['/', '\\']) {
                return Ok(None);
            }
            for suffix in TEMPLATE_SUFFIXES {
                let path = lookup_dir.join(format!("{wanted}{suffix}"));
                let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
                if template_name(&format!("{wanted}{suffix}")) == Some(wanted) && regular {
                    return std::fs::read_to_string(&path).map(Some).map_err(|e| {
                        minijinja::Error::new(
                            ErrorKind::TemplateNotFound,
                            format!("cannot read {}: {e}", path.display()),
                        )
                    });
                }
            }
            Ok(None)
        });
        set.dir = Some(dir);
        set.add(&name, &source)?;
        Ok((set, name))
    }

    /// Add (or replace) a template from source.
    pub fn add(&mut self, name: &str, source: &str) -> Result<(), PromptError> {
        self.env
            .add_template_owned(name.to_string(), source.to_string())
            .map_err(|e| syntax_error(name, &e, None))?;
        if !self.contains(name) {
            self.names.push(name.to_string());
            self.names.sort();
        }
        match self.sources.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = source.to_string(),
            None => self.sources.push((name.to_string(), source.to_string())),
        }
        self.generation = next_generation();
        Ok(())
    }

    /// A number unique to this set's current templates: two sets (or one set before and after
    /// an [`add`](Self::add)) never share one. Render workers hold the generation they loaded.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Every template's `(name, source)`, in the order they were added.
    pub fn sources(&self) -> &[(String, String)] {
        &self.sources
    }

    /// Cap a render's output at `bytes` (default [`DEFAULT_MAX_OUTPUT_BYTES`]).
    pub fn set_max_output_bytes(&mut self, bytes: usize) {
        self.max_output_bytes = bytes;
    }

    /// The cap on a render's output, in bytes.
    pub fn max_output_bytes(&self) -> usize {
        self.max_output_bytes
    }

    /// The names of the templates, sorted.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether a template of that name is loaded.
    pub fn contains(&self, name: &str) -> bool {
        self.names.iter().any(|n| n == name)
    }

    /// The directory the set was loaded from, if any.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Render a template to its text (the YAML list of parts, before parsing). `variables`
    /// must be a JSON object (or null for none).
    pub fn render_text(
        &self,
        which: TemplateRef<'_>,
        variables: &serde_json::Value,
    ) -> Result<String, PromptError> {
        self.check_request(which, variables)?;
        let root = RootVariables {
            vars: Value::from_serialize(variables),
            misses: Arc::default(),
        };
        let misses = Arc::clone(&root.misses);
        let ctx = Value::from_object(root);
        let name = which.name();
        match which {
            TemplateRef::Named(n) => {
                let t = self
                    .env
                    .get_template(n)
                    .map_err(|e| syntax_error(n, &e, None))?;
                self.render_limited(
                    name,
                    None,
                    |out| t.render_captured_to(ctx, out).map(drop),
                    |e| self.missing_variables(e, None, variables, &misses.lock()),
                )
            }
            TemplateRef::Inline(source) => {
                let t = self
                    .env
                    .template_from_named_str(INLINE_TEMPLATE_NAME, source)
                    .map_err(|e| syntax_error(name, &e, Some(source)))?;
                self.render_limited(
                    name,
                    Some(source),
                    |out| t.render_captured_to(ctx, out).map(drop),
                    |e| self.missing_variables(e, Some(source), variables, &misses.lock()),
                )
            }
        }
    }

    /// Refuse a render request before any work: variables that are not an object (or null),
    /// or a named template the set does not have. Wherever the render then runs (here or in a
    /// worker process), it is refused the same way.
    pub fn check_request(
        &self,
        which: TemplateRef<'_>,
        variables: &serde_json::Value,
    ) -> Result<(), PromptError> {
        if !(variables.is_object() || variables.is_null()) {
            return Err(PromptError::InvalidParameter {
                message: "variables must be a JSON object".to_string(),
            });
        }
        match which {
            TemplateRef::Named(n) if !self.contains(n) => Err(PromptError::UnknownTemplate {
                name: n.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// The variable an undefined-value error lacked, as far as it can be traced: the dotted
    /// paths into given variables (`scene.title` where `scene` has no `title`) that the failing
    /// template uses and `variables` lack, else the last name the render looked up and did not
    /// find (`misses`; the engine stops at the first undefined value used, and names probed
    /// with `is defined` before it are not it). An inline template's error names only what its
    /// own text spells (never a name from a named template it includes). Empty for other
    /// errors, and for a named template unless [`TemplateSet::explain_named_templates`].
    /// `inline`: the source of an inline template being rendered.
    fn missing_variables(
        &self,
        e: &minijinja::Error,
        inline: Option<&str>,
        variables: &serde_json::Value,
        misses: &[String],
    ) -> Vec<String> {
        let inner = innermost(e);
        if inner.kind() != ErrorKind::UndefinedError {
            return Vec::new();
        }
        let template = match (inner.name(), inline) {
            (Some(INLINE_TEMPLATE_NAME), Some(src)) => self
                .env
                .template_from_named_str(INLINE_TEMPLATE_NAME, src)
                .ok(),
            (Some(n), _) if self.explain_named => self.env.get_template(n).ok(),
            _ => None,
        };
        let Some(template) = template else {
            return Vec::new();
        };
        let given = |path: &str| {
            path.split('.')
                .try_fold(variables, |v, key| v.get(key))
                .is_some()
        };
        let global = |name: &str| self.env.globals().any(|(g, _)| g == name);
        // Whether the client's own text spells `name` (always, for the set's own user).
        let spelled = |name: &str| match inner.name() {
            Some(INLINE_TEMPLATE_NAME) => inline.is_some_and(|src| spells(src, name)),
            _ => true,
        };
        let mut nested: Vec<String> = template
            .undeclared_variables(true)
            .into_iter()
            .filter(|p| {
                p.split_once('.')
                    .is_some_and(|(root, _)| given(root) && !global(root))
                    && !given(p)
            })
            .collect();
        nested.sort();
        if !nested.is_empty() {
            return nested;
        }
        misses
            .iter()
            .rev()
            .find(|m| !global(m) && !given(m))
            .filter(|m| spelled(m))
            .map(|m| vec![m.clone()])
            .unwrap_or_default()
    }

    /// Run `render` into an output capped at `max_output_bytes`; `missing` names the variables
    /// an undefined-value error lacks.
    fn render_limited(
        &self,
        name: &str,
        inline: Option<&str>,
        render: impl FnOnce(&mut LimitedOutput) -> Result<(), minijinja::Error>,
        missing: impl FnOnce(&minijinja::Error) -> Vec<String>,
    ) -> Result<String, PromptError> {
        let mut out = LimitedOutput {
            text: Vec::new(),
            limit: self.max_output_bytes,
            exceeded: false,
        };
        let result = render(&mut out);
        if out.exceeded {
            return Err(PromptError::Limit {
                template: name.to_string(),
                message: format!(
                    "the rendered text passed the limit of {} bytes",
                    self.max_output_bytes
                ),
            });
        }
        result.map_err(|e| render_error(name, &e, inline, &missing(&e)))?;
        // minijinja writes whole UTF-8 strings, so the bytes are valid text.
        String::from_utf8(out.text).map_err(|_| PromptError::Limit {
            template: name.to_string(),
            message: "the rendered text is not UTF-8".to_string(),
        })
    }

    /// Render a template and parse its parts.
    pub fn render(
        &self,
        which: TemplateRef<'_>,
        variables: &serde_json::Value,
    ) -> Result<Vec<Part>, PromptError> {
        let text = self.render_text(which, variables)?;
        parse_parts(which.name(), &text)
    }

    /// Render, count each part's tokens with `count_tokens`, truncate to `budget` (none: keep
    /// everything) and build the chat messages. See [`build_prompt`].
    pub fn prompt<E, F>(
        &self,
        which: TemplateRef<'_>,
        variables: &serde_json::Value,
        budget: Option<Budget>,
        count_tokens: F,
    ) -> Result<Prompt, PromptError>
    where
        E: fmt::Display,
        F: Fn(&str) -> Result<usize, E>,
    {
        let parts = self.render(which, variables)?;
        build_prompt(which.name(), parts, budget, count_tokens)
    }
}

/// The daemon's templates: a [`TemplateSet`] loaded from a directory, reloaded on demand
/// (SIGHUP). A failed reload keeps the set in use.
#[derive(Debug)]
pub struct TemplateRegistry {
    dir: PathBuf,
    max_output_bytes: usize,
    current: parking_lot::RwLock<Arc<TemplateSet>>,
}

impl TemplateRegistry {
    /// Load the templates of `dir`, each render's output capped at `max_output_bytes`.
    pub fn load(dir: &Path, max_output_bytes: usize) -> Result<TemplateRegistry, PromptError> {
        let mut set = TemplateSet::load_dir(dir)?;
        set.set_max_output_bytes(max_output_bytes);
        Ok(TemplateRegistry {
            dir: dir.to_path_buf(),
            max_output_bytes,
            current: parking_lot::RwLock::new(Arc::new(set)),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The set in use; requests hold it while they render, unaffected by reloads.
    pub fn current(&self) -> Arc<TemplateSet> {
        self.current.read().clone()
    }

    /// Load the directory again. On success the new set replaces the old and its size is
    /// returned; on error the old set stays and the error says why (for the caller to log).
    pub fn reload(&self) -> Result<usize, PromptError> {
        let mut set = TemplateSet::load_dir(&self.dir)?;
        set.set_max_output_bytes(self.max_output_bytes);
        let n = set.names().len();
        *self.current.write() = Arc::new(set);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::prompt::parts::Role;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("convoy-prompt-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn set(templates: &[(&str, &str)]) -> TemplateSet {
        let mut s = TemplateSet::new();
        for (n, src) in templates {
            s.add(n, src).unwrap();
        }
        s
    }

    #[test]
    fn sets_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<TemplateSet>();
        shared::<TemplateRegistry>();
    }

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(template_name("group_chat.yaml.j2"), Some("group_chat"));
        assert_eq!(template_name("a.yml.j2"), Some("a"));
        assert_eq!(template_name("_macros.j2"), Some("_macros"));
        assert_eq!(template_name("notes.yaml"), None);
        assert_eq!(template_name(".hidden.j2"), None);
        assert_eq!(template_name(".j2"), None);
    }

    #[test]
    fn yaml_quote_round_trips_through_the_parser() {
        let texts = [
            "",
            "plain",
            "key: value # not a comment",
            "- not a list",
            "\"quoted\" and 'single'",
            "back\\slash \\n literal",
            "line one\nline two\r\n\ttab",
            "  leading and trailing  ",
            "null",
            "true",
            "42",
            "{{ not jinja }} {% either %}",
            "émoji 🎭 and 中文",
            "bell \u{7} nul \u{0} del \u{7f} nel \u{85} ls \u{2028} bom \u{feff}",
            "*alias &anchor !tag %directive @at `tick` | > ---",
        ];
        for t in texts {
            let yaml = format!("- name: x\n  content: {}\n", yaml_quote(t));
            let parts = parse_parts("t", &yaml).unwrap_or_else(|e| panic!("{t:?}: {e}"));
            assert_eq!(parts[0].content, t);
            assert!(!yaml_quote(t).contains('\n'));
        }
    }

    #[test]
    fn renders_parts_with_loops_conditionals_macros_and_includes() {
        let s = set(&[
            (
                "_macros",
                "{% macro part(name, content, role='user', priority=0) %}\n- name: {{ name | yaml_escape }}\n  role: {{ role }}\n  truncation_priority: {{ priority }}\n  content: {{ content | yaml_escape }}\n{% endmacro %}\n",
            ),
            ("_head", "- name: head\n  role: system\n  content: {{ persona | yaml_escape }}\n"),
            (
                "chat",
                "{% import '_macros' as m %}\n{% include '_head' %}\n{% for msg in history %}\n{{ m.part('h' ~ loop.index, msg.text, msg.role, 1) }}\n{% endfor %}\n{% if note is defined %}\n{{ m.part('note', note) }}\n{% endif %}\n",
            ),
        ]);
        let vars = json!({"persona": "Ann: \"kind\"", "history": [
            {"role": "user", "text": "hi: there"}, {"role": "assistant", "text": "hello\nyou"}]});
        let parts = s.render(TemplateRef::Named("chat"), &vars).unwrap();
        let got: Vec<(&str, Role, u32, &str)> = parts
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.role,
                    p.truncation_priority,
                    p.content.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("head", Role::System, 0, "Ann: \"kind\""),
                ("h1", Role::User, 1, "hi: there"),
                ("h2", Role::Assistant, 1, "hello\nyou"),
            ]
        );
        let mut vars = vars;
        vars["note"] = json!(12);
        let parts = s.render(TemplateRef::Named("chat"), &vars).unwrap();
        assert_eq!(parts.last().unwrap().content, "12");
        // Inline templates see the set.
        let parts = s
            .render(
                TemplateRef::Inline("{% import '_macros' as m %}{{ m.part('only', 'x') }}"),
                &json!({}),
            )
            .unwrap();
        assert_eq!(parts[0].name, "only");
    }

    #[test]
    fn unknown_template_and_bad_variables() {
        let s = set(&[("a", "- name: a\n  content: x\n")]);
        let e = s.render(TemplateRef::Named("b"), &json!({})).unwrap_err();
        assert_eq!(e.code(), "unknown_template");
        // Only the name asked for: the loaded names are not listed to a client.
        assert_eq!(e.to_string(), "unknown template \"b\"");
        let e = s.render(TemplateRef::Named("a"), &json!([1])).unwrap_err();
        assert_eq!(e.code(), "invalid_parameter");
        assert!(s
            .render(TemplateRef::Named("a"), &serde_json::Value::Null)
            .is_ok());
    }

    #[test]
    fn jinja_syntax_error_names_template_and_line() {
        let mut s = TemplateSet::new();
        let e = s
            .add(
                "broken",
                "- name: a\n  content: x\n{% for m in history %}\n- oops\n",
            )
            .unwrap_err();
        assert_eq!(e.code(), "template_error");
        assert!(matches!(e, PromptError::Syntax { .. }), "{e:?}");
        assert_eq!(e.template(), Some("broken"));
        assert!(e.line().is_some(), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("template \"broken\": syntax error at \"broken\" line"),
            "{msg}"
        );
        // Inline.
        let e = s
            .render(
                TemplateRef::Inline("- name: a\n  content: {{ x }\n"),
                &json!({"x": 1}),
            )
            .unwrap_err();
        assert!(matches!(e, PromptError::Syntax { .. }), "{e:?}");
        assert_eq!(e.template(), Some("inline"));
        assert_eq!(e.line(), Some(2));
    }

    /// The error names the variable that failed, not one probed with `is defined` before it,
    /// and an inline template's error never names a variable of a named template it includes.
    #[test]
    fn undefined_names_only_the_failing_variable_of_the_clients_own_text() {
        let s = set(&[
            (
                "_system",
                "{% if internal_flag is defined %}x{% endif %}- name: s\n  content: hi\n",
            ),
            ("_broken", "{{ secret_name ~ 1 }}"),
        ]);
        let e = s
            .render(
                TemplateRef::Inline(
                    "{% if tools is defined %}{% endif %}{% include '_system' %}\n- name: a\n  content: {{ nope | yaml_escape }}\n",
                ),
                &json!({}),
            )
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.ends_with("(not given: nope)"), "{msg}");
        assert!(!msg.contains("internal_flag"), "{msg}");
        // Failing inside the named template: nothing of it is named to a client.
        let e = s
            .render(TemplateRef::Inline("{% include '_broken' %}"), &json!({}))
            .unwrap_err();
        assert!(!e.to_string().contains("secret_name"), "{e}");
        assert!(!e.to_string().contains("not given"), "{e}");
    }

    #[test]
    fn undefined_variable_is_an_error_with_its_line() {
        let s = set(&[
            (
                "scene",
                "- name: scene\n  content: {{ scene.title | yaml_escape }}\n",
            ),
            (
                "chat",
                "- name: intro\n  content: {{ intro | yaml_escape }}\n{% include 'scene' %}\n",
            ),
        ]);
        let e = s
            .render(TemplateRef::Named("chat"), &json!({"scene": {}}))
            .unwrap_err();
        assert_eq!(e.code(), "template_error");
        // By default a named template's variable names stay in the deployer's file.
        assert!(!e.to_string().contains("not given"), "{e}");
        let mut s = s;
        s.explain_named_templates();
        let e = s
            .render(TemplateRef::Named("chat"), &json!({"scene": {}}))
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("template \"chat\": rendering failed at \"chat\" line 2: undefined value"),
            "{msg}"
        );
        // It names what the caller did not give.
        assert!(msg.ends_with("(not given: intro)"), "{msg}");
        // A named template's lines are the deployer's file: named by number, never quoted.
        assert!(!msg.contains("(in `"), "{msg}");
        // An inline template's failing line is the client's own, and is quoted back.
        let e = s
            .render(
                TemplateRef::Inline("- name: a\n  content: {{ intro | yaml_escape }}\n"),
                &json!({}),
            )
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("(in `content: {{ intro | yaml_escape }}`) (not given: intro)"),
            "{e}"
        );
        // In an included template: the line is the included one's, and the missing variable
        // a dotted path into what was given.
        let e = s
            .render(
                TemplateRef::Named("chat"),
                &json!({"intro": "hi", "scene": {}}),
            )
            .unwrap_err();
        assert!(e.to_string().ends_with("(not given: scene.title)"), "{e}");
        match &e {
            PromptError::Render { template, at, .. } => {
                assert_eq!(template, "chat");
                assert_eq!(at.template, "scene");
                assert_eq!(at.line, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_yaml_and_bad_parts_from_a_template_name_it() {
        let s = set(&[
            ("badyaml", "- name: a\n  content: {{ text }}\n"),
            (
                "nocontent",
                "- name: a\n  content: x\n- name: {{ n }}\n  role: user\n",
            ),
            (
                "badprio",
                "- name: a\n  truncation_priority: {{ p }}\n  content: x\n",
            ),
        ]);
        // Unescaped text with a colon and a line break: not the YAML the author meant.
        let e = s
            .render(TemplateRef::Named("badyaml"), &json!({"text": "a: b\n- c"}))
            .unwrap_err();
        assert_eq!(e.code(), "template_error");
        assert!(matches!(e, PromptError::Yaml { .. }), "{e:?}");
        assert!(e.to_string().starts_with("template \"badyaml\""), "{e}");
        assert!(e.line().is_some());

        let e = s
            .render(TemplateRef::Named("nocontent"), &json!({"n": "second"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "template \"nocontent\": part #1 \"second\" at rendered line 3: the part has no content"
        );

        let e = s
            .render(TemplateRef::Named("badprio"), &json!({"p": "high"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "template \"badprio\": part #0 \"a\" at rendered line 2: truncation_priority must be a non-negative integer, got high"
        );
        assert_eq!(
            s.render(TemplateRef::Named("badprio"), &json!({"p": 3}))
                .unwrap()[0]
                .truncation_priority,
            3
        );
    }

    #[test]
    fn yaml_escape_refuses_lists_and_none() {
        let s = set(&[("t", "- name: a\n  content: {{ v | yaml_escape }}\n")]);
        for v in [json!([1]), json!(null), json!({"a": 1})] {
            let e = s
                .render(TemplateRef::Named("t"), &json!({ "v": v }))
                .unwrap_err();
            assert!(matches!(e, PromptError::Render { .. }), "{e:?}");
            assert!(e.to_string().contains("yaml_escape"), "{e}");
        }
        let p = s
            .render(TemplateRef::Named("t"), &json!({"v": true}))
            .unwrap();
        assert_eq!(p[0].content, "true");
    }

    #[test]
    fn runaway_loops_run_out_of_fuel() {
        let s = TemplateSet::new();
        let e = s
            .render(
                TemplateRef::Inline(
                    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                ),
                &json!({}),
            )
            .unwrap_err();
        assert!(matches!(e, PromptError::Render { .. }), "{e:?}");
        assert!(e.to_string().contains("fuel"), "{e}");
    }

    #[test]
    fn load_dir_naming_duplicates_and_reload() {
        let d = scratch("load");
        std::fs::write(d.join("one.yaml.j2"), "{% include '_part' %}").unwrap();
        std::fs::write(
            d.join("_part.j2"),
            "- name: p\n  content: {{ x | yaml_escape }}\n",
        )
        .unwrap();
        std::fs::write(d.join("readme.md"), "not a template").unwrap();
        let reg = TemplateRegistry::load(&d, DEFAULT_MAX_OUTPUT_BYTES).unwrap();
        let s = reg.current();
        assert_eq!(s.names(), ["_part".to_string(), "one".to_string()]);
        assert_eq!(
            s.render(TemplateRef::Named("one"), &json!({"x": "y"}))
                .unwrap()[0]
                .content,
            "y"
        );
        // A bad reload keeps the old set.
        std::fs::write(d.join("two.j2"), "{% if %}").unwrap();
        let e = reg.reload().unwrap_err();
        assert!(
            matches!(&e, PromptError::Syntax { template, .. } if template == "two"),
            "{e:?}"
        );
        assert_eq!(reg.current().names().len(), 2);
        // A good one replaces it.
        std::fs::write(d.join("two.j2"), "- name: t\n  content: two\n").unwrap();
        assert_eq!(reg.reload().unwrap(), 3);
        assert!(reg.current().contains("two"));
        // The set a request holds is not affected.
        assert!(!s.contains("two"));
        // Two files, one name.
        std::fs::write(d.join("two.yaml.j2"), "- name: t\n  content: two\n").unwrap();
        let e = reg.reload().unwrap_err();
        assert!(
            e.to_string().contains("both define the template \"two\""),
            "{e}"
        );
        // A missing directory.
        let e = TemplateSet::load_dir(&d.join("nope")).unwrap_err();
        assert!(matches!(e, PromptError::Load { .. }), "{e:?}");
        // load_file takes the file's template and loads what it includes, on demand: a broken
        // sibling does not matter, a broken include names itself.
        std::fs::write(d.join("two.j2"), "{% if %}").unwrap();
        let (s, name) = TemplateSet::load_file(&d.join("one.yaml.j2")).unwrap();
        assert_eq!(name, "one");
        assert_eq!(s.names(), ["one".to_string()]);
        assert_eq!(
            s.render(TemplateRef::Named("one"), &json!({"x": "z"}))
                .unwrap()[0]
                .content,
            "z"
        );
        std::fs::write(
            d.join("_part.j2"),
            "- name: p\n  content: {{ x | yaml_escape }\n",
        )
        .unwrap();
        let (s, _) = TemplateSet::load_file(&d.join("one.yaml.j2")).unwrap();
        let e = s
            .render(TemplateRef::Named("one"), &json!({"x": "z"}))
            .unwrap_err();
        assert!(
            matches!(&e, PromptError::Syntax { at, .. } if at.template == "_part" && at.line == Some(2)),
            "{e:?}"
        );
        let e = TemplateSet::load_file(&d.join("nope.j2")).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
