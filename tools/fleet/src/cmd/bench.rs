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
    /// After timing, run N more times timing every node of the optimised plan and print where
    /// the time goes: by op, then the slowest nodes (CPU backend only).
    #[arg(long, value_name = "N")]
    pub per_op: Option<usize>,
    /// How many of the slowest nodes `--per-op` lists.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
}

/// Time by op and the slowest nodes, from `Model::profile`.
fn per_op(
    model: &fedge_runtime::Model,
    inputs: &[fedge_runtime::Tensor],
    runs: usize,
    top: usize,
) -> anyhow::Result<serde_json::Value> {
    let runs = runs.max(1);
    let Some(mut nodes) = model.profile(inputs, runs)? else {
        anyhow::bail!(
            "--per-op: the {} backend cannot time single nodes (the CPU backend can)",
            model.backend().0
        );
    };
    let total: f64 = nodes.iter().map(|n| n.seconds).sum();
    let mut by_op = std::collections::BTreeMap::<String, (f64, usize)>::new();
    for n in &nodes {
        let e = by_op.entry(n.op.clone()).or_default();
        e.0 += n.seconds;
        e.1 += 1;
    }
    let mut by_op: Vec<_> = by_op.into_iter().collect();
    by_op.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    nodes.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let ms = |s: f64| s * 1e3 / runs as f64;
    Ok(serde_json::json!({
        "runs": runs,
        "total_ms": ms(total),
        "ops": by_op.iter().map(|(op, (s, count))| serde_json::json!({
            "op": op, "nodes": count, "ms": ms(*s), "share": s / total,
        })).collect::<Vec<_>>(),
        "slowest": nodes.iter().take(top).map(|n| serde_json::json!({
            "node": n.node, "op": n.op, "ms": ms(n.seconds), "share": n.seconds / total,
        })).collect::<Vec<_>>(),
    }))
}

fn print_per_op(p: &serde_json::Value) {
    println!(
        "  per node ({} run(s), {:.3} ms per run in nodes):",
        p["runs"],
        p["total_ms"].as_f64().unwrap_or(f64::NAN)
    );
    println!(
        "    {:<28} {:>5} {:>10} {:>6}",
        "op", "nodes", "ms/run", "share"
    );
    for o in p["ops"].as_array().into_iter().flatten() {
        println!(
            "    {:<28} {:>5} {:>10.3} {:>5.1}%",
            o["op"].as_str().unwrap_or(""),
            o["nodes"],
            o["ms"].as_f64().unwrap_or(f64::NAN),
            o["share"].as_f64().unwrap_or(f64::NAN) * 100.0
        );
    }
    println!("    slowest nodes:");
    for n in p["slowest"].as_array().into_iter().flatten() {
        println!(
            "    {:>10.3} ms {:>5.1}%  {} ({})",
            n["ms"].as_f64().unwrap_or(f64::NAN),
            n["share"].as_f64().unwrap_or(f64::NAN) * 100.0,
            n["node"].as_str().unwrap_or(""),
            n["op"].as_str().unwrap_or("")
        );
    }
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
    let profile = a
        .per_op
        .map(|runs| per_op(&model, &inputs, runs, a.top))
        .transpose()?;
    let mut j = serde_json::json!({
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
    if let Some(p) = &profile {
        j["per_op"] = p.clone();
    }
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
        if let Some(p) = &profile {
            print_per_op(p);
        }
    }
    Ok(())
}
