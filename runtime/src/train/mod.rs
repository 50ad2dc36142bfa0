//! On-device training of a model's head: the federated-learning state of a fedge model.
//!
//! A global model is a frozen ONNX backbone (optional) plus a trainable [`Head`] whose flat f32
//! parameter vector is what federated learning exchanges. Devices run the backbone to get
//! features, train the head on them with [`train`] (mini-batch SGD with momentum, L2 weight
//! decay and the FedProx proximal term) and send back the new parameters; [`export_onnx`] writes
//! backbone and head as one standard ONNX model that fedge and onnxruntime both run.
//!
//! Layout:
//! - [`Head`] (`head`): softmax regression or a one-hidden-layer ReLU MLP over a flat parameter
//!   vector; forward, predictions, loss and the cross-entropy gradient;
//! - [`train`], [`TrainConfig`], [`TrainReport`], [`Objective`] (`sgd`): the local optimiser;
//! - [`export_onnx`] (`export`): the head as `Gemm (→ Relu → Gemm) → Softmax`, merged after a
//!   backbone when one is given;
//! - [`data`]: data sets from CSV (plain or gzip), NPZ and the bundled digits set, the seeded
//!   stratified test split and the Dirichlet non-IID split across devices;
//! - [`rng`]: the small seeded generator behind every random choice (shuffles, initialisation,
//!   splits), so a seed fixes a run bit for bit.
//!
//! ```no_run
//! use fedge_runtime::train::{self, data, Head, TrainConfig};
//! let digits = data::load_digits("models/data/digits/digits.csv.gz")?;
//! let (train_set, test_set) = data::train_test_split(&digits, 0.2, 7)?;
//! let mut head = Head::softmax(digits.features, digits.classes);
//! let report = train::train(&mut head, &train_set.x, &train_set.y, &TrainConfig::default(), None)?;
//! let test = head.loss_and_accuracy(&test_set.x, &test_set.y)?;
//! println!("train loss {:.3}, test accuracy {:.3}", report.loss, test.accuracy);
//! let onnx = train::export_onnx(&head, None, None)?;
//! std::fs::write("head.onnx", onnx).expect("write");
//! # Ok::<(), fedge_runtime::train::TrainError>(())
//! ```

pub mod data;
mod export;
mod head;
pub mod rng;
mod sgd;

use std::path::PathBuf;

pub use export::{INPUT_NAME, OUTPUT_NAME, export_onnx};
pub use head::{Head, HeadKind, Metrics};
pub use sgd::{Objective, TrainConfig, TrainReport, train};

/// Everything that can go wrong training, exporting or loading training data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    #[error("expected {expected} parameters, got {got}")]
    ParamCount { expected: usize, got: usize },
    #[error("input has {got} values, {expected} expected ({rows} rows of {features} features)")]
    InputSize {
        expected: usize,
        got: usize,
        rows: usize,
        features: usize,
    },
    #[error("{got} labels for {expected} rows")]
    LabelCount { expected: usize, got: usize },
    #[error("label {label} at row {row} is out of range for {classes} classes")]
    LabelOutOfRange {
        label: u32,
        row: usize,
        classes: usize,
    },
    #[error("no training data")]
    EmptyData,
    #[error("invalid training configuration: {0}")]
    InvalidConfig(String),
    #[error("the loss became non-finite at step {step}; lower the learning rate")]
    Diverged { step: usize },
    #[error("bad data: {0}")]
    Data(String),
    #[error("cannot split the data: {0}")]
    Split(String),
    #[error("cannot export: {0}")]
    Export(String),
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Runtime(#[from] crate::RuntimeError),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;
