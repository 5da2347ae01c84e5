//! Classification metrics from gold and predicted label indices: the confusion matrix, accuracy,
//! macro-F1 and per-class precision, recall, F1 and support, plus a terminal table of them.
//!
//! Precision, recall and F1 are 0 where their denominator is 0 (a class never predicted, never
//! present, or both); this is scikit-learn's `zero_division=0`. Macro-F1 is the unweighted mean
//! of the per-class F1 over every label given, present in the data or not, as scikit-learn's
//! `f1_score(average="macro", labels=all)`.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Why predictions could not be scored.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum MetricsError {
    #[error("{gold} gold labels but {predicted} predictions")]
    LengthMismatch { gold: usize, predicted: usize },
    #[error(
        "{which} label index {index} at position {position} is outside the {num_labels} labels"
    )]
    LabelOutOfRange {
        which: &'static str,
        index: usize,
        position: usize,
        num_labels: usize,
    },
    #[error("no labels to score against")]
    NoLabels,
}

/// Counts of (gold, predicted) pairs: `counts[gold][predicted]`. It can be filled a batch at a
/// time during evaluation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfusionMatrix {
    counts: Vec<Vec<u64>>,
}

impl ConfusionMatrix {
    pub fn new(num_labels: usize) -> ConfusionMatrix {
        ConfusionMatrix {
            counts: vec![vec![0; num_labels]; num_labels],
        }
    }

    pub fn num_labels(&self) -> usize {
        self.counts.len()
    }

    /// Rows gold, columns predicted.
    pub fn counts(&self) -> &[Vec<u64>] {
        &self.counts
    }

    /// Adds pairs of gold and predicted label indices; on an error nothing is added.
    pub fn add(&mut self, gold: &[usize], predicted: &[usize]) -> Result<(), MetricsError> {
        if gold.len() != predicted.len() {
            return Err(MetricsError::LengthMismatch {
                gold: gold.len(),
                predicted: predicted.len(),
            });
        }
        let n = self.num_labels();
        for (which, labels) in [("gold", gold), ("predicted", predicted)] {
            if let Some(position) = labels.iter().position(|&l| l >= n) {
                return Err(MetricsError::LabelOutOfRange {
                    which,
                    index: labels[position],
                    position,
                    num_labels: n,
                });
            }
        }
        for (&g, &p) in gold.iter().zip(predicted) {
            self.counts[g][p] += 1;
        }
        Ok(())
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().flatten().sum()
    }

    /// The diagonal's sum: correct predictions.
    pub fn trace(&self) -> u64 {
        (0..self.num_labels()).map(|i| self.counts[i][i]).sum()
    }
}

/// Precision, recall and F1 of one class against the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Gold examples of this class (its confusion-matrix row sum).
    pub support: u64,
    /// Examples predicted as this class (its column sum).
    pub predicted: u64,
}

/// Every number of a classification report; serialises as the report's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub labels: Vec<String>,
    /// Rows gold, columns predicted, in `labels` order.
    pub confusion: Vec<Vec<u64>>,
    pub total: u64,
    pub correct: u64,
    /// `correct / total`, 0 for no examples.
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassMetrics>,
}

/// `num / den`, or 0 where `den` is 0.
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

impl Metrics {
    /// Scores `predicted` against `gold`, both label indices into `labels`.
    pub fn from_predictions(
        gold: &[usize],
        predicted: &[usize],
        labels: &[String],
    ) -> Result<Metrics, MetricsError> {
        let mut confusion = ConfusionMatrix::new(labels.len());
        confusion.add(gold, predicted)?;
        Metrics::from_confusion(&confusion, labels)
    }

    pub fn from_confusion(
        confusion: &ConfusionMatrix,
        labels: &[String],
    ) -> Result<Metrics, MetricsError> {
        if labels.is_empty() {
            return Err(MetricsError::NoLabels);
        }
        if confusion.num_labels() != labels.len() {
            return Err(MetricsError::LengthMismatch {
                gold: confusion.num_labels(),
                predicted: labels.len(),
            });
        }
        let counts = confusion.counts();
        let per_class: Vec<ClassMetrics> = labels
            .iter()
            .enumerate()
            .map(|(k, label)| {
                let tp = counts[k][k] as f64;
                let support: u64 = counts[k].iter().sum();
                let predicted: u64 = counts.iter().map(|row| row[k]).sum();
                let precision = ratio(tp, predicted as f64);
                let recall = ratio(tp, support as f64);
                ClassMetrics {
                    label: label.clone(),
                    precision,
                    recall,
                    f1: ratio(2.0 * precision * recall, precision + recall),
                    support,
                    predicted,
                }
            })
            .collect();
        let (total, correct) = (confusion.total(), confusion.trace());
        Ok(Metrics {
            labels: labels.to_vec(),
            confusion: counts.to_vec(),
            total,
            correct,
            accuracy: ratio(correct as f64, total as f64),
            macro_f1: per_class.iter().map(|c| c.f1).sum::<f64>() / per_class.len() as f64,
            per_class,
        })
    }

