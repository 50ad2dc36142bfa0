//! Rényi-DP accounting for the Poisson-sampled Gaussian mechanism.
//!
//! Follows `dp_accounting.rdp.rdp_privacy_accountant` (Google's dp-accounting) step for step, so
//! that the two agree to rounding: the RDP of one step at order α is `ln(A_α)/(α − 1)` with `A_α`
//! from Mironov, Talwar and Zhang 2019, §3.3 (a finite binomial sum for integer α, the two-sided
//! series with `erfc` weights for fractional α, stopped after 1000 terms, where an order that
//! has not converged is dropped as +∞ as dp-accounting does); composition adds the per-order
//! RDP; the conversion to (ε, δ) is Proposition 12 of Canonne, Kamath and Steinke 2020
//! (also Balle et al. 2020, eq. 20): `ε = rdp + ln(1 − 1/α) − ln(δα)/(α − 1)`, minimised over
//! the orders. Every sum is taken in log space.

use super::DpError;
use super::special::ln_erfc;

/// The largest RDP order accepted; the integer-order sum costs one term per unit of order.
pub const MAX_ORDER: f64 = 10_000.0;

const MAX_FRAC_TERMS: usize = 1000;

/// dp-accounting's `DEFAULT_RDP_ORDERS`: 1.1, 1.2, …, 10.9, then 11 … 63, 128, 256, 512, 1024.
pub fn default_orders() -> Vec<f64> {
    let fine = (1..100).map(|x| 1.0 + f64::from(x) / 10.0);
    let ints = (11..64).map(f64::from);
    fine.chain(ints)
        .chain([128.0, 256.0, 512.0, 1024.0])
        .collect()
}

/// One step of the Gaussian mechanism with noise `σ = z·C` on a sum of updates clipped to `C`,
/// each record (device) included independently with probability `q` (Poisson sampling).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampledGaussian {
    noise_multiplier: f64,
    sampling_rate: f64,
}

impl SampledGaussian {
    /// # Errors
    /// [`DpError::InvalidNoiseMultiplier`] unless `z` is finite and `> 0`;
    /// [`DpError::InvalidSamplingRate`] unless `0 ≤ q ≤ 1`.
    pub fn new(noise_multiplier: f64, sampling_rate: f64) -> Result<Self, DpError> {
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(DpError::InvalidNoiseMultiplier(noise_multiplier));
        }
        if !(0.0..=1.0).contains(&sampling_rate) {
            return Err(DpError::InvalidSamplingRate(sampling_rate));
        }
        Ok(Self {
            noise_multiplier,
            sampling_rate,
        })
    }

    /// The noise multiplier `z`.
    pub fn noise_multiplier(&self) -> f64 {
        self.noise_multiplier
    }

    /// The sampling rate `q`.
    pub fn sampling_rate(&self) -> f64 {
        self.sampling_rate
    }

    /// The RDP of one step at `order` (`> 1`); may be +∞ where the fractional series does not
    /// converge, which removes that order from the ε minimum.
    fn rdp(&self, order: f64) -> f64 {
        let (q, z) = (self.sampling_rate, self.noise_multiplier);
        if q == 0.0 {
            return 0.0;
        }
        if q == 1.0 {
            return order / (2.0 * z * z);
        }
        let log_a = if order.fract() == 0.0 {
            log_a_int(q, z, order)
        } else {
            log_a_frac(q, z, order)
        };
        log_a / (order - 1.0)
    }
}

/// `ln(eˣ + eʸ)`.
fn log_add(x: f64, y: f64) -> f64 {
    let (a, b) = if x < y { (x, y) } else { (y, x) };
    if a == f64::NEG_INFINITY {
        return b;
    }
    (a - b).exp().ln_1p() + b
}

/// `ln A_α` for integer α: `ln Σᵢ C(α,i) qⁱ (1−q)^{α−i} e^{(i²−i)/(2σ²)}`, `0 < q < 1`.
fn log_a_int(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_var = 2.0 * (sigma * sigma);
    let mut log_a = f64::NEG_INFINITY;
    let mut log_comb = 0.0;
    let mut i = 0.0;
    while i <= alpha {
        if i > 0.0 {
            log_comb += ((alpha - i + 1.0) / i).ln();
        }
        let log_coef = log_comb + i * ln_q + (alpha - i) * ln_1mq;
        log_a = log_add(log_a, log_coef + (i * i - i) / two_var);
        i += 1.0;
    }
    log_a
}

