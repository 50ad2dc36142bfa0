//! SecAgg+ rounds with 50 simulated devices: exact sums, uniform masked vectors, dropouts at
//! every stage, failure below the threshold, and tampering detected and attributed.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;

use fedge_fl::secagg::{
    Aggregate, Client, Confirmation, Params, RevealKind, RoundSetup, SecAggError, Server, Stage,
    dequantize_sum, quantize, unpack, wire,
};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use ring::signature::{Ed25519KeyPair, KeyPair};

const N: usize = 50;

struct Sim {
    setup: Arc<RoundSetup>,
    signers: Vec<Ed25519KeyPair>,
    clients: Vec<Client>,
    server: Server,
    inputs: Vec<Vec<f32>>,
    /// The largest wire body seen, sent or relayed (lists of indices included).
    largest: usize,
}

fn signer(i: usize) -> Ed25519KeyPair {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
    Ed25519KeyPair::from_seed_unchecked(&seed).unwrap()
}

fn pubkey(k: &Ed25519KeyPair) -> [u8; 32] {
    k.public_key().as_ref().try_into().unwrap()
}

fn sim_with(n: usize, len: usize, round: u64) -> Sim {
    let signers: Vec<_> = (0..n).map(signer).collect();
    let roster = signers.iter().map(pubkey).collect();
    let params = Params::new(n, len, 1.0).unwrap();
    let setup = Arc::new(RoundSetup::new("digits", round, roster, params).unwrap());
    let clients = signers
        .iter()
        .map(|s| Client::new(setup.clone(), &pubkey(s)).unwrap())
        .collect();
    let mut rng = StdRng::seed_from_u64(round);
    // Some values fall outside [−1, 1] to exercise clipping.
    let inputs = (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(-1.3f32..1.3)).collect())
        .collect();
    Sim {
        server: Server::new(setup.clone()),
        setup,
        signers,
        clients,
        inputs,
        largest: 0,
    }
}

fn sim(len: usize) -> Sim {
    sim_with(N, len, 1)
}

/// Devices to drop at each of the five stages.
type Drops = [BTreeSet<u32>; 5];

fn no_drops() -> Drops {
    Default::default()
}

impl Sim {
    fn stage1(&mut self, drops: &Drops) -> Result<Vec<u32>, SecAggError> {
        for (i, c) in self.clients.iter_mut().enumerate() {
            if drops[0].contains(&(i as u32)) {
                continue;
            }
            let keys = c.advertise(&self.signers[i]).unwrap();
            self.largest = self.largest.max(wire::encode_keys(&keys).len());
            self.server.receive_keys(keys).unwrap();
        }
        self.server.close_keys()
    }

    fn stage2(&mut self, drops: &Drops, u1: &[u32]) -> Result<Vec<u32>, SecAggError> {
        for &i in u1 {
            if drops[1].contains(&i) {
                continue;
            }
            let keys = self.server.keys_for(i);
            let items = self.clients[i as usize]
                .share(&self.signers[i as usize], &keys)
                .unwrap();
            let sizes = [
                wire::encode_keys(&keys).len(),
                wire::encode_shares(&items).len(),
            ];
            self.largest = self.largest.max(sizes[0]).max(sizes[1]);
            self.server.receive_shares(items).unwrap();
        }
        self.server.close_shares()
    }

    fn stage3(&mut self, drops: &Drops, u2: &[u32]) -> Result<Vec<u32>, SecAggError> {
        for &i in u2 {
            if drops[2].contains(&i) {
                continue;
            }
            let items = self.server.shares_for(i);
            let relay = wire::encode_shares(&items).len() + wire::encode_ids(u2).len();
            self.largest = self.largest.max(relay);
            let masked = self.clients[i as usize]
                .mask(
                    &self.signers[i as usize],
                    u2,
                    &items,
                    &self.inputs[i as usize],
                )
                .unwrap();
            self.largest = self.largest.max(masked.to_bytes().len());
            self.server.receive_masked(masked).unwrap();
        }
        self.server.close_masked()
    }

