//! What the model tests of this crate share: where the SmolLM2 GGUF file is.

use std::path::{Path, PathBuf};

/// The file `sluice models pull smollm2-135m` installs.
pub const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `$SLUICE_SMOLLM2_GGUF`, else `models/` at the repository root; `None` (the test skips) when
/// it is missing, unless `SLUICE_REQUIRE_MODELS=1`, which makes a missing model a failure.
pub fn model_path() -> Option<PathBuf> {
    let path = std::env::var_os("SLUICE_SMOLLM2_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../models")
                .join(MODEL_FILE)
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var("SLUICE_REQUIRE_MODELS").as_deref() == Ok("1") {
        panic!(
            "SLUICE_REQUIRE_MODELS=1 but the model is missing at {}",
            path.display()
        );
    }
    eprintln!(
        "SKIP: {} not found (set SLUICE_SMOLLM2_GGUF or put it in models/)",
        path.display()
    );
    None
}
