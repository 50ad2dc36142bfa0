//! `fedge check`, `fedge run` and `fedge bench` on a real zoo model.

mod common;

use common::{TempDir, fails, ok};

fn zoo(name: &str) -> String {
    format!(
        "{}/../../models/zoo/{name}/model.onnx",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn bench_per_op_says_where_the_time_goes() {
    let out = ok(&[
        "bench",
        &zoo("ppocr_cls"),
        "--shape",
        "x=1,3,48,192",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--per-op",
        "2",
        "--top",
        "5",
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let p = &j["per_op"];
    assert_eq!(p["runs"], 2);
    assert!(p["total_ms"].as_f64().expect("total_ms") > 0.0, "{p}");
    let ops = p["ops"].as_array().expect("ops");
    // A CNN: the convolutions are in the plan, and the shares add up to the whole.
    assert!(
        ops.iter().any(|o| o["op"]
            .as_str()
            .is_some_and(|s| s.contains("MatMul") || s.contains("Conv"))),
        "{p}"
    );
    let share: f64 = ops.iter().map(|o| o["share"].as_f64().unwrap_or(0.0)).sum();
    assert!((share - 1.0).abs() < 1e-6, "{share}");
    let nodes: usize = ops
        .iter()
        .map(|o| o["nodes"].as_u64().unwrap_or(0) as usize)
        .sum();
    assert!(nodes > 50, "{nodes} nodes timed");
    assert_eq!(p["slowest"].as_array().map(Vec::len), Some(5));
}

#[test]
fn check_and_run_describe_and_write_every_output() {
    let dir = TempDir::new("model-run");
    let text = ok(&["check", &zoo("ppocr_cls_dyn")]);
    assert!(text.contains("quantization: dynamic"), "{text}");
    assert!(
        text.contains("ConvInteger on float kernels with exact integer accumulation"),
        "{text}"
    );
    let x = dir.join("x.npy");
    // A 1×3×48×192 page of mid-grey.
    let grey =
        fedge_runtime::Tensor::new(&[1, 3, 48, 192], &vec![0.5f32; 3 * 48 * 192]).expect("tensor");
    fedge_runtime::npy::write(&x, &grey).expect("write x.npy");
    let out = dir.join("out");
    ok(&[
        "run",
        &zoo("ppocr_cls_dyn"),
        "--input",
        &format!("x={}", x.display()),
        "--out",
        &out.display().to_string(),
    ]);
    let written: Vec<_> = std::fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        written,
        vec!["save_infer_model_scale_0.tmp_1.npy".to_string()]
    );
}

#[test]
fn bench_of_a_file_that_is_not_a_model_is_one_clear_error() {
    let dir = TempDir::new("model-bad");
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"not a model at all").expect("write");
    let err = fails(&["bench", &junk.display().to_string(), "--per-op", "1"]);
    assert!(err.contains("protobuf") || err.contains("ONNX"), "{err}");
}
