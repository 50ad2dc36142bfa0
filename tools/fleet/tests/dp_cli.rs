//! `fedge dp epsilon`: the last line is the bare ε, bad parameters are one-line errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn fedge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedge"))
        .args(args)
        .output()
        .expect("run fedge")
}

fn epsilon_args<'a>(z: &'a str, q: &'a str, t: &'a str, d: &'a str) -> Vec<&'a str> {
    vec![
        "dp",
        "epsilon",
        "--noise-multiplier",
        z,
        "--sampling-rate",
        q,
        "--steps",
        t,
        "--delta",
        d,
    ]
}

#[test]
fn dp_epsilon_prints_the_accountants_epsilon_on_its_last_line() {
    let out = fedge(&epsilon_args("1.1", "0.004", "10000", "1e-5"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last: f64 = stdout.trim_end().lines().last().unwrap().parse().unwrap();
    // dp-accounting 0.6.0: 2.013059446324756 (models/fl/tests/vectors/dp_rdp.json).
    assert!((last - 2.013059446324756).abs() < 1e-9, "{last}");
    assert_eq!(
        last,
        fedge_fl::dp::epsilon(1.1, 0.004, 10_000, 1e-5).unwrap()
    );

    let mut json_args = epsilon_args("1.1", "0.004", "10000", "1e-5");
    json_args.push("--json");
    let out = fedge(&json_args);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["epsilon"].as_f64(), Some(last));
    assert_eq!(doc["optimal_order"].as_f64(), Some(9.8));
}

#[test]
fn dp_epsilon_rejects_bad_parameters_with_one_line() {
    for (z, q, d, what) in [
        ("0", "0.1", "1e-5", "noise multiplier"),
        ("NaN", "0.1", "1e-5", "noise multiplier"),
        ("1", "1.5", "1e-5", "sampling rate"),
        ("1", "0.1", "0", "delta"),
        ("1", "0.1", "1", "delta"),
    ] {
        let out = fedge(&epsilon_args(z, q, "10", d));
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.starts_with("error: ") && err.contains(what), "{err}");
        assert!(out.stdout.is_empty());
    }
}
