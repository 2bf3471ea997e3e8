//! Fuzz prompt templates: a Jinja source (before the first NUL byte) must compile or give a
//! syntax error, never panic; the same bytes read as rendered YAML must give parts or an error
//! naming a line, never panic or recurse without bound. (Rendering itself runs in the
//! daemon's worker processes under memory and time limits, tested in the server's tests: a
//! fuzzer in one process would only rediscover that a template can ask for 100 GB.)
#![no_main]

use convoy_server::prompt::{parse_parts, TemplateSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let source = data.split(|&b| b == 0).next().unwrap_or_default();
    let Ok(source) = std::str::from_utf8(source) else {
        return;
    };
    let mut set = TemplateSet::new();
    if let Err(e) = set.add("t", source) {
        assert_eq!(e.code(), "template_error");
    }
    if let Err(e) = parse_parts("t", source) {
        assert_eq!(e.code(), "template_error");
        assert!(e.line().is_some());
    }
});
