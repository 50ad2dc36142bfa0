pub mod api;
pub mod bench;
pub mod bundle;
pub mod check;
pub mod demo;
pub mod device;
pub mod dp;
pub mod job;
pub mod keys;
pub mod mosquitto;
mod plot;
pub mod profile;
pub mod rollout;
pub mod run;
pub mod secagg;

use std::path::PathBuf;

use anyhow::{Context, bail};
use fedge_runtime::{DType, Dim, Model, ModelOptions, Tensor, TensorInfo, npy};

/// Flags every model verb shares: backend, threads, shapes and inputs.
#[derive(Debug, clap::Args)]
pub struct ModelFlags {
    /// The ONNX model file.
    pub model: PathBuf,
    /// Backend: cpu, gpu, or gpu-or-cpu (the GPU when one is usable, else the CPU).
    #[arg(long, default_value = "cpu")]
    pub backend: String,
    /// Threads for matrix products.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// An input as NAME=FILE.npy (repeatable).
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    pub inputs: Vec<String>,
    /// An input baked into the graph as a constant, NAME=FILE.npy (repeatable).
    #[arg(long = "constant", value_name = "NAME=FILE.npy")]
    pub constants: Vec<String>,
    /// A symbolic dimension's value, SYMBOL=N (repeatable), e.g. --dim batch=1.
    #[arg(long = "dim", value_name = "SYMBOL=N")]
    pub dims: Vec<String>,
    /// An input's shape, NAME=D0,D1,... (repeatable).
    #[arg(long = "shape", value_name = "NAME=D0,D1,...")]
    pub shapes: Vec<String>,
    /// Accept NaN/infinity in float inputs.
    #[arg(long)]
    pub allow_non_finite: bool,
    /// Turn fedge's import rewrites off (plain tract), to compare.
    #[arg(long)]
    pub no_rewrites: bool,
    /// Run int8 convolutions and matrix products as float kernels between exact quantize
    /// steps, scales applied before the sum: less faithful to onnxruntime's integer results.
    /// (By default those with constant kernels already use float kernels, exactly.)
    #[arg(long)]
    pub float_kernels: bool,
}

fn split_pair(s: &str) -> anyhow::Result<(&str, &str)> {
    s.split_once('=')
        .with_context(|| format!("`{s}`: expected NAME=VALUE"))
}

impl ModelFlags {
    pub fn options(&self) -> anyhow::Result<ModelOptions> {
        let mut o = ModelOptions::default()
            .threads(self.threads)
            .backend(&self.backend)
            .allow_non_finite(self.allow_non_finite)
            .rewrites(!self.no_rewrites)
            .integer_kernels(!self.float_kernels);
        for c in &self.constants {
            let (name, file) = split_pair(c)?;
            o = o.constant(name, npy::read(file)?);
        }
        for d in &self.dims {
            let (name, v) = split_pair(d)?;
            o = o.dim(
                name,
                v.parse()
                    .with_context(|| format!("--dim {d}: not a number"))?,
            );
        }
        for s in &self.shapes {
            let (name, v) = split_pair(s)?;
            let shape = v
                .split(',')
                .map(|x| x.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("--shape {s}: expected comma-separated numbers"))?;
            o = o.input_shape(name, &shape);
        }
        Ok(o)
    }

    pub fn load(&self) -> anyhow::Result<(Model, f64)> {
        let opts = self.options()?;
        let t0 = std::time::Instant::now();
        let model = Model::load(&self.model, &opts)
            .with_context(|| format!("loading {}", self.model.display()))?;
        Ok((model, t0.elapsed().as_secs_f64() * 1e3))
    }

    /// Inputs from `--input`, in the model's order; random ones where `random` and none given.
    pub fn inputs(&self, model: &Model, random: bool) -> anyhow::Result<Vec<Tensor>> {
        let mut given = std::collections::HashMap::new();
        for i in &self.inputs {
            let (name, file) = split_pair(i)?;
            if !model.inputs().iter().any(|x| x.name == name) {
                let names: Vec<&str> = model.inputs().iter().map(|x| x.name.as_str()).collect();
                bail!(
                    "the model has no input `{name}` (inputs: {})",
                    names.join(", ")
                );
            }
            given.insert(name.to_string(), npy::read(file)?);
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        model
            .inputs()
            .iter()
            .map(|info| match given.remove(&info.name) {
                Some(t) => Ok(t),
                None if random => random_input(info, &self.dims_map(), &mut rng),
                None => bail!("missing --input {}=FILE.npy", info.name),
            })
            .collect()
    }

    fn dims_map(&self) -> std::collections::HashMap<String, usize> {
        self.dims
            .iter()
            .filter_map(|d| split_pair(d).ok())
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }
}

use rand::{Rng, SeedableRng};

fn random_input(
    info: &TensorInfo,
    dims: &std::collections::HashMap<String, usize>,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<Tensor> {
    let shape = info
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => Ok(*n),
            Dim::Symbol(s) => dims.get(s).copied().with_context(|| {
                format!(
                    "input `{}` has symbolic dimension `{s}`: give --dim {s}=N or --input",
                    info.name
                )
            }),
            Dim::Unknown => bail!(
                "input `{}` has an unknown dimension: give --shape or --input",
                info.name
            ),
        })
        .collect::<anyhow::Result<Vec<usize>>>()?;
    let n: usize = shape.iter().product();
    let t = match info.dtype.unwrap_or(DType::F32) {
        DType::F32 => Tensor::new(
            &shape,
            &(0..n).map(|_| rng.random::<f32>()).collect::<Vec<_>>(),
        ),
        DType::I64 => Tensor::new(&shape, &vec![0i64; n]),
        DType::U8 => Tensor::new(
            &shape,
            &(0..n).map(|_| rng.random::<u8>()).collect::<Vec<_>>(),
        ),
        DType::I8 => Tensor::new(
            &shape,
            &(0..n).map(|_| rng.random::<i8>()).collect::<Vec<_>>(),
        ),
        d => Ok(Tensor::zeros(d, &shape)),
    }?;
    Ok(t)
}

/// `/` and other path-hostile characters in tensor names become `_`.
pub fn file_name(tensor: &str) -> String {
    tensor
        .chars()
        .map(|c| {
            if c == '/' || c == '\\' || c == ':' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// Peak resident set size of this process, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
