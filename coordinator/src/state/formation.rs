//! Generations: proposing a group from the live workers, forming it once every member has
//! come to rendezvous, and choosing where its state comes from (a member that holds the
//! committed step, else the checkpoint, else the seed).

use super::api::{Assignment, CollectiveKind, EventKind, RendezvousRequest};
use super::{
    store_err, Arrival, Forming, JobState, Phase, RendezvousOutcome, StateError, FULL_PEER_LIST_MAX,
};
use crate::store::{FormedRecord, StateSourceRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

impl JobState {
    /// Proposes a new generation if the membership calls for one. `force`: a member is gone,
    /// the current group cannot go on.
    pub(super) fn propose(&mut self, now: Instant, force: bool) -> Result<(), StateError> {
        if self.job.stopped || self.finished() {
            return Ok(());
        }
        let (mut members, extras) = self.candidates(now);
        let handover = self.handover_from(&members, &extras);
        if let Some(id) = &handover {
            tracing::info!(
                worker = %id,
                step = self.job.committed,
                "the only holder of the committed state is going: it stays one more \
                 generation to hand the state over"
            );
            members.insert(0, id.clone());
            // It takes a place of its own: the last to join waits on standby meanwhile.
            members.truncate(self.job.target_workers.min(self.spec.max_workers()).max(1) as usize);
        }
        let min = self.spec.cluster.min_workers as usize;
        if members.len() < min {
            if force || !matches!(self.phase, Phase::Formed) {
                if !matches!(self.phase, Phase::Idle) {
                    tracing::warn!(
                        "{} workers, below the quorum of {min}: waiting",
                        members.len()
                    );
                    self.previous = self.job.formed.take().or(self.previous.take());
                    self.index_ranks();
                    self.phase = Phase::Idle;
                    self.store.save_job(&self.job).map_err(store_err)?;
                    self.emit(
                        EventKind::Membership,
                        "",
                        format!("waiting for {min} workers"),
                    );
                }
            }
            return Ok(());
        }
        let same = |ids: &[String]| {
            ids.len() == members.len()
                && ids.iter().collect::<BTreeSet<_>>() == members.iter().collect()
        };
        match &self.phase {
            Phase::Idle => {
                let full =
                    members.len() >= self.job.target_workers.min(self.spec.max_workers()) as usize;
                if !full && now.duration_since(self.last_join) < self.timing.settle {
                    return Ok(());
                }
            }
            Phase::Forming(f) if same(&f.members) => return Ok(()),
            Phase::Formed if !force => {
                if self.job.formed.as_ref().is_some_and(|f| same(&f.ranks)) {
                    // A handover is done once the others hold the state: look again at the
                    // next boundary.
                    self.membership_pending = handover.is_some();
                    return Ok(());
                }
            }
            _ => {}
        }
        // Scale-down: workers beyond the target are sent away, not kept on standby.
        if self.job.target_workers < self.spec.max_workers() {
            for id in extras.iter().filter(|&id| Some(id) != handover.as_ref()) {
                if let Some(w) = self.workers.get_mut(id) {
                    w.released = true;
                }
                self.emit(EventKind::Released, id, "scaled down".into());
            }
        }
        let leaving: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.leaving && !w.released && Some(&w.rec.id) != handover.as_ref())
            .map(|w| w.rec.id.clone())
            .collect();
        for id in leaving {
            if let Some(w) = self.workers.get_mut(&id) {
                w.released = true;
            }
            self.emit(EventKind::Released, &id, "left".into());
        }
        let member_set: std::collections::HashSet<String> = members.iter().cloned().collect();
        let carried: BTreeMap<String, Arrival> =
            match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::Forming(f) => f
                    .arrived
                    .into_iter()
                    .filter(|(id, _)| member_set.contains(id.as_str()))
                    .collect(),
                _ => BTreeMap::new(),
            };
        if let Some(formed) = self.job.formed.take() {
            self.previous = Some(formed);
        }
        self.index_ranks();
        self.job.generation += 1;
        self.membership_pending = handover.is_some();
        tracing::info!(
            generation = self.job.generation,
            "proposing generation of {} workers",
            members.len()
        );
        self.phase = Phase::Forming(Forming {
            generation: self.job.generation,
            members,
            member_set,
            arrived: carried,
            proposed_at: now,
            awaiting_blob_from: None,
        });
        self.store.save_job(&self.job).map_err(store_err)?;
        self.emit(EventKind::Membership, "", "new generation proposed".into());
        self.publish_gauges();
        self.try_form()
    }

    /// The worker to keep for one more generation so that it hands the committed state over
    /// before it goes: when every worker that holds the state is going (a graceful leave, or
    /// beyond the target after a scale-down), others stay, and no checkpoint has the step.
    /// Released at once, it would take every step since the checkpoint with it.
    ///
    /// A member of the group holds the committed state once that group committed a step
    /// (every rank applied it); before that only its rank 0, if it held the state already.
    pub(super) fn handover_from(&self, staying: &[String], extras: &[String]) -> Option<String> {
        let checkpointed = self.job.checkpoint.as_ref().map_or(0, |c| c.step);
        if staying.is_empty() || self.job.committed <= checkpointed {
            return None;
        }
        let group = self.job.formed.as_ref().or(self.previous.as_ref())?;
        let holds = |id: &String| {
            group.start_step < self.job.committed
                || (group.source == StateSourceRecord::Held
                    && group.start_step == self.job.committed
                    && group.ranks.first() == Some(id))
        };
        if group
            .ranks
            .iter()
            .any(|id| staying.contains(id) && holds(id))
        {
            return None;
        }
        group
            .ranks
            .iter()
            .filter(|id| holds(id))
            .find(|id| {
                self.workers.get(*id).is_some_and(|w| {
                    !w.released && !w.needs_rendezvous && (w.leaving || extras.contains(id))
                })
            })
            .cloned()
    }

    /// Forms the proposed group once every member has arrived.
    pub(super) fn try_form(&mut self) -> Result<(), StateError> {
        let Phase::Forming(f) = &self.phase else {
            return Ok(());
        };
        if !f.complete() {
            return Ok(());
        }
        let Phase::Forming(mut f) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("checked above");
        };
        let committed = self.job.committed;
        let previous_ranks: std::collections::HashMap<&str, usize> = self
            .previous
            .iter()
            .flat_map(|p| p.ranks.iter().enumerate().map(|(r, id)| (id.as_str(), r)))
            .collect();
        let prev_rank = |id: &String| {
            previous_ranks
                .get(id.as_str())
                .copied()
                .unwrap_or(usize::MAX)
        };
        let join_seq = |id: &String| self.workers.get(id).map_or(u64::MAX, |w| w.rec.join_seq);
        let mut ranks = f.members.clone();
        ranks.sort_by_key(|id| (prev_rank(id), join_seq(id)));
        let holder = ranks
            .iter()
            .position(|id| f.arrived[id].holds_step == Some(committed));
        if let Some(i) = holder {
            let id = ranks.remove(i);
            ranks.insert(0, id);
        }
        // NCCL's unique id is made by rank 0 alone, now that it is known: each id starts a
        // bootstrap thread in NCCL that lives until a communicator uses the id.
        let rank0 = &f.arrived[&ranks[0]];
        if rank0.collective == CollectiveKind::Nccl && rank0.blob.is_empty() {
            f.awaiting_blob_from = Some(ranks[0].clone());
            self.phase = Phase::Forming(f);
            return Ok(());
        }
        let (source, checkpoint_path) = match holder {
            Some(_) => (StateSourceRecord::Held, String::new()),
            None if committed == 0 => (StateSourceRecord::Init, String::new()),
            None => match self.job.checkpoint.clone() {
                Some(ck) if ck.step <= committed => {
                    self.roll_back(ck.step)?;
                    (StateSourceRecord::Checkpoint, ck.path)
                }
                _ => {
                    self.roll_back(0)?;
                    (StateSourceRecord::Init, String::new())
                }
            },
        };
        // A fallback's rollback continues only into the formation right after it.
        self.rollback_continues = false;
        let peers = ranks
            .iter()
            .map(|id| {
                self.workers
                    .get(id)
                    .map(|w| w.rec.data_addr.clone())
                    .unwrap_or_default()
            })
            .collect();
        let blob = f.arrived[&ranks[0]].blob.clone();
        self.job.formed = Some(FormedRecord {
            generation: f.generation,
            ranks,
            peers,
            blob,
            start_step: self.job.committed,
            source,
            checkpoint_path,
        });
        self.index_ranks();
        self.phase = Phase::Formed;
        self.store.save_job(&self.job).map_err(store_err)?;
        tracing::info!(
            generation = f.generation,
            world = f.members.len(),
            step = self.job.committed,
            source = ?source,
            "generation formed"
        );
        self.emit(EventKind::Membership, "", "generation formed".into());
        self.publish_gauges();
        Ok(())
    }

    pub fn rendezvous(
        &mut self,
        req: &RendezvousRequest,
        now: Instant,
    ) -> Result<RendezvousOutcome, StateError> {
        if req.blob.len() > 64 * 1024 {
            return Err(StateError::invalid_argument("blob is larger than 64 KiB"));
        }
        self.worker_mut(&req.worker_id, now)?;
        if !req.uncommitted.is_empty() {
            self.accept_offer(req);
        }
        let w = self.worker_mut(&req.worker_id, now)?;
        if w.released {
            let id = req.worker_id.clone();
            self.remove_worker(&id, "released");
            return Ok(RendezvousOutcome::Released);
        }
        w.needs_rendezvous = false;
        if self.job.stopped {
            return Ok(RendezvousOutcome::Stopped);
        }
        if self.finished() {
            return Ok(RendezvousOutcome::Finished);
        }
        if req.known_generation > self.job.generation {
            return Err(StateError::failed_precondition(format!(
                "generation {} is from the future: the newest is {}",
                req.known_generation, self.job.generation
            )));
        }
        if let (Phase::Formed, Some(rank)) = (&self.phase, self.rank_of(&req.worker_id)) {
            let formed = self.job.formed.as_ref().expect("formed phase has a record");
            if req.known_generation < formed.generation {
                return Ok(RendezvousOutcome::Ready(self.ready_reply(rank)));
            }
            // A member of the running group is back at rendezvous: its group is broken.
            tracing::warn!(worker = %req.worker_id, "member returned to rendezvous: regrouping");
            self.propose(now, true)?;
        }
        self.check_collective(req)?;
        let arrival = Arrival {
            holds_step: req.holds_step,
            collective: req.collective,
            blob: req.blob.clone(),
        };
        match &mut self.phase {
            Phase::Forming(f) if f.has(&req.worker_id) => {
                f.arrived.insert(req.worker_id.clone(), arrival);
                self.try_form()?;
            }
            _ => {
                // Not in the proposal: counts as a join at the next boundary.
                self.membership_pending = true;
                if matches!(self.phase, Phase::Idle) {
                    self.propose(now, false)?;
                    if let Phase::Forming(f) = &mut self.phase {
                        if f.has(&req.worker_id) {
                            f.arrived.insert(req.worker_id.clone(), arrival);
                            self.try_form()?;
                        }
                    }
                }
            }
        }
        if let (Phase::Formed, Some(rank)) = (&self.phase, self.rank_of(&req.worker_id)) {
            return Ok(RendezvousOutcome::Ready(self.ready_reply(rank)));
        }
        if self.workers.get(&req.worker_id).is_some_and(|w| w.released) {
            let id = req.worker_id.clone();
            self.remove_worker(&id, "released");
            return Ok(RendezvousOutcome::Released);
        }
        if let Some((left, partner)) = self.links.set_aside_for(&req.worker_id, now) {
            return Ok(RendezvousOutcome::Wait(format!(
                "set aside for {}s: the link to worker {partner} failed in {} generations in a \
                 row; offered to a group again after that",
                left.as_secs().max(1),
                crate::links::STRIKES
            )));
        }
        if let Phase::Forming(f) = &self.phase {
            if f.awaiting_blob_from.as_ref() == Some(&req.worker_id) {
                return Ok(RendezvousOutcome::SendBlob(format!(
                    "rank 0 of generation {}: offer the group an NCCL unique id",
                    f.generation
                )));
            }
        }
        let why = match &self.phase {
            Phase::Idle => format!(
                "waiting for a quorum of {} workers",
                self.spec.cluster.min_workers
            ),
            Phase::Forming(f) if f.awaiting_blob_from.is_some() => format!(
                "generation {} is forming: every member is here, waiting for rank 0's NCCL \
                 unique id",
                f.generation
            ),
            Phase::Forming(f) => format!(
                "generation {} is forming: {}/{} members here",
                f.generation,
                f.arrived.len(),
                f.members.len()
            ),
            Phase::Formed => "standing by: the group is full".to_string(),
        };
        Ok(RendezvousOutcome::Wait(why))
    }

    /// Commits the steps a worker's last group trained that it offers at rendezvous (rank 0
    /// died before committing them, the coordinator restarted, the group broke up after
    /// applying them). Whatever the answer, the worker goes on to rendezvous: an offer from a
    /// group that a newer one replaced, or one that does not match the schedule, is only
    /// logged, and those steps are trained again.
    fn accept_offer(&mut self, req: &RendezvousRequest) {
        let before = self.job.committed;
        // A worker that joined again (declared lost while cut off) trained under its old id.
        let member = req.trained_as.as_deref().unwrap_or(&req.worker_id);
        match self.accept_trained(member, req.known_generation, &req.uncommitted) {
            Ok(()) if self.job.committed > before => tracing::info!(
                worker = %req.worker_id,
                generation = req.known_generation,
                "late commit of steps {before}..{}: offered at rendezvous",
                self.job.committed
            ),
            Ok(()) => {}
            Err(e) => tracing::info!(
                worker = %req.worker_id,
                generation = req.known_generation,
                "offered steps not committed: {e}"
            ),
        }
    }

    /// A group runs one collective: a worker whose collective differs from that of another
    /// live worker is refused with the reason and leaves the job, instead of being proposed
    /// into groups that can never connect. The workers already there keep the job.
    fn check_collective(&mut self, req: &RendezvousRequest) -> Result<(), StateError> {
        // Checked once per worker, when it first says (or changes) what it runs, not at every
        // rendezvous poll: the scan is over every worker of the job.
        let known = self.workers.get(&req.worker_id).and_then(|w| w.collective);
        if known == Some(req.collective) {
            return Ok(());
        }
        let others = self.collective_count.iter().sum::<usize>()
            - self.collective_count[req.collective.index()]
            - usize::from(known.is_some());
        let other = (others > 0)
            .then(|| {
                self.workers.values().find(|w| {
                    w.rec.id != req.worker_id
                        && !w.released
                        && w.collective.is_some_and(|c| c != req.collective)
                })
            })
            .flatten();
        if let Some(other) = other {
            let message = format!(
                "worker {} runs {}, but this job's workers (such as {} on {}) run {}: a group \
                 cannot mix them. Start every worker on the same kind of device (--device), \
                 or set cluster.backend = \"ring\" to run GPU workers on the ring",
                req.worker_id,
                req.collective.name(),
                other.rec.id,
                other.rec.host,
                other.collective.map_or("", |c| c.name()),
            );
            let id = req.worker_id.clone();
            self.remove_worker(&id, "its collective differs from the job's");
            return Err(StateError::failed_precondition(message));
        }
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            if let Some(was) = w.collective.replace(req.collective) {
                self.collective_count[was.index()] -= 1;
            }
            self.collective_count[req.collective.index()] += 1;
        }
        Ok(())
    }

    pub(super) fn ready_reply(&self, rank: usize) -> Assignment {
        let f = self
            .job
            .formed
            .as_ref()
            .expect("called with a formed group");
        let world = f.ranks.len();
        let (peers, peer_ranks) = if world <= FULL_PEER_LIST_MAX {
            (f.peers.clone(), Vec::new())
        } else {
            let mut ranks = vec![(rank + world - 1) % world, rank, (rank + 1) % world];
            ranks.dedup();
            (
                ranks.iter().map(|&r| f.peers[r].clone()).collect(),
                ranks.iter().map(|&r| r as u32).collect(),
            )
        };
        Assignment {
            generation: f.generation,
            rank: rank as u32,
            world_size: world as u32,
            peers,
            peer_ranks,
            blob: f.blob.clone(),
            start_step: f.start_step,
            source: f.source,
            checkpoint_path: f.checkpoint_path.clone(),
        }
    }

    /// Checks that `generation` is the running group's and `id` a member; returns its rank.
    pub(super) fn member_rank(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Option<usize>, StateError> {
        if generation > self.job.generation {
            return Err(StateError::failed_precondition(format!(
                "generation {generation} is from the future: the newest is {}",
                self.job.generation
            )));
        }
        match &self.job.formed {
            Some(f) if f.generation == generation && matches!(self.phase, Phase::Formed) => {
                Ok(self.rank_of(id))
            }
            _ => Ok(None),
        }
    }
}
