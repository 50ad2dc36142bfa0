use std::path::PathBuf;

use anyhow::Context;
use fedge_runtime::manifest::{Manifest, compare};
use fedge_runtime::npy;

use super::{ModelFlags, file_name};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Directory for the outputs, one `<output name>.npy` each (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// For a zoo model: take the inputs of its first reference case (a real signal) from its
    /// manifest, and compare the outputs with onnxruntime's.
    #[arg(long)]
    pub reference: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, load_ms) = a.model.load()?;
    let (inputs, expected) = if a.reference {
        let (ins, outs, what) = reference_case(&a.model.model)?;
        println!("inputs: {what}");
        (ins, Some(outs))
    } else {
        (a.model.inputs(&model, false)?, None)
    };
    let t0 = std::time::Instant::now();
    let outputs = model.run(&inputs)?;
    let run_ms = t0.elapsed().as_secs_f64() * 1e3;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    println!(
        "{} on {} (load {load_ms:.1} ms, run {run_ms:.1} ms)",
        a.model.model.display(),
        model.backend().0
    );
    for (name, t) in model.output_names().iter().zip(&outputs) {
        let path = a.out.join(format!("{}.npy", file_name(name)));
        npy::write(&path, t)?;
        let v = t.to_f64_lossy();
        let (min, max) = v
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
                (a.min(x), b.max(x))
            });
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "  {name}: {} {:?} min {min:.4} max {max:.4} mean {mean:.4} -> {}",
            t.dtype(),
            t.shape(),
            path.display()
        );
    }
    if let Some(expected) = expected {
        let m = Manifest::for_model(&a.model.model).context("no manifest")?;
        let mut worst = 0f64;
        for (name, (got, want)) in model
            .output_names()
            .iter()
            .zip(outputs.iter().zip(&expected))
        {
            let (err, agree, rows) = compare(got, want);
            worst = worst.max(err);
            let top1 = if m.tolerance.argmax {
                format!(", top-1 agrees on {agree}/{rows}")
            } else {
                String::new()
            };
            println!("  vs onnxruntime: {name} max |error| {err:.2e}{top1}");
        }
        let ok = worst <= m.tolerance.max_abs;
        println!(
            "{} within the manifest's tolerance {:.1e}",
            if ok { "MATCH:" } else { "MISMATCH: not" },
            m.tolerance.max_abs
        );
        anyhow::ensure!(ok, "outputs differ from onnxruntime's by {worst:.2e}");
    }
    Ok(())
}

/// Inputs and onnxruntime's outputs of a zoo model's first reference case.
fn reference_case(
    model: &std::path::Path,
) -> anyhow::Result<(
    Vec<fedge_runtime::Tensor>,
    Vec<fedge_runtime::Tensor>,
    String,
)> {
    let m = Manifest::for_model(model).with_context(|| {
        format!(
            "--reference: no manifest.toml for {} (zoo models only)",
            model.display()
        )
    })?;
    let path = m
        .references_path(true)
        .context("--reference: reference file absent: run bash tools/scripts/build_zoo.sh")?;
    let (ins, outs) = Manifest::cases(&path)?
        .into_iter()
        .next()
        .context("no reference case")?;
    Ok((
        ins,
        outs,
        format!("case 0 of {} ({})", path.display(), m.references.signal),
    ))
}
