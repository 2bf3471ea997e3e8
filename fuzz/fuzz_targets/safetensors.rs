//! Fuzz the safetensors reader: any file (its JSON header above all) gives tensors or an
//! error, never a panic, and no tensor reaches past the file's end.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!(
        "convoy-fuzz-{}.safetensors",
        std::process::id()
    ));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = convoy_weights::safetensors::read_file(&path);
    let _ = std::fs::remove_file(&path);
});
