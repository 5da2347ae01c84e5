//! Fine-tuning recipes as pure functions of the step, so that the training loop only multiplies
//! and a test can check them against the papers' formulas:
//!
//! - warmup + linear decay (BERT, Devlin et al. 2019; as `transformers`'
//!   `get_linear_schedule_with_warmup`),
//! - slanted triangular learning rates, discriminative learning rates and gradual unfreezing
//!   (ULMFiT, Howard & Ruder 2018, sections 3.2 and 3.3),
//! - early stopping on a dev metric.
//!
//! Layer groups are numbered from the bottom: group 0 is the embeddings, the last group the top
//! (the classifier head).

use serde::{Deserialize, Serialize};

use crate::DataError;

/// BERT's schedule, as a multiplier of the peak learning rate at optimizer step `step`
/// (0-based): `step / warmup_steps` while warming up, then linear decay to 0 at `total_steps`.
/// Step 0 of a warmup gets 0, as in `transformers`; past `total_steps` it stays 0.
pub fn warmup_linear_decay(step: u64, warmup_steps: u64, total_steps: u64) -> f64 {
    if step < warmup_steps {
        return step as f64 / warmup_steps as f64;
    }
    let decay_steps = total_steps.saturating_sub(warmup_steps);
    if decay_steps == 0 {
        return 0.0;
    }
    total_steps.saturating_sub(step) as f64 / decay_steps as f64
}

/// Slanted triangular learning rates (ULMFiT eq. 3): a short linear rise to `lr_max` over the
/// first `cut_frac` of the iterations, then a long linear decay, from and to `lr_max / ratio`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlantedTriangular {
    /// The share of iterations spent rising.
    pub cut_frac: f64,
    /// How much smaller the lowest learning rate is than the peak.
    pub ratio: f64,
}

impl Default for SlantedTriangular {
    /// The paper's values: `cut_frac` 0.1, `ratio` 32.
    fn default() -> Self {
        SlantedTriangular {
            cut_frac: 0.1,
            ratio: 32.0,
        }
    }
}

impl SlantedTriangular {
    pub fn new(cut_frac: f64, ratio: f64) -> Result<SlantedTriangular, DataError> {
        if !(cut_frac > 0.0 && cut_frac < 1.0) {
            return Err(DataError::InvalidOption {
                option: "cut_frac",
                message: format!("must lie strictly between 0 and 1, got {cut_frac}"),
            });
        }
        if !(ratio.is_finite() && ratio >= 1.0) {
            return Err(DataError::InvalidOption {
                option: "ratio",
                message: format!("must be a finite number of at least 1, got {ratio}"),
            });
        }
        Ok(SlantedTriangular { cut_frac, ratio })
    }

    /// The iteration where the rise ends: `floor(T * cut_frac)`, at least 1 so that a short
    /// run (where the paper's formula would divide by 0) still starts low and peaks at t = 1.
    pub fn cut(&self, total_steps: u64) -> u64 {
        ((total_steps as f64 * self.cut_frac).floor() as u64).max(1)
    }

    /// The paper's `p`: the position on the triangle, 0 at both ends and 1 at the peak.
    /// Clamped to [0, 1]: `floor` makes the decay reach 0 slightly before `T` for some `T`, and
    /// past the end the rate stays at its floor rather than going negative.
    pub fn position(&self, t: u64, total_steps: u64) -> f64 {
        let cut = self.cut(total_steps) as f64;
        let t = t as f64;
        let p = if t < cut {
            t / cut
        } else {
            1.0 - (t - cut) / (cut * (1.0 / self.cut_frac - 1.0))
        };
        p.clamp(0.0, 1.0)
    }

    /// The multiplier of `lr_max` at iteration `t` (0-based) of `total_steps`:
    /// `(1 + p * (ratio - 1)) / ratio`.
    pub fn multiplier(&self, t: u64, total_steps: u64) -> f64 {
        (1.0 + self.position(t, total_steps) * (self.ratio - 1.0)) / self.ratio
    }

    pub fn lr(&self, lr_max: f64, t: u64, total_steps: u64) -> f64 {
        lr_max * self.multiplier(t, total_steps)
    }
}

/// ULMFiT's factor between the learning rates of adjacent layer groups.
pub const ULMFIT_LAYER_FACTOR: f64 = 2.6;

/// Discriminative fine-tuning (ULMFiT eq. 2): the learning rate of each of `num_groups` groups,
/// bottom first, with the top group at `top_lr` and `eta_{l-1} = eta_l / factor` below it.
pub fn discriminative_lrs(top_lr: f64, num_groups: usize, factor: f64) -> Vec<f64> {
    let mut lrs = vec![0.0; num_groups];
    let mut lr = top_lr;
    for slot in lrs.iter_mut().rev() {
        *slot = lr;
        lr /= factor;
    }
    lrs
}

