//! The two places noise is added: on each device (local DP) or on the server's sum (central DP).

use super::DpError;
use super::clip::{AdaptiveClip, check_clip_norm, check_finite, clip_to};
use super::noise::{NormalSource, noised};

/// Local DP: each device clips its update to `C` and adds `N(0, (zC)²)` per coordinate before
/// sending it, so the server (and anyone after it) sees only a noised update.
///
/// One privatised update is a Gaussian mechanism with sensitivity `C` and noise multiplier `z`;
/// the server knows who took part, so account each participation with sampling rate 1:
/// `SampledGaussian::new(z, 1.0)`, composed once per round the device joins.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalDp {
    noise_multiplier: f64,
    clip_norm: f64,
}

impl LocalDp {
    /// # Errors
    /// [`DpError::InvalidNoiseMultiplier`] unless `z` is finite and `> 0`;
    /// [`DpError::InvalidClipNorm`] unless `C` is finite and `> 0`.
    pub fn new(noise_multiplier: f64, clip_norm: f64) -> Result<Self, DpError> {
        check_noise_multiplier(noise_multiplier)?;
        check_clip_norm(clip_norm)?;
        Ok(Self {
            noise_multiplier,
            clip_norm,
        })
    }

    /// The noise stddev per coordinate, `zC`.
    pub fn noise_stddev(&self) -> f64 {
        self.noise_multiplier * self.clip_norm
    }

    /// Clips `update` to `C` and adds the noise, in place; returns whether it was unclipped
    /// (`‖update‖ ≤ C`).
    ///
    /// # Errors
    /// [`DpError::NonFiniteValue`] for NaN/Inf in `update` or a result overflowing f32;
    /// `update` is then unchanged.
    pub fn privatize(
        &self,
        update: &mut [f32],
        source: &mut dyn NormalSource,
    ) -> Result<bool, DpError> {
        let mut clipped = update.to_vec();
        let unclipped = clip_to(&mut clipped, self.clip_norm)?;
        let out = noised(&clipped, self.noise_stddev(), source)?;
        update.copy_from_slice(&out);
        Ok(unclipped)
    }
}

/// How the server chooses the clipping norm.
#[derive(Debug, Clone, PartialEq)]
pub enum Clipping {
    /// The same norm every round.
    Fixed(f64),
    /// A norm that follows a quantile of the update norms.
    Adaptive(AdaptiveClip),
}

/// Central DP (McMahan et al. 2018, DP-FedAvg): the server clips every update to `C`, sums
/// them, and adds `N(0, (z_Δ C)²)` per coordinate to the sum; with fixed clipping `z_Δ = z`,
/// with adaptive clipping `z_Δ` is [`AdaptiveClip::update_noise_multiplier`]. Each round is
/// a [`SampledGaussian`](super::SampledGaussian) with multiplier `z` and the round's
/// sampling rate.
///
/// Per round: [`clip`](Self::clip) each update and count the unclipped ones, add them up, then
/// [`noise_sum`](Self::noise_sum) once, and divide by the (expected) number of clients.
#[derive(Debug, Clone, PartialEq)]
pub struct CentralDp {
    noise_multiplier: f64,
    update_noise_multiplier: f64,
    clipping: Clipping,
}

impl CentralDp {
    /// # Errors
    /// [`DpError::InvalidNoiseMultiplier`], [`DpError::InvalidClipNorm`], or, for adaptive
    /// clipping, [`DpError::InvalidOption`] unless `2σ_b > z`.
    pub fn new(noise_multiplier: f64, clipping: Clipping) -> Result<Self, DpError> {
        check_noise_multiplier(noise_multiplier)?;
        let update_noise_multiplier = match &clipping {
            Clipping::Fixed(c) => {
                check_clip_norm(*c)?;
                noise_multiplier
            }
            Clipping::Adaptive(a) => a.update_noise_multiplier(noise_multiplier)?,
        };
        Ok(Self {
            noise_multiplier,
            update_noise_multiplier,
            clipping,
        })
    }

    /// `z`, what the accountant is charged per round.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The clipping norm for the current round.
    pub fn clip_norm(&self) -> f64 {
        match &self.clipping {
            Clipping::Fixed(c) => *c,
            Clipping::Adaptive(a) => a.norm(),
        }
    }

    /// The stddev of the noise on the sum this round, `z_Δ·C`.
    pub fn noise_stddev(&self) -> f64 {
        self.update_noise_multiplier * self.clip_norm()
    }

    /// Clips one update to this round's norm, in place; returns whether it was unclipped.
    ///
    /// # Errors
    /// [`DpError::NonFiniteValue`] for NaN/Inf; `update` is then unchanged.
    pub fn clip(&self, update: &mut [f32]) -> Result<bool, DpError> {
        clip_to(update, self.clip_norm())
    }

    /// Adds this round's noise to `sum` (the sum of `clients` clipped updates, `unclipped` of
    /// which were inside the norm), then, with adaptive clipping, moves the norm for the next
    /// round.
    ///
    /// # Errors
    /// [`DpError::NonFiniteValue`] for NaN/Inf in `sum` or an f32 overflow;
    /// [`DpError::InvalidOption`] for `clients == 0` or `unclipped > clients` with adaptive
    /// clipping. On error neither `sum` nor the norm changes.
    pub fn noise_sum(
        &mut self,
        sum: &mut [f32],
        unclipped: u64,
        clients: u64,
        source: &mut dyn NormalSource,
    ) -> Result<(), DpError> {
        check_finite(sum)?;
        let out = noised(sum, self.noise_stddev(), source)?;
        if let Clipping::Adaptive(a) = &mut self.clipping {
            a.adapt(unclipped, clients, source)?;
        }
        sum.copy_from_slice(&out);
        Ok(())
    }
}

fn check_noise_multiplier(z: f64) -> Result<(), DpError> {
    if z.is_finite() && z > 0.0 {
        Ok(())
    } else {
        Err(DpError::InvalidNoiseMultiplier(z))
    }
}
