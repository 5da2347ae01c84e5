//! The sample ledger: which sequences each rank trains at each step (the plan), the commit
//! that records a step exactly once with every rank's slice, the rollback to a checkpoint,
//! and reading the ledger back.

use super::api::{CheckpointReport, CommitAnswer, Directive, EventKind, StepsCommit, TrainedStep};
use super::{store_err, JobState, LedgerMeta, Phase, StateError};
use crate::store::{CheckpointRecord, FormedRecord, LedgerRecord, SliceRecord, StateSourceRecord};
use std::time::Instant;

impl JobState {
    /// Rank 0's commit of the steps its group trained since its last commit. Answers what the
    /// group does after its next step: go on, or go back to rendezvous (membership changes
    /// take effect here, at a boundary every rank learns in the next step's all-reduce).
    pub fn commit(&mut self, req: &StepsCommit, now: Instant) -> Result<CommitAnswer, StateError> {
        self.worker_mut(&req.worker_id, now)?;
        self.accept_trained(&req.worker_id, req.generation, &req.steps)?;
        let running = matches!(self.phase, Phase::Formed)
            && self
                .job
                .formed
                .as_ref()
                .is_some_and(|f| f.generation == req.generation);
        let directive = if self.job.stopped {
            Directive::Stop
        } else if !running {
            Directive::Regroup
        } else if self.membership_pending && !self.finished() {
            self.propose(now, false)?;
            if matches!(self.phase, Phase::Formed) {
                Directive::Continue
            } else {
                Directive::Regroup
            }
        } else {
            Directive::Continue
        };
        Ok(CommitAnswer {
            committed: self.job.committed,
            directive,
        })
    }

    /// Records the steps of `steps` that continue the ledger, as trained by `generation`: the
    /// running group, or the one before a proposal while no newer group has formed (once one
    /// has, it may already be training those steps again). Steps already committed are
    /// skipped, so a retried commit, or every survivor offering the same steps, records each
    /// step once.
    pub(super) fn accept_trained(
        &mut self,
        worker_id: &str,
        generation: u64,
        steps: &[TrainedStep],
    ) -> Result<(), StateError> {
        if steps.len() > 100_000 {
            return Err(StateError::invalid_argument(format!(
                "{} steps in one commit: at most 100000",
                steps.len()
            )));
        }
        if generation > self.job.generation {
            return Err(StateError::failed_precondition(format!(
                "generation {generation} is from the future: the newest is {}",
                self.job.generation
            )));
        }
        // Nothing here may cost O(W) per commit (at 100,000 ranks, a copy of the group took
        // longer than the rest): the running group's members are looked up in its rank index.
        let Some(group) = committing_group(&self.job.formed, &self.previous, generation) else {
            return Err(StateError::failed_precondition(format!(
                "generation {generation} is not the running group (newest is {}): regroup",
                self.job.generation
            )));
        };
        let world = group.ranks.len() as u64;
        let member = if self
            .job
            .formed
            .as_ref()
            .is_some_and(|f| f.generation == generation)
        {
            self.rank_of(worker_id).is_some()
        } else {
            group.ranks.iter().any(|id| id == worker_id)
        };
        if !member {
            return Err(StateError::failed_precondition(format!(
                "worker {worker_id} is not a member of generation {generation}"
            )));
        }
        let committed_before = self.job.committed;
        for s in steps {
            if s.step < self.job.committed {
                continue;
            }
            if s.step != self.job.committed {
                return Err(StateError::out_of_range(format!(
                    "step {} is out of range: the next step to commit is {}",
                    s.step, self.job.committed
                )));
            }
            if self.finished() {
                return Err(StateError::out_of_range(format!(
                    "step {} is beyond the job's {} steps",
                    s.step, self.spec.job.steps
                )));
            }
            let expected = self.schedule.group_digest(s.step, world);
            if s.group_digest != expected {
                return Err(StateError::invalid_argument(format!(
                    "group digest {:#x} of step {} does not match the schedule of generation \
                     {generation}'s {world} ranks ({expected:#x})",
                    s.group_digest, s.step
                )));
            }
            self.record_commit(generation, world, s.loss, s.tokens, s.step_time_s)?;
            if s.step_time_s > 0.0 {
                metrics::gauge!("ferry_tokens_per_second").set(s.tokens as f64 / s.step_time_s);
            }
            if s.allreduce_s > 0.0 {
                metrics::histogram!("ferry_allreduce_seconds").record(s.allreduce_s);
            }
        }
        if self.job.committed > committed_before {
            // The group's links all worked for these steps.
            if let Some(g) = committing_group(&self.job.formed, &self.previous, generation) {
                self.links.trained_together(&g.ranks);
            }
        }
        Ok(())
    }

    /// Commits step `job.committed`, as trained by generation `generation` of `world` ranks.
    pub(super) fn record_commit(
        &mut self,
        generation: u64,
        world: u64,
        loss: f64,
        tokens: u64,
        step_time_s: f64,
    ) -> Result<(), StateError> {
        let step = self.job.committed;
        // The slices follow from the generation's ranks and the schedule: derived when the
        // ledger is read ([`Self::ledger`]), so a commit costs the same at any group size.
        let entry = LedgerRecord {
            step,
            generation,
            world_size: world as u32,
            slices: Vec::new(),
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
        let mut entries = self.store.read_ledger(from, to).map_err(store_err)?;
        let mut group: Option<FormedRecord> = None;
        for e in entries.iter_mut().filter(|e| e.slices.is_empty()) {
            if group.as_ref().map(|g| g.generation) != Some(e.generation) {
                group = Some(self.store.generation(e.generation).map_err(store_err)?);
            }
            let ranks = &group.as_ref().expect("just read").ranks;
            let world = ranks.len() as u64;
            e.slices = ranks
                .iter()
                .enumerate()
                .map(|(rank, id)| {
                    let (stream_start, count, _) = self.schedule.slice(e.step, rank as u64, world);
                    SliceRecord {
                        rank: rank as u32,
                        worker_id: id.clone(),
                        stream_start,
                        count,
                    }
                })
                .collect();
        }
        Ok(entries)
    }

    pub fn ledger_meta(&self) -> LedgerMeta {
        LedgerMeta {
            num_sequences: self.schedule.num_sequences(),
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

/// The group that trained as `generation` and may commit its steps: the running one, or the
/// one before a proposal while no newer group has formed (once one has, it may already be
/// training those steps again). Fields, not `&self`, so the caller may borrow others.
fn committing_group<'a>(
    formed: &'a Option<FormedRecord>,
    previous: &'a Option<FormedRecord>,
    generation: u64,
) -> Option<&'a FormedRecord> {
    match (formed, previous) {
        (Some(f), _) if f.generation == generation => Some(f),
        (None, Some(p)) if p.generation == generation => Some(p),
        _ => None,
    }
}
