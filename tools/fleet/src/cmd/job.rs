//! `fedge job start|stop|status` and `fedge rounds JOB`: federated-learning jobs through the
//! aggregator's HTTP API (`docs/aggregator.md`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use serde_json::Value;

use super::api::Api;
use super::device::ApiFlags;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: JobCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Create and start a job from a TOML spec (the aggregator's `[[jobs]]` fields: id, rounds,
    /// min_devices, model, strategy, selection, deadline_ms, ...).
    Start {
        /// The job spec file.
        spec: PathBuf,
        #[command(flatten)]
        api: ApiFlags,
        /// Print the created job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a running job now: its open round closes without a model; devices see `Finished`.
    Stop {
        /// Job id.
        job: String,
        #[command(flatten)]
        api: ApiFlags,
        #[arg(long)]
        json: bool,
    },
    /// One job's phase, round and model version; without JOB every job.
    Status {
        job: Option<String>,
        #[command(flatten)]
        api: ApiFlags,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct RoundsArgs {
    /// Job id.
    pub job: String,
    #[command(flatten)]
    pub api: ApiFlags,
    /// Also draw the devices' reported training accuracy and loss per round as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print the round records as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        JobCommand::Start { spec, api, json } => {
            let text = std::fs::read_to_string(&spec)
                .with_context(|| format!("job spec {}", spec.display()))?;
            let (_, job) = Api::new(&api.aggregator)?.post_text("/api/jobs", &text)?;
            print_jobs(&[job], json, "started")
        }
        JobCommand::Stop { job, api, json } => {
            fedge_proto::check_id(&job).map_err(|e| anyhow::anyhow!("job id {job:?}: {e}"))?;
            let (_, j) = Api::new(&api.aggregator)?.post(&format!("/api/jobs/{job}/stop"), None)?;
            print_jobs(&[j], json, "stopped")
        }
        JobCommand::Status { job, api, json } => {
            let api = Api::new(&api.aggregator)?;
            let jobs = match job {
                Some(id) => {
                    fedge_proto::check_id(&id)
                        .map_err(|e| anyhow::anyhow!("job id {id:?}: {e}"))?;
                    vec![api.get(&format!("/api/jobs/{id}"))?]
                }
                None => match api.get("/api/jobs")? {
                    Value::Array(v) => v,
                    _ => bail!("GET /api/jobs: not a list"),
                },
            };
            print_jobs(&jobs, json, "")
        }
    }
}

fn print_jobs(jobs: &[Value], json: bool, verb: &str) -> anyhow::Result<()> {
    if json {
        match jobs {
            [one] if !verb.is_empty() => println!("{one}"),
            _ => println!("{}", Value::Array(jobs.to_vec())),
        }
        return Ok(());
    }
    if jobs.is_empty() {
        println!("no jobs");
    }
    for j in jobs {
        let s = |k: &str| {
            j.get(k).map_or_else(String::new, |v| match v {
                Value::String(s) => s.clone(),
                v => v.to_string(),
            })
        };
        println!(
            "{}{} {}: {}, round {} of {}, model v{}, {} parameters, {}",
            if verb.is_empty() { "" } else { verb },
            if verb.is_empty() { "job" } else { " job" },
            s("id"),
            s("phase"),
            s("round"),
            s("rounds"),
            s("model_version"),
            s("param_count"),
            s("strategy"),
        );
        let eps = j.get("epsilon_spent").and_then(Value::as_f64);
        let budget = j.get("epsilon_budget").and_then(Value::as_f64);
        if eps.is_some() || budget.is_some() {
            let show = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
            println!(
                "  privacy: epsilon spent {} of budget {} (delta {})",
                show(eps),
                show(budget),
                s("dp_delta")
            );
        }
        if let Some(why) = j.get("finish_reason").and_then(Value::as_str) {
            println!("  finished early: {why}");
        }
    }
    Ok(())
}

pub fn rounds(a: RoundsArgs) -> anyhow::Result<()> {
    fedge_proto::check_id(&a.job).map_err(|e| anyhow::anyhow!("job id {:?}: {e}", a.job))?;
    let list = match Api::new(&a.api.aggregator)?.get(&format!("/api/jobs/{}/rounds", a.job))? {
        Value::Array(v) => v,
        _ => bail!("GET /api/jobs/{}/rounds: not a list", a.job),
    };
    let f = |r: &Value, k: &str| r.get(k).and_then(Value::as_f64);
    let u = |r: &Value, k: &str| r.get(k).and_then(Value::as_u64).unwrap_or(0);
    if let Some(path) = &a.plot {
        let closed: Vec<&Value> = list
            .iter()
            .filter(|r| r.get("result_sha256").is_some_and(|v| !v.is_null()))
            .collect();
        let acc: Vec<f32> = closed
            .iter()
            .map(|r| f(r, "train_accuracy").unwrap_or(f64::NAN) as f32)
            .collect();
        let loss: Vec<f32> = closed
            .iter()
            .map(|r| f(r, "train_loss").unwrap_or(f64::NAN) as f32)
            .collect();
        let title = format!("job {}: devices' training accuracy and loss", a.job);
        std::fs::write(path, super::plot::svg(&title, &acc, &loss, None))
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if a.json {
        println!("{}", Value::Array(list));
        return Ok(());
    }
    println!(
        "{:>5}  {:>8}  {:>8}  {:>8}  {:>6}  {:>9}  {:>9}  {:>9}  state",
        "round", "selected", "accepted", "rejected", "stale", "accuracy", "loss", "epsilon",
    );
    let num = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
    for r in &list {
        let state = if r.get("stopped").and_then(Value::as_bool) == Some(true) {
            "stopped"
        } else if r.get("closed_unix_ms").is_some_and(|v| !v.is_null()) {
            "closed"
        } else {
            "open"
        };
        println!(
            "{:>5}  {:>8}  {:>8}  {:>8}  {:>6}  {:>9}  {:>9}  {:>9}  {}",
            u(r, "round"),
            u(r, "selected"),
            u(r, "accepted"),
            u(r, "rejected"),
            u(r, "stale"),
            num(f(r, "train_accuracy")),
            num(f(r, "train_loss")),
            num(f(r, "epsilon")),
            state
        );
    }
    Ok(())
}
