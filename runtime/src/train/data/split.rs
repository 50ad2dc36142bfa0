//! Seeded splits: a stratified test split, and a Dirichlet label split across devices.

use super::super::rng::SplitMix64;
use super::super::{Result, TrainError};
use super::Dataset;

/// Tries of the Dirichlet split before giving up on `min_per_device`.
const MAX_TRIES: usize = 1000;

/// Splits `data` into `(train, test)` with `test_fraction` of every class (rounded) in the test
/// part, chosen by `seed`. Both parts keep the original row order.
///
/// # Errors
/// [`TrainError::Split`] when `test_fraction` is not strictly between 0 and 1 or either part
/// would be empty.
pub fn train_test_split(
    data: &Dataset,
    test_fraction: f64,
    seed: u64,
) -> Result<(Dataset, Dataset)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(TrainError::Split(format!(
            "test fraction {test_fraction} must be strictly between 0 and 1"
        )));
    }
    let mut rng = SplitMix64::new(seed);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for mut rows in rows_by_class(&data.y, data.classes) {
        rng.shuffle(&mut rows);
        let n_test = (rows.len() as f64 * test_fraction).round() as usize;
        test.extend_from_slice(&rows[..n_test]);
        train.extend_from_slice(&rows[n_test..]);
    }
    if train.is_empty() || test.is_empty() {
        return Err(TrainError::Split(format!(
            "{} rows leave an empty part at test fraction {test_fraction}",
            data.len()
        )));
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((data.subset(&train), data.subset(&test)))
}

