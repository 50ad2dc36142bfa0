//! A job's (ε, δ) budget and the accountant that enforces it.

use super::DpError;
use super::rdp::{RdpAccountant, SampledGaussian, check_delta};

/// The total (ε, δ) a job may spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrivacyBudget {
    epsilon: f64,
    delta: f64,
}

impl PrivacyBudget {
    /// # Errors
    /// [`DpError::InvalidEpsilon`] unless `ε` is finite and `> 0`;
    /// [`DpError::InvalidDelta`] unless `0 < δ < 1`.
    pub fn new(epsilon: f64, delta: f64) -> Result<Self, DpError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(DpError::InvalidEpsilon(epsilon));
        }
        check_delta(delta)?;
        Ok(Self { epsilon, delta })
    }

    /// The ε budget.
    pub fn epsilon(&self) -> f64 {
        self.epsilon
    }

    /// The δ at which ε is measured.
    pub fn delta(&self) -> f64 {
        self.delta
    }
}

/// An [`RdpAccountant`] bound to a job's [`PrivacyBudget`]: it refuses any round that would
/// take the job's ε (at the budget's δ) past the budget.
///
/// The aggregator calls [`check_round`](Self::check_round) before opening a round (and does
/// not open it on `Err`), then [`record_round`](Self::record_round) when the round's noised
/// result is released.
///
/// ```
/// use fedge_fl::dp::{BudgetedAccountant, DpError, PrivacyBudget, SampledGaussian};
///
/// let mut job = BudgetedAccountant::new(PrivacyBudget::new(2.0, 1e-5)?);
/// let round = SampledGaussian::new(1.0, 0.01)?;
/// let mut rounds = 0;
/// while job.check_round(&round).is_ok() {
///     job.record_round(&round)?;
///     rounds += 1;
/// }
/// assert!((500..1000).contains(&rounds) && job.spent() <= 2.0); // dp-accounting: ε(1000) = 2.10
/// assert!(matches!(job.record_round(&round), Err(DpError::BudgetExceeded { .. })));
/// # Ok::<(), DpError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetedAccountant {
    budget: PrivacyBudget,
    accountant: RdpAccountant,
    rounds: u64,
}

impl BudgetedAccountant {
    /// A fresh job: nothing spent, default orders.
    pub fn new(budget: PrivacyBudget) -> Self {
        Self::resume(budget, RdpAccountant::new(), 0)
    }

    /// A job restored from its saved accountant and round count. It may already be over
    /// budget (e.g. restored under a smaller budget); it then refuses every round.
    pub fn resume(budget: PrivacyBudget, accountant: RdpAccountant, rounds: u64) -> Self {
        Self {
            budget,
            accountant,
            rounds,
        }
    }

    /// The budget.
    pub fn budget(&self) -> PrivacyBudget {
        self.budget
    }

    /// The accountant (its orders and RDP are what to persist).
    pub fn accountant(&self) -> &RdpAccountant {
        &self.accountant
    }

    /// Rounds recorded so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// ε spent so far at the budget's δ.
    pub fn spent(&self) -> f64 {
        self.epsilon_of(&self.accountant)
    }

    /// ε left before the budget, never negative.
    pub fn remaining(&self) -> f64 {
        (self.budget.epsilon - self.spent()).max(0.0)
    }

    /// The cumulative ε after one more round of `mechanism`, without recording it.
    ///
    /// # Errors
    /// [`DpError::BudgetExceeded`] when that ε is above the budget.
    pub fn check_round(&self, mechanism: &SampledGaussian) -> Result<f64, DpError> {
        let mut next = self.accountant.clone();
        next.compose(mechanism, 1);
        let epsilon = self.epsilon_of(&next);
        if epsilon > self.budget.epsilon {
            return Err(DpError::BudgetExceeded {
                budget: self.budget.epsilon,
                spent: self.spent(),
                after: epsilon,
            });
        }
        Ok(epsilon)
    }

    /// Records one round of `mechanism` and returns the cumulative ε.
    ///
    /// # Errors
    /// [`DpError::BudgetExceeded`] as [`check_round`](Self::check_round); nothing is
    /// recorded then.
    pub fn record_round(&mut self, mechanism: &SampledGaussian) -> Result<f64, DpError> {
        let epsilon = self.check_round(mechanism)?;
        self.accountant.compose(mechanism, 1);
        self.rounds += 1;
        Ok(epsilon)
    }

    fn epsilon_of(&self, accountant: &RdpAccountant) -> f64 {
        // The budget's δ was checked in `PrivacyBudget::new`, so this cannot fail; an
        // impossible error reads as "no guarantee".
        accountant
            .epsilon(self.budget.delta)
            .unwrap_or(f64::INFINITY)
    }
}
