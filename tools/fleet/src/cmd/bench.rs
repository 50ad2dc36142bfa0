use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use super::{ModelFlags, peak_rss_mib};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Timed runs.
    #[arg(long, default_value_t = 50)]
    pub iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Stop timing after this many seconds even if fewer runs were made.
    #[arg(long, default_value_t = 60.0)]
    pub max_seconds: f64,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p / 100.0 * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let (model, load_ms) = a.model.load()?;
    let inputs = a.model.inputs(&model, true)?;
    for _ in 0..a.warmup {
        model.run(&inputs)?;
    }
    let bar = if a.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.iters as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} runs {wide_bar} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut lat = Vec::with_capacity(a.iters);
    let start = Instant::now();
    for _ in 0..a.iters.max(1) {
        let t0 = Instant::now();
        model.run(&inputs)?;
        lat.push(t0.elapsed().as_secs_f64() * 1e3);
        bar.inc(1);
        if start.elapsed().as_secs_f64() > a.max_seconds {
            break;
        }
    }
    bar.finish_and_clear();
    let total_s = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    let mean = lat.iter().sum::<f64>() / lat.len() as f64;
    let j = serde_json::json!({
        "model": a.model.model,
        "backend": model.backend().0,
        "threads": a.model.threads,
        "runs": lat.len(),
        "load_ms": load_ms,
        "mean_ms": mean,
        "p50_ms": percentile(&lat, 50.0),
        "p95_ms": percentile(&lat, 95.0),
        "p99_ms": percentile(&lat, 99.0),
        "min_ms": lat.first(),
        "throughput_per_s": lat.len() as f64 / total_s,
        "peak_rss_mib": peak_rss_mib(),
    });
    if a.json {
        println!("{j}");
    } else {
        println!(
            "{} on {} ({} thread(s), {} runs)",
            a.model.model.display(),
            model.backend().0,
            a.model.threads,
            lat.len()
        );
        println!("  load      {load_ms:9.2} ms");
        println!("  p50       {:9.3} ms", percentile(&lat, 50.0));
        println!("  p95       {:9.3} ms", percentile(&lat, 95.0));
        println!("  p99       {:9.3} ms", percentile(&lat, 99.0));
        println!("  mean      {mean:9.3} ms");
        println!("  throughput {:8.1} runs/s", lat.len() as f64 / total_s);
        if let Some(rss) = peak_rss_mib() {
            println!("  peak RSS  {rss:9.1} MiB");
        }
    }
    Ok(())
}
