//! Differential privacy: the RDP accountant against Google's dp-accounting
//! (`tools/scripts/dp_vectors.py` → `tests/vectors/dp_rdp.json`, within 1 % relative, the
//! acceptance bound of issue 7), and the behaviour of clipping, noise, adaptive clipping and
//! the budget. `FL_REPORT=1` prints every case's error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use fedge_fl::dp::{
    AdaptiveClip, AdaptiveClipOptions, BudgetedAccountant, CentralDp, Clipping, DpError, LocalDp,
    NoiseRng, NormalSource, PrivacyBudget, RdpAccountant, SampledGaussian, clip_to, epsilon,
};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct VectorFile {
    versions: serde_json::Map<String, serde_json::Value>,
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    noise_multiplier: f64,
    sampling_rate: f64,
    steps: u64,
    delta: f64,
    epsilon: f64,
    optimal_order: f64,
}

fn l2(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

fn seeded(n: u8) -> NoiseRng {
    NoiseRng::from_seed([n; 32])
}

/// A source that always returns the same value: noise-free runs of the adaptive rule.
struct Constant(f64);

impl NormalSource for Constant {
    fn standard_normal(&mut self) -> f64 {
        self.0
    }
}

#[test]
fn accountant_matches_dp_accounting_within_one_percent() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/dp_rdp.json");
    let file: VectorFile = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(file.cases.len() >= 30, "{} cases", file.cases.len());
    assert!(file.versions.contains_key("dp-accounting"));
    let report = std::env::var_os("FL_REPORT").is_some();
    let mut worst = (0.0f64, 0usize);
    for (i, c) in file.cases.iter().enumerate() {
        let mut acc = RdpAccountant::new();
        acc.compose(
            &SampledGaussian::new(c.noise_multiplier, c.sampling_rate).unwrap(),
            c.steps,
        );
        let (eps, order) = acc.epsilon_and_order(c.delta).unwrap();
        let rel = (eps - c.epsilon).abs() / c.epsilon;
        if report {
            println!(
                "z={} q={} T={} δ={}: fedge {eps} (α {order}), dp-accounting {} (α {}), rel {rel:.2e}",
                c.noise_multiplier, c.sampling_rate, c.steps, c.delta, c.epsilon, c.optimal_order
            );
        }
        assert!(
            rel <= 0.01,
            "case {i} {c:?}: fedge ε = {eps} (order {order}), relative error {rel}"
        );
        assert_eq!(
            eps,
            epsilon(c.noise_multiplier, c.sampling_rate, c.steps, c.delta).unwrap()
        );
        if rel > worst.0 {
            worst = (rel, i);
        }
    }
    println!(
        "max relative error vs dp-accounting: {:.3e} (case {})",
        worst.0, worst.1
    );
}

#[test]
fn composition_adds_rdp_per_order() {
    let a = SampledGaussian::new(1.0, 0.01).unwrap();
    let b = SampledGaussian::new(2.0, 0.1).unwrap();
    let mut batched = RdpAccountant::new();
    batched.compose(&a, 3);
    batched.compose(&b, 2);
    let mut stepped = RdpAccountant::new();
    for m in [&a, &b, &a, &b, &a] {
        stepped.compose(m, 1);
    }
    for (x, y) in batched.rdp().iter().zip(stepped.rdp()) {
        assert!((x - y).abs() <= 1e-12 * x.abs().max(1e-300), "{x} vs {y}");
    }
    let once = epsilon(1.0, 0.01, 3, 1e-5).unwrap();
    assert!(batched.epsilon(1e-5).unwrap() > once);
}

