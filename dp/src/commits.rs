//! The steps a rank applied that it does not know to be committed, and the control words the
//! ranks exchange in each step's all-reduce instead of asking the coordinator.
//!
//! Rank 0 commits them (`CommitSteps`) every `cluster.commit_every` steps or
//! `commit_interval_s` seconds; every rank keeps its own copy, trimmed as rank 0 reports what
//! the coordinator acknowledged, and offers what is left at rendezvous, so that steps a group
//! trained are committed once even when rank 0 or the coordinator dies before its commit.

use super::rank0::StepRecord;
use ferry_rpc::proto::{self, commit_steps_reply::Directive};
use ferry_spec::schedule::DigestLimbs;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// A step this rank applied: what rank 0 commits of it, and what rank 0 logs of it.
pub(super) struct Applied {
    pub(super) trained: proto::TrainedStep,
    pub(super) record: StepRecord,
    at: Instant,
}

#[derive(Default)]
pub(super) struct Uncommitted {
    steps: VecDeque<Applied>,
}

impl Uncommitted {
    pub(super) fn push(&mut self, trained: proto::TrainedStep, record: StepRecord) {
        self.steps.push_back(Applied {
            trained,
            record,
            at: Instant::now(),
        });
    }

    pub(super) fn len(&self) -> usize {
        self.steps.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// What a commit or a rendezvous offers: every step held, in order.
    pub(super) fn offer(&self) -> Vec<proto::TrainedStep> {
        self.steps.iter().map(|a| a.trained.clone()).collect()
    }

    /// Whether rank 0's commit is due: `every` steps held, or the oldest `interval` old.
    pub(super) fn due(&self, every: u64, interval: Duration) -> bool {
        let n = self.steps.len() as u64;
        n >= every.max(1)
            || (n > 0
                && !interval.is_zero()
                && self
                    .steps
                    .front()
                    .is_some_and(|a| a.at.elapsed() >= interval))
    }

    /// How long the oldest step has waited for its commit.
    pub(super) fn oldest_age(&self) -> Duration {
        self.steps
            .front()
            .map_or(Duration::ZERO, |a| a.at.elapsed())
    }

    /// Removes and returns the steps before `committed` (the coordinator's count).
    pub(super) fn take_committed(&mut self, committed: u64) -> Vec<Applied> {
        let n = self
            .steps
            .iter()
            .take_while(|a| a.trained.step < committed)
            .count();
        self.steps.drain(..n).collect()
    }

    /// The newest step held, to add the commit's wait to its wall time.
    pub(super) fn newest_mut(&mut self) -> Option<&mut Applied> {
        self.steps.back_mut()
    }

    pub(super) fn clear(&mut self) {
        self.steps.clear();
    }
}

/// The scalars a rank adds to a step's all-reduce after its loss: its sequences digest as
/// limbs (summed: the group digest) and, from rank 0 only, its directive and how many steps
/// before this one are not yet committed (summed with zeros: rank 0's values).
pub(super) fn control_scalars(digest: u64, rank0: Option<(Directive, u64)>) -> Vec<f64> {
    let mut v = DigestLimbs::split(digest).to_vec();
    let (directive, behind) = rank0.unwrap_or((Directive::Unspecified, 0));
    v.push(f64::from(directive as i32));
    v.push(behind as f64);
    v
}

/// What the reduced scalars after the loss say: the group digest, rank 0's directive, and the
/// number of steps before this one that rank 0 has not seen committed.
pub(super) fn read_control(reduced: &[f64]) -> (u64, Directive, u64) {
    let limbs = &reduced[..DigestLimbs::COUNT.min(reduced.len())];
    let at = |i: usize| reduced.get(DigestLimbs::COUNT + i).copied().unwrap_or(0.0);
    let directive = Directive::try_from(at(0).round() as i32).unwrap_or(Directive::Unspecified);
    (
        DigestLimbs::join(limbs),
        directive,
        at(1).round().max(0.0) as u64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_scalars_summed_over_ranks_give_the_group_digest_and_rank_0s_word() {
        let digests = [0xdead_beef_0123_4567u64, u64::MAX, 7];
        let mut sum = vec![0.0f64; DigestLimbs::COUNT + 2];
        for (rank, d) in digests.iter().enumerate() {
            let rank0 = (rank == 0).then_some((Directive::Regroup, 3));
            for (s, v) in sum.iter_mut().zip(control_scalars(*d, rank0)) {
                *s = (*s as f32 + v as f32) as f64;
            }
        }
        let group = digests.iter().fold(0u64, |a, d| a.wrapping_add(*d));
        assert_eq!(read_control(&sum), (group, Directive::Regroup, 3));
    }
}
