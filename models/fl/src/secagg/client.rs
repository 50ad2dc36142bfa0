//! One device's side of a SecAgg+ round.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::Ed25519KeyPair;

use super::mask::{apply_mask, pack, quantize};
use super::shamir::{self, Secret};
use super::wire::Confirmation;
use super::wire::{self, MaskedInput, Reveal, RevealKind, Reveals, ShareItem, SignedKey};
use super::{
    PairKeys, RoundSetup, SecAggError, Stage, commit, derive_pair, parse_pair_part, same, wipe,
};

/// What a device holds of one neighbour's secrets after stage 2.
struct Held {
    self_share: Secret,
    pair_part: Vec<u8>,
}

impl Drop for Held {
    fn drop(&mut self) {
        wipe(&mut self.self_share);
        wipe(&mut self.pair_part);
    }
}

/// One device in one round. Call [`advertise`](Self::advertise), [`share`](Self::share),
/// [`mask`](Self::mask), [`confirm`](Self::confirm) and [`unmask`](Self::unmask) in order with
/// what the aggregator relays; each checks every signature and the aggregator's instructions. A
/// call that returns an error has taken the device out of the round: its secrets are dropped
/// and every later call fails, so the aggregator treats it as a dropout.
pub struct Client {
    setup: Arc<RoundSetup>,
    me: u32,
    next: Option<Stage>,
    rng: SystemRandom,
    ephemeral: BTreeMap<u32, EphemeralPrivateKey>,
    pairs: BTreeMap<u32, PairKeys>,
    self_seed: Secret,
    held: BTreeMap<u32, Held>,
    shared: BTreeSet<u32>,
    survivors: Vec<u32>,
}