#[test]
fn accountant_state_round_trips_through_its_parts() {
    let mut acc = RdpAccountant::new();
    acc.compose(&SampledGaussian::new(1.3, 0.02).unwrap(), 50);
    let back = RdpAccountant::from_parts(acc.orders().to_vec(), acc.rdp().to_vec()).unwrap();
    assert_eq!(back, acc);
    assert_eq!(
        RdpAccountant::from_parts(vec![2.0, 3.0], vec![0.1]),
        Err(DpError::InvalidState("orders and rdp differ in length"))
    );
    assert!(matches!(
        RdpAccountant::from_parts(vec![2.0], vec![f64::NAN]),
        Err(DpError::InvalidState(_))
    ));
    for bad in [1.0, 0.5, f64::NAN, f64::INFINITY, 1e6] {
        assert!(matches!(
            RdpAccountant::with_orders(vec![2.0, bad]),
            Err(DpError::InvalidOrder(_))
        ));
    }
    assert!(RdpAccountant::with_orders(vec![]).is_err());
}

#[test]
fn bad_accountant_parameters_are_typed_errors() {
    for z in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            SampledGaussian::new(z, 0.5),
            Err(DpError::InvalidNoiseMultiplier(_))
        ));
        assert!(matches!(
            epsilon(z, 0.5, 10, 1e-5),
            Err(DpError::InvalidNoiseMultiplier(_))
        ));
    }
    for q in [-0.1, 1.0001, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            SampledGaussian::new(1.0, q),
            Err(DpError::InvalidSamplingRate(_))
        ));
    }
    let mut acc = RdpAccountant::new();
    acc.compose(&SampledGaussian::new(1.0, 0.1).unwrap(), 10);
    let before = acc.clone();
    for d in [0.0, 1.0, -1e-5, 2.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(acc.epsilon(d), Err(DpError::InvalidDelta(_))));
        assert!(matches!(
            epsilon(1.0, 0.1, 10, d),
            Err(DpError::InvalidDelta(_))
        ));
    }
    assert_eq!(acc, before);
    for (e, d) in [
        (0.0, 1e-5),
        (-1.0, 1e-5),
        (f64::NAN, 1e-5),
        (f64::INFINITY, 1e-5),
    ] {
        assert!(matches!(
            PrivacyBudget::new(e, d),
            Err(DpError::InvalidEpsilon(_))
        ));
    }
    assert!(matches!(
        PrivacyBudget::new(1.0, 0.0),
        Err(DpError::InvalidDelta(_))
    ));
}

