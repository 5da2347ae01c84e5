//! The sample ledger: which sequences each rank trains at each step (the plan), the commit
//! that records a step exactly once with every rank's slice, the rollback to a checkpoint,
//! and reading the ledger back.

use super::api::{CheckpointReport, EventKind, StepCommit, StepPlan, StepRequest};
use super::{store_err, JobState, LedgerMeta, NextStepOutcome, Phase, StateError};
use crate::store::{CheckpointRecord, FormedRecord, LedgerRecord, SliceRecord, StateSourceRecord};
use ferry_spec::sampler::{rank_micro_batches, sequences_digest};
use std::time::Instant;

impl JobState {
    pub fn next_step(
        &mut self,
        req: &StepRequest,
        now: Instant,
    ) -> Result<NextStepOutcome, StateError> {
        let w = self.worker_mut(&req.worker_id, now)?;
        if w.released {
            let id = req.worker_id.clone();
            self.remove_worker(&id, "released");
            return Ok(NextStepOutcome::Released);
        }
        if self.job.stopped {
            return Ok(NextStepOutcome::Stopped);
        }
        let Some(rank) = self.member_rank(&req.worker_id, req.generation)? else {
            return Ok(NextStepOutcome::Regroup);
        };
        let step = self.job.committed;
        if req.step != step {
            return Err(StateError::out_of_range(format!(
                "step {} is out of range: the next step to run is {step}",
                req.step
            )));
        }
        if self.finished() {
            return Ok(NextStepOutcome::Finished);
        }
        let generation = req.generation;
        if self.handed_out != Some((generation, step)) {
            // A step boundary: membership changes take effect here.
            if self.membership_pending {
                self.propose(now, false)?;
                if !matches!(self.phase, Phase::Formed) {
                    return Ok(NextStepOutcome::Regroup);
                }
            }
            self.handed_out = Some((generation, step));
        }
        let formed = self.job.formed.as_ref().expect("member of a formed group");
        let world = formed.ranks.len() as u64;
        Ok(NextStepOutcome::Plan(self.plan(
            step,
            generation,
            rank as u64,
            world,
        )))
    }

    /// Stream positions `[start, start + count)` of rank `rank` of `world` at `step`.
    pub(super) fn slice(&self, step: u64, rank: u64, world: u64) -> (u64, u64, u64) {
        let b = &self.spec.batch;
        let (first_micro, micro_count) = rank_micro_batches(self.spec.micro_batches(), world, rank);
        let start = step * b.global + first_micro * b.micro;
        (start, micro_count * b.micro, first_micro)
    }

    pub(super) fn plan(&mut self, step: u64, generation: u64, rank: u64, world: u64) -> StepPlan {
        let (stream_start, count, first_micro) = self.slice(step, rank, world);
        let sequence_ids = (stream_start..stream_start + count)
            .map(|p| self.order.at(p).1)
            .collect();
        StepPlan {
            step,
            generation,
            rank: rank as u32,
            world_size: world as u32,
            sequence_ids,
            first_micro_batch: first_micro,
            micro_batch: self.spec.batch.micro,
            global_batch: self.spec.batch.global,
            stream_start,
            epoch: stream_start / self.num_sequences,
        }
    }

    pub(super) fn expected_digest(&mut self, step: u64, rank: u64, world: u64) -> u64 {
        let (start, count, _) = self.slice(step, rank, world);
        let ids: Vec<u64> = (start..start + count).map(|p| self.order.at(p).1).collect();
        sequences_digest(&ids)
    }

    pub fn commit(&mut self, req: &StepCommit, now: Instant) -> Result<u64, StateError> {
        self.worker_mut(&req.worker_id, now)?;
        if let Some((rank, expected)) = self.recorded_slice_digest(req) {
            // A confirmation of the step just recorded: checked against the ledger's slice, so
            // it is answered the same whether the group still runs or a join or a loss has
            // dissolved it since the first rank's commit (a refusal would make the rank treat a
            // step it applied, and that counts, as unconfirmed, and on rank 0 leave it out of
            // the run's metrics).
            self.check_digest(req, rank, expected)?;
            self.note_worker_step(req);
            return Ok(self.job.committed);
        }
        let Some(rank) = self.member_rank(&req.worker_id, req.generation)? else {
            return Err(StateError::failed_precondition(format!(
                "generation {} is not the running group (newest is {}): regroup",
                req.generation, self.job.generation
            )));
        };
        let committed = self.job.committed;
        if req.step != committed {
            return Err(StateError::out_of_range(format!(
                "step {} is out of range: the next step to commit is {committed}",
                req.step
            )));
        }
        let world = self.job.formed.as_ref().map_or(1, |f| f.ranks.len()) as u64;
        let expected = self.expected_digest(req.step, rank as u64, world);
        self.check_digest(req, rank as u32, expected)?;
        self.note_worker_step(req);
        // Once per step: the record names every rank's slice.
        let formed = self.job.formed.clone().expect("member of a formed group");
        self.record_commit(&formed, req.loss, req.tokens, req.step_time_s)?;
        if req.step_time_s > 0.0 {
            metrics::gauge!("ferry_tokens_per_second").set(req.tokens as f64 / req.step_time_s);
        }
        if req.allreduce_s > 0.0 {
            metrics::histogram!("ferry_allreduce_seconds").record(req.allreduce_s);
        }
        Ok(self.job.committed)
    }

