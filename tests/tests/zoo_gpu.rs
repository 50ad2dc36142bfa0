//! Zoo models on the GPU backend against onnxruntime's reference outputs, within the same
//! manifest tolerances as the CPU backend, with every matrix product and convolution on the GPU.
//! Without a GPU adapter each test prints why it is skipped and returns.

use fedge_tests::{skip, zoo};

fn check_on_gpu(name: &str) {
    if let Err(e) = fedge_runtime::gpu::adapter() {
        skip(name, &format!("no GPU adapter: {e}"));
        return;
    }
    let opts = zoo::manifest(name).options().backend("gpu");
    let Some(out) = zoo::check(name, Some(opts)) else {
        return;
    };
    let p = out
        .placement
        .expect("the GPU backend reports its placement");
    eprintln!("{name} on the GPU:\n  {}", out.describe.join("\n  "));
    assert!(
        p.heavy_total > 0,
        "{name}: no matrix product or convolution?"
    );
    assert_eq!(
        p.heavy,
        p.heavy_total,
        "{name}: only {} of {} heavy ops ran on the GPU:\n{}",
        p.heavy,
        p.heavy_total,
        out.describe.join("\n")
    );
}

macro_rules! zoo_gpu {
    ($($(#[$attr:meta])* $test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        $(#[$attr])*
        fn $test() {
            check_on_gpu($name);
        }
    )*};
}

zoo_gpu! {
    ppocr_cls_on_gpu_matches_onnxruntime => "ppocr_cls",
    oww_embedding_on_gpu_matches_onnxruntime => "oww_embedding",
    silero_vad_16k_on_gpu_matches_onnxruntime => "silero_vad_16k",
    #[ignore = "passes (max |d| 1.4e-6, 53/53 heavy ops on the GPU) but takes ~3 minutes on lavapipe; run with --ignored, and on a real GPU"]
    effword_resnet50_on_gpu_matches_onnxruntime => "effword_resnet50",
    ppocr_cls_qop_on_gpu_matches_onnxruntime => "ppocr_cls_qop",
    ppocr_cls_qdq_on_gpu_matches_onnxruntime => "ppocr_cls_qdq",
    effword_resnet50_qint8_on_gpu_matches_onnxruntime => "effword_resnet50_qint8",
}
