//! A seeded, stratified train/dev/test split over the records of a labelled CSV, and its file,
//! `split.json`, which lets a later run (or the Python baseline) use exactly the same split.
//!
//! Each class is shuffled on its own (splitmix64 + Fisher-Yates, [`ferry_spec::sampler::shuffle`])
//! and cut by the fractions, so every split has the class proportions of the whole file, to
//! within one record per class.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::csv::{Example, LabelledSet};
use crate::DataError;
use ferry_spec::sampler::{mix_seed, shuffle};

/// Keeps the split's random stream apart from the sample order's (`mix_seed(&[seed, epoch])`),
/// so that the same `--seed` does not correlate the two.
const SPLIT_STREAM: u64 = 0x5911_7DA7_A5E7;

/// The share of records in each split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitFractions {
    pub train: f64,
    pub dev: f64,
    pub test: f64,
}

impl Default for SplitFractions {
    /// 80/10/10, the split of the ULMFiT and BERT fine-tuning comparisons.
    fn default() -> Self {
        SplitFractions {
            train: 0.8,
            dev: 0.1,
            test: 0.1,
        }
    }
}

impl SplitFractions {
    fn as_array(&self) -> [f64; 3] {
        [self.train, self.dev, self.test]
    }

    /// Each fraction finite and in [0, 1], train above 0, the three summing to 1.
    pub fn check(&self) -> Result<(), String> {
        let parts = self.as_array();
        if parts.iter().any(|f| !f.is_finite() || *f < 0.0 || *f > 1.0) {
            return Err(format!("fractions must lie in [0, 1], got {self:?}"));
        }
        if self.train <= 0.0 {
            return Err("the train fraction must be above 0".to_owned());
        }
        let sum: f64 = parts.iter().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(format!("fractions must sum to 1, these sum to {sum}"));
        }
        Ok(())
    }
}

/// One of the three parts of a split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Train,
    Dev,
    Test,
}

impl Part {
    pub const ALL: [Part; 3] = [Part::Train, Part::Dev, Part::Test];

    pub fn name(self) -> &'static str {
        match self {
            Part::Train => "train",
            Part::Dev => "dev",
            Part::Test => "test",
        }
    }
}

/// A train/dev/test split of a file's records; this struct is exactly `split.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    pub seed: u64,
    pub fractions: SplitFractions,
    /// The CSV the split was made from, as it was named then (for people; not checked).
    pub source: String,
    /// How many records that CSV had; a file with another count is refused.
    pub num_records: usize,
    /// The label vocabulary, in label-index order; a file with other labels is refused.
    pub labels: Vec<String>,
    /// Sorted record indices of each part (see [`Example::record`]).
    pub train: Vec<usize>,
    pub dev: Vec<usize>,
    pub test: Vec<usize>,
}

impl Split {
    /// Splits every record of `set` by class. Per class the counts are cut by largest
    /// remainder, so each is within one record of `fraction * class size`; then a part with a
    /// positive fraction that got no record of a class takes one from the largest part, where
    /// the class has a record for each part. An empty part is an error only when the whole set
    /// is too small to fill it.
    pub fn stratified(
        set: &LabelledSet,
        fractions: SplitFractions,
        seed: u64,
    ) -> Result<Split, DataError> {
        let labels = set
            .label_indices()
            .filter(|_| !set.labels.is_empty())
            .ok_or_else(|| DataError::InvalidOption {
                option: "label_column",
                message: format!(
                    "{} was read without a label column; a stratified split needs labels",
                    set.path.display()
                ),
            })?;
        fractions
            .check()
            .map_err(|message| DataError::InvalidOption {
                option: "split fractions",
                message,
            })?;
        let [train, dev, test] = stratified_parts(&labels, set.labels.len(), fractions, seed)
            .map_err(|message| DataError::Split {
                path: set.path.clone(),
                message,
            })?;
        Ok(Split {
            seed,
            fractions,
            source: set.path.display().to_string(),
            num_records: set.len(),
            labels: set.labels.clone(),
            train,
            dev,
            test,
        })
    }

    pub fn indices(&self, part: Part) -> &[usize] {
        match part {
            Part::Train => &self.train,
            Part::Dev => &self.dev,
            Part::Test => &self.test,
        }
    }

