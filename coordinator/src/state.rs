//! The job's state machine: membership, generations, the sample schedule and the ledger.
//!
//! Pure logic behind one mutex: no I/O except the store, time passed in as `now`. The rules:
//!
//! * **Generations.** A generation is a fixed group of workers with ranks. It is *proposed*
//!   (members chosen), then *formed* once every member has called `Rendezvous`. Joins, graceful
//!   leaves and scale orders take effect at a step boundary: the first `NextStep` for a step that
//!   nobody in the group has started yet answers REGROUP. A lost member (heartbeat timeout, a
//!   reported data-plane failure) re-proposes at once; the step in flight is abandoned and redone.
//! * **State hand-over.** When a group forms, rank 0 is a member that holds the weights of the
//!   last committed step (`HELD`); its state is broadcast to all. A member that applied the step
//!   in flight whose commit never reached us (commit lost in a restart, or all-reduce finished
//!   just as a peer died) proves that step complete: it is committed late, from the plan of the
//!   generation that ran it. With no holder, rank 0 loads the latest checkpoint and the ledger is
//!   rolled back to it, or starts from the seed.
//! * **Schedule.** Step `s` trains stream positions `s*G .. (s+1)*G` of the seeded endless
//!   permutation ([`SampleOrder`]); rank `r` of `W` gets a contiguous run of whole micro-batches
//!   of it ([`rank_micro_batches`]). A step commits on the first rank's report: a finished
//!   all-reduce on any rank proves every rank contributed. Later reports confirm it.

use crate::links::LinkHealth;
use crate::store::{
    CheckpointRecord, FormedRecord, JobRecord, LedgerRecord, SliceRecord, StateSourceRecord, Store,
    StoreError, WorkerRecord,
};
use ferry_common::job::JobSpec;
use ferry_common::proto::{self, watch_event::Kind};
use ferry_common::sampler::{rank_micro_batches, sequences_digest, SampleOrder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tonic::Status;

/// Groups up to this size get every rank's address at rendezvous; larger ones only their ring
/// neighbours' (see `RendezvousReply.peer_ranks`).
pub const FULL_PEER_LIST_MAX: usize = 1024;

/// Timing rules derived from the job spec.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub heartbeat_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub settle: Duration,
    /// A proposed member that has not come to rendezvous by then is set aside.
    pub formation_deadline: Duration,
}

impl Timing {
    pub fn from_spec(spec: &JobSpec) -> Timing {
        let c = &spec.cluster;
        let heartbeat_timeout = Duration::from_secs_f64(c.heartbeat_timeout_s);
        Timing {
            heartbeat_timeout,
            heartbeat_interval: heartbeat_timeout / 4,
            settle: Duration::from_secs_f64(c.settle_s),
            formation_deadline: heartbeat_timeout + Duration::from_secs_f64(c.collective_timeout_s),
        }
    }
}

struct Worker {
    rec: WorkerRecord,
    last_seen: Instant,
    /// Asked to leave; goes at the next step boundary.
    leaving: bool,
    /// Told to exit (scale down, graceful leave done); answered RELEASED until it goes.
    released: bool,
    /// Missed a formation; left out of proposals until it comes to rendezvous itself.
    needs_rendezvous: bool,
    // What `ferry status` shows, from heartbeats.
    generation: u64,
    step: u64,
    loss: f64,
    tokens_per_s: f64,
}

struct Arrival {
    has_state: bool,
    state_step: u64,
    blob: Vec<u8>,
}

struct Forming {
    generation: u64,
    members: Vec<String>,
    arrived: BTreeMap<String, Arrival>,
    proposed_at: Instant,
}

enum Phase {
    /// No group: waiting for a quorum (or for more workers to settle).
    Idle,
    Forming(Forming),
    /// The group in `job.formed` is training.
    Formed,
}

/// What `Rendezvous` answers.
pub enum RendezvousOutcome {
    Ready(proto::RendezvousReply),
    Wait(String),
    Released,
    Stopped,
    Finished,
}

