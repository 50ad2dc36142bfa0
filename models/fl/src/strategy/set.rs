use super::state::{Kept, Round, UpdateSet, Verdict, verdict};
use super::{Checkpoint, OpenRound, State, open_round, validate_round, wrong_kind};
use crate::{ClientUpdate, FlError, RoundOptions};

/// The round handling of the strategies that keep every update; each of them supplies only its
/// aggregation rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct SetRounds {
    pub options: RoundOptions,
    open: Option<Round<UpdateSet>>,
}

impl SetRounds {
    pub fn begin(&mut self, round: u64, global: &[f32]) -> Result<(), FlError> {
        self.open = Some(Round::open(round, global, false, UpdateSet::default())?);
        Ok(())
    }

    pub fn accumulate(&mut self, update: ClientUpdate) -> Result<(), FlError> {
        self.open
            .as_mut()
            .ok_or(FlError::NoOpenRound)?
            .admit(update)
    }

    /// Applies the round policy, then `rule` to the updates sorted by client id.
    pub fn finish(
        &mut self,
        failures: usize,
        rule: impl FnOnce(&[&Kept], usize) -> Result<Vec<f32>, FlError>,
    ) -> Result<Option<Vec<f32>>, FlError> {
        let out = match verdict(&self.open, &self.options, failures)? {
            Verdict::Keep => None,
            Verdict::Aggregate(round) => Some(rule(&round.acc.sorted(), round.dim)?),
        };
        self.open = None;
        Ok(out)
    }

    pub fn open_round(&self) -> Option<OpenRound> {
        open_round(&self.open)
    }

    pub fn checkpoint(&self, name: &'static str) -> Checkpoint {
        Checkpoint::new(name, State::Set(self.open.clone()))
    }

    pub fn restore(&mut self, name: &'static str, checkpoint: Checkpoint) -> Result<(), FlError> {
        let State::Set(open) = checkpoint.into_state(name)? else {
            return Err(wrong_kind());
        };
        validate_round(&open, false)?;
        self.open = open;
        Ok(())
    }
}

/// Applies `stat` to every coordinate's values across the updates, sorted ascending.
pub(crate) fn coordinatewise(
    updates: &[&Kept],
    dim: usize,
    stat: impl Fn(&[f64]) -> f64,
) -> Vec<f64> {
    let mut column = vec![0.0; updates.len()];
    (0..dim)
        .map(|i| {
            for (c, u) in column.iter_mut().zip(updates) {
                *c = f64::from(u.params.0[i]);
            }
            column.sort_unstable_by(f64::total_cmp);
            stat(&column)
        })
        .collect()
}