/// `ln A_α` for fractional α (Mironov, Talwar, Zhang 2019, §3.3): the integrals over
/// `(−∞, z₀]` and `[z₀, ∞)`, `z₀ = σ² ln(1/q − 1) + ½`, as series in `|C(α, i)|`; stops when
/// both terms decrease and are below `e⁻³⁰` of the total, or returns +∞ after 1000 terms.
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    let two_var = 2.0 * (sigma * sigma);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let scale = std::f64::consts::SQRT_2 * sigma;
    let ln_half = 0.5f64.ln();
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let (mut last_s0, mut last_s1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let mut log_comb = 0.0;
    for n in 0..MAX_FRAC_TERMS {
        let i = n as f64;
        if n > 0 {
            log_comb += ((alpha - i + 1.0) / i).abs().ln();
        }
        let j = alpha - i;
        let log_t0 = log_comb + i * ln_q + j * ln_1mq;
        let log_t1 = log_comb + j * ln_q + i * ln_1mq;
        let log_e0 = ln_half + ln_erfc((i - z0) / scale);
        let log_e1 = ln_half + ln_erfc((z0 - j) / scale);
        let log_s0 = log_t0 + (i * i - i) / two_var + log_e0;
        let log_s1 = log_t1 + (j * j - j) / two_var + log_e1;
        log_a0 = log_add(log_a0, log_s0);
        log_a1 = log_add(log_a1, log_s1);
        let total = log_add(log_a0, log_a1);
        if log_s0 < last_s0 && log_s1 < last_s1 && log_s0.max(log_s1) < total - 30.0 {
            return total;
        }
        last_s0 = log_s0;
        last_s1 = log_s1;
    }
    f64::INFINITY
}

/// The smallest ε over the orders for `δ` (in (0, 1)), and the order reaching it;
/// dp-accounting's `compute_epsilon`. +∞ when every order is +∞.
fn epsilon_for(orders: &[f64], rdp: &[f64], delta: f64) -> (f64, f64) {
    let mut best = (f64::INFINITY, orders.first().copied().unwrap_or(f64::NAN));
    for (&a, &r) in orders.iter().zip(rdp) {
        let eps = if r < 0.0 || delta * delta + (-r).exp_m1() > 0.0 {
            0.0
        } else if a > 1.01 {
            r + (-1.0 / a).ln_1p() - (delta * a).ln() / (a - 1.0)
        } else {
            f64::INFINITY
        };
        if eps < best.0 {
            best = (eps, a);
        }
    }
    (best.0.max(0.0), best.1)
}

/// Cumulative Rényi-DP of a sequence of mechanisms, per order.
///
/// ```
/// use fedge_fl::dp::{RdpAccountant, SampledGaussian};
///
/// let mut accountant = RdpAccountant::new();
/// accountant.compose(&SampledGaussian::new(1.1, 0.004)?, 10_000);
/// let epsilon = accountant.epsilon(1e-5)?;
/// assert!((epsilon - 2.013).abs() < 0.01, "{epsilon}"); // dp-accounting: 2.0131
/// # Ok::<(), fedge_fl::dp::DpError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        Self::new()
    }
}

impl RdpAccountant {
    /// An empty accountant over [`default_orders`].
    pub fn new() -> Self {
        let orders = default_orders();
        let rdp = vec![0.0; orders.len()];
        Self { orders, rdp }
    }

    /// An empty accountant over `orders`.
    ///
    /// # Errors
    /// [`DpError::InvalidOrder`] for an empty list or an order that is not finite and in
    /// `(1, MAX_ORDER]`.
    pub fn with_orders(orders: Vec<f64>) -> Result<Self, DpError> {
        let rdp = vec![0.0; orders.len()];
        Self::from_parts(orders, rdp)
    }

    /// An accountant restored from [`orders`](Self::orders) and [`rdp`](Self::rdp) saved earlier.
    ///
    /// # Errors
    /// [`DpError::InvalidOrder`] as for [`with_orders`](Self::with_orders);
    /// [`DpError::InvalidState`] when the lengths differ or an RDP value is NaN or negative.
    pub fn from_parts(orders: Vec<f64>, rdp: Vec<f64>) -> Result<Self, DpError> {
        if orders.is_empty() {
            return Err(DpError::InvalidOrder(f64::NAN));
        }
        if let Some(&bad) = orders
            .iter()
            .find(|a| !(a.is_finite() && **a > 1.0 && **a <= MAX_ORDER))
        {
            return Err(DpError::InvalidOrder(bad));
        }
        if rdp.len() != orders.len() {
            return Err(DpError::InvalidState("orders and rdp differ in length"));
        }
        if rdp.iter().any(|r| r.is_nan() || *r < 0.0) {
            return Err(DpError::InvalidState("an rdp value is NaN or negative"));
        }
        Ok(Self { orders, rdp })
    }

    /// The RDP orders α.
    pub fn orders(&self) -> &[f64] {
        &self.orders
    }

    /// The cumulative RDP at each order (+∞ where an order gives no bound).
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    /// Adds `steps` applications of `mechanism` (RDP composes by addition per order).
    pub fn compose(&mut self, mechanism: &SampledGaussian, steps: u64) {
        if steps == 0 {
            return;
        }
        let count = steps as f64;
        for (acc, &order) in self.rdp.iter_mut().zip(&self.orders) {
            *acc += count * mechanism.rdp(order);
        }
    }

    /// ε for `delta`: the best (ε, δ)-DP guarantee of everything composed so far. 0 before
    /// any step; +∞ when no order gives a bound.
    ///
    /// # Errors
    /// [`DpError::InvalidDelta`] unless `0 < δ < 1`.
    pub fn epsilon(&self, delta: f64) -> Result<f64, DpError> {
        Ok(self.epsilon_and_order(delta)?.0)
    }

