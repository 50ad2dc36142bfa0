use fedge_runtime::{Graph, Model, Registry};

use super::ModelFlags;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelFlags,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let opts = a.model.options()?;
    let bytes = std::fs::read(&a.model.model)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", a.model.model.display()))?;
    let graph = Graph::import(&bytes, &opts)?;
    let registry = Registry::default();
    let mut backends = Vec::new();
    for name in ["cpu", "gpu"] {
        let verdict = match registry.resolve(name) {
            Err(e) => format!("not available: {e}"),
            Ok(_) => match Model::from_bytes_with(&bytes, &opts.clone().backend(name), &registry) {
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