    /// The examples of one part, in record order. `set` must be the set the split was checked
    /// against ([`Split::load`] or [`Split::check_matches`]); an index outside it is skipped.
    pub fn examples<'a>(
        &'a self,
        part: Part,
        set: &'a LabelledSet,
    ) -> impl Iterator<Item = &'a Example> + 'a {
        self.indices(part)
            .iter()
            .filter_map(|&i| set.examples.get(i))
    }

    /// Writes `split.json` (through a temporary file, so a crash leaves the old one or none).
    pub fn save(&self, path: &Path) -> Result<(), DataError> {
        let mut json = serde_json::to_string(self).map_err(|e| DataError::Split {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        json.push('\n');
        let tmp = temporary_sibling(path);
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, json.as_bytes())?;
            f.sync_all()
        };
        write().map_err(DataError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(DataError::io(path))
    }

    /// Reads a `split.json` and checks that it is a split at all: valid fractions, labels
    /// without repeats, indices below `num_records`, and no record in two places.
    pub fn read(path: &Path) -> Result<Split, DataError> {
        let bad = |message: String| DataError::Split {
            path: path.to_path_buf(),
            message,
        };
        let text = fs::read_to_string(path).map_err(DataError::io(path))?;
        let split: Split = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        split.fractions.check().map_err(bad)?;
        split.check_consistent().map_err(bad)?;
        Ok(split)
    }

    /// [`Split::read`], then [`Split::check_matches`] against `set`.
    pub fn load(path: &Path, set: &LabelledSet) -> Result<Split, DataError> {
        let split = Split::read(path)?;
        split.check_matches(path, set)?;
        Ok(split)
    }

    /// Refuses a split made for another file: a different record count or label vocabulary.
    /// `path` names the split file in the error.
    pub fn check_matches(&self, path: &Path, set: &LabelledSet) -> Result<(), DataError> {
        let bad = |message: String| DataError::Split {
            path: path.to_path_buf(),
            message,
        };
        if self.num_records != set.len() {
            return Err(bad(format!(
                "made for {} records of {}, but {} has {}",
                self.num_records,
                self.source,
                set.path.display(),
                set.len()
            )));
        }
        if set.label_column.is_some() && self.labels != set.labels {
            return Err(bad(format!(
                "made for labels {:?}, but {} has labels {:?}",
                self.labels,
                set.path.display(),
                set.labels
            )));
        }
        Ok(())
    }

    fn check_consistent(&self) -> Result<(), String> {
        if self.num_records == 0 {
            return Err("num_records is 0".to_owned());
        }
        for (i, label) in self.labels.iter().enumerate() {
            if self.labels[..i].contains(label) {
                return Err(format!("label {label:?} is listed twice"));
            }
        }
        // Sorting a copy finds repeats without an allocation sized by `num_records`, which
        // comes from the file and may be absurd.
        let mut all: Vec<(usize, Part)> = Part::ALL
            .iter()
            .flat_map(|&part| self.indices(part).iter().map(move |&i| (i, part)))
            .collect();
        if let Some(&(i, part)) = all.iter().find(|(i, _)| *i >= self.num_records) {
            return Err(format!(
                "{} index {i} is out of range (num_records is {})",
                part.name(),
                self.num_records
            ));
        }
        all.sort_unstable_by_key(|&(i, part)| (i, part as u8));
        if let Some(pair) = all.windows(2).find(|w| w[0].0 == w[1].0) {
            let (i, a, b) = (pair[0].0, pair[0].1.name(), pair[1].1.name());
            return Err(if a == b {
                format!("record {i} is listed twice in {a}")
            } else {
                format!("record {i} is in both {a} and {b}")
            });
        }
        Ok(())
    }
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The record indices of train, dev and test (each sorted) for records with label indices
/// `labels` (each below `num_labels`). The per-class rule is described at [`Split::stratified`].
pub fn stratified_parts(
    labels: &[usize],
    num_labels: usize,
    fractions: SplitFractions,
    seed: u64,
) -> Result<[Vec<usize>; 3], String> {
    fractions.check()?;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); num_labels];
    for (record, &label) in labels.iter().enumerate() {
        members
            .get_mut(label)
            .ok_or_else(|| format!("record {record} has label {label} of {num_labels}"))?
            .push(record);
    }
    let fractions = fractions.as_array();
    let mut counts: Vec<[usize; 3]> = members
        .iter()
        .map(|m| class_counts(m.len(), fractions))
        .collect();
    fill_empty_parts(&mut counts, fractions)?;

    let mut parts: [Vec<usize>; 3] = Default::default();
    for (class, (records, count)) in members.iter_mut().zip(&counts).enumerate() {
        shuffle(records, mix_seed(&[seed, SPLIT_STREAM, class as u64]));
        let mut rest = &records[..];
        for (part, &n) in parts.iter_mut().zip(count) {
            let (taken, left) = rest.split_at(n);
            part.extend_from_slice(taken);
            rest = left;
        }
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    Ok(parts)
}