    /// [`epsilon`](Self::epsilon) and the order α that attains it.
    ///
    /// # Errors
    /// [`DpError::InvalidDelta`] unless `0 < δ < 1`.
    pub fn epsilon_and_order(&self, delta: f64) -> Result<(f64, f64), DpError> {
        check_delta(delta)?;
        Ok(epsilon_for(&self.orders, &self.rdp, delta))
    }
}

/// [`DpError::InvalidDelta`] unless `0 < δ < 1`.
pub(crate) fn check_delta(delta: f64) -> Result<(), DpError> {
    if delta > 0.0 && delta < 1.0 {
        Ok(())
    } else {
        Err(DpError::InvalidDelta(delta))
    }
}

/// ε of `steps` applications of the sampled Gaussian with `noise_multiplier` and
/// `sampling_rate`, for `delta`, over the default orders: what `fedge dp epsilon` prints.
///
/// # Errors
/// As [`SampledGaussian::new`] and [`RdpAccountant::epsilon`].
pub fn epsilon(
    noise_multiplier: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, DpError> {
    let mechanism = SampledGaussian::new(noise_multiplier, sampling_rate)?;
    check_delta(delta)?;
    let mut accountant = RdpAccountant::new();
    accountant.compose(&mechanism, steps);
    accountant.epsilon(delta)
}

/// The smallest noise multiplier (to 1e-6 relative, rounded up) whose [`epsilon`] after `steps`
/// steps at `sampling_rate` is at most `target` for `delta`: how much noise a planned job needs.
///
/// # Errors
/// As [`epsilon`]; [`DpError::InvalidEpsilon`] for a target that is not finite and `> 0`, or
/// out of reach even with a noise multiplier of 10⁴.
pub fn noise_multiplier_for(
    target: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, DpError> {
    if !(target.is_finite() && target > 0.0) {
        return Err(DpError::InvalidEpsilon(target));
    }
    epsilon(1.0, sampling_rate, steps, delta)?;
    let fits = |z: f64| epsilon(z, sampling_rate, steps, delta).is_ok_and(|e| e <= target);
    let (mut lo, mut hi) = (1e-3, 1e4);
    if !fits(hi) {
        return Err(DpError::InvalidEpsilon(target));
    }
    if fits(lo) {
        return Ok(lo);
    }
    while hi / lo > 1.0 + 1e-6 {
        let mid = (lo * hi).sqrt();
        if fits(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_orders_are_dp_accountings() {
        let orders = default_orders();
        assert_eq!(orders.len(), 99 + 53 + 4);
        assert_eq!(orders[0], 1.1);
        assert_eq!(orders[9], 2.0);
        assert_eq!(orders[98], 10.9);
        assert_eq!(orders[99], 11.0);
        assert_eq!(orders[155], 1024.0);
    }

    #[test]
    fn unsampled_gaussian_has_the_closed_form_rdp() {
        let m = SampledGaussian::new(2.0, 1.0).unwrap();
        assert_eq!(m.rdp(3.0), 3.0 / 8.0);
        assert_eq!(m.rdp(1.5), 1.5 / 8.0);
    }

    #[test]
    fn integer_order_sum_matches_the_closed_form_for_order_two() {
        // A_2 = (1−q)² + 2q(1−q) + q² e^{1/σ²} = 1 + q²(e^{1/σ²} − 1).
        let (q, z) = (0.3f64, 1.5f64);
        let want = (q * q * ((1.0 / (z * z)).exp() - 1.0)).ln_1p();
        let got = log_a_int(q, z, 2.0);
        assert!((got - want).abs() < 1e-15, "{got} vs {want}");
    }

    #[test]
    fn fractional_orders_sit_between_their_integer_neighbours() {
        let m = SampledGaussian::new(1.0, 0.01).unwrap();
        let (lo, mid, hi) = (m.rdp(3.0), m.rdp(3.5), m.rdp(4.0));
        assert!(lo < mid && mid < hi, "{lo} {mid} {hi}");
    }

    #[test]
    fn zero_sampling_rate_and_zero_steps_spend_nothing() {
        let mut acc = RdpAccountant::new();
        acc.compose(&SampledGaussian::new(1.0, 0.0).unwrap(), 1000);
        acc.compose(&SampledGaussian::new(1.0, 0.5).unwrap(), 0);
        assert_eq!(acc.epsilon(1e-5).unwrap(), 0.0);
    }

    #[test]
    fn epsilon_grows_with_steps_and_shrinks_with_noise() {
        let e = |z, t| epsilon(z, 0.01, t, 1e-5).unwrap();
        assert!(e(1.0, 100) < e(1.0, 1000));
        assert!(e(2.0, 1000) < e(1.0, 1000));
    }

    #[test]
    fn log_add_handles_negative_infinity() {
        assert_eq!(
            log_add(f64::NEG_INFINITY, f64::NEG_INFINITY),
            f64::NEG_INFINITY
        );
        assert_eq!(log_add(f64::NEG_INFINITY, 1.5), 1.5);
        assert!((log_add(0.0, 0.0) - std::f64::consts::LN_2).abs() < 1e-16);
    }
}
