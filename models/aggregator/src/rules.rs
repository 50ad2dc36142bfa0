//! The round rules as pure functions: which round an update counts in and with what weight,
//! what its delta must look like, whom a round selects and when it closes. No I/O, no clock:
//! the engine passes `now` in.

use fedge_proto::msg::{Reason, Selection, Update};

use crate::config::{LatePolicy, UpdateCodec};

/// Why an update is refused, with a short detail for the ack and the log.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
        }
    }
}

/// The open round an update is judged against.
#[derive(Debug, Clone, Copy)]
pub struct RoundCtx<'a> {
    pub job: &'a str,
    pub round: u64,
    pub param_count: u32,
    pub codec: UpdateCodec,
    /// 0: unbounded.
    pub max_norm: f32,
    pub late: LatePolicy,
}

/// When an update arrived relative to its round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timing {
    /// For the open round.
    OnTime,
    /// For a round closed `staleness` rounds ago, counted with its weight times `factor`.
    Stale { staleness: u64, factor: f64 },
}

/// Places an update: its job, its round (the envelope's and the payload's must agree, and the
/// base version must be the round's), and the late policy for rounds already closed.
///
/// # Errors
/// `WrongJob`, `WrongRound` or `Late`.
pub fn timing(
    ctx: &RoundCtx<'_>,
    envelope_round: u64,
    u: &Update<'_>,
) -> Result<Timing, Rejection> {
    if u.job != ctx.job {
        return Err(Rejection::new(
            Reason::WrongJob,
            format!("update names job {:?}", u.job),
        ));
    }
    if envelope_round != u.round {
        return Err(Rejection::new(
            Reason::WrongRound,
            "envelope and update name different rounds",
        ));
    }
    if u.round == 0 || u.round > ctx.round {
        return Err(Rejection::new(
            Reason::WrongRound,
            format!("round {} is not open (open: {})", u.round, ctx.round),
        ));
    }
    if u.base_version != u.round - 1 {
        return Err(Rejection::new(
            Reason::WrongRound,
            format!(
                "base version {} is not round {}'s model ({})",
                u.base_version,
                u.round,
                u.round - 1
            ),
        ));
    }
    if u.round == ctx.round {
        return Ok(Timing::OnTime);
    }
    let staleness = ctx.round - u.round;
    match ctx.late {
        LatePolicy::Reject => Err(Rejection::new(
            Reason::Late,
            format!("round {} has closed", u.round),
        )),
        LatePolicy::DownWeight { max_staleness, .. } if staleness > max_staleness => {
            Err(Rejection::new(
                Reason::Late,
                format!(
                    "round {} is {staleness} rounds old (max {max_staleness})",
                    u.round
                ),
            ))
        }
        LatePolicy::DownWeight { exponent, .. } => Ok(Timing::Stale {
            staleness,
            factor: staleness_factor(staleness, exponent),
        }),
    }
}

/// `(1 + staleness)^-exponent`: the polynomial staleness weighting of FedAsync (Xie et al.,
/// "Asynchronous Federated Optimization", 2019).
pub fn staleness_factor(staleness: u64, exponent: f64) -> f64 {
    (1.0 + staleness as f64).powf(-exponent)
}

/// Decodes and bounds a delta: exactly `param_count` values, all finite, L2 norm within
/// `max_norm` (when non-zero).
///
/// # Errors
/// `WrongShape`, `Malformed` (undecodable), `NonFinite` or `NormAboveBound`.
pub fn check_delta(ctx: &RoundCtx<'_>, bytes: &[u8]) -> Result<Vec<f32>, Rejection> {
    let delta = crate::fl::decode_delta(ctx.codec, bytes, ctx.param_count as usize)?;
    let norm = crate::fl::l2_norm(&delta);
    if ctx.max_norm > 0.0 && norm > f64::from(ctx.max_norm) {
        return Err(Rejection::new(
            Reason::NormAboveBound,
            format!("L2 norm {norm:.4} above {}", ctx.max_norm),
        ));
    }
    Ok(delta)
}

/// Chooses a round's selection over the `devices` eligible now (registered, not revoked).
///
/// `fraction ≥ 1` selects all. Otherwise devices sample themselves with probability
/// `max(fraction, min / n) × (1 + over)`; the seed is `base_seed + round`, moved on (up to 64
/// times) while fewer than `min` eligible devices would be selected, and `All` is used when no
/// seed gets there. Returns the selection and how many eligible devices it includes.
pub fn select(
    devices: &[&str],
    job: &str,
    round: u64,
    fraction: f64,
    over: f64,
    min: u32,
    base_seed: u64,
) -> (Selection, u32) {
    let n = devices.len().max(1) as f64;
    let p = (fraction.max(f64::from(min) / n) * (1.0 + over)).min(1.0);
    if fraction >= 1.0 || p >= 1.0 {
        return (Selection::All, devices.len() as u32);
    }
    let fraction_ppm = (p * 1e6).ceil() as u32;
    let want = (min as usize).min(devices.len());
    for k in 0..64u64 {
        let s = Selection::Sample {
            seed: base_seed.wrapping_add(round).wrapping_add(k << 32),
            fraction_ppm,
        };
        let count = devices.iter().filter(|d| s.includes(job, round, d)).count();
        if count >= want {
            return (s, count as u32);
        }
    }
    (Selection::All, devices.len() as u32)
}

