use std::path::PathBuf;

use anyhow::Context;
use fedge_runtime::npy;

use super::{ModelFlags, file_name};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Directory for the outputs, one `<output name>.npy` each (created if missing).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, load_ms) = a.model.load()?;
    let inputs = a.model.inputs(&model, false)?;
    let t0 = std::time::Instant::now();
    let outputs = model.run(&inputs)?;
    let run_ms = t0.elapsed().as_secs_f64() * 1e3;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    println!("{} on {} (load {load_ms:.1} ms, run {run_ms:.1} ms)", a.model.model.display(), model.backend().0);
    for (name, t) in model.output_names().iter().zip(&outputs) {
        let path = a.out.join(format!("{}.npy", file_name(name)));
        npy::write(&path, t)?;
        let v = t.to_f64_lossy();
        let (min, max) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        println!(
            "  {name}: {} {:?} min {min:.4} max {max:.4} mean {mean:.4} -> {}",
            t.dtype(),
            t.shape(),
            path.display()
        );
    }
    Ok(())
}