/// How many of `n` records of one class go to each part: floors of the ideal counts, the
/// remainder to the largest fractional parts; then, where `n` allows, at least one record for
/// every part with a positive fraction.
fn class_counts(n: usize, fractions: [f64; 3]) -> [usize; 3] {
    let ideal = fractions.map(|f| f * n as f64);
    let mut counts = ideal.map(|x| (x.floor() as usize).min(n));
    let mut by_remainder = [0, 1, 2];
    // Stable: ties go to the earlier part (train, then dev, then test).
    by_remainder.sort_by(|&a, &b| {
        let (ra, rb) = (ideal[a] - ideal[a].floor(), ideal[b] - ideal[b].floor());
        rb.total_cmp(&ra)
    });
    let mut left = n.saturating_sub(counts.iter().sum());
    for &k in by_remainder.iter().cycle().take(3 * n.max(1)) {
        if left == 0 {
            break;
        }
        if fractions[k] > 0.0 {
            counts[k] += 1;
            left -= 1;
        }
    }
    let wanted = fractions.iter().filter(|&&f| f > 0.0).count();
    if n >= wanted {
        for k in 0..3 {
            if fractions[k] > 0.0 && counts[k] == 0 {
                let donor = (0..3).max_by_key(|&d| counts[d]).unwrap_or(0);
                counts[donor] -= 1;
                counts[k] += 1;
            }
        }
    }
    counts
}

/// Classes too small to give every part a record can leave a whole part empty; fill it with one
/// record moved from the part (and class) that has the most, or fail when no part can spare one.
fn fill_empty_parts(counts: &mut [[usize; 3]], fractions: [f64; 3]) -> Result<(), String> {
    for k in 0..3 {
        let total = |counts: &[[usize; 3]], p: usize| counts.iter().map(|c| c[p]).sum::<usize>();
        if fractions[k] == 0.0 || total(counts, k) > 0 {
            continue;
        }
        let donor = (0..3)
            .filter(|&d| d != k && total(counts, d) >= 2)
            .max_by_key(|&d| total(counts, d));
        let Some(donor) = donor else {
            let records: usize = counts.iter().flatten().sum();
            return Err(format!(
                "{records} records are too few for a non-empty {} part",
                Part::ALL[k].name()
            ));
        };
        // Ties go to the first class, so the choice does not depend on the iterator's rule.
        let class = (0..counts.len())
            .max_by_key(|&c| (counts[c][donor], std::cmp::Reverse(c)))
            .unwrap_or(0);
        counts[class][donor] -= 1;
        counts[class][k] += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: [f64; 3] = [0.8, 0.1, 0.1];

    #[test]
    fn class_counts_round_by_largest_remainder() {
        assert_eq!(class_counts(9178, DEFAULT), [7342, 918, 918]);
        assert_eq!(class_counts(3099, DEFAULT), [2479, 310, 310]);
        assert_eq!(class_counts(2363, DEFAULT), [1891, 236, 236]);
        assert_eq!(class_counts(10, DEFAULT), [8, 1, 1]);
        // 0.8*7 = 5.6, 0.7, 0.7: floors 5,0,0; the two left over go to dev and test.
        assert_eq!(class_counts(7, DEFAULT), [5, 1, 1]);
        assert_eq!(class_counts(0, DEFAULT), [0, 0, 0]);
        assert_eq!(class_counts(5, [1.0, 0.0, 0.0]), [5, 0, 0]);
    }

    #[test]
    fn small_classes_still_reach_every_part() {
        // 3 records: ideal 2.4 / 0.3 / 0.3 would give dev and test nothing.
        assert_eq!(class_counts(3, DEFAULT), [1, 1, 1]);
        assert_eq!(class_counts(4, DEFAULT), [2, 1, 1]);
        // Too small for three parts: left to `fill_empty_parts`.
        assert_eq!(class_counts(2, DEFAULT), [2, 0, 0]);
    }

    #[test]
    fn empty_parts_are_filled_across_classes_or_refused() {
        let mut counts = vec![[2, 0, 0], [1, 0, 0]];
        fill_empty_parts(&mut counts, DEFAULT).unwrap();
        assert_eq!(counts, vec![[0, 1, 1], [1, 0, 0]]);
        let mut two = vec![[1, 0, 0], [1, 0, 0]];
        let err = fill_empty_parts(&mut two, DEFAULT).unwrap_err();
        assert!(err.contains("too few"), "{err}");
    }
}
