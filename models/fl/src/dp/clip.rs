//! L2 clipping, fixed and adaptive (Andrew et al. 2019).

use super::DpError;
use super::noise::NormalSource;

/// Extra shrink applied when clipping, so f32 rounding of the scaled values (at most 2⁻²⁴
/// relative each) cannot leave the norm above the bound.
const CLIP_MARGIN: f64 = 1.0 - 1.0 / (1u64 << 22) as f64;

/// Scales `update` in place onto the L2 ball of radius `bound` and says whether it was already
/// inside (`‖update‖ ≤ bound`: the "unclipped" bit adaptive clipping counts). After a clip the
/// norm is at most `bound` (the factor is shrunk by 2⁻²² against f32 rounding).
///
/// # Errors
/// [`DpError::InvalidClipNorm`] unless `bound` is finite and `> 0`;
/// [`DpError::NonFiniteValue`] at the first NaN or ±Inf. `update` is then unchanged.
pub fn clip_to(update: &mut [f32], bound: f64) -> Result<bool, DpError> {
    check_clip_norm(bound)?;
    check_finite(update)?;
    let norm = l2_norm_f64(update);
    if norm <= bound {
        return Ok(true);
    }
    let scale = bound / norm * CLIP_MARGIN;
    for v in update.iter_mut() {
        *v = (f64::from(*v) * scale) as f32;
    }
    Ok(false)
}

/// The L2 norm, accumulated in f64.
pub(crate) fn l2_norm_f64(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

pub(crate) fn check_clip_norm(bound: f64) -> Result<(), DpError> {
    if bound.is_finite() && bound > 0.0 {
        Ok(())
    } else {
        Err(DpError::InvalidClipNorm(bound))
    }
}

pub(crate) fn check_finite(x: &[f32]) -> Result<(), DpError> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(DpError::NonFiniteValue { index }),
        None => Ok(()),
    }
}

/// Options of [`AdaptiveClip`]; [`new`](Self::new) gives the paper's defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveClipOptions {
    /// C₀, the norm of the first round.
    pub initial_norm: f64,
    /// γ ∈ [0, 1]: the fraction of updates meant to be left unclipped.
    pub target_quantile: f64,
    /// η_C > 0, the step of the geometric update (paper: 0.2).
    pub learning_rate: f64,
    /// σ_b > 0, the stddev of the noise on the unclipped count (paper: expected clients / 20).
    pub count_stddev: f64,
}

impl AdaptiveClipOptions {
    /// `initial_norm` and `target_quantile`, η_C = 0.2 and σ_b = `expected_clients / 20`.
    pub fn new(initial_norm: f64, target_quantile: f64, expected_clients: f64) -> Self {
        Self {
            initial_norm,
            target_quantile,
            learning_rate: 0.2,
            count_stddev: expected_clients / 20.0,
        }
    }
}

/// Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning
/// with Adaptive Clipping", NeurIPS 2021, arXiv:1905.03871): after each round the norm moves
/// geometrically toward the γ-quantile of the update norms, from a noised count of unclipped
/// updates, `b̃ = (Σ bᵢ + N(0, σ_b²)) / m`, `C ← C · exp(−η_C (b̃ − γ))`.
///
/// The count is itself a Gaussian query; to keep the round's total noise multiplier at `z`,
/// the updates get the smaller `z_Δ = (z⁻² − (2σ_b)⁻²)^{−1/2}`
/// ([`update_noise_multiplier`](Self::update_noise_multiplier)), and the accountant is charged
/// `z` (Theorem 1 of the paper).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveClip {
    norm: f64,
    options: AdaptiveClipOptions,
}

impl AdaptiveClip {
    /// # Errors
    /// [`DpError::InvalidClipNorm`] for a bad `initial_norm`, [`DpError::InvalidOption`] for
    /// γ outside [0, 1], or a non-positive or non-finite η_C or σ_b.
    pub fn new(options: AdaptiveClipOptions) -> Result<Self, DpError> {
        check_clip_norm(options.initial_norm)?;
        if !(0.0..=1.0).contains(&options.target_quantile) {
            return Err(invalid(
                "target_quantile",
                options.target_quantile,
                "in [0, 1]",
            ));
        }
        for (name, v) in [
            ("learning_rate", options.learning_rate),
            ("count_stddev", options.count_stddev),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(invalid(name, v, "finite and > 0"));
            }
        }
        Ok(Self {
            norm: options.initial_norm,
            options,
        })
    }

    /// The clipping norm for the current round.
    pub fn norm(&self) -> f64 {
        self.norm
    }

    /// The options it was built with.
    pub fn options(&self) -> &AdaptiveClipOptions {
        &self.options
    }

    /// `z_Δ`, the noise multiplier for the update sum that, with the count's noise, makes the
    /// round's total noise multiplier `z`.
    ///
    /// # Errors
    /// [`DpError::InvalidNoiseMultiplier`] for a bad `z`; [`DpError::InvalidOption`] unless
    /// `2σ_b > z` (otherwise the count alone would spend more than the whole round).
    pub fn update_noise_multiplier(&self, noise_multiplier: f64) -> Result<f64, DpError> {
        let z = noise_multiplier;
        if !(z.is_finite() && z > 0.0) {
            return Err(DpError::InvalidNoiseMultiplier(z));
        }
        let count = 2.0 * self.options.count_stddev;
        if count <= z {
            return Err(invalid(
                "count_stddev",
                self.options.count_stddev,
                "> z / 2",
            ));
        }
        Ok((z.powi(-2) - count.powi(-2)).powf(-0.5))
    }

    /// The norm after a round in which `unclipped` of `clients` updates had `‖Δ‖ ≤ C`, with
    /// the count noised from `source`; `self` is unchanged (see [`adapt`](Self::adapt)).
    ///
    /// # Errors
    /// [`DpError::InvalidOption`] when `clients` is 0 or `unclipped > clients`;
    /// [`DpError::InvalidClipNorm`] if the new norm under- or overflows.
    pub fn next_norm(
        &self,
        unclipped: u64,
        clients: u64,
        source: &mut dyn NormalSource,
    ) -> Result<f64, DpError> {
        if clients == 0 || unclipped > clients {
            let reason = format!("{unclipped} unclipped of {clients} clients");
            return Err(DpError::InvalidOption {
                name: "unclipped",
                reason,
            });
        }
        let noise = self.options.count_stddev * source.standard_normal();
        let fraction = (unclipped as f64 + noise) / clients as f64;
        let step = -self.options.learning_rate * (fraction - self.options.target_quantile);
        let next = self.norm * step.exp();
        check_clip_norm(next)?;
        Ok(next)
    }

    /// Moves the norm as [`next_norm`](Self::next_norm) says and returns it.
    ///
    /// # Errors
    /// As [`next_norm`](Self::next_norm); the norm is then unchanged.
    pub fn adapt(
        &mut self,
        unclipped: u64,
        clients: u64,
        source: &mut dyn NormalSource,
    ) -> Result<f64, DpError> {
        self.norm = self.next_norm(unclipped, clients, source)?;
        Ok(self.norm)
    }
}

fn invalid(name: &'static str, value: f64, want: &str) -> DpError {
    DpError::InvalidOption {
        name,
        reason: format!("must be {want}, got {value}"),
    }
}
