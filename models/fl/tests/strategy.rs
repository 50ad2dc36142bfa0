//! Behaviour every strategy shares: the round contract, explicit failures that leave the state
//! untouched, checkpoint and restore, and determinism.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use fedge_fl::{
    ClientUpdate, FedAvg, FedAvgM, FedMedian, FedOpt, FedProx, FlError, Krum, RoundOptions,
    Strategy, TrimmedMean,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One of each strategy, with options that make every code path run.
fn all() -> Vec<Box<dyn Strategy>> {
    vec![
        Box::new(FedAvg::new()),
        Box::new(FedProx::new(0.1).unwrap()),
        Box::new(FedAvgM::new(0.8, 0.9).unwrap()),
        Box::new(FedOpt::adam()),
        Box::new(FedOpt::yogi()),
        Box::new(FedOpt::adagrad()),
        Box::new(FedMedian::new()),
        Box::new(TrimmedMean::new(0.2).unwrap()),
        Box::new(Krum::new(1)),
        Box::new(Krum::multi(1, 3).unwrap()),
    ]
}

fn rebuild(name: &str, keep: usize) -> Box<dyn Strategy> {
    all()
        .into_iter()
        .find(|s| s.name() == name && (name != "krum" || keep_of(s.as_ref()) == keep))
        .unwrap()
}

/// Krum's two configurations share a name; tell them apart by their debug text.
fn keep_of(s: &dyn Strategy) -> usize {
    if format!("{s:?}").contains("keep: 3") {
        3
    } else {
        1
    }
}

fn random_update(rng: &mut StdRng, client: usize, dim: usize) -> ClientUpdate {
    let params = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    ClientUpdate::new(format!("c{client:03}"), rng.random_range(1..100), params)
}

fn updates(seed: u64, n: usize, dim: usize) -> Vec<ClientUpdate> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|i| random_update(&mut rng, i, dim)).collect()
}

fn checkpoint_json(s: &dyn Strategy) -> String {
    serde_json::to_string(&s.checkpoint()).unwrap()
}

#[test]
fn fedavg_of_identical_updates_is_identity() {
    let params = vec![0.25, -3.5, 1e-3, 7.0];
    let mut s = FedAvg::new();
    s.begin(1, &[0.0; 4]).unwrap();
    for (i, n) in [3, 17, 250].into_iter().enumerate() {
        s.accumulate(ClientUpdate::new(format!("c{i}"), n, params.clone()))
            .unwrap();
    }
    assert_eq!(s.finish(0).unwrap().unwrap(), params);
}

#[test]
fn fedavg_weights_by_samples_times_staleness() {
    let run = |a: ClientUpdate, b: ClientUpdate| {
        let mut s = FedAvg::new();
        s.begin(1, &[0.0; 2]).unwrap();
        s.accumulate(a).unwrap();
        s.accumulate(b).unwrap();
        s.finish(0).unwrap().unwrap()
    };
    let late = run(
        ClientUpdate::new("a", 10, vec![1.0, 2.0]),
        ClientUpdate::new("b", 20, vec![4.0, 8.0]).with_staleness_weight(0.5),
    );
    let halved = run(
        ClientUpdate::new("a", 10, vec![1.0, 2.0]),
        ClientUpdate::new("b", 10, vec![4.0, 8.0]),
    );
    assert_eq!(late, halved);
    assert_eq!(late, [2.5, 5.0]);
}

#[test]
fn every_strategy_aggregates_and_closes_the_round() {
    for mut s in all() {
        let global = vec![0.5; 8];
        s.begin(1, &global).unwrap();
        for u in updates(1, 5, 8) {
            s.accumulate(u).unwrap();
        }
        let open = s.open_round().unwrap();
        assert_eq!(
            (open.round, open.params, open.updates),
            (1, 8, 5),
            "{}",
            s.name()
        );
        let out = s.finish(0).unwrap().unwrap();
        assert_eq!(out.len(), 8, "{}", s.name());
        assert!(s.open_round().is_none(), "{}", s.name());
        assert_eq!(s.finish(0), Err(FlError::NoOpenRound), "{}", s.name());
    }
}

