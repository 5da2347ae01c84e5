//! Who is in the job: joins, heartbeats, graceful leaves, silent workers declared dead,
//! reported data-plane failures, and the admin orders that change the target (scale, stop).

use super::api::{
    EventKind, FailureReport, Heartbeat, HeartbeatAnswer, JoinRequest, Joined, Scaled,
};
use super::{new_id, store_err, valid_addr, JobState, Phase, StateError, Worker};
use crate::store::{StoreError, WorkerRecord};
use std::time::Instant;

impl JobState {
    pub fn join(&mut self, req: JoinRequest, now: Instant) -> Result<Joined, StateError> {
        let JoinRequest {
            host,
            data_addr,
            metrics_addr,
            devices,
            pid,
        } = req;
        if host.trim().is_empty() || host.len() > 255 {
            return Err(StateError::invalid_argument(
                "host must be 1 to 255 characters",
            ));
        }
        if !valid_addr(&data_addr) {
            return Err(StateError::invalid_argument(format!(
                "data_addr {data_addr:?} is not host:port"
            )));
        }
        if !metrics_addr.is_empty() && !valid_addr(&metrics_addr) {
            return Err(StateError::invalid_argument(format!(
                "metrics_addr {metrics_addr:?} is not host:port"
            )));
        }
        if devices.len() > 64 || devices.iter().any(|d| d.len() > 255) {
            return Err(StateError::invalid_argument(
                "at most 64 devices of 255 characters",
            ));
        }
        if self.job.stopped {
            return Err(StateError::failed_precondition("the job is stopped"));
        }
        let rec = WorkerRecord {
            id: format!("w{}-{}", self.job.next_join_seq, &new_id()[..6]),
            host,
            data_addr,
            metrics_addr,
            devices,
            pid,
            join_seq: self.job.next_join_seq,
        };
        self.job.next_join_seq += 1;
        // On disk before the worker hears its id (the service waits), so a restarted
        // coordinator still knows it.
        self.store.put_worker(&rec).map_err(store_err)?;
        self.store.save_job(&self.job).map_err(store_err)?;
        tracing::info!(worker = %rec.id, host = %rec.host, addr = %rec.data_addr, "worker joined");
        let id = rec.id.clone();
        self.workers.insert(id.clone(), Worker::new(rec, now));
        self.last_join = now;
        self.membership_pending = true;
        self.emit(EventKind::Membership, &id, "joined".into());
        self.publish_gauges();
        Ok(Joined {
            worker_id: id,
            job_id: self.job.job_id.clone(),
            job_toml: self.spec_toml.clone(),
            heartbeat_interval: self.timing.heartbeat_interval,
            generation: self.job.generation,
            num_sequences: self.schedule.num_sequences(),
        })
    }

    pub fn heartbeat(
        &mut self,
        req: &Heartbeat,
        now: Instant,
    ) -> Result<HeartbeatAnswer, StateError> {
        let w = self.worker_mut(&req.worker_id, now)?;
        w.generation = req.generation;
        w.step = req.step;
        if req.loss.is_finite() {
            w.loss = req.loss;
        }
        if req.tokens_per_s.is_finite() {
            w.tokens_per_s = req.tokens_per_s;
        }
        Ok(HeartbeatAnswer {
            generation: self.job.generation,
            stop: self.job.stopped,
        })
    }

    /// Graceful leave: at once when the worker is not training, else at the next boundary.
    pub fn leave(&mut self, id: &str, now: Instant) -> Result<bool, StateError> {
        self.worker_mut(id, now)?.leaving = true;
        let training = matches!(self.phase, Phase::Formed)
            && self.rank_of(id).is_some()
            && !self.job.stopped
            && !self.finished();
        if training {
            self.membership_pending = true;
            tracing::info!(worker = %id, "worker leaves at the next step boundary");
            return Ok(false);
        }
        let in_proposal = matches!(&self.phase, Phase::Forming(f) if f.has(id));
        if in_proposal {
            // The only holder of the committed state, leaving while its next group forms:
            // it stays in that group to hand the state over, and goes at its first boundary
            // after a commit (see `handover_from`).
            let (staying, extras) = self.candidates(now);
            if self.handover_from(&staying, &extras).as_deref() == Some(id) {
                self.membership_pending = true;
                tracing::info!(worker = %id, "worker leaves once it has handed its state over");
                return Ok(false);
            }
        }
        self.remove_worker(id, "left");
        if in_proposal {
            self.propose(now, true)?;
        }
        Ok(true)
    }

    pub(super) fn remove_worker(&mut self, id: &str, why: &str) {
        self.links.forget(id);
        if let Some(w) = self.workers.remove(id) {
            if let Some(kind) = w.collective {
                self.collective_count[kind.index()] -= 1;
            }
            if let Err(e) = self.store.remove_worker(id) {
                tracing::error!("state store: {e}");
            }
            tracing::info!(worker = %id, "worker removed: {why}");
            self.publish_gauges();
        }
    }

