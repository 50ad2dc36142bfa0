//! `fedge secagg plan`: SecAgg+ parameters and their cost; bad input is a one-line error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};

fn fedge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedge"))
        .args(args)
        .output()
        .expect("run fedge")
}

fn plan(extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["secagg", "plan", "--json"];
    args.extend_from_slice(extra);
    let out = fedge(&args);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn secagg_plan_prices_the_defaults_and_meets_a_failure_target() {
    // The defaults for 50 devices, with the bytes the bench_secagg example measured.
    let d = plan(&["--devices", "50", "--params", "100000"]);
    assert_eq!(d["neighbours"], 40);
    assert_eq!(d["threshold"], 21);
    assert_eq!(d["mod_bits"], 22);
    assert_eq!(d["sent_bytes"], 346_304);
    assert_eq!(d["plain_bytes"], 200_072);

    // A failure target raises k until it holds.
    let loose = plan(&["--devices", "1000", "--params", "1000", "--dropout", "0.3"]);
    let tight = plan(&[
        "--devices",
        "1000",
        "--params",
        "1000",
        "--dropout",
        "0.3",
        "--failure",
        "1e-6",
    ]);
    assert!(loose["failure_probability"].as_f64().unwrap() > 0.1);
    assert!(tight["failure_probability"].as_f64().unwrap() <= 1e-6);
    assert!(tight["neighbours"].as_u64() > loose["neighbours"].as_u64());
    assert!(tight["sent_bytes"].as_u64() > loose["sent_bytes"].as_u64());

    // The text form names the same numbers.
    let out = fedge(&["secagg", "plan", "--devices", "50", "--params", "100000"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("k = 40") && text.contains("346304 bytes"),
        "{text}"
    );
}

#[test]
fn secagg_plan_refuses_bad_input_with_one_line() {
    for args in [
        &["--devices", "2", "--params", "10"][..],
        &["--devices", "20", "--params", "0"],
        &["--devices", "20", "--params", "10", "--dropout", "1.5"],
        &["--devices", "20", "--params", "10", "--failure", "0"],
    ] {
        let mut all = vec!["secagg", "plan"];
        all.extend_from_slice(args);
        let out = fedge(&all);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: "), "{err}");
    }
}
