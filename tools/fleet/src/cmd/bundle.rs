//! `fedge bundle`: sign a model bundle the agent installs, and verify one.
//!
//! A bundle is `seal(Envelope { kind: Bundle, sender: operator id, payload: postcard(Bundle) })`
//! (`docs/protocol.md`, Bundles): the model, its test vector and a tolerance, signed once by the
//! operator key. `build` runs the agent's own install path (`fedge_agent::store::ModelStore`) on
//! the sealed bytes in a scratch directory, so a bundle that fails its self-test is never signed
//! by accident.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedge_proto::envelope::{decode, encode};
use fedge_proto::msg::Bundle;
use fedge_proto::{Envelope, Kind, PublicKey};
use serde_json::json;

use super::keys::read_public_key;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: BundleCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Sign a model, its test vector and a tolerance into one bundle file.
    Build(BuildArgs),
    /// Check a bundle: exit 0 only when it is intact and signed by the given operator key.
    Verify(VerifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The ONNX model.
    pub model: PathBuf,
    /// Version number (devices install it under this number; rollouts compare them).
    #[arg(long)]
    pub version: u64,
    /// The operator's private key (operator.key from `fedge keys gen`, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Bundle name (1-64 characters of [A-Za-z0-9._-]). Default: the model's directory name
    /// for a zoo-style `NAME/model.onnx`, else the file stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Test vector (.npz): zoo layout `c{case}_in{k}` / `c{case}_out{k}` (inputs and expected
    /// outputs in one file), or inputs named like the model's. Default: `io.npz` beside the
    /// model (the zoo's onnxruntime reference).
    #[arg(long, value_name = "FILE.npz")]
    pub test_vector: Option<PathBuf>,
    /// Expected outputs (.npz), when they are not in the test vector itself.
    #[arg(long, value_name = "FILE.npz")]
    pub test_output: Option<PathBuf>,
    /// Largest accepted |got - want|, relative to max |want| (0: exact).
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
    /// Sender id in the envelope (agents configured with `operator_id` require it).
    #[arg(long, default_value = "operator")]
    pub operator_id: String,
    /// Sign without running the self-test here first (e.g. to exercise a rollback).
    #[arg(long)]
    pub no_self_test: bool,
    /// Output file.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The bundle file.
    pub file: PathBuf,
    /// The operator's public key: operator.pub or 64 hex characters.
    #[arg(long = "pub", value_name = "FILE|HEX")]
    pub public: String,
    /// Also install it in a scratch directory the way the agent does (load + self-test).
    #[arg(long)]
    pub self_test: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        BundleCommand::Build(b) => build(&b),
        BundleCommand::Verify(v) => verify(&v),
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn default_name(model: &Path) -> Option<String> {
    let stem = model.file_stem()?.to_string_lossy();
    if stem == "model" {
        let dir = model.canonicalize().ok()?;
        return Some(dir.parent()?.file_name()?.to_string_lossy().into_owned());
    }
    Some(stem.into_owned())
}

fn build(a: &BuildArgs) -> anyhow::Result<()> {
    if a.out.exists() && !a.force {
        bail!("{} exists; pass --force to replace it", a.out.display());
    }
    let name = match &a.name {
        Some(n) => n.clone(),
        None => default_name(&a.model).context("cannot derive a name: give --name")?,
    };
    fedge_proto::check_id(&name).map_err(|e| anyhow::anyhow!("bundle name {name:?}: {e}"))?;
    if !(a.tolerance.is_finite() && a.tolerance >= 0.0) {
        bail!("--tolerance must be a finite number >= 0");
    }
    let model = read(&a.model)?;
    let test_in_path = match &a.test_vector {
        Some(p) => p.clone(),
        None => a.model.with_file_name("io.npz"),
    };
    if a.test_vector.is_none() && !test_in_path.exists() {
        bail!(
            "no test vector: {} does not exist; give --test-vector FILE.npz (every device \
             self-tests a bundle before serving it)",
            test_in_path.display()
        );
    }
    let test_input = read(&test_in_path)?;
    let test_output = match &a.test_output {
        Some(p) => read(p)?,
        None => test_input.clone(),
    };
    let signer = fedge_proto::keys::file::load(&a.key)
        .with_context(|| format!("operator key {}", a.key.display()))?;
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let bundle = Bundle {
        name: &name,
        version: a.version,
        created_unix_s: created,
        model: &model,
        test_input: &test_input,
        test_output: &test_output,
        tolerance: a.tolerance,
    };
    let payload = encode(&bundle)?;
    let wire = Envelope::new(Kind::Bundle, &a.operator_id, created, 0, &payload)
        .seal(&signer)
        .map_err(|e| anyhow::anyhow!("--operator-id {:?}: {e}", a.operator_id))?;
    let opened = open_bundle(&wire, &signer.public_key())?;
    if !a.no_self_test {
        self_test(&opened, &wire)?;
    }
    write_atomic(&a.out, &wire)?;
    println!(
        "{} v{}: {} bytes, sha256 {}, signed by {}",
        name,
        a.version,
        wire.len(),
        sha256_hex(&wire),
        signer.public_key().fingerprint()
    );
    Ok(())
}

/// The envelope checks a device makes on a reassembled bundle: signature by `key`, kind, payload.
fn open_bundle<'a>(wire: &'a [u8], key: &PublicKey) -> anyhow::Result<(&'a str, Bundle<'a>)> {
    let env = Envelope::open(wire, wire.len())
        .map_err(|e| anyhow::anyhow!("not a bundle: {e}"))?
        .verify(key)
        .map_err(|_| {
            anyhow::anyhow!(
                "bad signature: not signed by operator key {} (or altered after signing)",
                key.fingerprint()
            )
        })?;
    if env.kind != Kind::Bundle {
        bail!("not a bundle: a {:?} envelope", env.kind);
    }
    let b: Bundle<'_> = decode(env.payload).map_err(|e| anyhow::anyhow!("bundle payload: {e}"))?;
    fedge_proto::check_id(b.name).map_err(|e| anyhow::anyhow!("bundle name {:?}: {e}", b.name))?;
    Ok((env.sender, b))
}

