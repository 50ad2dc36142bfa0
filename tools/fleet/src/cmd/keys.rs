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
}

pub fn run(a: Args) -> anyhow::Result<()> {
    match a.command {
        KeysCommand::Gen { out, force } => gen_keys(&out, force),
    }
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
