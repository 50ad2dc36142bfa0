//! A bundle's self-test: run the model on the bundle's test inputs and compare with its expected
//! outputs.
//!
//! Test vectors are `.npz` archives in one of two layouts: reference cases named `c{case}_in{k}` /
//! `c{case}_out{k}` (the layout of the zoo's `io.npz`; the same archive may serve as both), or a
//! single case whose members are named like the model's inputs (else taken in name order) and
//! whose outputs are taken in name order.

use std::collections::BTreeMap;
use std::path::Path;

use fedge_runtime::{Model, Tensor, npy};

/// Test cases: inputs and expected outputs, in model order.
pub type Case = (Vec<Tensor>, Vec<Tensor>);

/// Reads the cases of a test vector.
///
/// # Errors
/// A message when an archive does not read or the layouts do not fit together.
pub fn read_cases(
    input: &Path,
    output: &Path,
    input_names: &[String],
) -> Result<Vec<Case>, String> {
    let ins: BTreeMap<String, Tensor> = npy::read_npz(input)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let outs: BTreeMap<String, Tensor> = npy::read_npz(output)
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    if ins.contains_key("c0_in0") {
        return numbered_cases(&ins, &outs);
    }
    let by_name: Option<Vec<Tensor>> = input_names.iter().map(|n| ins.get(n).cloned()).collect();
    let inputs = by_name.unwrap_or_else(|| ins.values().cloned().collect());
    let outputs: Vec<Tensor> = outs.into_values().collect();
    if inputs.is_empty() || outputs.is_empty() {
        return Err("test vector has no inputs or no outputs".into());
    }
    Ok(vec![(inputs, outputs)])
}

fn numbered_cases(
    ins: &BTreeMap<String, Tensor>,
    outs: &BTreeMap<String, Tensor>,
) -> Result<Vec<Case>, String> {
    let mut cases = Vec::new();
    for c in 0.. {
        let take = |m: &BTreeMap<String, Tensor>, kind: &str| -> Vec<Tensor> {
            (0..)
                .map_while(|k| m.get(&format!("c{c}_{kind}{k}")).cloned())
                .collect()
        };
        let (i, o) = (take(ins, "in"), take(outs, "out"));
        if i.is_empty() {
            break;
        }
        if o.is_empty() {
            return Err(format!("test output has no c{c}_out0"));
        }
        cases.push((i, o));
    }
    Ok(cases)
}

/// Runs every case; `tolerance` bounds `max |got - want|` relative to `max |want|` (0: exact).
///
/// # Errors
/// A message naming the first case and output that fails.
pub fn run(model: &Model, cases: &[Case], tolerance: f32) -> Result<(), String> {
    for (c, (inputs, want)) in cases.iter().enumerate() {
        let got = model.run(inputs).map_err(|e| format!("case {c}: {e}"))?;
        if got.len() != want.len() {
            return Err(format!(
                "case {c}: {} outputs, expected {}",
                got.len(),
                want.len()
            ));
        }
        for (k, (g, w)) in got.iter().zip(want).enumerate() {
            compare(g, w, tolerance).map_err(|e| format!("case {c} output {k}: {e}"))?;
        }
    }
    Ok(())
}

fn compare(got: &Tensor, want: &Tensor, tolerance: f32) -> Result<(), String> {
    if got.shape() != want.shape() {
        return Err(format!(
            "shape {:?}, expected {:?}",
            got.shape(),
            want.shape()
        ));
    }
    let (g, w) = (got.to_f64_lossy(), want.to_f64_lossy());
    let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
    let bound = f64::from(tolerance) * scale;
    let mut worst = 0f64;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        if !d.is_finite() {
            return Err(format!("non-finite value (got {a}, expected {b})"));
        }
        worst = worst.max(d);
    }
    if worst > bound {
        return Err(format!(
            "max |difference| {worst:.3e} above {bound:.3e} (tolerance {tolerance} x {scale:.3e})"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_is_relative_to_the_reference_scale() {
        let w = Tensor::new(&[3], &[10f32, -20., 5.]).expect("tensor");
        let g = Tensor::new(&[3], &[10.1f32, -20., 5.]).expect("tensor");
        assert!(compare(&g, &w, 0.01).is_ok());
        assert!(compare(&g, &w, 0.001).is_err());
        assert!(compare(&w, &w, 0.0).is_ok());
        assert!(compare(&g, &w, 0.0).is_err());
        let nan = Tensor::new(&[3], &[f32::NAN, -20., 5.]).expect("tensor");
        assert!(compare(&nan, &w, 1.0).is_err());
        let other = Tensor::new(&[1, 3], &[10f32, -20., 5.]).expect("tensor");
        assert!(
            compare(&other, &w, 1.0)
                .expect_err("shape")
                .contains("shape")
        );
    }
}
