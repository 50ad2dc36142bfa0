//! Ed25519 identities (ring): a [`Signer`] holds a private key, a [`PublicKey`] verifies.

use core::fmt;

use ring::signature::{self, Ed25519KeyPair, KeyPair};

use crate::{ProtoError, SIGNATURE_LEN};

/// An Ed25519 public key (32 bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// Parses 64 hex characters.
    pub fn from_hex(text: &str) -> Result<Self, ProtoError> {
        crate::hex::decode::<32>(text)
            .map(Self)
            .map_err(|_| ProtoError::BadKey)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> heapless::String<64> {
        crate::hex::encode32(&self.0)
    }

    /// Verifies `sig` over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<(), ProtoError> {
        signature::UnparsedPublicKey::new(&signature::ED25519, &self.0)
            .verify(msg, sig)
            .map_err(|_| ProtoError::BadSignature)
    }

    /// A short fingerprint for logs: the first 8 bytes of the key's sha256, in hex.
    pub fn fingerprint(&self) -> heapless::String<16> {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.0);
        let mut buf = [0u8; 16];
        let mut s = heapless::String::new();
        if let Ok(t) = crate::hex::encode(&d.as_ref()[..8], &mut buf) {
            let _ = s.push_str(t);
        }
        s
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A private Ed25519 key that signs envelopes. Its `Debug` never prints the key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("public", &self.public_key())
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Loads a key from its PKCS#8 v2 document (what [`Signer::generate_pkcs8`] returns and what
    /// key files hold).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ProtoError> {
        Ed25519KeyPair::from_pkcs8(pkcs8)
            .map(|pair| Self { pair })
            .map_err(|_| ProtoError::BadKey)
    }

    /// A fresh key from the system random generator, as a PKCS#8 document (83-85 bytes) written to
    /// `out`; returns its length.
    pub fn generate_pkcs8(out: &mut [u8]) -> Result<usize, ProtoError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| ProtoError::Rng)?;
        let bytes = doc.as_ref();
        out.get_mut(..bytes.len())
            .ok_or(ProtoError::BufferFull)?
            .copy_from_slice(bytes);
        Ok(bytes.len())
    }

    /// A fresh key and its PKCS#8 document.
    #[cfg(feature = "alloc")]
    pub fn generate() -> Result<(Self, alloc::vec::Vec<u8>), ProtoError> {
        let mut buf = [0u8; 128];
        let n = Self::generate_pkcs8(&mut buf)?;
        let doc = buf[..n].to_vec();
        Ok((Self::from_pkcs8(&doc)?, doc))
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let mut k = [0u8; 32];
        k.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(k)
    }

    /// The Ed25519 key pair, for protocols that sign with `ring` directly (secure aggregation).
    pub fn key_pair(&self) -> &Ed25519KeyPair {
        &self.pair
    }

    /// Signs `msg`.
    pub fn sign(&self, msg: &[u8]) -> [u8; SIGNATURE_LEN] {
        let mut out = [0u8; SIGNATURE_LEN];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }
}

/// Key files: the PKCS#8 document, raw, created with mode 0600 (the private key never leaves the
/// device; a group- or world-readable key file is refused on load).
#[cfg(feature = "std")]
pub mod file {
    use std::io::Write;
    use std::path::Path;

    use super::Signer;

    /// Generates a key and writes it to `path` (mode 0600, refusing to overwrite); returns it.
    pub fn create(path: &Path) -> std::io::Result<Signer> {
        let (signer, doc) = Signer::generate().map_err(std::io::Error::other)?;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(path)?;
        f.write_all(&doc)?;
        f.sync_all()?;
        Ok(signer)
    }

    /// Loads the key at `path`; refuses a file readable by group or others.
    pub fn load(path: &Path) -> std::io::Result<Signer> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "{}: key file mode is {:o}; it must be 0600 (chmod 600)",
                        path.display(),
                        mode & 0o777
                    ),
                ));
            }
        }
        let doc = std::fs::read(path)?;
        Signer::from_pkcs8(&doc)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Loads the key at `path`, creating it first if absent.
    pub fn load_or_create(path: &Path) -> std::io::Result<Signer> {
        if path.exists() {
            load(path)
        } else {
            create(path)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify() {
        let mut doc = [0u8; 128];
        let n = Signer::generate_pkcs8(&mut doc).expect("keygen");
        let s = Signer::from_pkcs8(&doc[..n]).expect("load");
        let sig = s.sign(b"hello");
        let pk = s.public_key();
        assert!(pk.verify(b"hello", &sig).is_ok());
        assert_eq!(pk.verify(b"hellO", &sig), Err(ProtoError::BadSignature));
        assert_eq!(PublicKey::from_hex(&pk.to_hex()), Ok(pk));
        assert_eq!(Signer::from_pkcs8(b"junk").err(), Some(ProtoError::BadKey));
        assert!(!format!("{s:?}").contains("pair"));
    }

    #[cfg(all(feature = "std", unix))]
    #[test]
    fn key_file_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("fedge-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("device.key");
        let _ = std::fs::remove_file(&p);
        let s = file::create(&p).expect("create");
        assert_eq!(
            std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(file::load(&p).expect("load").public_key(), s.public_key());
        assert!(file::create(&p).is_err(), "never overwrites a key");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(file::load(&p).is_err());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