    /// A plain-text report: one row per class, accuracy and macro-F1, then the confusion matrix.
    pub fn render_table(&self) -> String {
        let width = |s: &str| s.chars().count();
        let name_w = self
            .labels
            .iter()
            .map(|l| width(l))
            .chain([width("macro-F1"), width("gold \\ predicted")])
            .max()
            .unwrap_or(0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9}  {:>6}  {:>6}  {:>7}",
            "label", "precision", "recall", "f1", "support"
        );
        for c in &self.per_class {
            let _ = writeln!(
                out,
                "{}  {:>9.3}  {:>6.3}  {:>6.3}  {:>7}",
                pad(&c.label, name_w),
                c.precision,
                c.recall,
                c.f1,
                c.support
            );
        }
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9.3}  {:>6}  {:>6}  {:>7}",
            "accuracy", self.accuracy, "", "", self.total
        );
        let _ = writeln!(
            out,
            "{:<name_w$}  {:>9}  {:>6}  {:>6.3}",
            "macro-F1", "", "", self.macro_f1
        );
        out.push('\n');
        let cell_w = self
            .labels
            .iter()
            .map(|l| width(l))
            .chain(self.confusion.iter().flatten().map(|n| n.to_string().len()))
            .max()
            .unwrap_or(1);
        let _ = write!(out, "{}", pad("gold \\ predicted", name_w));
        for label in &self.labels {
            let _ = write!(out, "  {}", pad_left(label, cell_w));
        }
        out.push('\n');
        for (label, row) in self.labels.iter().zip(&self.confusion) {
            let _ = write!(out, "{}", pad(label, name_w));
            for n in row {
                let _ = write!(out, "  {n:>cell_w$}");
            }
            out.push('\n');
        }
        out
    }
}

/// Left-aligned in `width` characters (`format!`'s padding counts chars too, but this keeps the
/// intent next to [`pad_left`]).
fn pad(s: &str, width: usize) -> String {
    format!("{s:<width$}")
}