#[test]
fn bad_updates_are_typed_errors_that_leave_the_state_unchanged() {
    for mut s in all() {
        let name = s.name();
        assert_eq!(
            s.accumulate(ClientUpdate::new("x", 1, vec![0.0; 4])),
            Err(FlError::NoOpenRound),
            "{name}"
        );
        s.begin(3, &[0.0; 4]).unwrap();
        s.accumulate(ClientUpdate::new("a", 5, vec![1.0; 4]))
            .unwrap();
        let before = checkpoint_json(s.as_ref());
        let bad = [
            ClientUpdate::new("b", 5, vec![1.0; 5]),
            ClientUpdate::new("b", 5, vec![1.0; 3]),
            ClientUpdate::new("b", 5, vec![1.0, f32::NAN, 1.0, 1.0]),
            ClientUpdate::new("b", 5, vec![1.0, 1.0, 1.0, f32::NEG_INFINITY]),
            ClientUpdate::new("b", 5, vec![1.0; 4]).with_staleness_weight(-0.5),
            ClientUpdate::new("b", 5, vec![1.0; 4]).with_staleness_weight(f32::NAN),
            ClientUpdate::new("a", 5, vec![2.0; 4]),
        ];
        let errors: Vec<FlError> = bad
            .into_iter()
            .map(|u| s.accumulate(u).unwrap_err())
            .collect();
        assert!(
            matches!(
                errors[0],
                FlError::ShapeMismatch {
                    expected: 4,
                    got: 5,
                    ..
                }
            ),
            "{name}"
        );
        assert!(
            matches!(
                errors[1],
                FlError::ShapeMismatch {
                    expected: 4,
                    got: 3,
                    ..
                }
            ),
            "{name}"
        );
        assert!(
            matches!(errors[2], FlError::NonFiniteUpdate { index: 1, .. }),
            "{name}"
        );
        assert!(
            matches!(errors[3], FlError::NonFiniteUpdate { index: 3, .. }),
            "{name}"
        );
        assert!(matches!(errors[4], FlError::InvalidWeight { .. }), "{name}");
        assert!(matches!(errors[5], FlError::InvalidWeight { .. }), "{name}");
        assert!(
            matches!(errors[6], FlError::DuplicateClient { .. }),
            "{name}"
        );
        assert_eq!(checkpoint_json(s.as_ref()), before, "{name}");
    }
}

#[test]
fn begin_refuses_empty_and_non_finite_models() {
    for mut s in all() {
        assert_eq!(s.begin(1, &[]), Err(FlError::EmptyModel), "{}", s.name());
        assert_eq!(
            s.begin(1, &[0.0, f32::INFINITY]),
            Err(FlError::NonFiniteModel { index: 1 }),
            "{}",
            s.name()
        );
        assert!(s.open_round().is_none());
    }
}

#[test]
fn too_few_updates_is_an_error_and_the_round_stays_open() {
    let options = RoundOptions {
        min_updates: 3,
        ..RoundOptions::default()
    };
    let mut s = FedAvg::new().with_options(options);
    s.begin(1, &[0.0; 2]).unwrap();
    assert_eq!(s.finish(0), Err(FlError::TooFewUpdates { got: 0, min: 3 }));
    s.accumulate(ClientUpdate::new("a", 1, vec![1.0, 1.0]))
        .unwrap();
    s.accumulate(ClientUpdate::new("b", 1, vec![3.0, 3.0]))
        .unwrap();
    assert_eq!(s.finish(2), Err(FlError::TooFewUpdates { got: 2, min: 3 }));
    s.accumulate(ClientUpdate::new("c", 2, vec![0.0, 0.0]))
        .unwrap();
    assert_eq!(s.finish(1).unwrap().unwrap(), [1.0, 1.0]);
}

#[test]
fn every_strategy_needs_at_least_one_update() {
    for mut s in all() {
        s.begin(1, &[0.0; 3]).unwrap();
        assert_eq!(
            s.finish(0),
            Err(FlError::TooFewUpdates { got: 0, min: 1 }),
            "{}",
            s.name()
        );
    }
}

