//! `fedge keys`: the operator's Ed25519 key pair, the trust anchor that devices pin.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use fedge_proto::PublicKey;
use fedge_proto::keys::file;

/// The private key file inside a key directory.
pub const OPERATOR_KEY: &str = "operator.key";
/// The public key file (64 hex characters and a newline) inside a key directory.
pub const OPERATOR_PUB: &str = "operator.pub";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Make the operator key pair: DIR/operator.key (PKCS#8, mode 0600) and DIR/operator.pub
    /// (hex). Devices pin the public key; bundles and commands are signed with the private one.
    Gen {
        /// Directory for the key pair (created if absent, mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing key pair (devices pinned to the old key will refuse the new one).
        #[arg(long)]
        force: bool,
    },
    /// Certify an aggregator's key with the operator key. The aggregator publishes the
    /// certificate retained (its `certificate_file`); devices that pin only the operator key
    /// learn the aggregator key from it, and a newer certificate rotates it.
    CertifyAggregator(CertifyArgs),
}

#[derive(Debug, clap::Args)]
pub struct CertifyArgs {
    /// The operator's private key (operator.key from `fedge keys gen`, mode 0600).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The aggregator's public key: 64 hex characters, or a file holding them
    /// (`fedge-aggregator key` prints it).
    #[arg(long, value_name = "HEX|FILE")]
    pub aggregator_pub: String,
    /// The aggregator's sender id (its configuration's `id`).
    #[arg(long, default_value = "aggregator")]
    pub aggregator_id: String,
    /// The fleet the certificate is for.
    #[arg(long, default_value = "default")]
    pub fleet: String,
    /// Days the certificate stays valid.
    #[arg(long, default_value_t = 365)]
    pub valid_days: u64,
    /// Sender id in the envelope (agents configured with `operator_id` require it).
    #[arg(long, default_value = "operator")]
    pub operator_id: String,
    /// Where to write the certificate (the signed envelope, as the aggregator publishes it).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        KeysCommand::Gen { out, force } => gen_keys(&out, force),
        KeysCommand::CertifyAggregator(c) => certify_aggregator(&c),
    }
}

fn certify_aggregator(a: &CertifyArgs) -> anyhow::Result<()> {
    use fedge_proto::check_id;
    for (what, id) in [
        ("--fleet", &a.fleet),
        ("--aggregator-id", &a.aggregator_id),
        ("--operator-id", &a.operator_id),
    ] {
        check_id(id)
            .map_err(|_| anyhow::anyhow!("{what} {id:?}: 1 to 64 characters of [A-Za-z0-9._-]"))?;
    }
    if a.valid_days == 0 {
        bail!("--valid-days must be at least 1");
    }
    let signer = file::load(&a.key).with_context(|| format!("reading {}", a.key.display()))?;
    let public_key = read_public_key(&a.aggregator_pub)?;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    let now = since.as_secs();
    let not_after = now.saturating_add(a.valid_days.saturating_mul(86_400));
    let cert = fedge_proto::msg::AggregatorCert {
        fleet: &a.fleet,
        aggregator: &a.aggregator_id,
        public_key,
        not_after_unix_s: not_after,
    };
    let issued_ms = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    let wire = aggregator_certificate(&signer, &a.operator_id, &cert, issued_ms)?;
    std::fs::write(&a.out, &wire).with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "certified {public_key} as aggregator {:?} of fleet {:?} until {not_after} (unix seconds), signed by {}; wrote {} ({} bytes)",
        a.aggregator_id,
        a.fleet,
        signer.public_key().fingerprint(),
        a.out.display(),
        wire.len()
    );
    Ok(())
}

fn gen_keys(dir: &Path, force: bool) -> anyhow::Result<()> {
    let (key, public) = (dir.join(OPERATOR_KEY), dir.join(OPERATOR_PUB));
    if !force {
        for p in [&key, &public] {
            if p.exists() {
                bail!("{} exists; pass --force to replace it", p.display());
            }
        }
    }
    create_private_dir(dir)?;
    for p in [&key, &public] {
        match std::fs::remove_file(p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", p.display()));
            }
            _ => {}
        }
    }
    let signer = file::create(&key).with_context(|| format!("writing {}", key.display()))?;
    let hex = signer.public_key().to_hex();
    std::fs::write(&public, format!("{hex}\n"))
        .with_context(|| format!("writing {}", public.display()))?;
    println!("{hex}");
    Ok(())
}

/// The operator's certificate `cert`, signed by `operator` as `operator_id`. The issue time
/// (`issued_ms`, unix milliseconds) is the envelope's sequence number: devices take a newer
/// certificate over an older one.
///
/// # Errors
/// An invalid operator id.
pub fn aggregator_certificate(
    operator: &fedge_proto::Signer,
    operator_id: &str,
    cert: &fedge_proto::msg::AggregatorCert<'_>,
    now: u64,
) -> anyhow::Result<Vec<u8>> {
    let payload = fedge_proto::envelope::encode(cert)?;
    fedge_proto::Envelope::new(
        fedge_proto::Kind::Certificate,
        operator_id,
        now,
        0,
        &payload,
    )
    .seal(operator)
    .map_err(|e| anyhow::anyhow!("sealing the certificate: {e}"))
}

/// Creates `dir` (and its parents) if absent; a directory it creates is mode 0700.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

/// A public key given as 64 hex characters or as a file holding them.
pub fn read_public_key(arg: &str) -> anyhow::Result<PublicKey> {
    if let Ok(k) = PublicKey::from_hex(arg.trim()) {
        return Ok(k);
    }
    let text = std::fs::read_to_string(arg)
        .with_context(|| format!("{arg}: neither 64 hex characters nor a readable key file"))?;
    PublicKey::from_hex(text.trim())
        .map_err(|_| anyhow::anyhow!("{arg}: does not hold 64 hex characters of a public key"))
}