#[test]
fn budget_refuses_the_round_that_would_exceed_it_and_records_nothing() {
    let round = SampledGaussian::new(1.0, 0.05).unwrap();
    let mut job = BudgetedAccountant::new(PrivacyBudget::new(2.0, 1e-5).unwrap());
    assert_eq!(job.spent(), 0.0);
    let peek = job.check_round(&round).unwrap();
    assert_eq!(job.rounds(), 0, "check_round records nothing");
    assert_eq!(job.record_round(&round).unwrap(), peek);
    let mut last = peek;
    while let Ok(eps) = job.record_round(&round) {
        assert!(eps >= last && eps <= 2.0);
        last = eps;
    }
    let frozen = job.clone();
    let err = job.record_round(&round).unwrap_err();
    match err {
        DpError::BudgetExceeded {
            budget,
            spent,
            after,
        } => {
            assert_eq!(budget, 2.0);
            assert_eq!(spent, last);
            assert!(after > 2.0);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(job, frozen);
    assert_eq!(job.spent(), last);
    assert!(job.remaining() >= 0.0 && job.remaining() < 2.0);
    // A smaller, less noisy round may still fit; the resumed job behaves the same.
    let resumed = BudgetedAccountant::resume(job.budget(), job.accountant().clone(), job.rounds());
    assert_eq!(resumed, job);
    let tiny = SampledGaussian::new(50.0, 1e-4).unwrap();
    assert!(resumed.check_round(&tiny).is_ok());
}

#[test]
fn clipping_bounds_the_norm_and_leaves_short_vectors_alone() {
    let mut rng = seeded(1);
    for (n, scale) in [
        (1usize, 1e3),
        (7, 1.0),
        (1000, 50.0),
        (100_000, 0.01),
        (3, 3e30),
    ] {
        let mut x: Vec<f32> = (0..n)
            .map(|_| (scale * rng.standard_normal()) as f32)
            .collect();
        let norm = l2(&x);
        for bound in [1e-3, 0.5, 1.0, 7.0] {
            let mut y = x.clone();
            let unclipped = clip_to(&mut y, bound).unwrap();
            assert_eq!(unclipped, norm <= bound);
            assert!(l2(&y) <= bound, "n={n} bound={bound}: {}", l2(&y));
            if unclipped {
                assert_eq!(y, x);
            } else {
                assert!(l2(&y) >= bound * (1.0 - 1e-6), "clipped onto the sphere");
                let ratio = f64::from(y[0]) / f64::from(x[0]);
                assert!(
                    (ratio - bound / norm).abs() <= 1e-5 * ratio,
                    "direction kept"
                );
            }
        }
        x.iter_mut().for_each(|v| *v *= 1e-40);
        let before = x.clone();
        assert!(clip_to(&mut x, 1.0).unwrap());
        assert_eq!(x, before);
    }
}

#[test]
fn non_finite_updates_and_bad_norms_are_errors_that_change_nothing() {
    let mut x = vec![3.0f32, f32::NAN, 4.0];
    let before = x.clone();
    assert_eq!(
        clip_to(&mut x, 1.0),
        Err(DpError::NonFiniteValue { index: 1 })
    );
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            clip_to(&mut [3.0, 4.0], bad),
            Err(DpError::InvalidClipNorm(_))
        ));
        assert!(matches!(
            LocalDp::new(1.0, bad),
            Err(DpError::InvalidClipNorm(_))
        ));
        assert!(matches!(
            CentralDp::new(1.0, Clipping::Fixed(bad)),
            Err(DpError::InvalidClipNorm(_))
        ));
        assert!(matches!(
            LocalDp::new(bad, 1.0),
            Err(DpError::InvalidNoiseMultiplier(_))
        ));
    }
    assert_eq!(x[0], before[0]);
    assert!(x[1].is_nan());

    let mut rng = seeded(2);
    let local = LocalDp::new(1.0, 1.0).unwrap();
    let mut inf = vec![1.0f32, f32::INFINITY];
    assert_eq!(
        local.privatize(&mut inf, &mut rng),
        Err(DpError::NonFiniteValue { index: 1 })
    );
    assert_eq!(inf, [1.0, f32::INFINITY]);

    let mut server = CentralDp::new(1e38, Clipping::Fixed(10.0)).unwrap();
    let mut sum = vec![0.0f32, f32::MAX];
    assert!(matches!(
        server.noise_sum(&mut sum, 1, 1, &mut rng),
        Err(DpError::NonFiniteValue { .. })
    ));
    assert_eq!(sum, [0.0, f32::MAX]);
}

#[test]
fn added_noise_has_zero_mean_and_the_configured_variance() {
    let (z, c, n) = (0.8, 2.5, 200_000usize);
    let sigma = z * c;
    let local = LocalDp::new(z, c).unwrap();
    assert_eq!(local.noise_stddev(), sigma);
    let mut x = vec![0.0f32; n];
    assert!(local.privatize(&mut x, &mut seeded(3)).unwrap());
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    // 5 standard errors: mean's is σ/√n, the variance's ≈ σ²√(2/n).
    assert!(mean.abs() < 5.0 * sigma / (n as f64).sqrt(), "mean {mean}");
    let var_se = sigma * sigma * (2.0 / n as f64).sqrt();
    assert!((var - sigma * sigma).abs() < 5.0 * var_se, "var {var}");
    let within_1 = x.iter().filter(|v| f64::from(v.abs()) <= sigma).count() as f64 / n as f64;
    assert!(
        (within_1 - 0.682_689).abs() < 0.005,
        "P(|x| ≤ σ) = {within_1}"
    );
    let within_3 = x
        .iter()
        .filter(|v| f64::from(v.abs()) <= 3.0 * sigma)
        .count() as f64
        / n as f64;
    assert!(
        (within_3 - 0.997_300).abs() < 0.001,
        "P(|x| ≤ 3σ) = {within_3}"
    );

    let mut same = vec![0.0f32; 16];
    local.privatize(&mut same, &mut seeded(3)).unwrap();
    assert_eq!(same, x[..16], "a seeded source is deterministic");
    let (mut a, mut b) = (vec![0.0f32; 16], vec![0.0f32; 16]);
    local
        .privatize(&mut a, &mut NoiseRng::from_system().unwrap())
        .unwrap();
    local
        .privatize(&mut b, &mut NoiseRng::from_system().unwrap())
        .unwrap();
    assert_ne!(a, b, "system-keyed generators differ");
}