    /// For a commit of the step just recorded, by a worker with a slice in it, in the
    /// generation that trained it: that slice's rank and sequences digest.
    pub(super) fn recorded_slice_digest(&mut self, req: &StepCommit) -> Option<(u32, u64)> {
        let tail = self.ledger_tail.as_ref()?;
        if tail.generation != req.generation
            || tail.step != req.step
            || req.step + 1 != self.job.committed
        {
            return None;
        }
        let slice = tail.slices.iter().find(|s| s.worker_id == req.worker_id)?;
        let (rank, start, count) = (slice.rank, slice.stream_start, slice.count);
        let ids: Vec<u64> = (start..start + count).map(|p| self.order.at(p).1).collect();
        Some((rank, sequences_digest(&ids)))
    }

    pub(super) fn check_digest(
        &self,
        req: &StepCommit,
        rank: u32,
        expected: u64,
    ) -> Result<(), StateError> {
        if req.sequences_digest != expected {
            return Err(StateError::invalid_argument(format!(
                "sequences digest {:#x} does not match the plan of rank {rank} at step {} ({expected:#x})",
                req.sequences_digest, req.step
            )));
        }
        Ok(())
    }

    pub(super) fn note_worker_step(&mut self, req: &StepCommit) {
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.step = w.step.max(req.step + 1);
            if req.loss.is_finite() {
                w.loss = req.loss;
            }
        }
    }

    /// Commits step `job.committed`, as trained by the group `by`.
    pub(super) fn record_commit(
        &mut self,
        by: &FormedRecord,
        loss: f64,
        tokens: u64,
        step_time_s: f64,
    ) -> Result<(), StateError> {
        let step = self.job.committed;
        let world = by.ranks.len() as u64;
        let slices = by
            .ranks
            .iter()
            .enumerate()
            .map(|(rank, id)| {
                let (stream_start, count, _) = self.slice(step, rank as u64, world);
                SliceRecord {
                    rank: rank as u32,
                    worker_id: id.clone(),
                    stream_start,
                    count,
                }
            })
            .collect();
        let entry = LedgerRecord {
            step,
            generation: by.generation,
            world_size: world as u32,
            slices,
            loss,
            tokens,
            step_time_s,
        };
        self.job.committed += 1;
        if let Err(e) = self.store.commit_step(&entry, &self.job) {
            self.job.committed -= 1;
            return Err(store_err(e));
        }
        if loss.is_finite() {
            self.loss_history.push((step, loss));
            metrics::gauge!("ferry_loss").set(loss);
        }
        self.ledger_tail = Some(entry);
        self.links.trained_together(&by.ranks);
        self.emit(EventKind::Committed, "", format!("step {step} committed"));
        if self.finished() {
            tracing::info!(
                steps = self.job.committed,
                "all steps committed: job finished"
            );
            self.emit(EventKind::Finished, "", "finished".into());
        }
        self.publish_gauges();
        Ok(())
    }

    pub(super) fn roll_back(&mut self, to_step: u64) -> Result<(), StateError> {
        let continues = std::mem::take(&mut self.rollback_continues);
        if to_step == self.job.committed {
            return Ok(());
        }
        tracing::warn!(
            from = self.job.committed,
            to = to_step,
            "no worker holds the committed state: rolling back to the checkpoint"
        );
        self.job.redone_steps += self.job.committed - to_step;
        self.job.committed = to_step;
        if !continues {
            self.job.rollbacks += 1;
        }
        self.store
            .truncate_ledger(to_step, &self.job)
            .map_err(store_err)?;
        self.loss_history.retain(|(s, _)| *s < to_step);
        self.ledger_tail = None;
        self.publish_gauges();
        Ok(())
    }

    pub fn report_checkpoint(
        &mut self,
        req: &CheckpointReport,
        now: Instant,
    ) -> Result<(), StateError> {
        self.worker_mut(&req.worker_id, now)?;
        // Only the current group's rank 0 writes checkpoints; anyone else naming one could
        // point a later restore at files of its choosing.
        let rank0 = self
            .job
            .formed
            .as_ref()
            .filter(|f| f.generation == req.generation)
            .and_then(|f| f.ranks.first());
        if rank0 != Some(&req.worker_id) {
            return Err(StateError::permission_denied(format!(
                "only rank 0 of the current generation {} reports checkpoints; worker {} of \
                 generation {} is not it",
                self.job.formed.as_ref().map_or(0, |f| f.generation),
                req.worker_id,
                req.generation
            )));
        }
        if req.unverified_step != 0 {
            return self.fall_back_from_unverified(req, now);
        }
        if req.step == 0 || req.step > self.job.committed {
            return Err(StateError::out_of_range(format!(
                "checkpoint step {} is not a committed step (1 to {})",
                req.step, self.job.committed
            )));
        }
        if let Some(newer) = self.job.checkpoint.as_ref().filter(|c| c.step > req.step) {
            return Err(StateError::failed_precondition(format!(
                "checkpoint step {} is older than the recorded one (step {})",
                req.step, newer.step
            )));
        }
        self.check_checkpoint_path(req.step, &req.path)?;
        self.job.checkpoint = Some(CheckpointRecord {
            step: req.step,
            path: req.path.clone(),
        });
        self.store.save_job(&self.job).map_err(store_err)?;
        Ok(())
    }

    /// The one place a checkpoint of `step` may be: the job's run directory.
    fn check_checkpoint_path(&self, step: u64, path: &str) -> Result<(), StateError> {
        let expected = ferry_spec::run_dir::checkpoint_dir(&self.spec.job.run_dir, step);
        if std::path::Path::new(path) != expected {
            return Err(StateError::invalid_argument(format!(
                "checkpoint path {:?} is not {} (the job's run directory)",
                path.chars().take(256).collect::<String>(),
                expected.display()
            )));
        }
        Ok(())
    }

    /// Rank 0 of a group formed to restore the recorded checkpoint found that it does not
    /// verify: the job's checkpoint becomes the older one rank 0 names (none: the start) and a
    /// new generation forms. Its formation rolls the ledger back to that step as for any
    /// restore, so the steps after it are planned and trained again, once.
    fn fall_back_from_unverified(
        &mut self,
        req: &CheckpointReport,
        now: Instant,
    ) -> Result<(), StateError> {
        let formed = self
            .job
            .formed
            .as_ref()
            .expect("checked: rank 0 of the formed group");
        let recorded = self.job.checkpoint.as_ref();
        let restoring = formed.source == StateSourceRecord::Checkpoint
            && recorded
                .is_some_and(|c| c.step == req.unverified_step && c.path == formed.checkpoint_path);
        if !restoring {
            return Err(StateError::failed_precondition(format!(
                "checkpoint step {} is not the one generation {} restores ({})",
                req.unverified_step,
                formed.generation,
                match (formed.source, recorded) {
                    (StateSourceRecord::Checkpoint, Some(c)) => format!("step {}", c.step),
                    _ => "it restores none".to_string(),
                }
            )));
        }
        if req.step >= req.unverified_step {
            return Err(StateError::invalid_argument(format!(
                "the checkpoint to fall back to (step {}) is not older than the one that does \
                 not verify (step {})",
                req.step, req.unverified_step
            )));
        }
        let fallback = if req.step == 0 {
            if !req.path.is_empty() {
                return Err(StateError::invalid_argument(
                    "step 0 has no checkpoint; leave the path empty",
                ));
            }
            None
        } else {
            self.check_checkpoint_path(req.step, &req.path)?;
            Some(CheckpointRecord {
                step: req.step,
                path: req.path.clone(),
            })
        };
        tracing::warn!(
            worker = %req.worker_id,
            "the checkpoint of step {} does not verify: {}; falling back to {}",
            req.unverified_step,
            req.unverified_reason.chars().take(500).collect::<String>(),
            match &fallback {
                Some(c) => format!("step {} ({})", c.step, c.path),
                None => "step 0: no older checkpoint verifies".to_string(),
            }
        );
        self.job.checkpoint = fallback;
        self.store.save_job(&self.job).map_err(store_err)?;
        // Going back further than the restore that failed is the same rollback, not a second.
        self.rollback_continues = true;
        self.propose(now, true)?;
        // The group that could not restore trained no step: it has none in flight for a
        // member to complete late (see `try_form`).
        self.previous = None;
        Ok(())
    }

    /// Committed ledger entries in `[from, to)`; `to == 0` means up to the last one. Read
    /// from the store: what its writer has written (the service waits for it first).
    pub fn ledger(&self, from: u64, to: u64) -> Result<Vec<LedgerRecord>, StateError> {
        let to = if to == 0 {
            self.job.committed
        } else {
            to.min(self.job.committed)
        };
        if from > to {
            return Err(StateError::out_of_range(format!(
                "from_step {from} is beyond the committed steps ({})",
                self.job.committed
            )));
        }
        if to - from > 100_000 {
            return Err(StateError::invalid_argument(
                "ask for at most 100000 steps at a time",
            ));
        }
        self.store.read_ledger(from, to).map_err(store_err)
    }

    pub fn ledger_meta(&self) -> LedgerMeta {
        LedgerMeta {
            num_sequences: self.num_sequences,
            global_batch: self.spec.batch.global,
            seed: self.spec.job.seed,
            rollbacks: self.job.rollbacks,
            redone_steps: self.job.redone_steps,
        }
    }

    pub fn committed(&self) -> u64 {
        self.job.committed
    }
}
