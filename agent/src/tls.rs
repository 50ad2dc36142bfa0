//! rustls client configuration (ring provider, no aws-lc) from PEM files.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::BrokerConfig;
use crate::error::AgentError;

/// The TLS client config for `mqtts://`: the broker's certificate must chain to `ca_file`; with
/// `client_cert_file` and `client_key_file`, the device authenticates with its certificate.
///
/// # Errors
/// [`AgentError::Tls`] naming the file or setting at fault.
pub fn client_config(cfg: &BrokerConfig) -> Result<rustls::ClientConfig, AgentError> {
    let ca = cfg.ca_file.as_ref().ok_or_else(|| {
        AgentError::Tls(
            "mqtts:// needs broker.ca_file (the CA that signed the broker's certificate)".into(),
        )
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| AgentError::Tls(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&cfg.client_cert_file, &cfg.client_key_file) {
        (Some(c), Some(k)) => {
            let key = PrivateKeyDer::from_pem_file(k)
                .map_err(|e| AgentError::Tls(format!("{}: {e}", k.display())))?;
            builder
                .with_client_auth_cert(certs(c)?, key)
                .map_err(|e| AgentError::Tls(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(AgentError::Tls(
            "set both broker.client_cert_file and broker.client_key_file, or neither".into(),
        )),
    }
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let err =
        |e: rustls::pki_types::pem::Error| AgentError::Tls(format!("{}: {e}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    if certs.is_empty() {
        return Err(AgentError::Tls(format!(
            "{}: no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mqtts_needs_a_ca_file_that_holds_certificates() {
        let text = format!(
            "device_id = \"d\"\noperator_key = \"{}\"\n[broker]\nurl = \"mqtts://h\"\n",
            "0".repeat(64)
        );
        let mut cfg = crate::Config::from_toml(&text).expect("config").broker;
        let e = client_config(&cfg).expect_err("no CA").to_string();
        assert!(e.contains("ca_file"), "{e}");
        let dir = crate::fsx::testdir::TestDir::new("tls");
        let pem = dir.path().join("ca.pem");
        std::fs::write(&pem, "not a certificate\n").expect("write");
        cfg.ca_file = Some(pem);
        let e = client_config(&cfg).expect_err("empty CA").to_string();
        assert!(e.contains("no certificate"), "{e}");
    }
}
