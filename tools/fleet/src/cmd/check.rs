use fedge_runtime::{Graph, Model, Registry};

use super::ModelFlags;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Check the model against a device profile (built in: x86_64-linux, aarch64-rpi4,
    /// jetson-orin, mcu-cortex-m; or a path to a .toml): format, size, backend, and peak memory
    /// measured on one run. Exit status 1 when it does not fit.
    #[arg(long, value_name = "NAME|FILE.toml")]
    pub profile: Option<String>,
}

/// Whether a model fits a profile, and why.
#[derive(Debug, serde::Serialize)]
struct Fit {
    profile: String,
    fits: bool,
    backend: Option<String>,
    model_mib: f64,
    peak_memory_mib: Option<f64>,
    problems: Vec<String>,
    notes: Vec<String>,
}

fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn fit(a: &Args, p: &super::profile::Profile, bytes: &[u8], graph: &Graph) -> anyhow::Result<Fit> {
    let mut f = Fit {
        profile: p.name.clone(),
        fits: true,
        backend: None,
        model_mib: bytes.len() as f64 / (1024.0 * 1024.0),
        peak_memory_mib: None,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    if !p.runs_models {
        f.problems.push(format!(
            "{} runs no models (protocol core only: {})",
            p.name,
            p.crates.join(", ")
        ));
    }
    if f.model_mib > p.max_model_mib {
        f.problems.push(format!(
            "model is {:.1} MiB, the profile accepts at most {} MiB",
            f.model_mib, p.max_model_mib
        ));
    }
    let format = graph.quant_format().name();
    if p.runs_models && !p.quantization.iter().any(|q| q == format) {
        f.problems.push(format!(
            "format `{format}` is not accepted (accepted: {})",
            p.quantization.join(", ")
        ));
    }
    if f.problems.is_empty() {
        let registry = Registry::default();
        let base = a.model.options()?.threads(p.threads);
        let before = rss_mib();
        for name in &p.backends {
            match Model::from_bytes_with(bytes, &base.clone().backend(name), &registry) {
                Ok(m) => {
                    f.backend = Some(format!("{name} ({})", m.describe().join("; ")));
                    match a.model.inputs(&m, true).and_then(|i| Ok(m.run(&i)?)) {
                        Ok(_) => {
                            f.peak_memory_mib = super::peak_rss_mib()
                                .zip(before)
                                .map(|(peak, b)| (peak - b).max(0.0));
                            f.notes.push(
                                "peak memory measured over load and one run on random inputs"
                                    .into(),
                            );
                        }
                        Err(e) => f
                            .notes
                            .push(format!("not run (memory not measured): {e:#}")),
                    }
                    break;
                }
                Err(e) => f.notes.push(format!("backend {name}: {e}")),
            }
        }
        if f.backend.is_none() {
            f.problems.push(format!(
                "no backend of the profile runs it ({})",
                p.backends.join(", ")
            ));
        }
        if let Some(mib) = f.peak_memory_mib
            && mib > p.memory_budget_mib
        {
            f.problems.push(format!(
                "peak memory {mib:.0} MiB is above the budget of {} MiB",
                p.memory_budget_mib
            ));
        }
    }
    f.fits = f.problems.is_empty();
    Ok(f)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = a.model.options()?;
    let bytes = std::fs::read(&a.model.model)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.model.model.display()))?;
    let graph = Graph::import(&bytes, &opts)?;
    if let Some(name) = &a.profile {
        let p = super::profile::Profile::find(name)?;
        let f = fit(&a, &p, &bytes, &graph)?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&f)?);
        } else {
            println!("profile: {} ({})", p.name, p.description);
            println!(
                "build: cargo build --release {}{} --target {}{}",
                p.crates
                    .iter()
                    .map(|c| format!("-p {c}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                p.cargo_flags
                    .iter()
                    .map(|f| format!(" {f}"))
                    .collect::<String>(),
                p.rust_target,
                if p.cargo_features.is_empty() {
                    String::new()
                } else {
                    format!(" --features {}", p.cargo_features.join(","))
                }
            );
            println!(
                "model: {} ({:.1} MiB, {})",
                a.model.model.display(),
                f.model_mib,
                graph.quant_format().name()
            );
            if let Some(b) = &f.backend {
                println!("backend: {b}");
            }
            if let Some(m) = f.peak_memory_mib {
                println!("peak memory: {m:.1} MiB of {} MiB", p.memory_budget_mib);
            }
            for n in &f.notes {
                println!("note: {n}");
            }
            for pr in &f.problems {
                println!("does not fit: {pr}");
            }
            println!("{}", if f.fits { "fits" } else { "does not fit" });
        }
        if !f.fits {
            anyhow::bail!(
                "{} does not fit profile {}: {}",
                a.model.model.display(),
                p.name,
                f.problems.join("; ")
            );
        }
        return Ok(());
    }
    let registry = Registry::default();
    let mut backends = Vec::new();
    for name in ["cpu", "gpu"] {
        let verdict = match registry.resolve(name) {
            Err(e) => format!("not available: {e}"),
            Ok(_) => match Model::from_bytes_with(&bytes, &opts.clone().backend(name), &registry) {
                Ok(m) if name == "gpu" => {
                    format!(
                        "runs it, nodes without a GPU kernel on the CPU ({})",
                        m.describe().join("; ")
                    )
                }
                Ok(m) => format!("runs every node ({})", m.describe().join("; ")),
                Err(e) => format!("cannot run it: {e}"),
            },
        };
        backends.push((name, verdict));
    }
    if a.json {
        let io = |v: &[fedge_runtime::TensorInfo]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|i| serde_json::json!({"name": i.name, "dtype": i.dtype.map(|d| d.name()), "shape": i.shape_string()}))
                .collect()
        };
        let j = serde_json::json!({
            "model": a.model.model,
            "opset": graph.opset(),
            "inputs": io(graph.inputs()),
            "outputs": graph.output_names(),
            "quantization": graph.quant_format().name(),
            "ops": graph.op_histogram(),
            "imported_ops": graph.imported_op_histogram(),
            "rewrites": graph.rewrites(),
            "backends": backends.iter().map(|(n, v)| (n.to_string(), v.clone())).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "model: {} (opset {})",
        a.model.model.display(),
        graph.opset()
    );
    println!("quantization: {}", graph.quant_format().name());
    println!("inputs:");
    for i in graph.inputs() {
        println!(
            "  {} {} {}",
            i.name,
            i.dtype.map_or("?", |d| d.name()),
            i.shape_string()
        );
    }
    println!("outputs: {}", graph.output_names().join(", "));
    let total: usize = graph.op_histogram().values().sum();
    println!("operators ({total} nodes):");
    let mut ops: Vec<_> = graph.op_histogram().iter().collect();
    ops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (op, n) in ops {
        println!("  {n:>5} {op}");
    }
    if !graph.rewrites().is_empty() {
        println!("import rewrites:");
        for r in graph.rewrites() {
            println!("  {r}");
        }
    }
    println!("backends:");
    for (n, v) in backends {
        println!("  {n}: {v}");
    }
    Ok(())
}