/// Installs the bundle into a scratch model store, exactly as a device does (stage, load with the
/// test vector's shapes, self-test).
fn self_test(opened: &(&str, Bundle<'_>), wire: &[u8]) -> anyhow::Result<()> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir =
        std::env::temp_dir().join(format!("fedge-bundle-check-{}-{nanos}", std::process::id()));
    let result = fedge_agent::store::ModelStore::open(&dir, 1, 1)
        .with_context(|| format!("scratch store {}", dir.display()))
        .and_then(|store| {
            let sha: [u8; 32] = sha256(wire);
            store.install(&opened.1, &sha).map(|_| ()).map_err(|f| {
                anyhow::anyhow!(
                    "self-test failed ({}): {}",
                    f.reason.as_str(),
                    f.detail.replace('\n', " ")
                )
            })
        });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn verify(a: &VerifyArgs) -> anyhow::Result<()> {
    let key = read_public_key(&a.public).context("--pub")?;
    let wire = read(&a.file)?;
    let opened = open_bundle(&wire, &key)?;
    if a.self_test {
        self_test(&opened, &wire)?;
    }
    let (sender, b) = opened;
    if a.json {
        let v = json!({
            "ok": true,
            "name": b.name,
            "version": b.version,
            "created_unix_s": b.created_unix_s,
            "signer": sender,
            "signer_key": key.to_hex().as_str(),
            "sha256": sha256_hex(&wire),
            "bytes": wire.len(),
            "model_sha256": sha256_hex(b.model),
            "model_bytes": b.model.len(),
            "test_input_bytes": b.test_input.len(),
            "test_output_bytes": b.test_output.len(),
            "tolerance": b.tolerance,
            "self_tested": a.self_test,
        });
        println!("{v}");
    } else {
        println!(
            "ok: {} v{} signed by {sender} ({}), model sha256 {}, {} bytes{}",
            b.name,
            b.version,
            key.fingerprint(),
            sha256_hex(b.model),
            wire.len(),
            if a.self_test {
                ", self-test passed"
            } else {
                ""
            }
        );
    }
    Ok(())
}

pub(super) fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    fedge_proto::hex::encode32(&sha256(bytes)).to_string()
}

fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    let tmp = path.with_file_name(format!(".tmp-{}", name.to_string_lossy()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .with_context(|| format!("writing {}", path.display()))
}
