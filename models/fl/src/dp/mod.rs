//! Differential privacy: clipping, Gaussian noise and a Rényi-DP accountant.
//!
//! # Layout
//! - [`RdpAccountant`], [`SampledGaussian`], [`epsilon`]: RDP of the Poisson-sampled Gaussian
//!   mechanism and its conversion to (ε, δ), matching Google's dp-accounting.
//! - [`PrivacyBudget`], [`BudgetedAccountant`]: a job's budget, refusing rounds past it.
//! - [`LocalDp`] (noise on each device), [`CentralDp`] (noise on the server's sum) with
//!   [`Clipping::Fixed`] or [`Clipping::Adaptive`] ([`AdaptiveClip`], Andrew et al. 2019).
//! - [`clip_to`]: L2 clipping that reports whether the update was inside the norm.
//! - [`NormalSource`], [`NoiseRng`]: standard normals from a CSPRNG keyed by `ring`.
//! - [`DpError`]: every failure, as a value; a failed call changes no state.
//!
//! # Example
//! ```
//! use fedge_fl::dp::{CentralDp, Clipping, NoiseRng, PrivacyBudget, BudgetedAccountant, SampledGaussian};
//!
//! let mut job = BudgetedAccountant::new(PrivacyBudget::new(8.0, 1e-5)?);
//! let mut server = CentralDp::new(1.0, Clipping::Fixed(1.0))?;
//! let round = SampledGaussian::new(server.noise_multiplier(), 0.1)?;
//! job.check_round(&round)?; // before opening the round
//!
//! let mut rng = NoiseRng::from_system()?;
//! let mut sum = vec![0.0f32; 4];
//! for mut update in [vec![3.0f32, 4.0, 0.0, 0.0], vec![0.1, 0.0, 0.2, 0.0]] {
//!     server.clip(&mut update)?;
//!     sum.iter_mut().zip(&update).for_each(|(s, u)| *s += u);
//! }
//! server.noise_sum(&mut sum, 1, 2, &mut rng)?;
//! let spent = job.record_round(&round)?;
//! assert!(spent > 0.0 && spent <= 8.0);
//! # Ok::<(), fedge_fl::dp::DpError>(())
//! ```

mod budget;
mod clip;
mod mechanism;
mod noise;
mod rdp;
mod special;

pub use budget::{BudgetedAccountant, PrivacyBudget};
pub use clip::{AdaptiveClip, AdaptiveClipOptions, clip_to};
pub use mechanism::{CentralDp, Clipping, LocalDp};
pub use noise::{NoiseRng, NormalSource};
pub use rdp::{
    MAX_ORDER, RdpAccountant, SampledGaussian, default_orders, epsilon, noise_multiplier_for,
};

use thiserror::Error;

/// Everything that can go wrong in [`dp`](self).
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum DpError {
    /// A noise multiplier that is not finite and `> 0`.
    #[error("noise multiplier must be finite and > 0, got {0}")]
    InvalidNoiseMultiplier(f64),
    /// A sampling rate outside [0, 1] (or NaN).
    #[error("sampling rate must be in [0, 1], got {0}")]
    InvalidSamplingRate(f64),
    /// A δ outside (0, 1) (or NaN).
    #[error("delta must be in (0, 1), got {0}")]
    InvalidDelta(f64),
    /// An ε budget that is not finite and `> 0`.
    #[error("epsilon budget must be finite and > 0, got {0}")]
    InvalidEpsilon(f64),
    /// An RDP order that is not finite and in `(1, MAX_ORDER]`, or an empty order list (NaN).
    #[error("RDP orders must be finite and in (1, {MAX_ORDER}], got {0}")]
    InvalidOrder(f64),
    /// A clipping norm that is not finite and `> 0`.
    #[error("clipping norm must be finite and > 0, got {0}")]
    InvalidClipNorm(f64),
    /// Another option out of its range.
    #[error("invalid option {name}: {reason}")]
    InvalidOption { name: &'static str, reason: String },
    /// An update or sum holds NaN or ±Inf, or noise overflowed f32.
    #[error("non-finite value at index {index}")]
    NonFiniteValue { index: usize },
    /// Saved accountant state that contradicts itself.
    #[error("invalid accountant state: {0}")]
    InvalidState(&'static str),
    /// The round would take the job past its ε budget.
    #[error(
        "privacy budget exceeded: epsilon {after} after this round, budget {budget} (spent {spent})"
    )]
    BudgetExceeded { budget: f64, spent: f64, after: f64 },
    /// The operating system's random generator failed.
    #[error("the system random generator failed")]
    Rng,
}
