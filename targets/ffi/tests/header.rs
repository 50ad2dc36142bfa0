//! `targets/ffi/fedge.h` is what cbindgen generates from the crate: this fails when an exported
//! signature changed without regenerating. `FEDGE_BLESS=1` rewrites the header.
//!
//! cbindgen runs as its own binary (`cargo install cbindgen --version 0.29.4 --locked`, done by
//! `.ci/run`) rather than as a library, so its proc-macro features never change the workspace's
//! build of every other crate.

use std::path::Path;
use std::process::Command;

#[test]
fn header_matches_the_rust_code() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let generated = std::env::temp_dir().join(format!("fedge-h-{}.h", std::process::id()));
    let run = Command::new("cbindgen")
        .current_dir(crate_dir)
        .args([
            "--quiet",
            "--config",
            "cbindgen.toml",
            "--crate",
            "fedge-ffi",
            "--output",
        ])
        .arg(&generated)
        .status();
    match run {
        Err(e) => {
            eprintln!(
                "SKIPPED header_matches_the_rust_code: cbindgen not installed ({e}); `.ci/run` installs it"
            );
            return;
        }
        Ok(s) => assert!(s.success(), "cbindgen failed"),
    }
    let new = std::fs::read(&generated).expect("generated header");
    let _ = std::fs::remove_file(&generated);
    let path = crate_dir.join("fedge.h");
    if std::env::var_os("FEDGE_BLESS").is_some() {
        std::fs::write(&path, &new).expect("write header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == new,
        "{} is out of date with the Rust code: regenerate with\n  FEDGE_BLESS=1 cargo test --workspace --profile ci --test header",
        path.display()
    );
}