#[test]
fn zero_total_weight_is_an_error_for_the_weighted_strategies() {
    let weighted: Vec<Box<dyn Strategy>> = vec![
        Box::new(FedAvg::new()),
        Box::new(FedAvgM::new(1.0, 0.5).unwrap()),
        Box::new(FedOpt::adam()),
    ];
    for mut s in weighted {
        s.begin(1, &[0.0; 2]).unwrap();
        s.accumulate(ClientUpdate::new("a", 0, vec![1.0, 1.0]))
            .unwrap();
        s.accumulate(ClientUpdate::new("b", 7, vec![1.0, 1.0]).with_staleness_weight(0.0))
            .unwrap();
        assert_eq!(
            s.finish(0),
            Err(FlError::ZeroTotalWeight { updates: 2 }),
            "{}",
            s.name()
        );
        assert!(s.open_round().is_some());
    }
}

#[test]
fn refused_failures_keep_the_model_and_the_server_state() {
    let strict = RoundOptions {
        accept_failures: false,
        ..RoundOptions::default()
    };
    let mut a = FedOpt::adam().with_options(strict.clone());
    let mut b = FedOpt::adam().with_options(strict);
    let global = vec![0.0; 6];
    let round = |s: &mut FedOpt, r: u64, seed: u64, failures: usize| {
        s.begin(r, &global).unwrap();
        for u in updates(seed, 4, 6) {
            s.accumulate(u).unwrap();
        }
        s.finish(failures).unwrap()
    };
    round(&mut a, 1, 1, 0).unwrap();
    round(&mut b, 1, 1, 0).unwrap();
    assert_eq!(round(&mut a, 2, 2, 1), None);
    assert!(a.open_round().is_none());
    assert_eq!(round(&mut a, 3, 3, 0), round(&mut b, 3, 3, 0));
}

#[test]
fn an_overflowing_aggregate_is_an_error_not_an_infinity() {
    let mut s = FedAvgM::new(10.0, 0.0).unwrap();
    s.begin(1, &[3e38]).unwrap();
    s.accumulate(ClientUpdate::new("a", 1, vec![-3e38]))
        .unwrap();
    assert_eq!(s.finish(0), Err(FlError::NonFiniteResult { index: 0 }));
    assert!(s.open_round().is_some());
}

#[test]
fn server_state_refuses_a_model_of_another_size() {
    let mut s = FedOpt::yogi();
    s.begin(1, &[0.0; 4]).unwrap();
    s.accumulate(ClientUpdate::new("a", 1, vec![1.0; 4]))
        .unwrap();
    s.finish(0).unwrap();
    assert_eq!(
        s.begin(2, &[0.0; 5]),
        Err(FlError::ModelSizeChanged {
            expected: 4,
            got: 5
        })
    );
}

#[test]
fn krum_needs_two_f_plus_three_updates() {
    let mut s = Krum::multi(2, 3).unwrap();
    s.begin(1, &[0.0; 3]).unwrap();
    for u in updates(4, 6, 3) {
        s.accumulate(u).unwrap();
    }
    let err = FlError::TooFewForKrum {
        updates: 6,
        byzantine: 2,
        keep: 3,
        needed: 7,
    };
    assert_eq!(s.finish(0), Err(err));
    assert!(Krum::multi(1, 0).is_err());
}

#[test]
fn robust_strategies_ignore_a_wild_client() {
    let robust: Vec<Box<dyn Strategy>> = vec![
        Box::new(FedMedian::new()),
        Box::new(TrimmedMean::new(0.2).unwrap()),
        Box::new(Krum::new(1)),
        Box::new(Krum::multi(1, 3).unwrap()),
    ];
    for mut s in robust {
        s.begin(1, &[0.0; 3]).unwrap();
        for (i, x) in [1.0, 1.1, 0.9, 1.05, 1e6].into_iter().enumerate() {
            s.accumulate(ClientUpdate::new(format!("c{i}"), 10, vec![x; 3]))
                .unwrap();
        }
        let out = s.finish(0).unwrap().unwrap();
        assert!(
            out.iter().all(|v| (0.9..=1.1).contains(v)),
            "{}: {out:?}",
            s.name()
        );
    }
}

#[test]
fn trimmed_mean_and_fedavgm_validate_their_options() {
    for beta in [-0.1, 0.5, f64::NAN] {
        assert!(matches!(
            TrimmedMean::new(beta),
            Err(FlError::InvalidOption { .. })
        ));
    }
    assert!(FedAvgM::new(0.0, 0.0).is_err());
    assert!(FedAvgM::new(1.0, 1.0).is_err());
    assert!(FedProx::new(-1.0).is_err());
}