/// What a reader of the ledger needs besides its entries: how to rebuild the sample order,
/// and how many committed steps were thrown away and trained again.
pub struct LedgerMeta {
    pub num_sequences: u64,
    pub global_batch: u64,
    pub seed: u64,
    pub rollbacks: u64,
    pub redone_steps: u64,
}

pub enum NextStepOutcome {
    Plan(proto::StepPlan),
    Regroup,
    Finished,
    Stopped,
    Released,
}

pub struct JobState {
    spec: JobSpec,
    spec_toml: String,
    timing: Timing,
    num_sequences: u64,
    job: JobRecord,
    workers: BTreeMap<String, Worker>,
    phase: Phase,
    /// (generation, step) most recently handed out: a step boundary is reached when the next
    /// step has not been handed out in the current generation.
    handed_out: Option<(u64, u64)>,
    /// The generation that ran before the current proposal, for late commits.
    previous: Option<FormedRecord>,
    membership_pending: bool,
    /// Worker id -> rank in `job.formed`, so per-RPC lookups do not scan the group.
    rank_index: HashMap<String, usize>,
    last_join: Instant,
    order: SampleOrder,
    ledger_tail: Option<LedgerRecord>,
    loss_history: Vec<(u64, f64)>,
    /// Broken links between workers and who is set aside for them (see [`crate::links`]).
    links: LinkHealth,
    store: Store,
    events: tokio::sync::broadcast::Sender<proto::WatchEvent>,
    changed: tokio::sync::watch::Sender<u64>,
}

fn store_err(e: StoreError) -> Status {
    tracing::error!("state store: {e}");
    Status::internal(format!("coordinator state store failed: {e}"))
}