impl Drop for Client {
    fn drop(&mut self) {
        wipe(&mut self.self_seed);
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("me", &self.me)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// The device whose Ed25519 public key is `me` in `setup`'s roster.
    ///
    /// # Errors
    /// [`SecAggError::NotInRoster`].
    pub fn new(setup: Arc<RoundSetup>, me: &[u8; 32]) -> Result<Self, SecAggError> {
        let index = setup.index_of(me).ok_or(SecAggError::NotInRoster)?;
        Ok(Self {
            setup,
            me: index,
            next: Some(Stage::AdvertiseKeys),
            rng: SystemRandom::new(),
            ephemeral: BTreeMap::new(),
            pairs: BTreeMap::new(),
            self_seed: [0; 32],
            held: BTreeMap::new(),
            shared: BTreeSet::new(),
            survivors: Vec::new(),
        })
    }

    /// This device's index in the roster.
    pub fn index(&self) -> u32 {
        self.me
    }

    fn enter(&mut self, stage: Stage, signer: &Ed25519KeyPair) -> Result<(), SecAggError> {
        match self.next {
            Some(s) if s == stage => {}
            Some(at) => return Err(SecAggError::WrongStage { stage, at }),
            None => {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: "this device has left the round".into(),
                });
            }
        }
        if &wire::public_key(signer) != self.setup.key(self.me)? {
            return Err(SecAggError::NotInRoster);
        }
        Ok(())
    }

    /// Runs a stage; on error the device leaves the round and forgets its secrets.
    fn guarded<T>(
        &mut self,
        stage: Stage,
        signer: &Ed25519KeyPair,
        next: Option<Stage>,
        f: impl FnOnce(&mut Self) -> Result<T, SecAggError>,
    ) -> Result<T, SecAggError> {
        self.enter(stage, signer)?;
        match f(self) {
            Ok(v) => {
                self.next = next;
                Ok(v)
            }
            Err(e) => {
                self.next = None;
                self.ephemeral.clear();
                self.pairs.clear();
                self.held.clear();
                wipe(&mut self.self_seed);
                Err(e)
            }
        }
    }

    /// Stage 1: one signed X25519 public key per neighbour.
    ///
    /// # Errors
    /// [`SecAggError::Crypto`] if the system RNG fails.
    pub fn advertise(&mut self, signer: &Ed25519KeyPair) -> Result<Vec<SignedKey>, SecAggError> {
        self.guarded(Stage::AdvertiseKeys, signer, Some(Stage::ShareKeys), |c| {
            let round = *c.setup.hash();
            let mut out = Vec::new();
            for &to in c.setup.neighbours(c.me) {
                let private = EphemeralPrivateKey::generate(&agreement::X25519, &c.rng)
                    .map_err(|_| SecAggError::Crypto("x25519 keygen"))?;
                let mut public = [0u8; 32];
                public.copy_from_slice(
                    private
                        .compute_public_key()
                        .map_err(|_| SecAggError::Crypto("x25519 public key"))?
                        .as_ref(),
                );
                let signature = wire::sign(signer, &SignedKey::body(&round, c.me, to, &public));
                c.ephemeral.insert(to, private);
                out.push(SignedKey {
                    from: c.me,
                    to,
                    public,
                    signature,
                });
            }
            Ok(out)
        })
    }

    /// Stage 2: from the neighbours' keys addressed to this device, the encrypted, signed and
    /// committed shares of this device's seeds, one item per neighbour that advertised.
    ///
    /// # Errors
    /// [`SecAggError::BadSignature`] for a key not signed by its sender,
    /// [`SecAggError::Misbehaved`] for a signed but unusable key,
    /// [`SecAggError::AggregatorMisbehaved`] for keys not meant for this device or repeated,
    /// [`SecAggError::BelowThreshold`] when fewer than `t` neighbours advertised.
    pub fn share(
        &mut self,
        signer: &Ed25519KeyPair,
        keys: &[SignedKey],
    ) -> Result<Vec<ShareItem>, SecAggError> {
        self.guarded(Stage::ShareKeys, signer, Some(Stage::MaskedInput), |c| {
            let stage = Stage::ShareKeys;
            let round = *c.setup.hash();
            let mut seen = BTreeSet::new();
            for k in keys {
                if k.to != c.me || !c.setup.are_neighbours(c.me, k.from) || !seen.insert(k.from) {
                    return Err(SecAggError::AggregatorMisbehaved {
                        stage,
                        reason: format!(
                            "relayed a key from {} to {} that this device did not expect",
                            k.from, k.to
                        ),
                    });
                }
                wire::verify(
                    c.setup.key(k.from)?,
                    &k.signed_body(&round),
                    &k.signature,
                    Stage::AdvertiseKeys,
                    k.from,
                )?;
            }
            let threshold = c.setup.params().threshold;
            if keys.len() < threshold {
                return Err(SecAggError::BelowThreshold {
                    stage,
                    survivors: keys.len(),
                    needed: threshold,
                });
            }
            for k in keys {
                let private = c
                    .ephemeral
                    .remove(&k.from)
                    .ok_or(SecAggError::Crypto("missing ephemeral key"))?;
                let peer = UnparsedPublicKey::new(&agreement::X25519, k.public);
                let pair = agreement::agree_ephemeral(private, &peer, |shared| {
                    derive_pair(&round, c.me, k.from, shared)
                })
                .map_err(|_| SecAggError::Misbehaved {
                    stage,
                    device: k.from,
                    reason: "advertised an invalid X25519 key".into(),
                })??;
                c.pairs.insert(k.from, pair);
            }
            c.ephemeral.clear();

            c.rng
                .fill(&mut c.self_seed)
                .map_err(|_| SecAggError::Crypto("rng"))?;
            let mut coeff_seed = [0u8; 32];
            c.rng
                .fill(&mut coeff_seed)
                .map_err(|_| SecAggError::Crypto("rng"))?;
            let mut coeff_rng = ChaCha20Rng::from_seed(coeff_seed);
            wipe(&mut coeff_seed);
            let mut coefficients = |buf: &mut [u8]| {
                coeff_rng.fill_bytes(buf);
                Ok(())
            };

            let holders: Vec<u32> = c.pairs.keys().copied().collect();
            let xs: Vec<u8> = holders
                .iter()
                .map(|&h| c.setup.share_point(c.me, h))
                .collect::<Option<_>>()
                .ok_or(SecAggError::Crypto("share point"))?;
            let self_shares = shamir::split(&c.self_seed, threshold, &xs, &mut coefficients)?;
            let mut pair_shares = Vec::with_capacity(holders.len());
            for (&v, keys) in &c.pairs {
                pair_shares.push((
                    v,
                    shamir::split(&keys.mask_seed, threshold, &xs, &mut coefficients)?,
                ));
            }

            let mut items = Vec::with_capacity(holders.len());
            for (i, &w) in holders.iter().enumerate() {
                let mut pair_part = Vec::with_capacity(4 + 36 * pair_shares.len());
                pair_part.extend_from_slice(&(pair_shares.len() as u32).to_le_bytes());
                for (v, shares) in &pair_shares {
                    pair_part.extend_from_slice(&v.to_le_bytes());
                    pair_part.extend_from_slice(&shares[i]);
                }
                let commit_self = commit(&round, RevealKind::SelfMask, c.me, w, &self_shares[i]);
                let commit_pair = commit(&round, RevealKind::PairMasks, c.me, w, &pair_part);
                let mut plaintext = Vec::with_capacity(32 + pair_part.len() + 16);
                plaintext.extend_from_slice(&self_shares[i]);
                plaintext.extend_from_slice(&pair_part);
                let key = &c.pairs[&w].share_key;
                let ciphertext = super::seal_shares(&round, key, c.me, w, plaintext)?;
                let signature = wire::sign(
                    signer,
                    &ShareItem::body(&round, c.me, w, &commit_self, &commit_pair, &ciphertext),
                );
                items.push(ShareItem {
                    from: c.me,
                    to: w,
                    commit_self,
                    commit_pair,
                    ciphertext,
                    signature,
                });
            }
            Ok(items)
        })
    }

    /// Stage 3: given the devices that shared (`shared`, the aggregator's U2) and the share
    /// items addressed to this device, the signed masked update.
    ///
    /// # Errors
    /// As [`share`](Self::share), plus [`SecAggError::Misbehaved`] for shares that do not
    /// open or do not match their commitments, and [`SecAggError::ShapeMismatch`] /
    /// [`SecAggError::NonFinite`] for a bad update.
    pub fn mask(
        &mut self,
        signer: &Ed25519KeyPair,
        shared: &[u32],
        items: &[ShareItem],
        update: &[f32],
    ) -> Result<MaskedInput, SecAggError> {
        self.guarded(Stage::MaskedInput, signer, Some(Stage::Consistency), |c| {
            let stage = Stage::MaskedInput;
            let round = *c.setup.hash();
            let params = c.setup.params().clone();
            let quantized = quantize(update, &params)?;
            let shared: BTreeSet<u32> = shared.iter().copied().collect();
            if !shared.contains(&c.me) {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: "this device is missing from the devices that shared".into(),
                });
            }
            let mine: BTreeSet<u32> = shared
                .iter()
                .copied()
                .filter(|&v| c.setup.are_neighbours(c.me, v))
                .collect();
            if let Some(v) = mine.iter().find(|v| !c.pairs.contains_key(v)) {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: format!("lists {v} as shared, but its key never reached this device"),
                });
            }
            if mine.len() < params.threshold {
                return Err(SecAggError::BelowThreshold {
                    stage,
                    survivors: mine.len(),
                    needed: params.threshold,
                });
            }
            let mut held = BTreeMap::new();
            for item in items {
                if item.to != c.me || !mine.contains(&item.from) || held.contains_key(&item.from) {
                    return Err(SecAggError::AggregatorMisbehaved {
                        stage,
                        reason: format!(
                            "relayed shares from {} to {} that this device did not expect",
                            item.from, item.to
                        ),
                    });
                }
                wire::verify(
                    c.setup.key(item.from)?,
                    &item.signed_body(&round),
                    &item.signature,
                    Stage::ShareKeys,
                    item.from,
                )?;
                let blame = |reason: &str| SecAggError::Misbehaved {
                    stage: Stage::ShareKeys,
                    device: item.from,
                    reason: reason.into(),
                };
                let key = &c.pairs[&item.from].share_key;
                let plain = super::open_shares(&round, key, item.from, c.me, &item.ciphertext)
                    .ok_or_else(|| blame("its share ciphertext does not decrypt"))?;
                if plain.len() < 36 {
                    return Err(blame("its share plaintext is too short"));
                }
                let mut self_share = [0u8; 32];
                self_share.copy_from_slice(&plain[..32]);
                let pair_part = plain[32..].to_vec();
                let ok_self = same(
                    &commit(&round, RevealKind::SelfMask, item.from, c.me, &self_share),
                    &item.commit_self,
                );
                let ok_pair = same(
                    &commit(&round, RevealKind::PairMasks, item.from, c.me, &pair_part),
                    &item.commit_pair,
                );
                if !(ok_self && ok_pair) {
                    return Err(blame("its shares do not match its commitments"));
                }
                // The pairwise shares must cover every neighbour of the owner that shared, and
                // only its neighbours, or the aggregator could not unmask if the owner dropped.
                let owner_neighbours = c.setup.neighbours(item.from);
                let ids: Vec<u32> = parse_pair_part(&pair_part)
                    .ok_or_else(|| blame("its pairwise shares do not parse"))?
                    .into_iter()
                    .map(|(v, _)| v)
                    .collect();
                let covers = shared
                    .iter()
                    .filter(|v| owner_neighbours.binary_search(v).is_ok())
                    .all(|v| ids.binary_search(v).is_ok());
                if !covers
                    || ids
                        .iter()
                        .any(|v| owner_neighbours.binary_search(v).is_err())
                {
                    return Err(blame(
                        "its pairwise shares are not one per neighbour that shared",
                    ));
                }
                held.insert(
                    item.from,
                    Held {
                        self_share,
                        pair_part,
                    },
                );
            }
            if let Some(v) = mine.iter().find(|v| !held.contains_key(v)) {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: format!("withheld the shares of {v}"),
                });
            }

            let mut acc = quantized;
            apply_mask(&mut acc, &c.self_seed, true, params.mod_bits);
            for &v in &mine {
                apply_mask(&mut acc, &c.pairs[&v].mask_seed, c.me < v, params.mod_bits);
            }
            wipe(&mut c.self_seed);
            c.pairs.clear();
            c.held = held;
            c.shared = mine;
            let data = pack(&acc, params.mod_bits);
            let signature = wire::sign(signer, &MaskedInput::body(&round, c.me, &data));
            Ok(MaskedInput {
                from: c.me,
                data,
                signature,
            })
        })
    }

    /// Stage 4: given the devices whose masked inputs the aggregator holds (`survivors`, U3),
    /// this device's signature over that list, for the other devices to check that they were
    /// all told the same.
    ///
    /// # Errors
    /// [`SecAggError::AggregatorMisbehaved`] for a survivor list that contradicts U2 or leaves
    /// this device out; [`SecAggError::BelowThreshold`] when fewer than `t` neighbours survived.
    pub fn confirm(
        &mut self,
        signer: &Ed25519KeyPair,
        survivors: &[u32],
    ) -> Result<Confirmation, SecAggError> {
        self.guarded(Stage::Consistency, signer, Some(Stage::Unmask), |c| {
            let stage = Stage::Consistency;
            let survivors: BTreeSet<u32> = survivors.iter().copied().collect();
            if !survivors.contains(&c.me) {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: "this device is missing from the survivors".into(),
                });
            }
            let mine: Vec<u32> = survivors
                .iter()
                .copied()
                .filter(|&v| c.setup.are_neighbours(c.me, v))
                .collect();
            if let Some(v) = mine.iter().find(|v| !c.shared.contains(v)) {
                return Err(SecAggError::AggregatorMisbehaved {
                    stage,
                    reason: format!("lists {v} as a survivor, but it never shared"),
                });
            }
            let threshold = c.setup.params().threshold;
            if mine.len() < threshold {
                return Err(SecAggError::BelowThreshold {
                    stage,
                    survivors: mine.len(),
                    needed: threshold,
                });
            }
            c.survivors = survivors.into_iter().collect();
            let body = Confirmation::body(c.setup.hash(), &c.survivors);
            Ok(Confirmation {
                from: c.me,
                signature: wire::sign(signer, &body),
            })
        })
    }

    /// Stage 5: once a quorum ([`RoundSetup::quorum`]) of survivors has signed the survivor
    /// list this device signed, reveal for each neighbour that shared either its self-mask share
    /// (it survived) or its pairwise shares (it dropped), never both. Callable once.
    ///
    /// # Errors
    /// [`SecAggError::BadSignature`] for a confirmation that does not verify over this
    /// device's list (the aggregator told devices different lists, or it was altered);
    /// [`SecAggError::AggregatorMisbehaved`] for confirmations from non-survivors or repeated;
    /// [`SecAggError::BelowThreshold`] below the quorum.
    pub fn unmask(
        &mut self,
        signer: &Ed25519KeyPair,
        confirmations: &[Confirmation],
    ) -> Result<Reveals, SecAggError> {
        self.guarded(Stage::Unmask, signer, None, |c| {
            let stage = Stage::Consistency;
            let body = Confirmation::body(c.setup.hash(), &c.survivors);
            let mut seen = BTreeSet::new();
            for conf in confirmations {
                if c.survivors.binary_search(&conf.from).is_err() || !seen.insert(conf.from) {
                    return Err(SecAggError::AggregatorMisbehaved {
                        stage,
                        reason: format!("relayed an unexpected confirmation from {}", conf.from),
                    });
                }
                wire::verify(
                    c.setup.key(conf.from)?,
                    &body,
                    &conf.signature,
                    stage,
                    conf.from,
                )?;
            }
            let quorum = c.setup.quorum();
            if seen.len() < quorum {
                return Err(SecAggError::BelowThreshold {
                    stage,
                    survivors: seen.len(),
                    needed: quorum,
                });
            }
            let reveals: Vec<Reveal> = std::mem::take(&mut c.held)
                .into_iter()
                .map(|(owner, held)| {
                    if c.survivors.binary_search(&owner).is_ok() {
                        Reveal {
                            owner,
                            kind: RevealKind::SelfMask,
                            bytes: held.self_share.to_vec(),
                        }
                    } else {
                        Reveal {
                            owner,
                            kind: RevealKind::PairMasks,
                            bytes: held.pair_part.clone(),
                        }
                    }
                })
                .collect();
            let round = *c.setup.hash();
            let signature = wire::sign(signer, &Reveals::body(&round, c.me, &reveals));
            Ok(Reveals {
                from: c.me,
                reveals,
                signature,
            })
        })
    }
}
