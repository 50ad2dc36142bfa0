//! The trainable head: dense layers over one flat f32 parameter vector.

use super::rng::SplitMix64;
use super::{Result, TrainError};

/// The architecture of a [`Head`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Softmax (multinomial logistic) regression: `logits = W·x + b`.
    Softmax,
    /// One hidden layer: `logits = W₂·relu(W₁·x + b₁) + b₂`.
    Mlp { hidden: usize },
}

/// A classifier head whose flat parameter vector is the federated-learning state.
///
/// Parameters are stored layer after layer, each layer as its weight matrix `W` (outputs ×
/// inputs, row-major, the layout of ONNX `Gemm` with `transB = 1`) followed by its bias:
/// softmax regression is `[W (classes×features), b (classes)]`, the MLP is
/// `[W₁ (hidden×features), b₁ (hidden), W₂ (classes×hidden), b₂ (classes)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    kind: HeadKind,
    /// Layer widths from input to output: `[features, classes]` or `[features, hidden, classes]`.
    widths: Vec<usize>,
    params: Vec<f32>,
}

/// Mean cross-entropy and accuracy of a head on labelled data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub loss: f32,
    pub accuracy: f32,
    pub samples: usize,
}

/// Rows of a data matrix, all of them in order or a selection by index (a shuffled batch).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub x: &'a [f32],
    pub features: usize,
    pub idx: Option<&'a [usize]>,
}

impl<'a> Rows<'a> {
    pub fn len(&self) -> usize {
        self.idx
            .map_or(self.x.len() / self.features, <[usize]>::len)
    }

    /// The `i`-th row and its index in the data.
    pub fn get(&self, i: usize) -> (&'a [f32], usize) {
        let r = self.idx.map_or(i, |idx| idx[i]);
        (&self.x[r * self.features..(r + 1) * self.features], r)
    }
}

/// A dense layer's view of the parameters: `W` (outputs × inputs) and `b`, starting at `offset`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dense<'a> {
    pub w: &'a [f32],
    pub b: &'a [f32],
    pub inputs: usize,
    pub outputs: usize,
    pub offset: usize,
}

/// Per-row work buffers: one activation vector per layer and two delta vectors.
#[derive(Debug, Default)]
pub(crate) struct Scratch {
    acts: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
}

impl Head {
    /// A head of `kind`; softmax regression starts at zero, the MLP from a He-uniform hidden
    /// layer and a Glorot-uniform output layer drawn with `seed` (biases zero).
    ///
    /// # Errors
    /// [`TrainError::InvalidConfig`] for zero features or hidden units or fewer than 2 classes.
    pub fn new(kind: HeadKind, features: usize, classes: usize, seed: u64) -> Result<Head> {
        let widths = widths(kind, features, classes)?;
        let mut head = Head {
            kind,
            params: vec![0.0; count(&widths)],
            widths,
        };
        if let HeadKind::Mlp { .. } = kind {
            head.init_uniform(seed);
        }
        Ok(head)
    }

    /// Softmax regression, all parameters zero.
    ///
    /// # Panics
    /// When `features` is 0 or `classes` below 2 ([`Head::new`] returns the error instead).
    pub fn softmax(features: usize, classes: usize) -> Head {
        Head::new(HeadKind::Softmax, features, classes, 0).expect("softmax head sizes")
    }

    /// A one-hidden-layer ReLU MLP initialised with `seed`.
    ///
    /// # Panics
    /// When a size is 0 or `classes` below 2 ([`Head::new`] returns the error instead).
    pub fn mlp(features: usize, hidden: usize, classes: usize, seed: u64) -> Head {
        Head::new(HeadKind::Mlp { hidden }, features, classes, seed).expect("mlp head sizes")
    }

    /// A head with the given parameters (the layout of [`Head`]).
    ///
    /// # Errors
    /// As [`Head::new`] and [`Head::set_params`].
    pub fn from_params(
        kind: HeadKind,
        features: usize,
        classes: usize,
        params: &[f32],
    ) -> Result<Head> {
        let mut head = Head::new(kind, features, classes, 0)?;
        head.set_params(params)?;
        Ok(head)
    }

