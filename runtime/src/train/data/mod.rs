//! Labelled data for training: loading, the test split and the per-device split.
//!
//! Operator data comes as CSV (a header row optional, numeric features, the integer label in the
//! last column; plain or gzip-compressed, told apart by the gzip magic bytes) or as NPZ (arrays
//! `X` or `x`, rows × features, and `y`). The digits set bundled under `models/data/digits` is
//! gzip-compressed CSV without a header, read by [`load_digits`] and scaled to `[0, 1]`.
//!
//! Layout:
//! - [`Dataset`] and the readers (here);
//! - [`gunzip`] (`gzip`): gzip decoding over the `zip` crate's DEFLATE reader;
//! - [`train_test_split`], [`dirichlet_partition`], [`dirichlet_shards`] (`split`): the seeded
//!   stratified test split and the Dirichlet label split that gives devices non-IID data.

mod gzip;
mod split;

use std::path::Path;

pub use gzip::gunzip;
pub use split::{dirichlet_partition, dirichlet_shards, train_test_split};

use super::{Result, TrainError};

/// The digits data set, relative to the repository root.
pub const DIGITS_PATH: &str = "models/data/digits/digits.csv.gz";

/// Rows of features with integer class labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major, `len() × features`.
    pub x: Vec<f32>,
    /// One label per row, each below `classes`.
    pub y: Vec<u32>,
    pub features: usize,
    pub classes: usize,
}

impl Dataset {
    /// # Errors
    /// [`TrainError::InputSize`] when `x` does not hold one row per label,
    /// [`TrainError::LabelOutOfRange`], [`TrainError::Data`] for zero features or a non-finite
    /// feature value.
    pub fn new(x: Vec<f32>, y: Vec<u32>, features: usize, classes: usize) -> Result<Dataset> {
        if features == 0 {
            return Err(TrainError::Data(
                "a data set needs at least one feature".into(),
            ));
        }
        if y.len().checked_mul(features) != Some(x.len()) {
            return Err(TrainError::InputSize {
                expected: y.len().saturating_mul(features),
                got: x.len(),
                rows: y.len(),
                features,
            });
        }
        if let Some(row) = y.iter().position(|&c| c as usize >= classes) {
            return Err(TrainError::LabelOutOfRange {
                label: y[row],
                row,
                classes,
            });
        }
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(TrainError::Data(format!(
                "row {}, feature {} is {}",
                i / features,
                i % features,
                x[i]
            )));
        }
        Ok(Dataset {
            x,
            y,
            features,
            classes,
        })
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// # Panics
    /// When `i` is not below [`Dataset::len`].
    pub fn row(&self, i: usize) -> &[f32] {
        &self.x[i * self.features..(i + 1) * self.features]
    }

    /// The rows `idx` names, in that order.
    ///
    /// # Panics
    /// When an index is not below [`Dataset::len`].
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        Dataset {
            x: idx.iter().flat_map(|&i| self.row(i)).copied().collect(),
            y: idx.iter().map(|&i| self.y[i]).collect(),
            features: self.features,
            classes: self.classes,
        }
    }

    /// Multiplies every feature by `factor` (`1.0 / 16.0` maps digits' pixels to `[0, 1]`).
    pub fn scale(&mut self, factor: f32) {
        self.x.iter_mut().for_each(|v| *v *= factor);
    }

    /// Rows per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        self.y.iter().for_each(|&c| counts[c as usize] += 1);
        counts
    }
}

/// Parses CSV text: numeric features, then an integer label (`3` or `3.0`) in the last column.
///
/// The first line is a header when any of its fields is not a number; blank lines are skipped.
/// Classes are `0..=max label`.
///
/// # Errors
/// [`TrainError::Data`] naming the line of a non-numeric or non-finite value, a label that is
/// not a non-negative integer, or a row whose width differs from the first; and when there are
/// no rows.
pub fn parse_csv(text: &str) -> Result<Dataset> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let (mut x, mut y, mut width) = (Vec::new(), Vec::new(), None);
    let lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    for (n, (i, line)) in lines.enumerate() {
        let line_no = i + 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let values: Option<Vec<f64>> = fields.iter().map(|f| f.parse().ok()).collect();
        let values = match values {
            Some(v) => v,
            None if n == 0 => continue,
            None => return Err(csv_error(line_no, "a field is not a number")),
        };
        let w = *width.get_or_insert(values.len());
        if values.len() != w || w < 2 {
            return Err(csv_error(
                line_no,
                &format!("{} fields, expected {w} (at least 2)", values.len()),
            ));
        }
        let (label, features) = values.split_last().expect("at least 2 fields");
        y.push(
            label_of(*label).ok_or_else(|| {
                csv_error(line_no, &format!("label {label} is not a class number"))
            })?,
        );
        for &v in features {
            if !v.is_finite() {
                return Err(csv_error(line_no, &format!("feature value {v}")));
            }
            x.push(v as f32);
        }
    }
    let features = width.ok_or_else(|| TrainError::Data("CSV without data rows".into()))? - 1;
    let classes = y.iter().max().map_or(0, |&m| m as usize + 1);
    Dataset::new(x, y, features, classes)
}

