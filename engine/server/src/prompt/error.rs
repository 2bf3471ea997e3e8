//! Why a prompt could not be built. Every variant names what a person needs to find the fault:
//! the template, the part and the line; [`PromptError::code`] gives a stable code for the wire.

use std::fmt;
use std::path::PathBuf;

/// A part named in an error: its index in the rendered list (from 0) and its `name`, when the
/// part got far enough to have one.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PartRef {
    /// Position in the rendered list of parts, from 0.
    pub index: usize,
    /// The part's `name`, if it has a readable one.
    pub name: Option<String>,
}

impl fmt::Display for PartRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "part #{} {n:?}", self.index),
            None => write!(f, "part #{}", self.index),
        }
    }
}

/// Where in a template's Jinja source something went wrong.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SourceLine {
    /// The template the line is in: the requested one, or one it includes or imports.
    pub template: String,
    /// The line, from 1, when minijinja knows it.
    pub line: Option<usize>,
}

impl fmt::Display for SourceLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{:?} line {l}", self.template),
            None => write!(f, "{:?}", self.template),
        }
    }
}

/// Why a template could not be loaded, rendered or turned into a prompt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum PromptError {
    /// No template of that name is loaded.
    #[error("unknown template {name:?}")]
    UnknownTemplate {
        /// The name asked for.
        name: String,
    },
    /// The template directory, or a file in it, cannot be read.
    #[error("templates at {}: {message}", path.display())]
    Load {
        /// The directory or file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The Jinja source does not parse.
    #[error("template {template:?}: syntax error at {at}: {message}")]
    Syntax {
        /// The template being loaded or compiled.
        template: String,
        /// Where the error is.
        at: SourceLine,
        /// What is wrong.
        message: String,
    },
    /// Jinja rendering failed: an undefined variable (templates are strict), a failing filter, a
    /// missing include, a runaway loop.
    #[error("template {template:?}: rendering failed at {at}: {message}")]
    Render {
        /// The template asked for.
        template: String,
        /// Where the error is (which may be in an included template).
        at: SourceLine,
        /// What is wrong.
        message: String,
    },
    /// The rendered text is not valid YAML, or is not a list of parts.
    #[error("template {template:?}: the rendered text is not a YAML list of parts: {message} at rendered line {line}, column {column}")]
    Yaml {
        /// The template asked for.
        template: String,
        /// Line of the rendered text, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// What is wrong.
        message: String,
        /// The rendered line itself, to find it in the template (cut to 200 bytes; not part of
        /// the message: errors never carry template output to a client).
        text: String,
    },
    /// A part breaks the schema: a missing `content`, a wrong type for `truncation_priority`, an
    /// unknown role or key.
    #[error("template {template:?}: {part} at rendered line {line}: {message}")]
    Part {
        /// The template asked for.
        template: String,
        /// The part.
        part: PartRef,
        /// Line of the rendered text, from 1.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The render passed a resource limit: its output size, its memory, its time, or it
    /// crashed in its worker process.
    #[error("template {template:?}: {message}")]
    Limit {
        /// The template asked for.
        template: String,
        /// Which limit, and its value.
        message: String,
    },
    /// The variables are not a JSON object, or a budget value is out of range.
    #[error("{message}")]
    InvalidParameter {
        /// What is wrong.
        message: String,
    },
    /// The token counter failed on a part.
    #[error("template {template:?}: counting the tokens of {part}: {message}")]
    TokenCount {
        /// The template asked for.
        template: String,
        /// The part.
        part: PartRef,
        /// The counter's error.
        message: String,
    },
    /// Even with every cuttable part removed the prompt exceeds the limit.
    #[error("prompt too long: the parts that are never cut (truncation_priority 0) take {never_cut_tokens} tokens, over the token_limit {token_limit} (all parts: {tokens_before} tokens)")]
    PromptTooLong {
        /// The limit.
        token_limit: usize,
        /// Tokens of the priority-0 parts.
        never_cut_tokens: usize,
        /// Tokens of all parts.
        tokens_before: usize,
    },
}

impl PromptError {
    /// A stable code for the wire protocol: `unknown_template`, `template_error` (load, syntax,
    /// render, YAML and part errors), `invalid_parameter`, `invalid_prompt` (token counting) or
    /// `prompt_too_long`.
    pub fn code(&self) -> &'static str {
        match self {
            PromptError::UnknownTemplate { .. } => "unknown_template",
            PromptError::Load { .. }
            | PromptError::Syntax { .. }
            | PromptError::Render { .. }
            | PromptError::Yaml { .. }
            | PromptError::Part { .. }
            | PromptError::Limit { .. } => "template_error",
            PromptError::InvalidParameter { .. } => "invalid_parameter",
            PromptError::TokenCount { .. } => "invalid_prompt",
            PromptError::PromptTooLong { .. } => "prompt_too_long",
        }
    }

    /// The template the error is about, when there is one.
    pub fn template(&self) -> Option<&str> {
        match self {
            PromptError::UnknownTemplate { name, .. } => Some(name),
            PromptError::Syntax { template, .. }
            | PromptError::Render { template, .. }
            | PromptError::Yaml { template, .. }
            | PromptError::Part { template, .. }
            | PromptError::TokenCount { template, .. }
            | PromptError::Limit { template, .. } => Some(template),
            PromptError::Load { .. }
            | PromptError::InvalidParameter { .. }
            | PromptError::PromptTooLong { .. } => None,
        }
    }

    /// The line the error points at: a Jinja source line for syntax and render errors, a line
    /// of the rendered text for YAML and part errors.
    pub fn line(&self) -> Option<usize> {
        match self {
            PromptError::Syntax { at, .. } | PromptError::Render { at, .. } => at.line,
            PromptError::Yaml { line, .. } | PromptError::Part { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// The part the error is about, when there is one.
    pub fn part(&self) -> Option<&PartRef> {
        match self {
            PromptError::Part { part, .. } | PromptError::TokenCount { part, .. } => Some(part),
            _ => None,
        }
    }
}