impl JobState {
    /// A fresh job, or the one stored in `store` (then `spec` must be the stored one).
    pub fn open(
        spec: JobSpec,
        spec_toml: String,
        num_sequences: u64,
        store: Store,
        loaded: Option<crate::store::Loaded>,
        now: Instant,
    ) -> Result<JobState, StoreError> {
        let timing = Timing::from_spec(&spec);
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let (changed, _) = tokio::sync::watch::channel(0);
        let mut state = JobState {
            order: SampleOrder::new(spec.job.seed, num_sequences),
            job: JobRecord {
                job_id: new_id(),
                committed: 0,
                generation: 0,
                formed: None,
                target_workers: spec.max_workers(),
                stopped: false,
                checkpoint: None,
                rollbacks: 0,
                redone_steps: 0,
                next_join_seq: 0,
            },
            spec,
            spec_toml,
            timing,
            num_sequences,
            workers: BTreeMap::new(),
            phase: Phase::Idle,
            handed_out: None,
            previous: None,
            membership_pending: false,
            rank_index: HashMap::new(),
            last_join: now,
            ledger_tail: None,
            loss_history: Vec::new(),
            links: LinkHealth::default(),
            store,
            events,
            changed,
        };
        match loaded {
            None => state.store.init(&state.spec_toml, &state.job)?,
            Some(loaded) => {
                state.job = loaded.job;
                for rec in loaded.workers {
                    // Every known worker gets a full timeout to reconnect after a restart.
                    state.workers.insert(rec.id.clone(), Worker::new(rec, now));
                }
                if let Some(formed) = &state.job.formed {
                    state.phase = Phase::Formed;
                    // The group may be mid-step: treat the next step as started, so that a
                    // join waits for its commit instead of breaking the step in flight.
                    state.handed_out = Some((formed.generation, state.job.committed));
                }
                state.loss_history = loaded.ledger.iter().map(|e| (e.step, e.loss)).collect();
                state.ledger_tail = loaded.ledger.into_iter().last();
            }
        }
        state.index_ranks();
        state.publish_gauges();
        Ok(state)
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<proto::WatchEvent> {
        self.events.subscribe()
    }

    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn finished(&self) -> bool {
        self.job.committed >= self.spec.job.steps
    }

    fn emit(&self, kind: Kind, worker_id: &str, message: String) {
        let world_size = match &self.job.formed {
            Some(f) => f.ranks.len() as u32,
            None => 0,
        };
        let _ = self.events.send(proto::WatchEvent {
            kind: kind as i32,
            generation: self.job.generation,
            world_size,
            target_workers: self.job.target_workers,
            step: self.job.committed,
            worker_id: worker_id.to_string(),
            message,
        });
        self.changed.send_modify(|v| *v += 1);
    }

    fn publish_gauges(&self) {
        metrics::gauge!("ferry_workers").set(self.workers.len() as f64);
        metrics::gauge!("ferry_generation").set(self.job.generation as f64);
        metrics::gauge!("ferry_committed_steps").set(self.job.committed as f64);
        metrics::gauge!("ferry_target_workers").set(f64::from(self.job.target_workers));
        metrics::gauge!("ferry_rollbacks").set(self.job.rollbacks as f64);
        metrics::gauge!("ferry_redone_steps").set(self.job.redone_steps as f64);
        let world = self.job.formed.as_ref().map_or(0, |f| f.ranks.len());
        metrics::gauge!("ferry_world_size").set(world as f64);
    }

    fn worker_mut(&mut self, id: &str, now: Instant) -> Result<&mut Worker, Status> {
        let w = self
            .workers
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("unknown worker id {id:?}; join first")))?;
        w.last_seen = now;
        Ok(w)
    }

    fn rank_of(&self, id: &str) -> Option<usize> {
        self.rank_index.get(id).copied()
    }

    /// Rebuilds the rank index after `job.formed` changed.
    fn index_ranks(&mut self) {
        self.rank_index = match &self.job.formed {
            Some(f) => f
                .ranks
                .iter()
                .enumerate()
                .map(|(r, id)| (id.clone(), r))
                .collect(),
            None => HashMap::new(),
        };
    }

    // ----- membership -----

    pub fn join(
        &mut self,
        host: String,
        data_addr: String,
        metrics_addr: String,
        devices: Vec<String>,
        pid: u32,
        now: Instant,
    ) -> Result<proto::JoinReply, Status> {
        if host.trim().is_empty() || host.len() > 255 {
            return Err(Status::invalid_argument("host must be 1 to 255 characters"));
        }
        if !valid_addr(&data_addr) {
            return Err(Status::invalid_argument(format!(
                "data_addr {data_addr:?} is not host:port"
            )));
        }
        if !metrics_addr.is_empty() && !valid_addr(&metrics_addr) {
            return Err(Status::invalid_argument(format!(
                "metrics_addr {metrics_addr:?} is not host:port"
            )));
        }
        if devices.len() > 64 || devices.iter().any(|d| d.len() > 255) {
            return Err(Status::invalid_argument(
                "at most 64 devices of 255 characters",
            ));
        }
        if self.job.stopped {
            return Err(Status::failed_precondition("the job is stopped"));
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
        // No flush: a join lost in a crash only makes that worker join again.
        self.store.put_worker(&rec).map_err(store_err)?;
        self.store.save_job_lazily(&self.job).map_err(store_err)?;
        tracing::info!(worker = %rec.id, host = %rec.host, addr = %rec.data_addr, "worker joined");
        let id = rec.id.clone();
        self.workers.insert(id.clone(), Worker::new(rec, now));
        self.last_join = now;
        self.membership_pending = true;
        self.emit(Kind::Membership, &id, "joined".into());
        self.publish_gauges();
        Ok(proto::JoinReply {
            worker_id: id,
            job_id: self.job.job_id.clone(),
            job_toml: self.spec_toml.clone(),
            heartbeat_interval_s: self.timing.heartbeat_interval.as_secs_f64(),
            generation: self.job.generation,
        })
    }

    pub fn heartbeat(
        &mut self,
        req: &proto::HeartbeatRequest,
        now: Instant,
    ) -> Result<proto::HeartbeatReply, Status> {
        let w = self.worker_mut(&req.worker_id, now)?;
        w.generation = req.generation;
        w.step = req.step;
        if req.loss.is_finite() {
            w.loss = req.loss;
        }
        if req.tokens_per_s.is_finite() {
            w.tokens_per_s = req.tokens_per_s;
        }
        Ok(proto::HeartbeatReply {
            generation: self.job.generation,
            stop: self.job.stopped,
        })
    }

    /// Graceful leave: at once when the worker is not training, else at the next boundary.
    pub fn leave(&mut self, id: &str, now: Instant) -> Result<bool, Status> {
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
        let in_proposal =
            matches!(&self.phase, Phase::Forming(f) if f.members.iter().any(|m| m == id));
        self.remove_worker(id, "left");
        if in_proposal {
            self.propose(now, true)?;
        }
        Ok(true)
    }

    fn remove_worker(&mut self, id: &str, why: &str) {
        self.links.forget(id);
        if self.workers.remove(id).is_some() {
            if let Err(e) = self.store.remove_worker(id) {
                tracing::error!("state store: {e}");
            }
            tracing::info!(worker = %id, "worker removed: {why}");
            self.publish_gauges();
        }
    }

    /// Periodic duty: declare silent workers dead, set aside members that never came to a
    /// formation, and form the first group once a quorum has settled.
    pub fn tick(&mut self, now: Instant) -> Result<(), Status> {
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
                || matches!(&self.phase, Phase::Forming(f) if f.members.contains(&id));
            lost_member |= member;
            tracing::warn!(worker = %id, "no heartbeat for {:?}: worker declared dead", timeout);
            self.remove_worker(&id, "heartbeat timeout");
            self.emit(Kind::WorkerLost, &id, "heartbeat timeout".into());
        }
        if let Phase::Forming(f) = &self.phase {
            if now.duration_since(f.proposed_at) > self.timing.formation_deadline {
                let missing: Vec<String> = f
                    .members
                    .iter()
                    .filter(|m| !f.arrived.contains_key(*m))
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
    fn candidates(&self, now: Instant) -> (Vec<String>, Vec<String>) {
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

    /// Proposes a new generation if the membership calls for one. `force`: a member is gone,
    /// the current group cannot go on.
    fn propose(&mut self, now: Instant, force: bool) -> Result<(), Status> {
        if self.job.stopped || self.finished() {
            return Ok(());
        }
        let (members, extras) = self.candidates(now);
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
                    self.emit(Kind::Membership, "", format!("waiting for {min} workers"));
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
                    self.membership_pending = false;
                    return Ok(());
                }
            }
            _ => {}
        }
        // Scale-down: workers beyond the target are sent away, not kept on standby.
        if self.job.target_workers < self.spec.max_workers() {
            for id in &extras {
                if let Some(w) = self.workers.get_mut(id) {
                    w.released = true;
                }
                self.emit(Kind::Released, id, "scaled down".into());
            }
        }
        let leaving: Vec<String> = self
            .workers
            .values()
            .filter(|w| w.leaving && !w.released)
            .map(|w| w.rec.id.clone())
            .collect();
        for id in leaving {
            if let Some(w) = self.workers.get_mut(&id) {
                w.released = true;
            }
            self.emit(Kind::Released, &id, "left".into());
        }
        let carried: BTreeMap<String, Arrival> =
            match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::Forming(f) => f
                    .arrived
                    .into_iter()
                    .filter(|(id, _)| members.contains(id))
                    .collect(),
                _ => BTreeMap::new(),
            };
        if let Some(formed) = self.job.formed.take() {
            self.previous = Some(formed);
        }
        self.index_ranks();
        self.job.generation += 1;
        self.membership_pending = false;
        tracing::info!(
            generation = self.job.generation,
            "proposing generation of {} workers",
            members.len()
        );
        self.phase = Phase::Forming(Forming {
            generation: self.job.generation,
            members,
            arrived: carried,
            proposed_at: now,
        });
        self.store.save_job(&self.job).map_err(store_err)?;
        self.emit(Kind::Membership, "", "new generation proposed".into());
        self.publish_gauges();
        self.try_form()
    }

    /// Forms the proposed group once every member has arrived.
    fn try_form(&mut self) -> Result<(), Status> {
        let Phase::Forming(f) = &self.phase else {
            return Ok(());
        };
        if !f.members.iter().all(|m| f.arrived.contains_key(m)) {
            return Ok(());
        }
        let Phase::Forming(f) = std::mem::replace(&mut self.phase, Phase::Idle) else {
            unreachable!("checked above");
        };
        // A member that already applied the step in flight proves it complete.
        let newest = f
            .arrived
            .values()
            .filter(|a| a.has_state)
            .map(|a| a.state_step)
            .max();
        if newest == Some(self.job.committed + 1) {
            if let Some(prev) = self.previous.clone() {
                tracing::info!(
                    step = self.job.committed,
                    "late commit: a member holds its result"
                );
                self.record_commit(&prev, f64::NAN, 0, 0.0)?;
            }
        }
        let committed = self.job.committed;
        let prev_rank = |id: &String| {
            self.previous
                .as_ref()
                .and_then(|p| p.ranks.iter().position(|r| r == id))
                .unwrap_or(usize::MAX)
        };
        let join_seq = |id: &String| self.workers.get(id).map_or(u64::MAX, |w| w.rec.join_seq);
        let mut ranks = f.members.clone();
        ranks.sort_by_key(|id| (prev_rank(id), join_seq(id)));
        let holder = ranks.iter().position(|id| {
            let a = &f.arrived[id];
            a.has_state && a.state_step == committed
        });
        let (source, checkpoint_path) = match holder {
            Some(i) => {
                let id = ranks.remove(i);
                ranks.insert(0, id);
                (StateSourceRecord::Held, String::new())
            }
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
        self.handed_out = None;
        self.store.save_job(&self.job).map_err(store_err)?;
        tracing::info!(
            generation = f.generation,
            world = f.members.len(),
            step = self.job.committed,
            source = ?source,
            "generation formed"
        );
        self.emit(Kind::Membership, "", "generation formed".into());
        self.publish_gauges();
        Ok(())
    }

    fn roll_back(&mut self, to_step: u64) -> Result<(), Status> {
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
        self.job.rollbacks += 1;
        self.store
            .truncate_ledger(to_step, &self.job)
            .map_err(store_err)?;
        self.loss_history.retain(|(s, _)| *s < to_step);
        self.ledger_tail = None;
        self.publish_gauges();
        Ok(())
    }

    pub fn rendezvous(
        &mut self,
        req: &proto::RendezvousRequest,
        now: Instant,
    ) -> Result<RendezvousOutcome, Status> {
        if req.blob.len() > 64 * 1024 {
            return Err(Status::invalid_argument("blob is larger than 64 KiB"));
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
            return Err(Status::failed_precondition(format!(
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
        let arrival = Arrival {
            has_state: req.has_state,
            state_step: req.state_step,
            blob: req.blob.clone(),
        };
        match &mut self.phase {
            Phase::Forming(f) if f.members.contains(&req.worker_id) => {
                f.arrived.insert(req.worker_id.clone(), arrival);
                self.try_form()?;
            }
            _ => {
                // Not in the proposal: counts as a join at the next boundary.
                self.membership_pending = true;
                if matches!(self.phase, Phase::Idle) {
                    self.propose(now, false)?;
                    if let Phase::Forming(f) = &mut self.phase {
                        if f.members.contains(&req.worker_id) {
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
        let why = match &self.phase {
            Phase::Idle => format!(
                "waiting for a quorum of {} workers",
                self.spec.cluster.min_workers
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

    fn ready_reply(&self, rank: usize) -> proto::RendezvousReply {
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
        proto::RendezvousReply {
            status: proto::rendezvous_reply::Status::Ready as i32,
            generation: f.generation,
            rank: rank as u32,
            world_size: world as u32,
            peers,
            peer_ranks,
            blob: f.blob.clone(),
            start_step: f.start_step,
            state_source: match f.source {
                StateSourceRecord::Held => proto::StateSource::Held,
                StateSourceRecord::Checkpoint => proto::StateSource::Checkpoint,
                StateSourceRecord::Init => proto::StateSource::Init,
            } as i32,
            checkpoint_path: f.checkpoint_path.clone(),
            message: String::new(),
        }
    }

    /// Checks that `generation` is the running group's and `id` a member; returns its rank.
    fn member_rank(&self, id: &str, generation: u64) -> Result<Option<usize>, Status> {
        if generation > self.job.generation {
            return Err(Status::failed_precondition(format!(
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

    // ----- steps -----

    pub fn next_step(
        &mut self,
        req: &proto::NextStepRequest,
        now: Instant,
    ) -> Result<NextStepOutcome, Status> {
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
            return Err(Status::out_of_range(format!(
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
    fn slice(&self, step: u64, rank: u64, world: u64) -> (u64, u64, u64) {
        let b = &self.spec.batch;
        let (first_micro, micro_count) = rank_micro_batches(self.spec.micro_batches(), world, rank);
        let start = step * b.global + first_micro * b.micro;
        (start, micro_count * b.micro, first_micro)
    }

    fn plan(&mut self, step: u64, generation: u64, rank: u64, world: u64) -> proto::StepPlan {
        let (stream_start, count, first_micro) = self.slice(step, rank, world);
        let sequence_ids = (stream_start..stream_start + count)
            .map(|p| self.order.at(p).1)
            .collect();
        proto::StepPlan {
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

    fn expected_digest(&mut self, step: u64, rank: u64, world: u64) -> u64 {
        let (start, count, _) = self.slice(step, rank, world);
        let ids: Vec<u64> = (start..start + count).map(|p| self.order.at(p).1).collect();
        sequences_digest(&ids)
    }

    pub fn commit(
        &mut self,
        req: &proto::CommitStepRequest,
        now: Instant,
    ) -> Result<proto::CommitStepReply, Status> {
        self.worker_mut(&req.worker_id, now)?;
        if let Some((rank, expected)) = self.recorded_slice_digest(req) {
            // A confirmation of the step just recorded: checked against the ledger's slice, so
            // it is answered the same whether the group still runs or a join or a loss has
            // dissolved it since the first rank's commit (a refusal would make the rank treat a
            // step it applied, and that counts, as unconfirmed, and on rank 0 leave it out of
            // the run's metrics).
            self.check_digest(req, rank, expected)?;
            self.note_worker_step(req);
            return Ok(proto::CommitStepReply {
                committed_steps: self.job.committed,
            });
        }
        let Some(rank) = self.member_rank(&req.worker_id, req.generation)? else {
            return Err(Status::failed_precondition(format!(
                "generation {} is not the running group (newest is {}): regroup",
                req.generation, self.job.generation
            )));
        };
        let committed = self.job.committed;
        if req.step != committed {
            return Err(Status::out_of_range(format!(
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
        Ok(proto::CommitStepReply {
            committed_steps: self.job.committed,
        })
    }

    /// For a commit of the step just recorded, by a worker with a slice in it, in the
    /// generation that trained it: that slice's rank and sequences digest.
    fn recorded_slice_digest(&mut self, req: &proto::CommitStepRequest) -> Option<(u32, u64)> {
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

    fn check_digest(
        &self,
        req: &proto::CommitStepRequest,
        rank: u32,
        expected: u64,
    ) -> Result<(), Status> {
        if req.sequences_digest != expected {
            return Err(Status::invalid_argument(format!(
                "sequences digest {:#x} does not match the plan of rank {rank} at step {} ({expected:#x})",
                req.sequences_digest, req.step
            )));
        }
        Ok(())
    }

    fn note_worker_step(&mut self, req: &proto::CommitStepRequest) {
        if let Some(w) = self.workers.get_mut(&req.worker_id) {
            w.step = w.step.max(req.step + 1);
            if req.loss.is_finite() {
                w.loss = req.loss;
            }
        }
    }

    /// Commits step `job.committed`, as trained by the group `by`.
    fn record_commit(
        &mut self,
        by: &FormedRecord,
        loss: f64,
        tokens: u64,
        step_time_s: f64,
    ) -> Result<(), Status> {
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
        self.emit(Kind::Committed, "", format!("step {step} committed"));
        if self.finished() {
            tracing::info!(
                steps = self.job.committed,
                "all steps committed: job finished"
            );
            self.emit(Kind::Finished, "", "finished".into());
        }
        self.publish_gauges();
        Ok(())
    }

    pub fn report_checkpoint(
        &mut self,
        req: &proto::CheckpointReport,
        now: Instant,
    ) -> Result<(), Status> {
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
            return Err(Status::permission_denied(format!(
                "only rank 0 of the current generation {} reports checkpoints; worker {} of \
                 generation {} is not it",
                self.job.formed.as_ref().map_or(0, |f| f.generation),
                req.worker_id,
                req.generation
            )));
        }
        if req.step == 0 || req.step > self.job.committed {
            return Err(Status::out_of_range(format!(
                "checkpoint step {} is not a committed step (1 to {})",
                req.step, self.job.committed
            )));
        }
        if let Some(newer) = self.job.checkpoint.as_ref().filter(|c| c.step > req.step) {
            return Err(Status::failed_precondition(format!(
                "checkpoint step {} is older than the recorded one (step {})",
                req.step, newer.step
            )));
        }
        // The one place a checkpoint of this step may be: the job's run directory.
        let expected = ferry_common::run_dir::checkpoint_dir(&self.spec.job.run_dir, req.step);
        if std::path::Path::new(&req.path) != expected {
            return Err(Status::invalid_argument(format!(
                "checkpoint path {:?} is not {} (the job's run directory)",
                req.path.chars().take(256).collect::<String>(),
                expected.display()
            )));
        }
        self.job.checkpoint = Some(CheckpointRecord {
            step: req.step,
            path: req.path.clone(),
        });
        self.store.save_job(&self.job).map_err(store_err)?;
        Ok(())
    }

    pub fn report_failure(
        &mut self,
        req: &proto::FailureReport,
        now: Instant,
    ) -> Result<u64, Status> {
        self.worker_mut(&req.worker_id, now)?;
        if let Some(suspect) = req.suspect_rank {
            self.note_broken_link(&req.worker_id, req.generation, suspect as usize, now)?;
        }
        if self.member_rank(&req.worker_id, req.generation)?.is_some() {
            tracing::warn!(worker = %req.worker_id, generation = req.generation,
                "data-plane failure reported: {}", req.message.chars().take(500).collect::<String>());
            self.emit(
                Kind::WorkerLost,
                &req.worker_id,
                req.message.chars().take(500).collect(),
            );
            self.propose(now, true)?;
        }
        Ok(self.job.generation)
    }

    /// `reporter`'s collective in `generation` lost the peer at `suspect_rank`: scored by
    /// [`LinkHealth`]; when it sets a worker aside, a group or proposal holding it re-forms.
    fn note_broken_link(
        &mut self,
        reporter: &str,
        generation: u64,
        suspect_rank: usize,
        now: Instant,
    ) -> Result<(), Status> {
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
            Kind::WorkerLost,
            &d.worker,
            format!(
                "set aside for {}s: cannot reach worker {}",
                d.cool_off.as_secs(),
                d.partner
            ),
        );
        let in_group = self.rank_of(&d.worker).is_some()
            || matches!(&self.phase, Phase::Forming(f) if f.members.contains(&d.worker));
        if in_group {
            self.propose(now, true)?;
        }
        Ok(())
    }

    // ----- admin -----

    pub fn scale(&mut self, workers: u32, now: Instant) -> Result<proto::ScaleReply, Status> {
        let (min, max) = (self.spec.cluster.min_workers, self.spec.max_workers());
        if workers < min || workers > max {
            return Err(Status::invalid_argument(format!(
                "cannot scale to {workers} workers: the job allows {min} to {max} \
                 (cluster.min_workers, cluster.max_workers)"
            )));
        }
        self.job.target_workers = workers;
        self.store.save_job(&self.job).map_err(store_err)?;
        self.membership_pending = true;
        tracing::info!(target = workers, "scale order");
        self.emit(Kind::Scale, "", format!("scale to {workers}"));
        if matches!(self.phase, Phase::Idle | Phase::Forming(_)) {
            self.propose(now, false)?;
        }
        self.publish_gauges();
        Ok(proto::ScaleReply {
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

    pub fn stop(&mut self) -> Result<u64, Status> {
        if !self.job.stopped {
            self.job.stopped = true;
            self.store.save_job(&self.job).map_err(store_err)?;
            tracing::info!(step = self.job.committed, "stop order");
            self.emit(Kind::Stop, "", "stopped".into());
        }
        Ok(self.job.committed)
    }

    pub fn status(&self, now: Instant) -> proto::StatusReply {
        let phase = if self.job.stopped {
            "stopped"
        } else if self.finished() {
            "finished"
        } else {
            match self.phase {
                Phase::Idle => "waiting",
                Phase::Forming(_) => "forming",
                Phase::Formed => "running",
            }
        };
        let mut workers: Vec<proto::WorkerStatus> = self
            .workers
            .values()
            .map(|w| {
                let rank = self.rank_of(&w.rec.id);
                let state = if w.released {
                    "released"
                } else if w.leaving {
                    "leaving"
                } else if rank.is_some() {
                    "member"
                } else {
                    "standby"
                };
                proto::WorkerStatus {
                    worker_id: w.rec.id.clone(),
                    host: w.rec.host.clone(),
                    data_addr: w.rec.data_addr.clone(),
                    metrics_addr: w.rec.metrics_addr.clone(),
                    rank: rank.map_or(-1, |r| r as i32),
                    generation: w.generation,
                    step: w.step,
                    loss: w.loss,
                    tokens_per_s: w.tokens_per_s,
                    state: state.into(),
                    last_seen_s: now.duration_since(w.last_seen).as_secs_f64(),
                }
            })
            .collect();
        workers.sort_by_key(|w| (w.rank < 0, w.rank, w.worker_id.clone()));
        let recent_loss = self
            .loss_history
            .iter()
            .rev()
            .take(2000)
            .rev()
            .map(|&(step, loss)| proto::LossPoint { step, loss })
            .collect();
        let tail = self.ledger_tail.as_ref();
        let tokens_per_s = tail
            .filter(|e| e.step_time_s > 0.0)
            .map_or(0.0, |e| e.tokens as f64 / e.step_time_s);
        proto::StatusReply {
            job_id: self.job.job_id.clone(),
            job_name: self.spec.job.name.clone(),
            phase: phase.into(),
            generation: self.job.generation,
            world_size: self.job.formed.as_ref().map_or(0, |f| f.ranks.len() as u32),
            committed_steps: self.job.committed,
            total_steps: self.spec.job.steps,
            target_workers: self.job.target_workers,
            min_workers: self.spec.cluster.min_workers,
            max_workers: self.spec.max_workers(),
            workers,
            recent_loss,
            latest_checkpoint_step: self.job.checkpoint.as_ref().map_or(0, |c| c.step),
            latest_checkpoint_path: self
                .job
                .checkpoint
                .as_ref()
                .map_or(String::new(), |c| c.path.clone()),
            tokens_per_s,
            rollbacks: self.job.rollbacks,
            redone_steps: self.job.redone_steps,
        }
    }

    /// Committed ledger entries in `[from, to)`; `to == 0` means up to the last one.
    pub fn ledger(&self, from: u64, to: u64) -> Result<Vec<LedgerRecord>, Status> {
        let to = if to == 0 {
            self.job.committed
        } else {
            to.min(self.job.committed)
        };
        if from > to {
            return Err(Status::out_of_range(format!(
                "from_step {from} is beyond the committed steps ({})",
                self.job.committed
            )));
        }
        if to - from > 100_000 {
            return Err(Status::invalid_argument(
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

impl Worker {
    fn new(rec: WorkerRecord, now: Instant) -> Worker {
        Worker {
            rec,
            last_seen: now,
            leaving: false,
            released: false,
            needs_rendezvous: false,
            generation: 0,
            step: 0,
            loss: f64::NAN,
            tokens_per_s: 0.0,
        }
    }
}

fn valid_addr(addr: &str) -> bool {
    match addr.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && host.len() <= 255 && port.parse::<u16>().is_ok_and(|p| p > 0)
        }
        None => false,
    }
}

/// 16 random hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source is available");
    hex::encode(bytes)
}
