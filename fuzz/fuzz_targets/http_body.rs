//! Fuzz the HTTP face's body parser (OpenAI's request shapes, then the socket's checks): any
//! bytes give a request or an error with a code and a status, never a panic.
#![no_main]

use convoy_server::api::http::{parse_request, Endpoint};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        if let Err(e) = parse_request(endpoint, data, "m", 4096) {
            assert!(!e.code.is_empty());
            assert!(e.status.as_u16() >= 400);
            assert!(e.message.len() <= 512);
        }
    }
});