fn pad_left(s: &str, width: usize) -> String {
    format!("{s:>width$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    /// A 3-class example worked by hand:
    ///
    /// ```text
    ///          pred a  b  c
    /// gold a        3  1  0    support 4
    ///      b        1  2  1    support 4
    ///      c        0  0  2    support 2
    /// ```
    /// a: P 3/4, R 3/4, F1 3/4. b: P 2/3, R 2/4, F1 2*(2/3*1/2)/(2/3+1/2) = 4/7.
    /// c: P 2/3, R 1, F1 2*(2/3)/(5/3) = 4/5. Accuracy 7/10; macro-F1 (3/4 + 4/7 + 4/5)/3.
    #[test]
    fn hand_computed_three_classes() {
        let gold = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2];
        let pred = [0, 0, 0, 1, 0, 1, 1, 2, 2, 2];
        let m = Metrics::from_predictions(&gold, &pred, &labels(&["a", "b", "c"])).unwrap();
        assert_eq!(
            m.confusion,
            vec![vec![3, 1, 0], vec![1, 2, 1], vec![0, 0, 2]]
        );
        assert_eq!((m.total, m.correct), (10, 7));
        let close = |x: f64, y: f64| assert!((x - y).abs() < 1e-12, "{x} != {y}");
        close(m.accuracy, 0.7);
        let expected = [
            (0.75, 0.75, 0.75, 4, 4),
            (2.0 / 3.0, 0.5, 4.0 / 7.0, 4, 3),
            (2.0 / 3.0, 1.0, 0.8, 2, 3),
        ];
        for (c, (p, r, f1, support, predicted)) in m.per_class.iter().zip(expected) {
            close(c.precision, p);
            close(c.recall, r);
            close(c.f1, f1);
            assert_eq!(
                (c.support, c.predicted),
                (support, predicted),
                "{}",
                c.label
            );
        }
        close(m.macro_f1, (0.75 + 4.0 / 7.0 + 0.8) / 3.0);
    }

    #[test]
    fn never_predicted_and_absent_classes_score_zero() {
        // "c" is never gold nor predicted; "b" is gold once but never predicted.
        let m =
            Metrics::from_predictions(&[0, 0, 1], &[0, 0, 0], &labels(&["a", "b", "c"])).unwrap();
        let b = &m.per_class[1];
        assert_eq!((b.precision, b.recall, b.f1), (0.0, 0.0, 0.0));
        let c = &m.per_class[2];
        assert_eq!((c.precision, c.recall, c.f1, c.support), (0.0, 0.0, 0.0, 0));
        // a: P 2/3, R 1, F1 0.8; macro over all three labels.
        assert!((m.macro_f1 - 0.8 / 3.0).abs() < 1e-12, "{}", m.macro_f1);
        assert!(m.per_class.iter().all(|c| c.f1.is_finite()));
    }

    #[test]
    fn accuracy_is_trace_over_sum_for_many_random_matrices() {
        let mut state = 42u64;
        for round in 0..200 {
            let k = 1 + round % 6;
            let n = (ferry_spec::sampler::splitmix64(&mut state) % 300) as usize;
            let mut draw = || (ferry_spec::sampler::splitmix64(&mut state) % k as u64) as usize;
            let gold: Vec<usize> = (0..n).map(|_| draw()).collect();
            // Biased toward correct answers, so that the trace is not always small.
            let pred: Vec<usize> = gold
                .iter()
                .map(|&g| if draw() == 0 { g } else { draw() })
                .collect();
            let names: Vec<String> = (0..k).map(|i| format!("l{i}")).collect();
            let m = Metrics::from_predictions(&gold, &pred, &names).unwrap();
            let trace: u64 = (0..k).map(|i| m.confusion[i][i]).sum();
            let sum: u64 = m.confusion.iter().flatten().sum();
            let agree = gold.iter().zip(&pred).filter(|(g, p)| g == p).count();
            assert_eq!(sum, n as u64);
            assert_eq!(trace, agree as u64);
            let accuracy = if sum == 0 {
                0.0
            } else {
                trace as f64 / sum as f64
            };
            assert_eq!(m.accuracy, accuracy);
            let support: Vec<u64> = m.per_class.iter().map(|c| c.support).collect();
            let rows: Vec<u64> = m.confusion.iter().map(|r| r.iter().sum()).collect();
            assert_eq!(support, rows);
        }
    }

    #[test]
    fn bad_inputs_are_errors_and_add_nothing() {
        let names = labels(&["a", "b"]);
        assert_eq!(
            Metrics::from_predictions(&[0, 1], &[0], &names).unwrap_err(),
            MetricsError::LengthMismatch {
                gold: 2,
                predicted: 1
            }
        );
        let mut cm = ConfusionMatrix::new(2);
        let err = cm.add(&[0, 1, 0], &[0, 2, 1]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "predicted label index 2 at position 1 is outside the 2 labels"
        );
        assert_eq!(cm.total(), 0);
        assert_eq!(
            Metrics::from_predictions(&[], &[], &[]).unwrap_err(),
            MetricsError::NoLabels
        );
    }

    #[test]
    fn table_lists_every_class_and_the_matrix() {
        let m = Metrics::from_predictions(
            &[0, 0, 1, 2, 2],
            &[0, 1, 1, 2, 0],
            &labels(&["negative", "neutral", "positive"]),
        )
        .unwrap();
        let table = m.render_table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("label"), "{table}");
        assert!(
            lines[1].starts_with("negative") && lines[1].contains("0.500"),
            "{table}"
        );
        assert!(
            lines[4].starts_with("accuracy") && lines[4].contains("0.600"),
            "{table}"
        );
        assert!(lines[5].starts_with("macro-F1"), "{table}");
        // The matrix: header, then one row per gold label with its counts.
        let matrix = &lines[7..];
        assert_eq!(matrix.len(), 4, "{table}");
        let counts: Vec<Vec<u64>> = matrix[1..]
            .iter()
            .map(|l| {
                l.split_whitespace()
                    .skip(1)
                    .map(|n| n.parse().unwrap())
                    .collect()
            })
            .collect();
        assert_eq!(counts, m.confusion);
    }

    #[test]
    fn metrics_round_trip_through_json() {
        let m = Metrics::from_predictions(&[0, 1, 1], &[0, 1, 0], &labels(&["x", "y"])).unwrap();
        let json = serde_json::to_string(&m).unwrap();
        assert!(json.contains("\"macro_f1\""), "{json}");
        assert_eq!(serde_json::from_str::<Metrics>(&json).unwrap(), m);
    }
}