    /// Periodic duty: declare silent workers dead, set aside members that never came to a
    /// formation, and form the first group once a quorum has settled.
    pub fn tick(&mut self, now: Instant) -> Result<(), StateError> {
        let timeout = self.timing.heartbeat_timeout;
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| now.duration_since(w.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        let mut lost_member = false;
        for id in dead {
            let member = self.rank_of(&id).is_some()
                || matches!(&self.phase, Phase::Forming(f) if f.has(&id));
            lost_member |= member;
            tracing::warn!(worker = %id, "no heartbeat for {:?}: worker declared dead", timeout);
            self.remove_worker(&id, "heartbeat timeout");
            self.emit(EventKind::WorkerLost, &id, "heartbeat timeout".into());
        }
        if let Phase::Forming(f) = &self.phase {
            if now.duration_since(f.proposed_at) > self.timing.formation_deadline {
                // Also the member asked for its NCCL unique id that never sent it: without
                // it the group cannot form.
                let missing: Vec<String> = f
                    .members
                    .iter()
                    .filter(|m| !f.arrived.contains_key(*m))
                    .chain(f.awaiting_blob_from.iter())
                    .cloned()
                    .collect();
                for id in &missing {
                    tracing::warn!(worker = %id, "did not come to rendezvous in time; set aside");
                    if let Some(w) = self.workers.get_mut(id) {
                        w.needs_rendezvous = true;
                    }
                }
                lost_member |= !missing.is_empty();
            }
        }
        for id in self.links.readmit_due(now) {
            tracing::info!(worker = %id, "set-aside worker offered to the next group again");
            self.membership_pending = true;
        }
        if lost_member {
            self.propose(now, true)?;
        } else if matches!(self.phase, Phase::Idle) {
            self.propose(now, false)?;
        }
        Ok(())
    }

    /// Workers that should train next, in join order, and those beyond the target.
    pub(super) fn candidates(&self, now: Instant) -> (Vec<String>, Vec<String>) {
        let mut live: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| !w.released && !w.leaving && !w.needs_rendezvous)
            .filter(|w| self.links.set_aside_for(&w.rec.id, now).is_none())
            .collect();
        live.sort_by_key(|w| w.rec.join_seq);
        let cap = self.job.target_workers.min(self.spec.max_workers()) as usize;
        let ids: Vec<String> = live.iter().map(|w| w.rec.id.clone()).collect();
        if ids.len() <= cap {
            (ids, Vec::new())
        } else {
            (ids[..cap].to_vec(), ids[cap..].to_vec())
        }
    }

    pub fn scale(&mut self, workers: u32, now: Instant) -> Result<Scaled, StateError> {
        let (min, max) = (self.spec.cluster.min_workers, self.spec.max_workers());
        if workers < min || workers > max {
            return Err(StateError::invalid_argument(format!(
                "cannot scale to {workers} workers: the job allows {min} to {max} \
                 (cluster.min_workers, cluster.max_workers)"
            )));
        }
        self.job.target_workers = workers;
        self.store.save_job(&self.job).map_err(store_err)?;
        self.membership_pending = true;
        tracing::info!(target = workers, "scale order");
        self.emit(EventKind::Scale, "", format!("scale to {workers}"));
        if matches!(self.phase, Phase::Idle | Phase::Forming(_)) {
            self.propose(now, false)?;
        }
        self.publish_gauges();
        Ok(Scaled {
            target_workers: workers,
            live_workers: self.workers.values().filter(|w| !w.released).count() as u32,
        })
    }

    /// Lifts a stop order: the job was started again on purpose (`ferry coordinator --job` on
    /// its state directory, as `ferry launch` does to resume).
    pub fn resume_if_stopped(&mut self) -> Result<bool, StoreError> {
        if !self.job.stopped {
            return Ok(false);
        }
        self.job.stopped = false;
        self.store.save_job(&self.job)?;
        Ok(true)
    }

    pub fn stop(&mut self) -> Result<u64, StateError> {
        if !self.job.stopped {
            self.job.stopped = true;
            self.store.save_job(&self.job).map_err(store_err)?;
            tracing::info!(step = self.job.committed, "stop order");
            self.emit(EventKind::Stop, "", "stopped".into());
        }
        Ok(self.job.committed)
    }

    pub fn report_failure(&mut self, req: &FailureReport, now: Instant) -> Result<u64, StateError> {
        self.worker_mut(&req.worker_id, now)?;
        if let Some(suspect) = req.suspect_rank {
            self.note_broken_link(&req.worker_id, req.generation, suspect as usize, now)?;
        }
        if self.member_rank(&req.worker_id, req.generation)?.is_some() {
            tracing::warn!(worker = %req.worker_id, generation = req.generation,
                "data-plane failure reported: {}", req.message.chars().take(500).collect::<String>());
            self.emit(
                EventKind::WorkerLost,
                &req.worker_id,
                req.message.chars().take(500).collect(),
            );
            self.propose(now, true)?;
        }
        Ok(self.job.generation)
    }

    /// `reporter`'s collective in `generation` lost the peer at `suspect_rank`: scored by
    /// [`LinkHealth`]; when it sets a worker aside, a group or proposal holding it re-forms.
    pub(super) fn note_broken_link(
        &mut self,
        reporter: &str,
        generation: u64,
        suspect_rank: usize,
        now: Instant,
    ) -> Result<(), StateError> {
        let group = [self.job.formed.as_ref(), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|f| f.generation == generation);
        let Some(suspect) = group.and_then(|g| g.ranks.get(suspect_rank)).cloned() else {
            return Ok(());
        };
        let workers = &self.workers;
        let join_seq = |id: &str| workers.get(id).map_or(u64::MAX, |w| w.rec.join_seq);
        let Some(d) = self
            .links
            .report(reporter, &suspect, generation, now, join_seq)
        else {
            return Ok(());
        };
        tracing::warn!(
            worker = %d.worker, partner = %d.partner,
            "the link between {} and {} failed in {} generations: setting {} aside for {:?}",
            d.worker, d.partner, crate::links::STRIKES, d.worker, d.cool_off
        );
        self.emit(
            EventKind::WorkerLost,
            &d.worker,
            format!(
                "set aside for {}s: cannot reach worker {}",
                d.cool_off.as_secs(),
                d.partner
            ),
        );
        let in_group = self.rank_of(&d.worker).is_some()
            || matches!(&self.phase, Phase::Forming(f) if f.has(&d.worker));
        if in_group {
            self.propose(now, true)?;
        }
        Ok(())
    }
}
