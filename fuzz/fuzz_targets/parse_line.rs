//! Fuzz the daemon's request parser: any bytes must give a message or an error with a code,
//! never a panic; and every error must serialise to a valid error line.
#![no_main]

use convoy_server::api::protocol::{parse_line, ServerEvent};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_line(data) {
        Ok(_) => {}
        Err(e) => {
            assert!(!e.code.is_empty());
            let line = ServerEvent::from_error(e).to_line();
            assert!(line.ends_with('\n'));
            assert!(serde_json::from_str::<serde_json::Value>(&line).is_ok());
        }
    }
});