/// Gradual unfreezing (ULMFiT section 3.3): at stage 0 only the top group trains, and each
/// later stage unfreezes the next group down, until all train from stage `num_groups - 1` on.
/// `result[g]` says whether group `g` (bottom first) trains.
pub fn trainable_groups(num_groups: usize, stage: usize) -> Vec<bool> {
    let lowest = lowest_trainable_group(num_groups, stage);
    (0..num_groups).map(|g| g >= lowest).collect()
}

/// The lowest group that trains at `stage`; groups from it to the top train.
pub fn lowest_trainable_group(num_groups: usize, stage: usize) -> usize {
    num_groups.saturating_sub(stage.saturating_add(1))
}

/// The unfreezing stage at `epoch` when each stage lasts `epochs_per_stage` epochs (ULMFiT: 1).
/// The same works with steps in place of epochs.
pub fn unfreeze_stage(epoch: u64, epochs_per_stage: u64) -> usize {
    usize::try_from(epoch / epochs_per_stage.max(1)).unwrap_or(usize::MAX)
}

/// What an evaluation meant for early stopping.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// A new best: keep this model.
    Improved,
    /// No better than the best; `evals_left` more such evaluations are tolerated.
    NoImprovement { evals_left: usize },
    /// `patience` evaluations in a row without improvement: stop training.
    Stop,
}

/// Early stopping on a dev metric where higher is better (accuracy, macro-F1). Serialisable, so
/// that a resumed run keeps counting where it left off.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStopping {
    /// Evaluations without improvement that are tolerated before stopping.
    pub patience: usize,
    /// How much a value must beat the best by to count as an improvement.
    pub min_delta: f64,
    /// The best `(step, value)` so far.
    pub best: Option<(u64, f64)>,
    /// Evaluations since the best one.
    pub evals_since_best: usize,
}

impl EarlyStopping {
    pub fn new(patience: usize, min_delta: f64) -> EarlyStopping {
        EarlyStopping {
            patience,
            min_delta: if min_delta.is_finite() {
                min_delta.max(0.0)
            } else {
                0.0
            },
            best: None,
            evals_since_best: 0,
        }
    }

    /// Records the metric `value` of the evaluation at `step`. A NaN never improves.
    pub fn observe(&mut self, step: u64, value: f64) -> Verdict {
        let improved = !value.is_nan()
            && match self.best {
                None => true,
                Some((_, best)) => value > best + self.min_delta,
            };
        if improved {
            self.best = Some((step, value));
            self.evals_since_best = 0;
            return Verdict::Improved;
        }
        self.evals_since_best += 1;
        if self.should_stop() {
            Verdict::Stop
        } else {
            Verdict::NoImprovement {
                evals_left: self.patience - self.evals_since_best,
            }
        }
    }

    pub fn should_stop(&self) -> bool {
        self.evals_since_best > 0 && self.evals_since_best >= self.patience
    }

