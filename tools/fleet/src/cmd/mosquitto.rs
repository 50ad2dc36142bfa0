//! Mosquitto credentials for a device: a random password, its password-file line, and the ACL
//! lines that confine the device to its own topics.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::rand::{SecureRandom, SystemRandom};

/// PBKDF2 iterations, as `mosquitto_passwd` (2.0) writes them.
pub const ITERATIONS: u32 = 101;
const SALT_LEN: usize = 12;
const HASH_LEN: usize = 64;

/// A random password: 24 bytes from the system generator in base64 (32 characters of
/// `[A-Za-z0-9+/]`, no padding).
pub fn random_password() -> anyhow::Result<String> {
    let mut b = [0u8; 24];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(STANDARD.encode(b))
}

/// The password-file line `user:$7$101$<salt>$<hash>` (PBKDF2-HMAC-SHA512, 12-byte random salt,
/// standard base64): what `mosquitto_passwd -b` writes and Mosquitto 2.0 accepts.
pub fn password_line(user: &str, password: &str) -> anyhow::Result<String> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("the system random generator failed"))?;
    Ok(format!("{user}:{}", hash(password, &salt, ITERATIONS)))
}

fn hash(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut out = [0u8; HASH_LEN];
    let n = std::num::NonZeroU32::new(iterations).unwrap_or(std::num::NonZeroU32::MIN);
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        n,
        salt,
        password.as_bytes(),
        &mut out,
    );
    format!(
        "$7${iterations}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(out)
    )
}

/// ACL lines for `device` in `fleet` (see `docs/protocol.md`, broker ACLs): it publishes only its
/// status (also its last will), telemetry and updates, and reads only its commands, round
/// announcements, global-model chunks and bundle chunks.
pub fn acl_lines(fleet: &str, device: &str) -> String {
    let base = format!("fedge/v1/{fleet}");
    format!(
        "user {device}\n\
         topic write {base}/dev/{device}/status\n\
         topic write {base}/dev/{device}/telemetry\n\
         topic write {base}/job/+/update/{device}\n\
         topic read {base}/dev/{device}/cmd\n\
         topic read {base}/dev/{device}/desired\n\
         topic read {base}/job/+/round\n\
         topic read {base}/job/+/model/#\n\
         topic read {base}/bundle/#\n\
         topic read {base}/aggregator\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_mosquitto_passwd() {
        // `mosquitto_passwd -c -b pw dev-a secret` (Mosquitto 2.0.11).
        let line = "$7$101$v+29hhKDXXP+k7IV$YdP1HO9XdAtP/sStkhSEDifRuBZajoN/H6jyfIWeSWTp8q0gw8YMb6ziSB68U7Nl6YqNIxABit/mBvqT+M6XWw==";
        let salt = base64::engine::general_purpose::STANDARD
            .decode("v+29hhKDXXP+k7IV")
            .expect("salt");
        assert_eq!(hash("secret", &salt, 101), line);
    }

    #[test]
    fn password_lines_are_salted() {
        let a = password_line("dev-a", "pw").expect("line");
        let b = password_line("dev-a", "pw").expect("line");
        assert!(a.starts_with("dev-a:$7$101$"), "{a}");
        assert_ne!(a, b);
        assert_eq!(random_password().expect("pw").len(), 32);
    }

    #[test]
    fn acl_names_only_the_device_topics() {
        let acl = acl_lines("f", "dev-a");
        assert!(acl.starts_with("user dev-a\n"));
        for line in acl.lines().skip(1) {
            let topic = line.rsplit(' ').next().unwrap_or_default();
            let own = topic.contains("/dev-a");
            let shared = topic.ends_with("/round")
                || topic.contains("/model/")
                || topic.contains("/bundle/")
                || topic.ends_with("/aggregator");
            assert!(own || (shared && line.starts_with("topic read")), "{line}");
        }
    }
}
