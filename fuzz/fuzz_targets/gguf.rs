//! Fuzz the GGUF reader: any file gives a model file or an error, never a panic, and a tensor
//! the header describes is read within the file or refused.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::env::temp_dir().join(format!("convoy-fuzz-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(file) = convoy_weights::gguf::GgufFile::open(&path) {
        let _ = file.get("general.architecture");
        for info in file.tensors.iter().take(8) {
            let _ = file.read_tensor(info, String::new());
        }
    }
    let _ = std::fs::remove_file(&path);
});