#[test]
fn local_dp_clips_before_noising() {
    let local = LocalDp::new(1e-9, 1.0).unwrap();
    let mut x = vec![30.0f32, 40.0];
    assert!(!local.privatize(&mut x, &mut seeded(4)).unwrap());
    assert!((l2(&x) - 1.0).abs() < 1e-6, "{x:?}");
    assert!((x[0] - 0.6).abs() < 1e-6 && (x[1] - 0.8).abs() < 1e-6);
}

#[test]
fn central_dp_noises_the_sum_with_z_times_c() {
    let mut server = CentralDp::new(0.5, Clipping::Fixed(4.0)).unwrap();
    assert_eq!(server.noise_stddev(), 2.0);
    let mut u = vec![30.0f32, 40.0];
    assert!(!server.clip(&mut u).unwrap());
    assert!(l2(&u) <= 4.0);
    let mut sum = u.clone();
    server
        .noise_sum(&mut sum, 0, 1, &mut Constant(1.5))
        .unwrap();
    assert!((sum[0] - (u[0] + 3.0)).abs() < 1e-6 && (sum[1] - (u[1] + 3.0)).abs() < 1e-6);
    assert_eq!(server.clip_norm(), 4.0, "fixed clipping does not move");
}

fn quantile_options(initial: f64) -> AdaptiveClipOptions {
    AdaptiveClipOptions::new(initial, 0.5, 100.0)
}

#[test]
fn adaptive_clipping_moves_the_norm_toward_the_target_quantile() {
    // 100 updates per round with norms 0.1, 0.2, ..., 10: the median is about 5.
    let norms: Vec<f64> = (1..=100).map(|i| f64::from(i) / 10.0).collect();
    for initial in [0.1, 50.0] {
        let mut clip = AdaptiveClip::new(quantile_options(initial)).unwrap();
        let mut rng = seeded(5);
        let mut previous_gap = (clip.norm() - 5.0).abs();
        for round in 0..200 {
            let c = clip.norm();
            let unclipped = norms.iter().filter(|&&n| n <= c).count() as u64;
            clip.adapt(unclipped, 100, &mut rng).unwrap();
            if round == 20 {
                let gap = (clip.norm() - 5.0).abs();
                assert!(
                    gap < previous_gap,
                    "moved toward 5 from {initial}: {}",
                    clip.norm()
                );
                previous_gap = gap;
            }
        }
        assert!(
            (4.0..=6.0).contains(&clip.norm()),
            "from {initial}: ended at {}",
            clip.norm()
        );
    }
}

#[test]
fn adaptive_step_is_the_papers_geometric_update() {
    let mut clip = AdaptiveClip::new(quantile_options(2.0)).unwrap();
    // No count noise: b̃ = 80/100, C ← 2·exp(−0.2·(0.8 − 0.5)).
    let c = clip.adapt(80, 100, &mut Constant(0.0)).unwrap();
    assert!((c - 2.0 * (-0.2f64 * 0.3).exp()).abs() < 1e-15);
    // Count noise σ_b = 5 at one sigma: b̃ = (20 + 5)/100.
    let c2 = clip.adapt(20, 100, &mut Constant(1.0)).unwrap();
    assert!((c2 - c * (-0.2f64 * (0.25 - 0.5)).exp()).abs() < 1e-15);
}