fn csv_error(line: usize, what: &str) -> TrainError {
    TrainError::Data(format!("CSV line {line}: {what}"))
}

fn label_of(v: f64) -> Option<u32> {
    (v >= 0.0 && v.fract() == 0.0 && v <= f64::from(u32::MAX)).then_some(v as u32)
}

/// Reads a CSV file as [`parse_csv`] does, gunzipping it first when it starts with the gzip
/// magic bytes.
///
/// # Errors
/// [`TrainError::Io`], [`TrainError::Data`] for bad gzip, UTF-8 or CSV content.
pub fn read_csv(path: impl AsRef<Path>) -> Result<Dataset> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.into(),
        source,
    })?;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        gunzip(&bytes)?
    } else {
        bytes
    };
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| TrainError::Data(format!("{}: not UTF-8 text: {e}", path.display())))?;
    parse_csv(text).map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))
}

/// Reads an NPZ file holding `X` (or `x`), rows × features of any numeric type, and `y`, one
/// integer-valued label per row. Classes are `0..=max label`.
///
/// # Errors
/// [`TrainError::Runtime`] when the archive cannot be read, [`TrainError::Data`] for missing
/// arrays, wrong ranks or labels that are not non-negative integers.
pub fn read_npz(path: impl AsRef<Path>) -> Result<Dataset> {
    let arrays = crate::npy::read_npz(path)?;
    let find = |names: &[&str]| {
        arrays
            .iter()
            .find(|(n, _)| names.contains(&n.as_str()))
            .map(|(_, t)| t)
            .ok_or_else(|| TrainError::Data(format!("NPZ has no array {}", names.join(" or "))))
    };
    let (xs, ys) = (find(&["X", "x"])?, find(&["y"])?);
    let [rows, features] = *xs.shape() else {
        return Err(TrainError::Data(format!(
            "X has shape {:?}, expected rows × features",
            xs.shape()
        )));
    };
    if ys.shape() != [rows] {
        return Err(TrainError::Data(format!(
            "y has shape {:?}, expected [{rows}]",
            ys.shape()
        )));
    }
    let y = ys
        .to_f64_lossy()
        .into_iter()
        .map(|v| {
            label_of(v).ok_or_else(|| TrainError::Data(format!("label {v} is not a class number")))
        })
        .collect::<Result<Vec<u32>>>()?;
    let x = xs.to_f64_lossy().into_iter().map(|v| v as f32).collect();
    let classes = y.iter().max().map_or(0, |&m| m as usize + 1);
    Dataset::new(x, y, features, classes)
}

/// Loads the digits set (1,797 rows of 8×8 pixels, 10 classes) with features scaled from
/// `0..=16` to `[0, 1]`.
///
/// # Errors
/// As [`read_csv`]; [`TrainError::Data`] when the file is not 64 features and labels 0–9.
pub fn load_digits(path: impl AsRef<Path>) -> Result<Dataset> {
    let mut d = read_csv(path)?;
    if d.features != 64 || d.classes > 10 {
        return Err(TrainError::Data(format!(
            "digits: {} features and {} classes, expected 64 and 10",
            d.features, d.classes
        )));
    }
    d.classes = 10;
    d.scale(1.0 / 16.0);
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_header_is_detected_and_labels_go_last() {
        let d = parse_csv("\u{feff}a,b,label\n1,2,0\n\n3.5, -4 ,2.0\n").expect("csv");
        assert_eq!((d.features, d.classes, d.len()), (2, 3, 2));
        assert_eq!(d.x, vec![1.0, 2.0, 3.5, -4.0]);
        assert_eq!(d.y, vec![0, 2]);
        assert_eq!(parse_csv("1,2,1\n3,4,0").expect("no header").len(), 2);
    }

    #[test]
    fn bad_csv_names_the_line() {
        for (text, line) in [
            ("1,2,0\n1,x,0\n", 2),
            ("1,2,0\n1,2\n", 2),
            ("f,l\n1,0.5\n", 2),
            ("f,l\n1,-1\n", 2),
            ("f,l\n1,0\ninf,1\n", 3),
        ] {
            let err = parse_csv(text).expect_err(text).to_string();
            assert!(err.contains(&format!("line {line}")), "{text:?}: {err}");
        }
        assert!(parse_csv("a,b\n").is_err());
        assert!(parse_csv("5\n").is_err());
    }

    #[test]
    fn dataset_checks_sizes_and_labels() {
        assert!(matches!(
            Dataset::new(vec![0.0; 5], vec![0, 1], 2, 2),
            Err(TrainError::InputSize { .. })
        ));
        assert!(matches!(
            Dataset::new(vec![0.0; 4], vec![0, 2], 2, 2),
            Err(TrainError::LabelOutOfRange {
                label: 2,
                row: 1,
                classes: 2
            })
        ));
        let d = Dataset::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![1, 0, 1], 2, 2).expect("ok");
        let s = d.subset(&[2, 0]);
        assert_eq!((s.x, s.y), (vec![5.0, 6.0, 1.0, 2.0], vec![1, 1]));
        assert_eq!(d.class_counts(), vec![1, 2]);
    }
}