/// Row indices for `devices` devices with non-IID labels: for each class, device shares are
/// drawn from a symmetric Dirichlet(`alpha`) and the class's rows (shuffled) are cut by them.
///
/// Small `alpha` (0.1) gives each device few classes; large `alpha` (100) tends to an IID split.
/// As in NIID-Bench (Li et al., "Federated Learning on Non-IID Data Silos: An Experimental
/// Study", ICDE 2022), a device already holding `rows / devices` rows gets no share of later
/// classes, and the draw is repeated (up to 1000 times, the generator moving on) until every
/// device has at least `min_per_device` rows. Every row goes to exactly one device; each
/// device's indices are sorted.
///
/// # Errors
/// [`TrainError::Split`] for zero devices, an `alpha` that is not positive and finite, fewer
/// than `devices × min_per_device` rows, a label of `classes` or more, or when no draw meets
/// `min_per_device`.
pub fn dirichlet_partition(
    labels: &[u32],
    classes: usize,
    devices: usize,
    alpha: f64,
    min_per_device: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>> {
    check_partition(labels, classes, devices, alpha, min_per_device)?;
    let by_class = rows_by_class(labels, classes);
    let mut rng = SplitMix64::new(seed);
    for _ in 0..MAX_TRIES {
        let shards = draw(&by_class, labels.len(), devices, alpha, &mut rng);
        if shards.iter().all(|s| s.len() >= min_per_device) {
            return Ok(shards
                .into_iter()
                .map(|mut s| {
                    s.sort_unstable();
                    s
                })
                .collect());
        }
    }
    Err(TrainError::Split(format!(
        "no Dirichlet({alpha}) draw in {MAX_TRIES} gave every one of {devices} devices \
         {min_per_device} rows; raise alpha or lower the device count"
    )))
}

/// [`dirichlet_partition`] of `data`'s labels, as data sets.
///
/// # Errors
/// As [`dirichlet_partition`].
pub fn dirichlet_shards(
    data: &Dataset,
    devices: usize,
    alpha: f64,
    min_per_device: usize,
    seed: u64,
) -> Result<Vec<Dataset>> {
    let parts = dirichlet_partition(&data.y, data.classes, devices, alpha, min_per_device, seed)?;
    Ok(parts.iter().map(|idx| data.subset(idx)).collect())
}

fn check_partition(
    labels: &[u32],
    classes: usize,
    devices: usize,
    alpha: f64,
    min_per_device: usize,
) -> Result<()> {
    let fail = |what: String| Err(TrainError::Split(what));
    if devices == 0 {
        return fail("no devices".into());
    }
    if !(alpha > 0.0 && alpha.is_finite()) {
        return fail(format!("alpha {alpha} must be positive and finite"));
    }
    if labels.len() < devices.saturating_mul(min_per_device) {
        return fail(format!(
            "{} rows cannot give {devices} devices {min_per_device} each",
            labels.len()
        ));
    }
    if let Some(&c) = labels.iter().find(|&&c| c as usize >= classes) {
        return fail(format!("label {c} is out of range for {classes} classes"));
    }
    Ok(())
}

/// One draw: every class's rows shuffled and cut by Dirichlet shares over the devices.
fn draw(
    by_class: &[Vec<usize>],
    rows: usize,
    devices: usize,
    alpha: f64,
    rng: &mut SplitMix64,
) -> Vec<Vec<usize>> {
    let mut shards = vec![Vec::new(); devices];
    let full = rows as f64 / devices as f64;
    for class_rows in by_class {
        let mut class_rows = class_rows.clone();
        rng.shuffle(&mut class_rows);
        let drawn = rng.dirichlet(alpha, devices);
        let mut shares: Vec<f64> = drawn
            .iter()
            .zip(&shards)
            .map(|(&p, s)| if (s.len() as f64) < full { p } else { 0.0 })
            .collect();
        let sum: f64 = shares.iter().sum();
        if sum > 0.0 {
            shares.iter_mut().for_each(|p| *p /= sum);
        } else {
            shares = drawn;
        }
        let (n, mut cum, mut start) = (class_rows.len(), 0.0, 0);
        for (device, share) in shares.iter().enumerate() {
            cum += share;
            let end = if device + 1 == devices {
                n
            } else {
                ((cum * n as f64).round() as usize).clamp(start, n)
            };
            shards[device].extend_from_slice(&class_rows[start..end]);
            start = end;
        }
    }
    shards
}

/// Row indices of each class, in row order.
fn rows_by_class(labels: &[u32], classes: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); classes];
    for (i, &c) in labels.iter().enumerate() {
        out[c as usize].push(i);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 600 rows, 10 classes of 60.
    fn labels() -> Vec<u32> {
        (0..600).map(|i| (i % 10) as u32).collect()
    }

    /// Mean over devices of the share of a device's rows in its largest class.
    fn skew(parts: &[Vec<usize>], labels: &[u32]) -> f64 {
        let top = |p: &Vec<usize>| {
            let mut counts = [0usize; 10];
            p.iter().for_each(|&i| counts[labels[i] as usize] += 1);
            *counts.iter().max().unwrap_or(&0) as f64 / p.len() as f64
        };
        parts.iter().map(top).sum::<f64>() / parts.len() as f64
    }

    #[test]
    fn stratified_split_takes_the_fraction_of_every_class() {
        let d = Dataset::new(vec![0.0; 600], labels(), 1, 10).expect("data");
        let (train, test) = train_test_split(&d, 0.2, 1).expect("split");
        assert_eq!(test.class_counts(), vec![12; 10]);
        assert_eq!(train.class_counts(), vec![48; 10]);
        assert_eq!(train_test_split(&d, 0.2, 1).expect("again").1, test);
        assert!(train_test_split(&d, 1.0, 1).is_err());
    }

    #[test]
    fn dirichlet_partition_covers_every_row_once() {
        let y = labels();
        let parts = dirichlet_partition(&y, 10, 8, 0.3, 10, 4).expect("partition");
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all, (0..600).collect::<Vec<_>>());
        assert!(parts.iter().all(|p| p.len() >= 10));
        assert_eq!(
            dirichlet_partition(&y, 10, 8, 0.3, 10, 4).expect("again"),
            parts
        );
        assert_ne!(
            dirichlet_partition(&y, 10, 8, 0.3, 10, 5).expect("other seed"),
            parts
        );
    }

    #[test]
    fn small_alpha_gives_more_label_skew_than_large_alpha() {
        let y = labels();
        let skewed = skew(
            &dirichlet_partition(&y, 10, 10, 0.1, 5, 1).expect("0.1"),
            &y,
        );
        let iid = skew(
            &dirichlet_partition(&y, 10, 10, 1000.0, 5, 1).expect("1000"),
            &y,
        );
        assert!(skewed > 0.5 && iid < 0.2, "skew {skewed} vs {iid}");
    }

    #[test]
    fn impossible_partitions_are_errors() {
        let y = labels();
        assert!(dirichlet_partition(&y, 10, 0, 1.0, 1, 0).is_err());
        assert!(dirichlet_partition(&y, 10, 4, 0.0, 1, 0).is_err());
        assert!(dirichlet_partition(&y, 10, 7, 1.0, 100, 0).is_err());
        assert!(dirichlet_partition(&y, 5, 4, 1.0, 1, 0).is_err());
        // 10 rows of one class cannot give 3 devices 3 rows each when α makes one device take all.
        assert!(dirichlet_partition(&[0; 10], 1, 3, 1e-6, 3, 0).is_err());
    }
}