#[test]
fn adaptive_clipping_splits_the_noise_between_updates_and_count() {
    let clip = AdaptiveClip::new(quantile_options(1.0)).unwrap();
    // σ_b = 5: z_Δ = (z⁻² − 10⁻²)^(−1/2).
    let z_delta = clip.update_noise_multiplier(1.0).unwrap();
    assert!((z_delta - (1.0f64 - 0.01).powf(-0.5)).abs() < 1e-15);
    let server = CentralDp::new(1.0, Clipping::Adaptive(clip.clone())).unwrap();
    assert_eq!(server.noise_multiplier(), 1.0);
    assert!((server.noise_stddev() - z_delta).abs() < 1e-15);
    assert!(matches!(
        CentralDp::new(10.0, Clipping::Adaptive(clip)),
        Err(DpError::InvalidOption {
            name: "count_stddev",
            ..
        })
    ));
}

#[test]
fn adaptive_clipping_rejects_bad_input_without_moving() {
    for options in [
        AdaptiveClipOptions {
            target_quantile: 1.5,
            ..quantile_options(1.0)
        },
        AdaptiveClipOptions {
            target_quantile: f64::NAN,
            ..quantile_options(1.0)
        },
        AdaptiveClipOptions {
            learning_rate: 0.0,
            ..quantile_options(1.0)
        },
        AdaptiveClipOptions {
            count_stddev: f64::INFINITY,
            ..quantile_options(1.0)
        },
    ] {
        assert!(matches!(
            AdaptiveClip::new(options),
            Err(DpError::InvalidOption { .. })
        ));
    }
    assert!(matches!(
        AdaptiveClip::new(quantile_options(f64::NAN)),
        Err(DpError::InvalidClipNorm(_))
    ));

    let mut clip = AdaptiveClip::new(quantile_options(1.0)).unwrap();
    let mut rng = seeded(6);
    assert!(matches!(
        clip.adapt(3, 0, &mut rng),
        Err(DpError::InvalidOption { .. })
    ));
    assert!(matches!(
        clip.adapt(11, 10, &mut rng),
        Err(DpError::InvalidOption { .. })
    ));
    assert!(matches!(
        clip.adapt(0, 10, &mut Constant(f64::INFINITY)),
        Err(DpError::InvalidClipNorm(_))
    ));
    assert_eq!(clip.norm(), 1.0);

    let mut server = CentralDp::new(1.0, Clipping::Adaptive(clip)).unwrap();
    let mut sum = vec![1.0f32, 2.0];
    assert!(matches!(
        server.noise_sum(&mut sum, 5, 0, &mut rng),
        Err(DpError::InvalidOption { .. })
    ));
    let mut nan = vec![1.0f32, f32::NAN];
    assert_eq!(
        server.noise_sum(&mut nan, 1, 1, &mut rng),
        Err(DpError::NonFiniteValue { index: 1 })
    );
    assert_eq!(sum, [1.0, 2.0]);
    assert_eq!(server.clip_norm(), 1.0);
    server.noise_sum(&mut sum, 1, 1, &mut rng).unwrap();
    assert_ne!(server.clip_norm(), 1.0, "a good round moves the norm");
}

#[test]
fn noise_multiplier_for_a_target_is_the_smallest_that_meets_it() {
    use fedge_fl::dp::{epsilon, noise_multiplier_for};
    // The digits experiment: ε = 8 at δ = 1e-5 over 30 rounds with every device (q = 1).
    let z = noise_multiplier_for(8.0, 1.0, 30, 1e-5).unwrap();
    assert!((z - 3.4927).abs() < 1e-3, "{z}");
    assert!(epsilon(z, 1.0, 30, 1e-5).unwrap() <= 8.0);
    assert!(epsilon(z * (1.0 - 1e-5), 1.0, 30, 1e-5).unwrap() > 8.0);
    // Sub-sampling needs less noise for the same ε.
    assert!(noise_multiplier_for(8.0, 0.01, 30, 1e-5).unwrap() < z);
    for bad in [0.0, -1.0, f64::NAN, 1e-12] {
        assert!(matches!(
            noise_multiplier_for(bad, 1.0, 30, 1e-5),
            Err(DpError::InvalidEpsilon(_))
        ));
    }
    assert!(noise_multiplier_for(8.0, 1.0, 30, 2.0).is_err());
}
