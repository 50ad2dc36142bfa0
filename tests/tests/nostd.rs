//! The protocol core builds and passes its tests without `std` and without an allocator
//! (`fedge-proto --no-default-features`). Runs a nested cargo in its own target directory so the
//! outer build's features and lock are untouched.

use std::process::Command;

#[test]
fn proto_without_std_or_alloc_builds_and_passes_its_tests() {
    let root = fedge_tests::repo_root();
    let target = root.join("target").join("nostd");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for args in [
        &[
            "build",
            "-p",
            "fedge-proto",
            "--no-default-features",
            "--lib",
        ][..],
        &["test", "-p", "fedge-proto", "--no-default-features"][..],
    ] {
        let out = Command::new(&cargo)
            .current_dir(&root)
            .args(args)
            .arg("--target-dir")
            .arg(&target)
            .env("CARGO_TERM_COLOR", "never")
            .output()
            .expect("run cargo");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cargo {} failed:\n{stdout}\n{stderr}",
            args.join(" ")
        );
        if args[0] == "test" {
            // The unit tests: the envelope, chunk, topic, message and replay tests that need no
            // allocator.
            let passed: usize = stdout
                .lines()
                .filter_map(|l| l.strip_prefix("test result: ok. "))
                .filter_map(|l| l.split(' ').next()?.parse::<usize>().ok())
                .sum();
            assert!(
                passed >= 10,
                "expected the no-alloc unit tests to run:\n{stdout}"
            );
        }
    }
    // The library itself is #![no_std] without the std feature.
    let lib = std::fs::read_to_string(root.join("agent/proto/src/lib.rs")).expect("lib.rs");
    assert!(lib.contains("#![cfg_attr(not(any(feature = \"std\", test)), no_std)]"));
}