#[test]
fn restore_mid_round_equals_an_uninterrupted_run_for_every_strategy() {
    let global = vec![0.1; 16];
    for template in all() {
        let (name, keep) = (template.name(), keep_of(template.as_ref()));
        let mut straight = rebuild(name, keep);
        let mut resumed = rebuild(name, keep);
        for r in 1..=3 {
            straight.begin(r, &global).unwrap();
            resumed.begin(r, &global).unwrap();
            for (i, u) in updates(10 + r, 7, 16).into_iter().enumerate() {
                if i == 4 {
                    let json = checkpoint_json(resumed.as_ref());
                    resumed = rebuild(name, keep);
                    resumed
                        .restore(serde_json::from_str(&json).unwrap())
                        .unwrap();
                }
                straight.accumulate(u.clone()).unwrap();
                resumed.accumulate(u).unwrap();
            }
            let (a, b) = (straight.finish(0).unwrap(), resumed.finish(0).unwrap());
            assert!(a.is_some());
            assert_eq!(a, b, "{name} round {r}");
        }
    }
}

#[test]
fn set_based_strategies_ignore_arrival_order_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(99);
    for template in all()
        .into_iter()
        .filter(|s| matches!(s.name(), "fedmedian" | "fedtrimmedavg" | "krum"))
    {
        let (name, keep) = (template.name(), keep_of(template.as_ref()));
        let mut reference = None;
        for _ in 0..5 {
            let mut batch = updates(7, 9, 32);
            batch.shuffle(&mut rng);
            let mut s = rebuild(name, keep);
            s.begin(1, &[0.0; 32]).unwrap();
            batch.into_iter().for_each(|u| s.accumulate(u).unwrap());
            let out = s.finish(0).unwrap();
            assert_eq!(reference.get_or_insert_with(|| out.clone()), &out, "{name}");
        }
    }
}

#[test]
fn streaming_strategies_agree_across_arrival_orders_within_f32_rounding() {
    let mut rng = StdRng::seed_from_u64(5);
    let batch = updates(8, 200, 64);
    let run = |batch: &[ClientUpdate]| {
        let mut s = FedAvg::new();
        s.begin(1, &[0.0; 64]).unwrap();
        batch.iter().for_each(|u| s.accumulate(u.clone()).unwrap());
        s.finish(0).unwrap().unwrap()
    };
    let reference = run(&batch);
    for _ in 0..5 {
        let mut shuffled = batch.clone();
        shuffled.shuffle(&mut rng);
        for (a, b) in reference.iter().zip(run(&shuffled)) {
            assert!((a - b).abs() <= f32::EPSILON * a.abs().max(f32::MIN_POSITIVE));
        }
    }
}

#[test]
fn restore_refuses_another_strategys_or_a_corrupt_checkpoint() {
    let mut avg = FedAvg::new();
    avg.begin(1, &[0.0; 3]).unwrap();
    avg.accumulate(ClientUpdate::new("a", 1, vec![1.0; 3]))
        .unwrap();
    let cp = avg.checkpoint();
    assert_eq!(cp.strategy(), "fedavg");
    assert_eq!(cp.round(), Some(1));

    let mut median = FedMedian::new();
    let err = median.restore(cp.clone()).unwrap_err();
    assert!(matches!(
        err,
        FlError::CheckpointMismatch {
            expected: "fedmedian",
            ..
        }
    ));

    let mut json: serde_json::Value = serde_json::to_value(&cp).unwrap();
    json["state"]["Sum"]["acc"]["sum"]
        .as_array_mut()
        .expect("checkpoint layout")
        .pop();
    let corrupt = serde_json::from_value(json).unwrap();
    let mut fresh = FedAvg::new();
    assert!(matches!(
        fresh.restore(corrupt),
        Err(FlError::CorruptCheckpoint { .. })
    ));
    assert!(fresh.open_round().is_none());
}

#[test]
fn strategies_are_send_trait_objects_with_a_round_config() {
    fn assert_send<T: Send>(_: &T) {}
    for s in all() {
        assert_send(&s);
        let c = s.configure_round(7);
        assert_eq!(c.round, 7);
        assert_eq!(c.proximal_mu != 0.0, s.name() == "fedprox");
    }
    assert_eq!(FedOpt::yogi().configure_round(1).learning_rate, 0.0316);
}
