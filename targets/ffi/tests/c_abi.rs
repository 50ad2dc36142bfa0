//! The C example and the C tests, compiled with the system `cc` against the static library and
//! run (under valgrind when it is installed: zero errors, zero leaks), and the same model run
//! through the Rust API.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedge_proto::msg::Bundle;
use fedge_proto::{Envelope, Kind, Signer};
use fedge_runtime::manifest::Manifest;
use fedge_runtime::{Model, Tensor};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `target/<profile>/`, where cargo puts `libfedge_ffi.a`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .expect("target dir")
}

fn scratch(name: &str) -> PathBuf {
    let d = profile_dir().join("ffi-tests").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Compiles `src` against the static library; `None` (with the reason printed) when no `cc`.
fn compile(src: &str, out: &Path) -> Option<PathBuf> {
    // `cargo test` builds the staticlib beside the test binary (`deps/`) and only `cargo build`
    // copies it up to `target/<profile>/`: take the fresher of the two.
    let candidates = [
        profile_dir().join("deps/libfedge_ffi.a"),
        profile_dir().join("libfedge_ffi.a"),
    ];
    let lib = candidates
        .iter()
        .filter_map(|p| Some((std::fs::metadata(p).ok()?.modified().ok()?, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p.clone())
        .unwrap_or_else(|| {
            panic!(
                "{} missing: the staticlib is built with the crate",
                candidates[0].display()
            )
        });
    let exe = out.join(Path::new(src).file_stem().expect("stem"));
    let status = Command::new("cc")
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(repo().join("targets/ffi"))
        .arg(repo().join("targets/c").join(src))
        .arg(&lib)
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s", "-lc"])
        .arg("-o")
        .arg(&exe)
        .status();
    match status {
        Ok(s) => {
            assert!(s.success(), "cc failed for {src}");
            Some(exe)
        }
        Err(e) => {
            eprintln!("SKIPPED compiling {src}: no C compiler ({e})");
            None
        }
    }
}

/// Runs `exe args`, under valgrind when available; asserts success and a clean valgrind report.
fn run(exe: &Path, args: &[&Path]) -> String {
    let valgrind =
        Path::new("/usr/bin/valgrind").exists() && std::env::var_os("FEDGE_NO_VALGRIND").is_none();
    let mut cmd = if valgrind {
        let mut c = Command::new("valgrind");
        c.args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--show-leak-kinds=definite,indirect,possible",
            "--errors-for-leak-kinds=definite,indirect,possible",
            "--quiet",
        ])
        .arg(format!(
            "--suppressions={}",
            repo().join("targets/c/valgrind.supp").display()
        ))
        .arg(exe);
        c
    } else {
        eprintln!(
            "valgrind not installed: running {} without it",
            exe.display()
        );
        Command::new(exe)
    };
    let out = cmd.args(args).output().expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}\n{stderr}",
        exe.display(),
        out.status
    );
    stdout
}

fn ppocr_cls() -> (Manifest, Tensor, Tensor) {
    let m = Manifest::read(repo().join("models/zoo/ppocr_cls")).expect("manifest");
    let npz =
        fedge_runtime::npy::read_npz(m.references_path(true).expect("references")).expect("npz");
    let get = |k: &str| {
        npz.iter()
            .find(|(n, _)| n == k)
            .map(|(_, t)| t.clone())
            .expect(k)
    };
    (m, get("c0_in0"), get("c0_out0"))
}

fn max_abs(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn c_example_runs_a_zoo_model_and_rust_api_agrees() {
    let (manifest, input, reference) = ppocr_cls();
    let want = reference.as_f32().expect("f32 reference");

    // Through the Rust API.
    let model = Model::load(manifest.model_path(), &manifest.options()).expect("load");
    let got = model.run(std::slice::from_ref(&input)).expect("run");
    let rust = got[0].as_f32().expect("f32");
    assert!(
        max_abs(&rust, &want) <= manifest.tolerance.max_abs,
        "Rust API: {}",
        max_abs(&rust, &want)
    );

    // Through the C ABI.
    let dir = scratch("example");
    let Some(exe) = compile("run_model.c", &dir) else {
        return;
    };
    let inp = dir.join("input.bin");
    let outp = dir.join("output.bin");
    std::fs::write(&inp, input.as_bytes()).expect("write input");
    let dims: Vec<String> = input.shape().iter().map(ToString::to_string).collect();
    let mut args: Vec<PathBuf> = vec![manifest.model_path(), inp, outp.clone()];
    args.extend(dims.iter().map(PathBuf::from));
    let refs: Vec<&Path> = args.iter().map(PathBuf::as_path).collect();
    let stdout = run(&exe, &refs);
    assert!(stdout.contains("1 input(s)"), "{stdout}");
    let c = f32s(&std::fs::read(&outp).expect("output"));
    assert!(
        max_abs(&c, &want) <= manifest.tolerance.max_abs,
        "C ABI: {}",
        max_abs(&c, &want)
    );
    assert_eq!(c, rust, "C and Rust give the same bits");
}

#[test]
fn c_tests_error_paths_bundles_envelopes() {
    let (manifest, _, _) = ppocr_cls();
    let dir = scratch("tests");
    // A bundle signed by a fresh operator key, as `fedge bundle build` makes it.
    let (operator, _) = Signer::generate().expect("key");
    let model = std::fs::read(manifest.model_path()).expect("model");
    let payload = fedge_proto::envelope::encode(&Bundle {
        name: "ppocr_cls",
        version: 3,
        created_unix_s: 1_700_000_000,
        model: &model,
        test_input: &[],
        test_output: &[],
        tolerance: 1e-4,
    })
    .expect("encode");
    let sealed = Envelope::new(Kind::Bundle, "operator", 1, 0, &payload)
        .seal(&operator)
        .expect("seal");
    let bundle = dir.join("ppocr_cls.fedge");
    let public = dir.join("operator.pub");
    std::fs::write(&bundle, &sealed).expect("bundle");
    std::fs::write(&public, operator.public_key().0).expect("pub");

    let Some(exe) = compile("test_ffi.c", &dir) else {
        return;
    };
    let stdout = run(&exe, &[&manifest.model_path(), &bundle, &public]);
    assert!(stdout.contains("all C checks passed"), "{stdout}");
}
