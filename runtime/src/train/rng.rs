//! A small seeded generator (SplitMix64) and the distributions training needs.
//!
//! SplitMix64 (Steele, Lea and Flood, "Fast splittable pseudorandom number generators",
//! OOPSLA 2014) passes BigCrush, has one `u64` of state and is fully specified by its seed, so
//! every shuffle, initialisation and data split in [`crate::train`] is reproducible on every
//! platform. It is not a cryptographic generator.

/// SplitMix64: a 64-bit state advanced by a Weyl sequence and mixed by a finaliser.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` without modulo bias (Lemire's multiply-and-reject).
    ///
    /// # Panics
    /// When `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Fisher–Yates shuffle.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }

    /// Standard normal (Marsaglia's polar method; the second value is discarded).
    pub fn normal(&mut self) -> f64 {
        loop {
            let u = 2.0 * self.next_f64() - 1.0;
            let v = 2.0 * self.next_f64() - 1.0;
            let s = u * u + v * v;
            if s > 0.0 && s < 1.0 {
                return u * (-2.0 * s.ln() / s).sqrt();
            }
        }
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang ("A simple method for generating gamma
    /// variables", ACM TOMS 2000); shapes below 1 are boosted by `Gamma(shape + 1)·U^(1/shape)`.
    ///
    /// # Panics
    /// When `shape` is not positive and finite.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        assert!(shape > 0.0 && shape.is_finite(), "gamma shape {shape}");
        if shape < 1.0 {
            let u = self.next_f64();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let z = self.normal();
            let v = 1.0 + c * z;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.next_f64();
            if u < 1.0 - 0.0331 * z.powi(4) || u.ln() < 0.5 * z * z + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    /// A draw from the symmetric Dirichlet(α, …, α) over `k` categories (normalised gammas).
    ///
    /// For tiny α every gamma draw can underflow to zero; the draw is then a point mass on a
    /// uniformly chosen category, the limit the distribution tends to.
    ///
    /// # Panics
    /// When `k` is 0 or `alpha` is not positive and finite.
    pub fn dirichlet(&mut self, alpha: f64, k: usize) -> Vec<f64> {
        assert!(k > 0, "dirichlet over 0 categories");
        let mut p: Vec<f64> = (0..k).map(|_| self.gamma(alpha)).collect();
        let sum: f64 = p.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            p.iter_mut().for_each(|v| *v /= sum);
        } else {
            p.iter_mut().for_each(|v| *v = 0.0);
            p[self.below(k as u64) as usize] = 1.0;
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        (
            m,
            xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0),
        )
    }

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // Vigna's reference splitmix64.c (prng.di.unimi.it) gives these for seed 1234567.
        let mut r = SplitMix64::new(1234567);
        let want = [
            6457827717110365317u64,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for w in want {
            assert_eq!(r.next_u64(), w);
        }
    }

    #[test]
    fn below_stays_in_range_and_hits_every_value() {
        let mut r = SplitMix64::new(3);
        let mut seen = [0usize; 7];
        for _ in 0..7000 {
            seen[r.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let shuffled = |seed| {
            let mut v: Vec<usize> = (0..50).collect();
            SplitMix64::new(seed).shuffle(&mut v);
            v
        };
        let a = shuffled(9);
        assert_eq!(a, shuffled(9));
        assert_ne!(a, shuffled(10));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn normal_and_gamma_have_the_right_moments() {
        let mut r = SplitMix64::new(11);
        let (m, v) = mean_var(&(0..40_000).map(|_| r.normal()).collect::<Vec<_>>());
        assert!(
            m.abs() < 0.02 && (v - 1.0).abs() < 0.03,
            "normal mean {m} var {v}"
        );
        for shape in [0.1, 0.5, 1.0, 2.5, 9.0] {
            let (m, v) = mean_var(&(0..40_000).map(|_| r.gamma(shape)).collect::<Vec<_>>());
            assert!(
                (m - shape).abs() < 0.04 * shape.max(1.0),
                "gamma({shape}) mean {m}"
            );
            assert!(
                (v - shape).abs() < 0.1 * shape.max(1.0),
                "gamma({shape}) var {v}"
            );
        }
    }

    #[test]
    fn dirichlet_sums_to_one_and_concentrates_for_small_alpha() {
        let mut r = SplitMix64::new(5);
        let max_share = |r: &mut SplitMix64, alpha| {
            (0..500)
                .map(|_| {
                    let p = r.dirichlet(alpha, 10);
                    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
                    p.iter().cloned().fold(0.0, f64::max)
                })
                .sum::<f64>()
                / 500.0
        };
        let skewed = max_share(&mut r, 0.05);
        let flat = max_share(&mut r, 100.0);
        assert!(skewed > 0.6 && flat < 0.2, "max share {skewed} vs {flat}");
        let p = r.dirichlet(1e-300, 4);
        assert_eq!(p.iter().filter(|&&v| v == 1.0).count(), 1, "{p:?}");
    }
}