    /// The number of parameters of a head of this shape (0 for an invalid shape).
    pub fn param_count_for(kind: HeadKind, features: usize, classes: usize) -> usize {
        widths(kind, features, classes).map_or(0, |w| count(&w))
    }

    pub fn kind(&self) -> HeadKind {
        self.kind
    }

    pub fn features(&self) -> usize {
        self.widths[0]
    }

    pub fn classes(&self) -> usize {
        self.widths[self.widths.len() - 1]
    }

    pub fn param_count(&self) -> usize {
        self.params.len()
    }

    pub fn params(&self) -> &[f32] {
        &self.params
    }

    pub(crate) fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// Replaces the parameters (a new global model, an aggregated update).
    ///
    /// # Errors
    /// [`TrainError::ParamCount`] when the length differs from [`Head::param_count`],
    /// [`TrainError::Data`] for a NaN or infinite value; the head is unchanged on error.
    pub fn set_params(&mut self, params: &[f32]) -> Result<()> {
        if params.len() != self.params.len() {
            return Err(TrainError::ParamCount {
                expected: self.params.len(),
                got: params.len(),
            });
        }
        if let Some(i) = params.iter().position(|v| !v.is_finite()) {
            return Err(TrainError::Data(format!("parameter {i} is {}", params[i])));
        }
        self.params.copy_from_slice(params);
        Ok(())
    }

    pub(crate) fn n_layers(&self) -> usize {
        self.widths.len() - 1
    }

