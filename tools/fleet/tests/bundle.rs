//! `fedge bundle build` and `verify`: the file is the signed envelope the agent installs, and any
//! altered byte or another key is refused with a one-line reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{TempDir, fails, ok, operator_keys};
use fedge_proto::envelope::decode;
use fedge_proto::msg::Bundle;
use fedge_proto::{Envelope, Kind, PublicKey};

fn zoo(name: &str) -> std::path::PathBuf {
    fedge_tests::repo_root().join("models/zoo").join(name)
}

#[test]
fn a_built_bundle_verifies_and_installs_and_tampering_is_refused() {
    let t = TempDir::new("bundle");
    let operator = PublicKey::from_hex(&operator_keys(&t.join("ops"))).unwrap();
    let (key, public) = (t.join("ops/operator.key"), t.join("ops/operator.pub"));
    let model = zoo("ppocr_cls").join("model.onnx");
    let out = t.join("cls.bundle");
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();

    let built = ok(&[
        "bundle",
        "build",
        &s(&model),
        "--version",
        "7",
        "--key",
        &s(&key),
        "--out",
        &s(&out),
    ]);
    assert!(built.starts_with("ppocr_cls v7:"), "{built}");

    // The format: an operator-signed Bundle envelope holding the model and the zoo reference.
    let wire = std::fs::read(&out).unwrap();
    let env = Envelope::open(&wire, wire.len())
        .unwrap()
        .verify(&operator)
        .unwrap();
    assert_eq!((env.kind, env.sender), (Kind::Bundle, "operator"));
    let b: Bundle<'_> = decode(env.payload).unwrap();
    assert_eq!((b.name, b.version), ("ppocr_cls", 7));
    assert_eq!(b.model, std::fs::read(&model).unwrap().as_slice());
    let io = std::fs::read(zoo("ppocr_cls").join("io.npz")).unwrap();
    assert_eq!(
        (b.test_input, b.test_output),
        (io.as_slice(), io.as_slice())
    );

    // The agent's own install path takes it and serves it.
    let store_dir = t.join("store");
    let store = fedge_agent::store::ModelStore::open(&store_dir, 2, 1).unwrap();
    let sha: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &wire)
        .as_ref()
        .try_into()
        .unwrap();
    store
        .install(&b, &sha)
        .expect("the agent installs the bundle");
    assert_eq!(store.healthy().len(), 1);

    let v = ok(&["bundle", "verify", &s(&out), "--pub", &s(&public), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["name"], "ppocr_cls");
    assert_eq!(v["version"], 7);
    assert_eq!(
        v["model_sha256"],
        "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"
    );
    let text = ok(&[
        "bundle",
        "verify",
        &s(&out),
        "--pub",
        &operator.to_hex(),
        "--self-test",
    ]);
    assert!(
        text.starts_with("ok: ppocr_cls v7") && text.contains("self-test passed"),
        "{text}"
    );

    // One flipped byte anywhere: in the model (signature), in the header (version/shape).
    for (at, why) in [(wire.len() / 2, "bad signature"), (0, "not a bundle")] {
        let mut bad = wire.clone();
        bad[at] ^= 0x01;
        let f = t.join("tampered.bundle");
        std::fs::write(&f, &bad).unwrap();
        let e = fails(&["bundle", "verify", &s(&f), "--pub", &s(&public)]);
        assert!(e.contains(why), "{e}");
    }
    let f = t.join("truncated.bundle");
    std::fs::write(&f, &wire[..wire.len() - 1]).unwrap();
    fails(&["bundle", "verify", &s(&f), "--pub", &s(&public)]);

    // Another operator's key.
    operator_keys(&t.join("other"));
    let e = fails(&[
        "bundle",
        "verify",
        &s(&out),
        "--pub",
        &s(&t.join("other/operator.pub")),
    ]);
    assert!(e.contains("bad signature"), "{e}");

    // Missing files and bad flags.
    let e = fails(&[
        "bundle",
        "verify",
        &s(&t.join("none.bundle")),
        "--pub",
        &s(&public),
    ]);
    assert!(e.contains("none.bundle"), "{e}");
    let e = fails(&[
        "bundle",
        "verify",
        &s(&out),
        "--pub",
        &s(&t.join("none.pub")),
    ]);
    assert!(e.contains("--pub"), "{e}");
    let e = fails(&["bundle", "verify", &s(&out)]);
    assert!(e.contains("--pub"), "{e}");
    let e = fails(&[
        "bundle",
        "build",
        &s(&model),
        "--key",
        &s(&key),
        "--out",
        &s(&out),
    ]);
    assert!(e.contains("--version"), "{e}");
    let e = fails(&[
        "bundle",
        "build",
        &s(&model),
        "--version",
        "8",
        "--key",
        &s(&key),
        "--out",
        &s(&out),
    ]);
    assert!(e.contains("--force"), "{e}");
    let missing = t.join("nope.onnx");
    let e = fails(&[
        "bundle",
        "build",
        &s(&missing),
        "--version",
        "1",
        "--key",
        &s(&key),
        "--out",
        &s(&t.join("x.bundle")),
        "--test-vector",
        &s(&zoo("ppocr_cls").join("io.npz")),
    ]);
    assert!(e.contains("nope.onnx"), "{e}");
    let lone = t.join("lone.onnx");
    std::fs::copy(&model, &lone).unwrap();
    let e = fails(&[
        "bundle",
        "build",
        &s(&lone),
        "--version",
        "1",
        "--key",
        &s(&key),
        "--out",
        &s(&t.join("x.bundle")),
    ]);
    assert!(e.contains("--test-vector"), "{e}");
    let e = fails(&[
        "bundle",
        "build",
        &s(&model),
        "--version",
        "1",
        "--key",
        &s(&public),
        "--out",
        &s(&t.join("x.bundle")),
    ]);
    assert!(e.contains("operator key"), "{e}");
}

#[test]
fn a_bundle_that_fails_its_self_test_is_not_signed_unless_asked() {
    let t = TempDir::new("selftest");
    operator_keys(&t.join("ops"));
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let key = s(&t.join("ops/operator.key"));
    let model = s(&zoo("ppocr_cls").join("model.onnx"));
    // Another model's reference: the outputs cannot match.
    let wrong = s(&zoo("ppocr_cls_qdq").join("io.npz"));
    let out = t.join("bad.bundle");
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = [
            "bundle",
            "build",
            &model,
            "--version",
            "2",
            "--key",
            &key,
            "--out",
            &s(&out),
            "--test-vector",
            &wrong,
            "--tolerance",
            "0",
        ]
        .map(String::from)
        .to_vec();
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    let e = fails(&args(&[]));
    assert!(e.contains("self-test failed (self_test_failed)"), "{e}");
    assert!(!out.exists());
    ok(&args(&["--no-self-test"]));
    let public = s(&t.join("ops/operator.pub"));
    ok(&["bundle", "verify", &s(&out), "--pub", &public]);
    let e = fails(&[
        "bundle",
        "verify",
        &s(&out),
        "--pub",
        &public,
        "--self-test",
    ]);
    assert!(e.contains("self-test failed"), "{e}");
}