/// Whether a round closes now: at least `min` updates (stale ones included), and either the
/// deadline has passed or every selected device has sent its update for this round (`on_time`).
pub fn should_close(
    accepted: u32,
    on_time: u32,
    selected: u32,
    min: u32,
    now_unix_ms: u64,
    deadline_unix_ms: u64,
) -> bool {
    accepted >= min && (now_unix_ms >= deadline_unix_ms || on_time >= selected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(late: LatePolicy) -> RoundCtx<'static> {
        RoundCtx {
            job: "j",
            round: 3,
            param_count: 4,
            codec: UpdateCodec::F32,
            max_norm: 2.0,
            late,
        }
    }

    fn update(job: &str, round: u64, base: u64) -> Update<'_> {
        Update {
            job,
            round,
            base_version: base,
            num_samples: 1,
            loss: 0.0,
            accuracy: 0.0,
            delta: &[],
        }
    }

    #[test]
    fn timing_table() {
        let down = LatePolicy::DownWeight {
            max_staleness: 1,
            exponent: 1.0,
        };
        type Case<'a> = (&'a str, LatePolicy, u64, Update<'a>, Result<Timing, Reason>);
        let cases: [Case<'_>; 8] = [
            (
                "on time",
                LatePolicy::Reject,
                3,
                update("j", 3, 2),
                Ok(Timing::OnTime),
            ),
            (
                "other job",
                LatePolicy::Reject,
                3,
                update("k", 3, 2),
                Err(Reason::WrongJob),
            ),
            (
                "envelope round differs",
                LatePolicy::Reject,
                2,
                update("j", 3, 2),
                Err(Reason::WrongRound),
            ),
            (
                "future round",
                LatePolicy::Reject,
                4,
                update("j", 4, 3),
                Err(Reason::WrongRound),
            ),
            (
                "wrong base",
                LatePolicy::Reject,
                3,
                update("j", 3, 1),
                Err(Reason::WrongRound),
            ),
            (
                "late, rejected",
                LatePolicy::Reject,
                2,
                update("j", 2, 1),
                Err(Reason::Late),
            ),
            (
                "late, down-weighted",
                down,
                2,
                update("j", 2, 1),
                Ok(Timing::Stale {
                    staleness: 1,
                    factor: 0.5,
                }),
            ),
            (
                "too late to down-weight",
                down,
                1,
                update("j", 1, 0),
                Err(Reason::Late),
            ),
        ];
        for (name, late, env_round, u, want) in cases {
            let got = timing(&ctx(late), env_round, &u).map_err(|r| r.reason);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn delta_checks() {
        let c = ctx(LatePolicy::Reject);
        // fedge-fl's f32 codec: id 1, version 1, no block, the count, the values.
        let le = |v: &[f32]| {
            let mut b = vec![1, 1, 0, 0];
            b.extend((v.len() as u32).to_le_bytes());
            b.extend(crate::codec::f32_to_le(v));
            b
        };
        assert_eq!(
            check_delta(&c, &le(&[1.0, 0.0, 0.0, 1.0])),
            Ok(vec![1.0, 0.0, 0.0, 1.0])
        );
        let reason = |b: &[u8]| check_delta(&c, b).map_err(|r| r.reason).err();
        assert_eq!(reason(&le(&[1.0, 0.0, 0.0])), Some(Reason::WrongShape));
        assert_eq!(
            reason(&le(&[1.0, f32::NAN, 0.0, 0.0])),
            Some(Reason::NonFinite)
        );
        assert_eq!(
            reason(&le(&[1.0, f32::NEG_INFINITY, 0.0, 0.0])),
            Some(Reason::NonFinite)
        );
        assert_eq!(
            reason(&le(&[2.0, 0.0, 0.0, 0.1])),
            Some(Reason::NormAboveBound)
        );
        let unbounded = RoundCtx { max_norm: 0.0, ..c };
        assert!(check_delta(&unbounded, &le(&[1e6, 0.0, 0.0, 0.0])).is_ok());
    }

    #[test]
    fn selection_respects_fraction_and_minimum() {
        let names: Vec<String> = (0..200).map(|i| format!("dev-{i}")).collect();
        let devs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_eq!(select(&devs, "j", 1, 1.0, 0.0, 1, 7), (Selection::All, 200));
        let (s, n) = select(&devs, "j", 1, 0.25, 0.2, 1, 7);
        assert!(
            matches!(
                s,
                Selection::Sample {
                    fraction_ppm: 300_000,
                    ..
                }
            ),
            "{s:?}"
        );
        assert_eq!(
            n as usize,
            devs.iter().filter(|d| s.includes("j", 1, d)).count()
        );
        assert!((30..90).contains(&n), "{n}");
        let (_, n) = select(&devs[..10], "j", 1, 0.1, 0.0, 5, 7);
        assert!(n >= 5, "{n}");
        assert!(select(&devs[..4], "j", 1, 0.5, 0.0, 3, 7).1 >= 3);
    }

    #[test]
    fn closing_needs_the_minimum_and_then_the_deadline_or_everyone() {
        assert!(!should_close(1, 1, 3, 2, 100, 50), "below the minimum");
        assert!(
            !should_close(2, 2, 3, 2, 10, 50),
            "minimum met, deadline ahead, one missing"
        );
        assert!(should_close(2, 2, 3, 2, 50, 50), "deadline reached");
        assert!(should_close(3, 3, 3, 2, 10, 50), "everyone reported");
        assert!(
            !should_close(3, 2, 3, 2, 10, 50),
            "a stale update does not stand in for a selected device"
        );
    }
}