    /// Dense layer `l` (0 is the input side).
    pub(crate) fn layer(&self, l: usize) -> Dense<'_> {
        let offset = count(&self.widths[..=l]);
        let (inputs, outputs) = (self.widths[l], self.widths[l + 1]);
        let (w, b) =
            self.params[offset..offset + inputs * outputs + outputs].split_at(inputs * outputs);
        Dense {
            w,
            b,
            inputs,
            outputs,
            offset,
        }
    }

    /// Logits of `n` rows of `x` (row-major `n × features`), `n × classes` row-major.
    ///
    /// # Errors
    /// [`TrainError::InputSize`] when `x` does not hold `n` rows.
    pub fn forward(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.map_rows(x, n, |logits, out| out.extend_from_slice(logits))
    }

    /// Class probabilities (softmax of the logits), `n × classes` row-major: what the exported
    /// ONNX model outputs.
    ///
    /// # Errors
    /// As [`Head::forward`].
    pub fn probabilities(&self, x: &[f32], n: usize) -> Result<Vec<f32>> {
        self.map_rows(x, n, |logits, out| {
            let lse = log_sum_exp(logits);
            out.extend(logits.iter().map(|&l| (f64::from(l) - lse).exp() as f32));
        })
    }

    /// The most likely class of each of `n` rows (the first on ties, as ONNX `ArgMax`).
    ///
    /// # Errors
    /// As [`Head::forward`].
    pub fn predict(&self, x: &[f32], n: usize) -> Result<Vec<u32>> {
        self.map_rows(x, n, |logits, out| out.push(argmax(logits) as u32))
    }

    /// Mean cross-entropy and accuracy on `x` with labels `y` (one row per label).
    ///
    /// # Errors
    /// [`TrainError::EmptyData`], [`TrainError::InputSize`], [`TrainError::LabelOutOfRange`],
    /// [`TrainError::Data`] for a NaN or infinite feature.
    pub fn loss_and_accuracy(&self, x: &[f32], y: &[u32]) -> Result<Metrics> {
        let rows = self.check_data(x, y)?;
        let mut scratch = Scratch::default();
        let (mut loss, mut correct) = (0.0f64, 0usize);
        for i in 0..rows.len() {
            let (row, r) = rows.get(i);
            let logits = self.forward_row(row, &mut scratch.acts);
            loss += log_sum_exp(logits) - f64::from(logits[y[r] as usize]);
            correct += usize::from(argmax(logits) == y[r] as usize);
        }
        Ok(Metrics {
            loss: (loss / y.len() as f64) as f32,
            accuracy: correct as f32 / y.len() as f32,
            samples: y.len(),
        })
    }

    /// Mean cross-entropy on `x`, `y` and its gradient with respect to the parameters, written
    /// to `grad` (overwritten, [`Head::param_count`] long). No regularisation: see
    /// [`crate::train::Objective`] for the objective training minimises.
    ///
    /// # Errors
    /// As [`Head::loss_and_accuracy`]; [`TrainError::ParamCount`] for a `grad` of the wrong
    /// length.
    pub fn loss_and_gradient(&self, x: &[f32], y: &[u32], grad: &mut [f32]) -> Result<f64> {
        let rows = self.check_data(x, y)?;
        if grad.len() != self.params.len() {
            return Err(TrainError::ParamCount {
                expected: self.params.len(),
                got: grad.len(),
            });
        }
        Ok(self.batch_gradient(rows, y, grad, &mut Scratch::default()))
    }

    /// Mean cross-entropy of `rows` and its gradient into `grad` (overwritten). Inputs are
    /// valid: rows hold `features` values, labels are below `classes`.
    pub(crate) fn batch_gradient(
        &self,
        rows: Rows<'_>,
        y: &[u32],
        grad: &mut [f32],
        scratch: &mut Scratch,
    ) -> f64 {
        grad.fill(0.0);
        let scale = 1.0 / rows.len() as f64;
        let mut loss = 0.0f64;
        for i in 0..rows.len() {
            let (row, r) = rows.get(i);
            let label = y[r] as usize;
            let logits = self.forward_row(row, &mut scratch.acts);
            let lse = log_sum_exp(logits);
            loss += lse - f64::from(logits[label]);
            scratch.delta.clear();
            scratch
                .delta
                .extend(logits.iter().enumerate().map(|(k, &l)| {
                    let p = (f64::from(l) - lse).exp() - f64::from(u8::from(k == label));
                    (p * scale) as f32
                }));
            self.backward_row(row, scratch, grad);
        }
        loss * scale
    }

    /// Runs one row through every layer; returns the logits (the last activation).
    fn forward_row<'s>(&self, x: &[f32], acts: &'s mut Vec<Vec<f32>>) -> &'s [f32] {
        let n_layers = self.n_layers();
        acts.resize_with(n_layers, Vec::new);
        for l in 0..n_layers {
            let d = self.layer(l);
            let (done, rest) = acts.split_at_mut(l);
            let input = if l == 0 { x } else { &done[l - 1] };
            let out = &mut rest[0];
            out.clear();
            out.extend((0..d.outputs).map(|o| d.b[o] + dot(d.row(o), input)));
            if l + 1 < n_layers {
                out.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
        &acts[n_layers - 1]
    }

    /// Adds the gradient of one row to `grad`, given `∂loss/∂logits` in `scratch.delta` and the
    /// activations [`Head::forward_row`] left in `scratch`.
    fn backward_row(&self, x: &[f32], scratch: &mut Scratch, grad: &mut [f32]) {
        for l in (0..self.n_layers()).rev() {
            let d = self.layer(l);
            let n_w = d.inputs * d.outputs;
            let (gw, gb) = grad[d.offset..d.offset + n_w + d.outputs].split_at_mut(n_w);
            let input = if l == 0 { x } else { &scratch.acts[l - 1] };
            for (o, &delta) in scratch.delta.iter().enumerate() {
                gb[o] += delta;
                axpy(delta, input, &mut gw[o * d.inputs..(o + 1) * d.inputs]);
            }
            if l > 0 {
                scratch.delta_prev.clear();
                scratch.delta_prev.resize(d.inputs, 0.0);
                for (o, &delta) in scratch.delta.iter().enumerate() {
                    axpy(delta, d.row(o), &mut scratch.delta_prev);
                }
                // ReLU'(pre) is 1 exactly where the stored activation is positive.
                for (dp, &a) in scratch.delta_prev.iter_mut().zip(&scratch.acts[l - 1]) {
                    if a <= 0.0 {
                        *dp = 0.0;
                    }
                }
                std::mem::swap(&mut scratch.delta, &mut scratch.delta_prev);
            }
        }
    }

    fn map_rows<T>(
        &self,
        x: &[f32],
        n: usize,
        mut f: impl FnMut(&[f32], &mut Vec<T>),
    ) -> Result<Vec<T>> {
        let rows = self.check_rows(x, n)?;
        let mut scratch = Scratch::default();
        let mut out = Vec::with_capacity(n * self.classes());
        for i in 0..n {
            f(self.forward_row(rows.get(i).0, &mut scratch.acts), &mut out);
        }
        Ok(out)
    }

    pub(crate) fn check_rows<'a>(&self, x: &'a [f32], n: usize) -> Result<Rows<'a>> {
        let features = self.features();
        if n.checked_mul(features) != Some(x.len()) {
            return Err(TrainError::InputSize {
                expected: n.saturating_mul(features),
                got: x.len(),
                rows: n,
                features,
            });
        }
        Ok(Rows {
            x,
            features,
            idx: None,
        })
    }

    /// Checks `x` holds one row of finite values per label and every label names a class.
    pub(crate) fn check_data<'a>(&self, x: &'a [f32], y: &[u32]) -> Result<Rows<'a>> {
        if y.is_empty() {
            return Err(TrainError::EmptyData);
        }
        let rows = self.check_rows(x, y.len())?;
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(TrainError::Data(format!(
                "row {}, feature {} is {}",
                i / self.features(),
                i % self.features(),
                x[i]
            )));
        }
        if let Some(row) = y.iter().position(|&c| c as usize >= self.classes()) {
            return Err(TrainError::LabelOutOfRange {
                label: y[row],
                row,
                classes: self.classes(),
            });
        }
        Ok(rows)
    }

    fn init_uniform(&mut self, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let n_layers = self.widths.len() - 1;
        let mut offset = 0;
        for (l, pair) in self.widths.clone().windows(2).enumerate() {
            let (inputs, outputs) = (pair[0] as f64, pair[1] as f64);
            let limit = if l + 1 < n_layers {
                (6.0 / inputs).sqrt()
            } else {
                (6.0 / (inputs + outputs)).sqrt()
            };
            let n_w = pair[0] * pair[1];
            for p in &mut self.params[offset..offset + n_w] {
                *p = ((2.0 * rng.next_f64() - 1.0) * limit) as f32;
            }
            offset += n_w + pair[1];
        }
    }
}