    fn stage4(&mut self, drops: &Drops, u3: &[u32]) -> Result<Vec<Confirmation>, SecAggError> {
        for &i in u3 {
            if drops[3].contains(&i) {
                continue;
            }
            let c = self.clients[i as usize]
                .confirm(&self.signers[i as usize], u3)
                .unwrap();
            self.server.receive_confirmation(c).unwrap();
        }
        self.server.close_confirmations()
    }

    fn stage5(&mut self, drops: &Drops, confs: &[Confirmation]) -> Result<Aggregate, SecAggError> {
        for c in confs {
            let i = c.from;
            if drops[4].contains(&i) {
                continue;
            }
            let reveals = self.clients[i as usize]
                .unmask(&self.signers[i as usize], confs)
                .unwrap();
            let sizes = [
                wire::encode_confirmations(confs).len(),
                reveals.to_bytes().len(),
            ];
            self.largest = self.largest.max(sizes[0]).max(sizes[1]);
            self.server.receive_reveals(reveals).unwrap();
        }
        self.server.finish()
    }

    fn run(&mut self, drops: &Drops) -> Result<Aggregate, SecAggError> {
        let u1 = self.stage1(drops)?;
        let u2 = self.stage2(drops, &u1)?;
        let u3 = self.stage3(drops, &u2)?;
        let confs = self.stage4(drops, &u3)?;
        self.stage5(drops, &confs)
    }

    /// The plain sum of the survivors' quantised updates, and its dequantised value.
    fn expected(&self, survivors: &[u32]) -> (Vec<u32>, Vec<f32>) {
        let p = self.setup.params();
        let mask = (1u32 << p.mod_bits) - 1;
        let mut sum = vec![0u32; p.len];
        for &i in survivors {
            for (s, q) in sum
                .iter_mut()
                .zip(quantize(&self.inputs[i as usize], p).unwrap())
            {
                *s = s.wrapping_add(q) & mask;
            }
        }
        let real = dequantize_sum(&sum, survivors.len(), p);
        (sum, real)
    }

    fn check_exact(&self, agg: &Aggregate) {
        let (q, real) = self.expected(&agg.survivors);
        assert_eq!(agg.quantized, q);
        assert_eq!(agg.sum, real);
        // And within quantisation error of the float sum of the clipped updates.
        let p = self.setup.params();
        let step = 2.0 * f64::from(p.clip) / f64::from((1u32 << p.quant_bits) - 1);
        for (j, s) in agg.sum.iter().enumerate() {
            let plain: f64 = agg
                .survivors
                .iter()
                .map(|&i| f64::from(self.inputs[i as usize][j].clamp(-1.0, 1.0)))
                .sum();
            let bound = agg.survivors.len() as f64 * step / 2.0 + 1e-4;
            assert!((f64::from(*s) - plain).abs() <= bound, "index {j}");
        }
    }
}

#[test]
fn fifty_devices_sum_exactly() {
    let mut s = sim(2000);
    let agg = s.run(&no_drops()).unwrap();
    assert_eq!(agg.survivors.len(), N);
    assert!(agg.dropped.iter().all(|d| d.is_empty()));
    assert!(agg.faults.is_empty());
    s.check_exact(&agg);
    assert_eq!(s.setup.params().neighbours, 40);
    // Transports size their bounds with this.
    let bound = s.setup.params().max_message_bytes(N) as usize;
    assert!(s.largest <= bound, "{} > {bound}", s.largest);
    assert!(
        s.largest + 4 * N + 4 >= bound,
        "the bound is tight: {} vs {bound}",
        s.largest
    );
}

