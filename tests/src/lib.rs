//! Shared helpers of fedge's integration tests: the model zoo and its references, a real
//! Mosquitto broker.

pub mod mosquitto;
pub mod zoo;

use std::path::PathBuf;

/// The workspace root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Prints why a test did not run; the test then returns without asserting.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}
