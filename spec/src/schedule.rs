//! The step schedule: what rank `r` of a group of `W` trains at step `s`, derived the same way
//! by every rank and by the coordinator from the job seed, the corpus size and the batch
//! shape. Nothing of it travels over the network: the coordinator hands out a group once
//! (generation, members in rank order, start step) and each rank plans its own steps.
//!
//! Step `s` trains stream positions `s*G .. (s+1)*G` of the seeded endless permutation
//! ([`SampleOrder`]); rank `r` of `W` gets a contiguous run of whole micro-batches of it
//! ([`rank_micro_batches`]), so a step is covered exactly once whatever the group's size.
//!
//! A step's *group digest* is the wrapping sum of every rank's [`sequences_digest`]: the
//! ranks sum it in the step's all-reduce (as [`DigestLimbs`], exact in float32) and rank 0
//! sends it with the commit, where the coordinator checks it against the same schedule.

use crate::sampler::{rank_micro_batches, sequences_digest, SampleOrder};

/// One rank's part of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepPlan {
    pub step: u64,
    pub rank: u64,
    pub world: u64,
    /// This rank's sequences, in order.
    pub sequence_ids: Vec<u64>,
    /// Index (within the step) of this rank's first micro-batch: it seeds dropout.
    pub first_micro_batch: u64,
    /// Position of this rank's first sequence in the endless sample stream (epoch * N + i).
    pub stream_start: u64,
}

impl StepPlan {
    pub fn digest(&self) -> u64 {
        sequences_digest(self.sequence_ids.iter().copied())
    }
}

/// The seeded sample order cut into steps and rank slices.
pub struct StepSchedule {
    order: SampleOrder,
    global_batch: u64,
    micro_batch: u64,
}

impl StepSchedule {
    /// `global_batch` must be a positive multiple of `micro_batch` (the job spec's rule).
    pub fn new(seed: u64, num_sequences: u64, global_batch: u64, micro_batch: u64) -> Self {
        assert!(
            micro_batch > 0 && global_batch >= micro_batch && global_batch % micro_batch == 0,
            "global batch {global_batch} is not a multiple of micro batch {micro_batch}"
        );
        StepSchedule {
            order: SampleOrder::new(seed, num_sequences),
            global_batch,
            micro_batch,
        }
    }

    pub fn for_job(spec: &crate::job::JobSpec, num_sequences: u64) -> Self {
        StepSchedule::new(
            spec.job.seed,
            num_sequences,
            spec.batch.global,
            spec.batch.micro,
        )
    }

    pub fn num_sequences(&self) -> u64 {
        self.order.num_sequences()
    }

    /// Stream positions `[start, start + count)` of rank `rank` of `world` at `step`, and the
    /// index of its first micro-batch.
    pub fn slice(&self, step: u64, rank: u64, world: u64) -> (u64, u64, u64) {
        let micro_batches = self.global_batch / self.micro_batch;
        let (first_micro, micro_count) = rank_micro_batches(micro_batches, world, rank);
        let start = step * self.global_batch + first_micro * self.micro_batch;
        (start, micro_count * self.micro_batch, first_micro)
    }

    pub fn plan(&mut self, step: u64, rank: u64, world: u64) -> StepPlan {
        let (stream_start, count, first_micro_batch) = self.slice(step, rank, world);
        let sequence_ids = (stream_start..stream_start + count)
            .map(|p| self.order.at(p).1)
            .collect();
        StepPlan {
            step,
            rank,
            world,
            sequence_ids,
            first_micro_batch,
            stream_start,
        }
    }

    /// The sequences digest of rank `rank`'s slice of `step`.
    pub fn rank_digest(&mut self, step: u64, rank: u64, world: u64) -> u64 {
        let (start, count, _) = self.slice(step, rank, world);
        sequences_digest((start..start + count).map(|p| self.order.at(p).1))
    }

    /// What a group of `world` ranks that trained `step` sums in its all-reduce.
    pub fn group_digest(&mut self, step: u64, world: u64) -> u64 {
        (0..world).fold(0u64, |sum, rank| {
            sum.wrapping_add(self.rank_digest(step, rank, world))
        })
    }
}

/// A 64-bit digest as sixteen 4-bit limbs, each carried as a float32 scalar of the step's
/// all-reduce (64 bytes a step). A sum of up to [`DigestLimbs::MAX_RANKS`] limbs stays below
/// 2^24, exact in float32, so the reduced limbs give back the exact wrapping sum of every
/// rank's digest.
pub struct DigestLimbs;

impl DigestLimbs {
    pub const COUNT: usize = 16;
    /// 15 * MAX_RANKS < 2^24: over a million ranks.
    pub const MAX_RANKS: u64 = (1 << 24) / 15;

    pub fn split(digest: u64) -> [f64; 16] {
        std::array::from_fn(|i| ((digest >> (4 * i)) & 0xf) as f64)
    }

    /// The wrapping sum of the digests whose limbs were summed into `sums`.
    pub fn join(sums: &[f64]) -> u64 {
        sums.iter()
            .take(Self::COUNT)
            .enumerate()
            .fold(0u64, |acc, (i, &s)| {
                acc.wrapping_add((s.round() as u64).wrapping_shl(4 * i as u32))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_plans_cover_the_step_once_and_their_digests_sum_to_the_group_digest() {
        let mut s = StepSchedule::new(7, 1000, 24, 4);
        for world in 1..=6 {
            let mut all = Vec::new();
            let mut limb_sums = [0.0f64; DigestLimbs::COUNT];
            for rank in 0..world {
                let plan = s.plan(3, rank, world);
                assert_eq!(plan.digest(), s.rank_digest(3, rank, world));
                for (sum, limb) in limb_sums.iter_mut().zip(DigestLimbs::split(plan.digest())) {
                    // As the all-reduce does: in float32.
                    *sum = (*sum as f32 + limb as f32) as f64;
                }
                all.extend(plan.sequence_ids);
            }
            assert_eq!(all, SampleOrder::new(7, 1000).step_sequences(3, 24));
            assert_eq!(DigestLimbs::join(&limb_sums), s.group_digest(3, world));
        }
    }

    #[test]
    fn limb_sums_are_exact_at_the_largest_group() {
        let digest = u64::MAX;
        let sums: Vec<f64> = DigestLimbs::split(digest)
            .iter()
            .map(|&l| (l as f32 * DigestLimbs::MAX_RANKS as f32) as f64)
            .collect();
        assert_eq!(
            DigestLimbs::join(&sums),
            digest.wrapping_mul(DigestLimbs::MAX_RANKS)
        );
    }
}