    pub fn best(&self) -> Option<(u64, f64)> {
        self.best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn warmup_rises_then_decays_linearly_to_zero() {
        // 10 warmup steps of 110.
        close(warmup_linear_decay(0, 10, 110), 0.0);
        close(warmup_linear_decay(5, 10, 110), 0.5);
        close(warmup_linear_decay(10, 10, 110), 1.0);
        close(warmup_linear_decay(60, 10, 110), 0.5);
        close(warmup_linear_decay(109, 10, 110), 0.01);
        close(warmup_linear_decay(110, 10, 110), 0.0);
        close(warmup_linear_decay(500, 10, 110), 0.0);
        // No warmup: full rate at step 0.
        close(warmup_linear_decay(0, 0, 100), 1.0);
        close(warmup_linear_decay(25, 0, 100), 0.75);
        // Degenerate: everything is warmup.
        close(warmup_linear_decay(10, 10, 10), 0.0);
    }

    #[test]
    fn stlr_matches_the_paper_at_its_landmarks() {
        let stlr = SlantedTriangular::default();
        let (lr_max, total) = (0.01, 1000);
        assert_eq!(stlr.cut(total), 100);
        close(stlr.lr(lr_max, 0, total), lr_max / 32.0);
        close(stlr.lr(lr_max, 100, total), lr_max);
        // Half-way up: p = 1/2, lr = lr_max * (1 + 31/2) / 32.
        close(stlr.lr(lr_max, 50, total), lr_max * 16.5 / 32.0);
        // Half-way down: p = 1 - 450 / (100 * 9) = 1/2.
        close(stlr.lr(lr_max, 550, total), lr_max * 16.5 / 32.0);
        close(stlr.lr(lr_max, 1000, total), lr_max / 32.0);
        // One step after the peak: p = 1 - 1/900.
        let p = 1.0 - 1.0 / 900.0;
        close(
            stlr.lr(lr_max, 101, total),
            lr_max * (1.0 + p * 31.0) / 32.0,
        );
        // The peak is the maximum.
        let peak = (0..=total)
            .map(|t| stlr.lr(lr_max, t, total))
            .fold(0.0, f64::max);
        close(peak, lr_max);
    }

    #[test]
    fn stlr_other_parameters_and_short_runs() {
        let stlr = SlantedTriangular::new(0.25, 4.0).unwrap();
        // T = 40: cut = 10; t = 5 gives p = 0.5, lr = (1 + 0.5 * 3) / 4 = 0.625.
        close(stlr.multiplier(5, 40), 0.625);
        close(stlr.multiplier(10, 40), 1.0);
        // Decay: 1 - (t - 10) / (10 * 3), so t = 25 gives p = 0.5.
        close(stlr.multiplier(25, 40), 0.625);
        // T = 3 with cut_frac 0.1: floor gives 0, so cut is 1.
        let default = SlantedTriangular::default();
        assert_eq!(default.cut(3), 1);
        close(default.multiplier(0, 3), 1.0 / 32.0);
        close(default.multiplier(1, 3), 1.0);
        // T = 105: cut 10; by t = 104 the paper's p is negative; clamped at the floor.
        close(default.multiplier(104, 105), 1.0 / 32.0);
        assert!((0..200).all(|t| default.multiplier(t, 105) >= 1.0 / 32.0));
    }

    #[test]
    fn stlr_refuses_bad_parameters() {
        for (cut_frac, ratio) in [
            (0.0, 32.0),
            (1.0, 32.0),
            (f64::NAN, 32.0),
            (0.1, 0.5),
            (0.1, f64::INFINITY),
        ] {
            let err = SlantedTriangular::new(cut_frac, ratio).unwrap_err();
            assert!(err.to_string().starts_with("invalid option"), "{err}");
        }
    }

    #[test]
    fn discriminative_rates_divide_by_the_factor_per_group() {
        let lrs = discriminative_lrs(0.01, 4, ULMFIT_LAYER_FACTOR);
        assert_eq!(lrs.len(), 4);
        close(lrs[3], 0.01);
        close(lrs[2], 0.01 / 2.6);
        close(lrs[1], 0.01 / 2.6 / 2.6);
        close(lrs[0], 0.01 / 2.6f64.powi(3));
        assert!(discriminative_lrs(0.01, 0, 2.6).is_empty());
        assert_eq!(discriminative_lrs(0.5, 3, 1.0), vec![0.5, 0.5, 0.5]);
    }

    #[test]
    fn unfreezing_starts_at_the_top_and_adds_one_group_per_stage() {
        assert_eq!(trainable_groups(4, 0), [false, false, false, true]);
        assert_eq!(trainable_groups(4, 1), [false, false, true, true]);
        assert_eq!(trainable_groups(4, 3), [true, true, true, true]);
        assert_eq!(trainable_groups(4, 99), [true, true, true, true]);
        assert_eq!(trainable_groups(4, usize::MAX), [true; 4]);
        assert!(trainable_groups(0, 0).is_empty());
        assert_eq!(lowest_trainable_group(4, 1), 2);
        assert_eq!(unfreeze_stage(0, 1), 0);
        assert_eq!(unfreeze_stage(5, 2), 2);
        assert_eq!(unfreeze_stage(5, 0), 5);
    }

    #[test]
    fn early_stopping_waits_patience_evaluations() {
        let mut stop = EarlyStopping::new(2, 0.001);
        assert_eq!(stop.observe(100, 0.70), Verdict::Improved);
        assert_eq!(stop.observe(200, 0.75), Verdict::Improved);
        // Within min_delta: not an improvement.
        assert_eq!(
            stop.observe(300, 0.7505),
            Verdict::NoImprovement { evals_left: 1 }
        );
        assert_eq!(stop.observe(400, 0.80), Verdict::Improved);
        assert_eq!(
            stop.observe(500, f64::NAN),
            Verdict::NoImprovement { evals_left: 1 }
        );
        assert_eq!(stop.observe(600, 0.79), Verdict::Stop);
        assert!(stop.should_stop());
        assert_eq!(stop.best(), Some((400, 0.80)));
        assert_eq!(stop.observe(700, 0.1), Verdict::Stop);
    }

    #[test]
    fn zero_patience_stops_at_the_first_setback_and_state_round_trips() {
        let mut stop = EarlyStopping::new(0, 0.0);
        assert!(!stop.should_stop());
        assert_eq!(stop.observe(1, 0.5), Verdict::Improved);
        assert!(!stop.should_stop());
        assert_eq!(stop.observe(2, 0.5), Verdict::Stop);
        let json = serde_json::to_string(&stop).unwrap();
        assert_eq!(serde_json::from_str::<EarlyStopping>(&json).unwrap(), stop);
    }
}
