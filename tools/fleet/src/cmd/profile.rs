//! Device profiles (`targets/profiles/*.toml`): what a device class may run. The repository's
//! profiles are built into the binary; `--profile path.toml` reads any other.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;

/// One device class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    pub description: String,
    /// Backends in order of preference.
    pub backends: Vec<String>,
    pub threads: usize,
    pub memory_budget_mib: f64,
    pub max_model_mib: f64,
    /// Accepted `QuantFormat` names.
    pub quantization: Vec<String>,
    pub runs_models: bool,
    pub crates: Vec<String>,
    pub cargo_features: Vec<String>,
    #[serde(default)]
    pub cargo_flags: Vec<String>,
    pub rust_target: String,
}

/// The profiles shipped in `targets/profiles/`.
pub const BUILT_IN: [(&str, &str); 4] = [
    (
        "x86_64-linux",
        include_str!("../../../../targets/profiles/x86_64-linux.toml"),
    ),
    (
        "aarch64-rpi4",
        include_str!("../../../../targets/profiles/aarch64-rpi4.toml"),
    ),
    (
        "jetson-orin",
        include_str!("../../../../targets/profiles/jetson-orin.toml"),
    ),
    (
        "mcu-cortex-m",
        include_str!("../../../../targets/profiles/mcu-cortex-m.toml"),
    ),
];

impl Profile {
    /// A built-in profile by name, or a TOML file by path.
    pub fn find(name_or_path: &str) -> anyhow::Result<Profile> {
        let text = if let Some((_, t)) = BUILT_IN.iter().find(|(n, _)| *n == name_or_path) {
            (*t).to_string()
        } else if name_or_path.ends_with(".toml") || Path::new(name_or_path).exists() {
            std::fs::read_to_string(name_or_path)
                .with_context(|| format!("cannot read profile {name_or_path}"))?
        } else {
            let names: Vec<&str> = BUILT_IN.iter().map(|(n, _)| *n).collect();
            bail!(
                "unknown profile `{name_or_path}` (built in: {}; or give a .toml path)",
                names.join(", ")
            )
        };
        toml::from_str(&text).with_context(|| format!("profile {name_or_path} is not valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_profiles_parse() {
        for (name, _) in BUILT_IN {
            let p = Profile::find(name).expect("profile");
            assert_eq!(p.name, name);
            assert_eq!(p.runs_models, !p.backends.is_empty(), "{name}");
        }
        assert!(Profile::find("nope").is_err());
    }
}