impl Dense<'_> {
    /// The weights into output `o`.
    pub fn row(&self, o: usize) -> &[f32] {
        &self.w[o * self.inputs..(o + 1) * self.inputs]
    }
}

fn widths(kind: HeadKind, features: usize, classes: usize) -> Result<Vec<usize>> {
    if features == 0 || classes < 2 {
        return Err(TrainError::InvalidConfig(format!(
            "a head needs at least 1 feature and 2 classes, got {features} and {classes}"
        )));
    }
    Ok(match kind {
        HeadKind::Softmax => vec![features, classes],
        HeadKind::Mlp { hidden: 0 } => {
            return Err(TrainError::InvalidConfig(
                "an MLP head needs hidden units".into(),
            ));
        }
        HeadKind::Mlp { hidden } => vec![features, hidden, classes],
    })
}

fn count(widths: &[usize]) -> usize {
    widths.windows(2).map(|p| p[0] * p[1] + p[1]).sum()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x);
}

/// `log Σ exp(l)`, shifted by the maximum so no term overflows; in f64.
pub(crate) fn log_sum_exp(logits: &[f32]) -> f64 {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + logits
        .iter()
        .map(|&l| (f64::from(l) - m).exp())
        .sum::<f64>()
        .ln()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_follow_the_layout() {
        assert_eq!(Head::softmax(64, 10).param_count(), 64 * 10 + 10);
        assert_eq!(
            Head::mlp(64, 32, 10, 1).param_count(),
            64 * 32 + 32 + 32 * 10 + 10
        );
        assert_eq!(Head::param_count_for(HeadKind::Mlp { hidden: 0 }, 4, 3), 0);
    }

    #[test]
    fn set_params_checks_length_and_finiteness() {
        let mut head = Head::softmax(2, 3);
        assert!(matches!(
            head.set_params(&[0.0; 8]),
            Err(TrainError::ParamCount {
                expected: 9,
                got: 8
            })
        ));
        let mut p = [0.5f32; 9];
        p[4] = f32::NAN;
        assert!(head.set_params(&p).is_err());
        assert_eq!(head.params(), &[0.0; 9]);
        head.set_params(&[1.0; 9]).expect("valid");
        assert_eq!(head.params(), &[1.0; 9]);
    }

    #[test]
    fn softmax_forward_is_w_x_plus_b() {
        // W = [[1, 2], [0, -1], [3, 0]], b = [0.5, 0, -1]
        let head = Head::from_params(
            HeadKind::Softmax,
            2,
            3,
            &[1.0, 2.0, 0.0, -1.0, 3.0, 0.0, 0.5, 0.0, -1.0],
        )
        .expect("head");
        let logits = head.forward(&[1.0, 1.0, 2.0, -1.0], 2).expect("forward");
        assert_eq!(logits, vec![3.5, -1.0, 2.0, 0.5, 1.0, 5.0]);
        assert_eq!(
            head.predict(&[1.0, 1.0, 2.0, -1.0], 2).expect("predict"),
            vec![0, 2]
        );
        let p = head.probabilities(&[1.0, 1.0], 1).expect("probabilities");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn log_sum_exp_is_stable_for_huge_logits() {
        assert!((log_sum_exp(&[1000.0, 1000.0]) - (1000.0 + 2f64.ln())).abs() < 1e-9);
        assert!((log_sum_exp(&[-1000.0, -1000.0]) - (-1000.0 + 2f64.ln())).abs() < 1e-9);
        let head =
            Head::from_params(HeadKind::Softmax, 1, 2, &[1e4, -1e4, 0.0, 0.0]).expect("head");
        let m = head
            .loss_and_accuracy(&[1.0, -1.0], &[1, 1])
            .expect("metrics");
        assert!((m.loss - 1e4).abs() < 1.0 && m.accuracy == 0.5, "{m:?}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        let head = Head::softmax(3, 2);
        assert!(matches!(
            head.forward(&[0.0; 5], 2),
            Err(TrainError::InputSize { .. })
        ));
        assert!(matches!(
            head.loss_and_accuracy(&[0.0; 3], &[2]),
            Err(TrainError::LabelOutOfRange {
                label: 2,
                row: 0,
                classes: 2
            })
        ));
        assert!(matches!(
            head.loss_and_accuracy(&[], &[]),
            Err(TrainError::EmptyData)
        ));
        assert!(matches!(
            Head::new(HeadKind::Softmax, 3, 1, 0),
            Err(TrainError::InvalidConfig(_))
        ));
    }

    #[test]
    fn mlp_initialisation_is_seeded_and_biases_start_at_zero() {
        let a = Head::mlp(8, 5, 3, 42);
        assert_eq!(a, Head::mlp(8, 5, 3, 42));
        assert_ne!(a, Head::mlp(8, 5, 3, 43));
        assert!((0..2).all(|l| a.layer(l).b.iter().all(|&v| v == 0.0)));
        let limit = (6.0f32 / 8.0).sqrt();
        assert!(a.layer(0).w.iter().all(|v| v.abs() <= limit && *v != 0.0));
    }
}
