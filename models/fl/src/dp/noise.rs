//! Gaussian noise for the DP mechanisms.
//!
//! [`NoiseRng`] is ChaCha12 (rand's `StdRng`, a CSPRNG) keyed with 32 bytes from
//! `ring::rand::SystemRandom` (the operating system's CSPRNG). Normals come from the Box–Muller
//! transform on two 53-bit uniforms: `u₁ ∈ (0, 1]`, `u₂ ∈ [0, 1)`,
//! `r = √(−2 ln u₁)`, `z₀ = r cos 2πu₂`, `z₁ = r sin 2πu₂`; both outputs are used. The
//! smallest `u₁` is 2⁻⁵³, so `|z| ≤ 8.57`: the tail beyond 8.57σ (probability 10⁻¹⁷) is cut,
//! and, as for every floating-point sampler, the output is not exactly Gaussian in its low
//! bits (Mironov 2012 shows how such artefacts can leak for Laplace noise). The noise is drawn
//! and added in f64, then rounded once to f32.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};

use super::DpError;

/// A source of independent standard normal samples.
///
/// [`NoiseRng`] is the one to use for privacy; tests can plug in a seeded or scripted source.
pub trait NormalSource {
    /// The next sample from N(0, 1).
    fn standard_normal(&mut self) -> f64;
}

/// A CSPRNG-backed [`NormalSource`] (see the module docs for the method).
pub struct NoiseRng {
    rng: StdRng,
    spare: Option<f64>,
}

impl std::fmt::Debug for NoiseRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoiseRng").finish_non_exhaustive()
    }
}

impl NoiseRng {
    /// Keyed from the operating system's CSPRNG through `ring`.
    ///
    /// # Errors
    /// [`DpError::Rng`] when the system generator fails.
    pub fn from_system() -> Result<Self, DpError> {
        let mut seed = [0u8; 32];
        SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| DpError::Rng)?;
        Ok(Self::from_seed(seed))
    }

    /// A deterministic generator for tests and reproducible simulations. Noise from a known
    /// seed gives no privacy: use [`from_system`](Self::from_system) for real updates.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self {
            rng: StdRng::from_seed(seed),
            spare: None,
        }
    }

    /// A uniform in `[0, 1)` with 53 random bits.
    fn unit(&mut self) -> f64 {
        (self.rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

impl NormalSource for NoiseRng {
    fn standard_normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let u1 = 1.0 - self.unit();
        let u2 = self.unit();
        let r = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * sin);
        r * cos
    }
}

/// `x + N(0, stddev²)` per coordinate, computed in f64 and rounded to f32, into a new vector.
///
/// # Errors
/// [`DpError::NonFiniteValue`] when a result overflows f32 (the input is left to the caller
/// unchanged).
pub(crate) fn noised(
    x: &[f32],
    stddev: f64,
    source: &mut dyn NormalSource,
) -> Result<Vec<f32>, DpError> {
    let mut out = Vec::with_capacity(x.len());
    for (index, &v) in x.iter().enumerate() {
        let y = (f64::from(v) + stddev * source.standard_normal()) as f32;
        if !y.is_finite() {
            return Err(DpError::NonFiniteValue { index });
        }
        out.push(y);
    }
    Ok(out)
}