/// Pearson's χ² over 256 bins of the top 8 bits; the critical value is for p = 10⁻⁶ with
/// 255 degrees of freedom (Wilson–Hilferty).
fn chi_square_top_byte(values: &[u32], bits: u32) -> (f64, f64) {
    let mut bins = [0u64; 256];
    for v in values {
        bins[(v >> (bits - 8)) as usize] += 1;
    }
    let e = values.len() as f64 / 256.0;
    let stat = bins.iter().map(|&o| (o as f64 - e).powi(2) / e).sum();
    let k = 255.0f64;
    let z = 4.753;
    let critical = k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3);
    (stat, critical)
}

#[test]
fn masked_inputs_the_aggregator_holds_look_uniform() {
    let len = 256 * 200;
    let mut s = sim(len);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    let bits = s.setup.params().mod_bits;
    for i in [0u32, 17, 49] {
        let items = s.server.shares_for(i);
        let masked = s.clients[i as usize]
            .mask(&s.signers[i as usize], &u2, &items, &s.inputs[i as usize])
            .unwrap();
        let values = unpack(&masked.data, len, bits).unwrap();
        let (stat, critical) = chi_square_top_byte(&values, bits);
        assert!(
            stat < critical,
            "device {i}: chi2 {stat:.1} >= {critical:.1}"
        );
        // The same test rejects the unmasked quantised update.
        let q = quantize(&s.inputs[i as usize], s.setup.params()).unwrap();
        let (stat, critical) = chi_square_top_byte(&q, 16);
        assert!(stat > critical, "the unmasked update passed: {stat:.1}");
    }
}

fn pick(rng: &mut StdRng, from: &[u32], count: usize) -> BTreeSet<u32> {
    let mut v = from.to_vec();
    v.shuffle(rng);
    v.into_iter().take(count).collect()
}

#[test]
fn dropouts_of_10_20_30_percent_at_each_stage_are_survived() {
    let all: Vec<u32> = (0..N as u32).collect();
    let mut rng = StdRng::seed_from_u64(42);
    for stage in 0..5 {
        for percent in [10, 20, 30] {
            let mut drops = no_drops();
            drops[stage] = pick(&mut rng, &all, N * percent / 100);
            let mut s = sim_with(N, 300, 10 + stage as u64);
            let agg = s
                .run(&drops)
                .unwrap_or_else(|e| panic!("{percent}% at stage {stage}: {e}"));
            s.check_exact(&agg);
            assert_eq!(
                agg.dropped[stage],
                drops[stage].iter().copied().collect::<Vec<_>>()
            );
            let expected_survivors = if stage >= 3 {
                N
            } else {
                N - drops[stage].len()
            };
            assert_eq!(agg.survivors.len(), expected_survivors);
        }
    }
    // 8 % more at every stage, one after the other: 20 of 50 gone by the end.
    let mut drops = no_drops();
    let mut left = all.clone();
    for d in drops.iter_mut() {
        *d = pick(&mut rng, &left, 4);
        left.retain(|x| !d.contains(x));
    }
    let mut s = sim_with(N, 300, 20);
    let agg = s.run(&drops).unwrap();
    s.check_exact(&agg);
    assert_eq!(agg.survivors.len(), N - 12);
}

#[test]
fn below_the_threshold_the_round_fails_with_its_reason() {
    let all: Vec<u32> = (0..N as u32).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let t = Params::new(N, 1, 1.0).unwrap().threshold;
    let quorum = N / 2 + 1;
    let stages = [
        (Stage::AdvertiseKeys, t),
        (Stage::ShareKeys, t),
        (Stage::MaskedInput, t),
        (Stage::Consistency, quorum),
        (Stage::Unmask, t),
    ];
    for (i, (stage, needed)) in stages.into_iter().enumerate() {
        let mut drops = no_drops();
        drops[i] = pick(&mut rng, &all, N - needed + 1);
        let mut s = sim_with(N, 50, 30 + i as u64);
        let e = s.run(&drops).unwrap_err();
        assert_eq!(
            e,
            SecAggError::BelowThreshold {
                stage,
                survivors: needed - 1,
                needed
            }
        );
        let says = format!("the round needs at least {needed}");
        assert!(e.to_string().contains(&says), "{e}");
        // The failure is final: nothing more is accepted.
        assert_eq!(s.server.finish().unwrap_err(), e);
    }

    // Enough devices overall, but too few of one device's neighbours left to rebuild it.
    let mut s = sim(50);
    let neighbours = s.setup.neighbours(0).to_vec();
    let mut drops = no_drops();
    drops[2] = neighbours[..20].iter().copied().collect();
    let e = s.run(&drops).unwrap_err();
    assert!(
        matches!(
            e,
            SecAggError::Unrecoverable {
                stage: Stage::MaskedInput,
                shares: 20,
                threshold: 21,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("cannot be rebuilt"), "{e}");
}

#[test]
fn a_tampered_key_advertisement_is_caught_by_the_device_and_the_aggregator() {
    let mut s = sim(10);
    // In transit to the aggregator: rejected, blamed on nobody, the round goes on.
    let mut keys = s.clients[3].advertise(&s.signers[3]).unwrap();
    let good = keys.clone();
    keys[0].public[0] ^= 1;
    assert_eq!(
        s.server.receive_keys(keys),
        Err(SecAggError::BadSignature {
            stage: Stage::AdvertiseKeys,
            claimed: 3
        })
    );
    assert_eq!(s.server.faults()[0].device, None);
    s.server.receive_keys(good.clone()).unwrap();
    assert!(matches!(
        s.server.receive_keys(good),
        Err(SecAggError::Duplicate { device: 3, .. })
    ));
    for i in (0..N).filter(|&i| i != 3) {
        let keys = s.clients[i].advertise(&s.signers[i]).unwrap();
        s.server.receive_keys(keys).unwrap();
    }
    s.server.close_keys().unwrap();
    // The aggregator swaps a key on the way to device 5: device 5 refuses and names the sender.
    let mut keys = s.server.keys_for(5);
    let victim = keys[2].from;
    keys[2].public[5] ^= 0x40;
    let e = s.clients[5].share(&s.signers[5], &keys).unwrap_err();
    assert_eq!(
        e,
        SecAggError::BadSignature {
            stage: Stage::AdvertiseKeys,
            claimed: victim
        }
    );
    // A device that has left the round stays out.
    assert!(
        s.clients[5]
            .share(&s.signers[5], &s.server.keys_for(5))
            .is_err()
    );
    // Keys from another round (replay) fail the same way.
    let mut other = sim_with(N, 10, 99);
    let old = other.clients[0].advertise(&other.signers[0]).unwrap();
    let mut fresh = sim(10);
    assert!(matches!(
        fresh.server.receive_keys(old),
        Err(SecAggError::BadSignature { claimed: 0, .. })
    ));
}

/// Re-signs a share item with its sender's key, as a misbehaving sender would.
fn resign_item(s: &Sim, i: &mut fedge_fl::secagg::ShareItem) {
    let round = *s.setup.hash();
    let body = [
        b"fedge-secagg-v1".as_slice(),
        &[2],
        &round,
        &i.from.to_le_bytes(),
        &i.to.to_le_bytes(),
        &i.commit_self,
        &i.commit_pair,
        &i.ciphertext,
    ]
    .concat();
    i.signature = s.signers[i.from as usize]
        .sign(&body)
        .as_ref()
        .try_into()
        .unwrap();
}

#[test]
fn tampered_shares_are_caught_and_attributed() {
    let mut s = sim(10);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();

    // Altered in transit: the signature fails, blamed on whoever relayed it.
    let mut items = s.server.shares_for(4);
    let sender = items[1].from;
    let n = items[1].ciphertext.len();
    items[1].ciphertext[n / 2] ^= 1;
    let e = s.clients[4]
        .mask(&s.signers[4], &u2, &items, &s.inputs[4])
        .unwrap_err();
    assert_eq!(
        e,
        SecAggError::BadSignature {
            stage: Stage::ShareKeys,
            claimed: sender
        }
    );

    // Signed by its sender but not decryptable: the sender is blamed.
    let mut items = s.server.shares_for(6);
    let sender = items[0].from;
    items[0].ciphertext[0] ^= 1;
    resign_item(&s, &mut items[0]);
    let e = s.clients[6]
        .mask(&s.signers[6], &u2, &items, &s.inputs[6])
        .unwrap_err();
    assert!(
        matches!(e, SecAggError::Misbehaved { stage: Stage::ShareKeys, device, ref reason } if device == sender && reason.contains("decrypt")),
        "{e}"
    );

    // The aggregator withholding a neighbour's shares is noticed.
    let mut items = s.server.shares_for(8);
    items.pop();
    let e = s.clients[8]
        .mask(&s.signers[8], &u2, &items, &s.inputs[8])
        .unwrap_err();
    assert!(matches!(e, SecAggError::AggregatorMisbehaved { .. }), "{e}");
}

#[test]
fn commitments_name_a_device_that_received_bad_shares_from_a_signed_sender() {
    // Device 6 gets a share item whose commitment was changed and re-signed by its sender:
    // it blames the sender.
    let mut s = sim(10);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    let mut items = s.server.shares_for(6);
    let sender = items[0].from;
    items[0].commit_pair[3] ^= 1;
    resign_item(&s, &mut items[0]);
    let e = s.clients[6]
        .mask(&s.signers[6], &u2, &items, &s.inputs[6])
        .unwrap_err();
    assert!(
        matches!(e, SecAggError::Misbehaved { stage: Stage::ShareKeys, device, ref reason } if device == sender && reason.contains("commitments")),
        "{e}"
    );
}

#[test]
fn tampered_masked_vectors_and_reveals_are_rejected_and_the_round_completes() {
    let mut s = sim(500);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    for &i in &u2 {
        let items = s.server.shares_for(i);
        let mut masked = s.clients[i as usize]
            .mask(&s.signers[i as usize], &u2, &items, &s.inputs[i as usize])
            .unwrap();
        if i == 11 {
            // Altered in transit: rejected; device 11 counts as dropped.
            masked.data[7] ^= 0x10;
            assert_eq!(
                s.server.receive_masked(masked),
                Err(SecAggError::BadSignature {
                    stage: Stage::MaskedInput,
                    claimed: 11
                })
            );
            continue;
        }
        if i == 12 {
            // Validly signed but the wrong length: device 12 is blamed.
            masked.data.push(0);
            let round = *s.setup.hash();
            let body = [
                b"fedge-secagg-v1".as_slice(),
                &[3],
                &round,
                &12u32.to_le_bytes(),
                &masked.data,
            ]
            .concat();
            masked.signature = s.signers[12].sign(&body).as_ref().try_into().unwrap();
            let e = s.server.receive_masked(masked).unwrap_err();
            assert!(
                matches!(e, SecAggError::Misbehaved { device: 12, .. }),
                "{e}"
            );
            continue;
        }
        s.server.receive_masked(masked).unwrap();
    }
    let u3 = s.server.close_masked().unwrap();
    assert_eq!(u3.len(), N - 2);
    let confs = s.stage4(&drops, &u3).unwrap();
    for &i in &u3 {
        let mut reveals = s.clients[i as usize]
            .unmask(&s.signers[i as usize], &confs)
            .unwrap();
        if i == 20 {
            // A device lies about a share it holds: its own signature, the owner's commitment.
            let r = reveals
                .reveals
                .iter_mut()
                .find(|r| r.kind == RevealKind::SelfMask)
                .unwrap();
            r.bytes[0] ^= 1;
            let round = *s.setup.hash();
            let mut body = [
                b"fedge-secagg-v1".as_slice(),
                &[4],
                &round,
                &20u32.to_le_bytes(),
            ]
            .concat();
            body.extend_from_slice(&(reveals.reveals.len() as u32).to_le_bytes());
            for r in &reveals.reveals {
                body.extend_from_slice(&r.owner.to_le_bytes());
                body.push(match r.kind {
                    RevealKind::SelfMask => 0,
                    RevealKind::PairMasks => 1,
                });
                body.extend_from_slice(&(r.bytes.len() as u32).to_le_bytes());
                body.extend_from_slice(&r.bytes);
            }
            reveals.signature = s.signers[20].sign(&body).as_ref().try_into().unwrap();
            let e = s.server.receive_reveals(reveals).unwrap_err();
            assert!(
                matches!(e, SecAggError::Misbehaved { device: 20, ref reason, .. } if reason.contains("commitment")),
                "{e}"
            );
            continue;
        }
        s.server.receive_reveals(reveals).unwrap();
    }
    let agg = s.server.finish().unwrap();
    s.check_exact(&agg);
    assert_eq!(
        agg.dropped[2],
        BTreeSet::from([11, 12]).into_iter().collect::<Vec<_>>()
    );
    assert!(agg.dropped[3].is_empty());
    assert_eq!(agg.dropped[4], vec![20]);
    let blamed: Vec<Option<u32>> = agg.faults.iter().map(|f| f.device).collect();
    assert_eq!(blamed, vec![None, Some(12), Some(20)]);
}

#[test]
fn a_device_reveals_once_and_checks_the_survivor_list() {
    let mut s = sim(10);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    let u3 = s.stage3(&drops, &u2).unwrap();
    // A survivor list that leaves the device out.
    let without: Vec<u32> = u3.iter().copied().filter(|&d| d != 1).collect();
    assert!(matches!(
        s.clients[1].confirm(&s.signers[1], &without),
        Err(SecAggError::AggregatorMisbehaved { .. })
    ));
    // The aggregator tells device 2 a different list: its confirmation does not verify at the
    // aggregator, and the confirmations of the others do not verify at device 2.
    let other: Vec<u32> = u3.iter().copied().filter(|&d| d != 40).collect();
    let c2 = s.clients[2].confirm(&s.signers[2], &other).unwrap();
    assert!(matches!(
        s.server.receive_confirmation(c2),
        Err(SecAggError::BadSignature {
            stage: Stage::Consistency,
            claimed: 2
        })
    ));
    for &i in u3.iter().filter(|&&i| i > 2) {
        let c = s.clients[i as usize]
            .confirm(&s.signers[i as usize], &u3)
            .unwrap();
        s.server.receive_confirmation(c).unwrap();
    }
    let confs = s.server.close_confirmations().unwrap();
    assert_eq!(confs.len(), N - 3);
    let e = s.clients[2].unmask(&s.signers[2], &confs).unwrap_err();
    assert!(
        matches!(
            e,
            SecAggError::BadSignature {
                stage: Stage::Consistency,
                ..
            }
        ),
        "{e}"
    );
    // Below the quorum a device does not reveal.
    let e = s.clients[3]
        .unmask(&s.signers[3], &confs[..25])
        .unwrap_err();
    assert_eq!(
        e,
        SecAggError::BelowThreshold {
            stage: Stage::Consistency,
            survivors: 25,
            needed: 26
        }
    );
    // A device reveals once.
    s.clients[4].unmask(&s.signers[4], &confs).unwrap();
    assert!(s.clients[4].unmask(&s.signers[4], &confs).is_err());
    // Messages for the wrong stage.
    let keys = s.clients[5].advertise(&s.signers[5]).unwrap_err();
    assert!(matches!(keys, SecAggError::WrongStage { .. }), "{keys}");
}

#[test]
fn wire_encodings_round_trip_and_reject_garbage() {
    let mut s = sim(33);
    let drops = no_drops();
    let keys = s.clients[0].advertise(&s.signers[0]).unwrap();
    assert_eq!(wire::decode_keys(&wire::encode_keys(&keys)).unwrap(), keys);
    for i in 1..N {
        let k = s.clients[i].advertise(&s.signers[i]).unwrap();
        s.server.receive_keys(k).unwrap();
    }
    s.server.receive_keys(keys).unwrap();
    let u1 = s.server.close_keys().unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    let items = s.server.shares_for(0);
    let bytes = wire::encode_shares(&items);
    assert_eq!(wire::decode_shares(&bytes).unwrap(), items);
    let masked = s.clients[0]
        .mask(&s.signers[0], &u2, &items, &s.inputs[0])
        .unwrap();
    let mb = masked.to_bytes();
    assert_eq!(wire::MaskedInput::from_bytes(&mb).unwrap(), masked);
    assert_eq!(wire::decode_ids(&wire::encode_ids(&u2)).unwrap(), u2);
    s.server.receive_masked(masked).unwrap();
    for i in 1..N as u32 {
        let items = s.server.shares_for(i);
        let m = s.clients[i as usize]
            .mask(&s.signers[i as usize], &u2, &items, &s.inputs[i as usize])
            .unwrap();
        s.server.receive_masked(m).unwrap();
    }
    let u3 = s.server.close_masked().unwrap();
    let confs = s.stage4(&drops, &u3).unwrap();
    let cb = wire::encode_confirmations(&confs);
    assert_eq!(wire::decode_confirmations(&cb).unwrap(), confs);
    assert!(wire::decode_confirmations(&cb[..cb.len() - 1]).is_err());
    let reveals = s.clients[0].unmask(&s.signers[0], &confs).unwrap();
    let rb = reveals.to_bytes();
    assert_eq!(wire::Reveals::from_bytes(&rb).unwrap(), reveals);
    assert!(wire::Reveals::from_bytes(&rb[..rb.len() - 1]).is_err());

    for bad in [
        &bytes[..bytes.len() - 1],
        &[&bytes[..], &[0]].concat()[..],
        &[0xff; 4],
    ] {
        assert!(matches!(
            wire::decode_shares(bad),
            Err(SecAggError::Malformed { .. })
        ));
    }
    assert!(wire::MaskedInput::from_bytes(&mb[..10]).is_err());
    assert!(wire::Reveals::from_bytes(&[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9]).is_err());
    // Random bytes never panic a decoder.
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..5000 {
        let len = rng.random_range(0..200);
        let junk: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let _ = wire::decode_keys(&junk);
        let _ = wire::decode_shares(&junk);
        let _ = wire::decode_ids(&junk);
        let _ = wire::MaskedInput::from_bytes(&junk);
        let _ = wire::Reveals::from_bytes(&junk);
        let _ = wire::decode_confirmations(&junk);
        let _ = unpack(&junk, 7, 13);
    }
}

#[test]
fn bad_updates_and_rosters_are_refused() {
    let mut s = sim(10);
    let drops = no_drops();
    let u1 = s.stage1(&drops).unwrap();
    let u2 = s.stage2(&drops, &u1).unwrap();
    let items = s.server.shares_for(0);
    let e = s.clients[0]
        .mask(&s.signers[0], &u2, &items, &[0.0; 9])
        .unwrap_err();
    assert_eq!(
        e,
        SecAggError::ShapeMismatch {
            expected: 10,
            got: 9
        }
    );
    let items = s.server.shares_for(1);
    let mut nan = vec![0.0f32; 10];
    nan[4] = f32::NAN;
    let e = s.clients[1]
        .mask(&s.signers[1], &u2, &items, &nan)
        .unwrap_err();
    assert_eq!(e, SecAggError::NonFinite { index: 4 });

    let outsider = signer(1000);
    assert_eq!(
        Client::new(s.setup.clone(), &pubkey(&outsider)).unwrap_err(),
        SecAggError::NotInRoster
    );
    let roster = vec![pubkey(&signer(0)); 5];
    assert!(RoundSetup::new("j", 1, roster, Params::new(5, 1, 1.0).unwrap()).is_err());
}

#[test]
fn flipped_bits_anywhere_in_any_message_give_typed_errors() {
    // Every message of a 10-device round, with one bit flipped at a time in each field the
    // aggregator reads: rejected with an error (never a panic), and the round still completes.
    let n = 10;
    let mut s = sim_with(n, 40, 5);
    let mut rng = StdRng::seed_from_u64(11);
    let mut flip = |bytes: &mut [u8]| {
        if !bytes.is_empty() {
            let i = rng.random_range(0..bytes.len());
            bytes[i] ^= 1 << rng.random_range(0..8);
        }
    };
    for i in 0..n {
        let keys = s.clients[i].advertise(&s.signers[i]).unwrap();
        for field in 0..3 {
            let mut bad = keys.clone();
            match field {
                0 => flip(&mut bad[0].public),
                1 => flip(&mut bad[1].signature),
                _ => bad[2].to ^= 1,
            }
            assert!(s.server.receive_keys(bad).is_err());
        }
        s.server.receive_keys(keys).unwrap();
    }
    let u1 = s.server.close_keys().unwrap();
    for &i in &u1 {
        let keys = s.server.keys_for(i);
        let items = s.clients[i as usize]
            .share(&s.signers[i as usize], &keys)
            .unwrap();
        for field in 0..4 {
            let mut bad = items.clone();
            match field {
                0 => flip(&mut bad[0].ciphertext),
                1 => flip(&mut bad[1].commit_self),
                2 => flip(&mut bad[2].commit_pair),
                _ => bad[3].from ^= 1,
            }
            assert!(s.server.receive_shares(bad).is_err());
        }
        s.server.receive_shares(items).unwrap();
    }
    let u2 = s.server.close_shares().unwrap();
    for &i in &u2 {
        let items = s.server.shares_for(i);
        let m = s.clients[i as usize]
            .mask(&s.signers[i as usize], &u2, &items, &s.inputs[i as usize])
            .unwrap();
        let mut bad = m.clone();
        flip(&mut bad.data);
        assert!(s.server.receive_masked(bad).is_err());
        let mut bad = m.clone();
        bad.data.truncate(3);
        assert!(s.server.receive_masked(bad).is_err());
        s.server.receive_masked(m).unwrap();
    }
    let u3 = s.server.close_masked().unwrap();
    for &i in &u3 {
        let c = s.clients[i as usize]
            .confirm(&s.signers[i as usize], &u3)
            .unwrap();
        let mut bad = c.clone();
        flip(&mut bad.signature);
        assert!(s.server.receive_confirmation(bad).is_err());
        s.server.receive_confirmation(c).unwrap();
    }
    let confs = s.server.close_confirmations().unwrap();
    for &i in &u3 {
        let r = s.clients[i as usize]
            .unmask(&s.signers[i as usize], &confs)
            .unwrap();
        for field in 0..3 {
            let mut bad = r.clone();
            match field {
                0 => flip(&mut bad.reveals[0].bytes),
                1 => bad.reveals[1].owner ^= 1,
                _ => {
                    bad.reveals.pop();
                }
            }
            assert!(s.server.receive_reveals(bad).is_err());
        }
        s.server.receive_reveals(r).unwrap();
    }
    let agg = s.server.finish().unwrap();
    s.check_exact(&agg);
    assert_eq!(agg.survivors.len(), n);
    // Every rejected message was forged as far as the aggregator can tell: nobody is blamed.
    assert!(agg.faults.iter().all(|f| f.device.is_none()));
    assert!(agg.faults.len() >= 10 * 10);
}
