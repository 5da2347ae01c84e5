//! The job's state machine: membership, generations, the sample schedule and the ledger.
//!
//! Pure logic behind one mutex, time passed in as `now`. Its changes go to the store's queue
//! and reach the disk on the store's writer thread, never under this mutex. The rules:
//!
//! * **Generations.** A generation is a fixed group of workers with ranks. It is *proposed*
//!   (members chosen), then *formed* once every member has called `Rendezvous`. Joins, graceful
//!   leaves and scale orders take effect when rank 0 next commits: its answer says REGROUP,
//!   which every rank learns in the next step's all-reduce, applies that step and comes back.
//!   A lost member (heartbeat timeout, a reported data-plane failure) re-proposes at once; the
//!   step in flight is abandoned and redone.
//! * **Commits.** Nobody asks for a step: each rank derives its plan from the shared
//!   [`StepSchedule`]. Rank 0 commits the group's steps, every `cluster.commit_every` steps or
//!   `commit_interval_s` seconds, with the group digest its all-reduce summed; a finished
//!   all-reduce proves every rank contributed. Steps a group trained but did not commit (rank
//!   0 died, the coordinator restarted, the group broke up) come back in its members' offers
//!   at rendezvous and are committed from there, once, while no newer group has formed.
//! * **State hand-over.** When a group forms, rank 0 is a member that holds the weights of the
//!   last committed step (`HELD`); its state is broadcast to all. With no holder, rank 0 loads
//!   the latest checkpoint and the ledger is rolled back to it, or starts from the seed.
//! * **Schedule.** Step `s` trains stream positions `s*G .. (s+1)*G` of the seeded endless
//!   permutation; rank `r` of `W` gets a contiguous run of whole micro-batches of it
//!   ([`ferry_spec::schedule`]).

pub use self::api::*;
pub use self::error::StateError;
use crate::links::LinkHealth;
use crate::store::{FormedRecord, JobRecord, LedgerRecord, Store, StoreError, WorkerRecord};
use ferry_spec::job::JobSpec;
use ferry_spec::schedule::StepSchedule;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

mod api;
mod error;
mod formation;
mod ledger;
mod roster;
mod status;
#[cfg(test)]
mod tests;

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
    /// The collective it runs, from its rendezvous (None before its first one).
    collective: Option<CollectiveKind>,
    // What `ferry status` shows, from heartbeats.
    generation: u64,
    step: u64,
    loss: f64,
    tokens_per_s: f64,
}

struct Arrival {
    /// The step whose state this member holds, if any.
    holds_step: Option<u64>,
    collective: CollectiveKind,
    blob: Vec<u8>,
}

struct Forming {
    generation: u64,
    members: Vec<String>,
    /// `members` for lookups: a rendezvous of each of W members must not scan W.
    member_set: std::collections::HashSet<String>,
    arrived: BTreeMap<String, Arrival>,
    proposed_at: Instant,
    /// Every member is here, and the one that is to be rank 0 was asked for its offer (its
    /// NCCL unique id): the group forms when it comes back with it.
    awaiting_blob_from: Option<String>,
}

enum Phase {
    /// No group: waiting for a quorum (or for more workers to settle).
    Idle,
    Forming(Forming),
    /// The group in `job.formed` is training.
    Formed,
}

pub struct JobState {
    spec: JobSpec,
    spec_toml: String,
    timing: Timing,
    job: JobRecord,
    workers: BTreeMap<String, Worker>,
    phase: Phase,
    /// The generation that ran before the current proposal, for late commits.
    previous: Option<FormedRecord>,
    membership_pending: bool,
    /// Worker id -> rank in `job.formed`, so per-RPC lookups do not scan the group.
    rank_index: HashMap<String, usize>,
    last_join: Instant,
    schedule: StepSchedule,
    ledger_tail: Option<LedgerRecord>,
    /// The next roll-back continues the last one (its checkpoint did not verify, no step ran
    /// in between): its steps count as redone, but it is not another rollback.
    rollback_continues: bool,
    loss_history: Vec<(u64, f64)>,
    /// Workers that said they run the ring, and NCCL: a rendezvous checks a newcomer against
    /// these counts, not by scanning every worker of the job.
    collective_count: [usize; 2],
    /// Broken links between workers and who is set aside for them (see [`crate::links`]).
    links: LinkHealth,
    store: Store,
    events: tokio::sync::broadcast::Sender<Event>,
    changed: tokio::sync::watch::Sender<u64>,
}

fn store_err(e: StoreError) -> StateError {
    tracing::error!("state store: {e}");
    StateError::Store(e)
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
            schedule: StepSchedule::for_job(&spec, num_sequences),
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
            workers: BTreeMap::new(),
            phase: Phase::Idle,
            previous: None,
            membership_pending: false,
            rank_index: HashMap::new(),
            last_join: now,
            ledger_tail: None,
            rollback_continues: false,
            loss_history: Vec::new(),
            collective_count: [0, 0],
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
                let whole = state.job.formed.as_ref().map(|f| {
                    let known = f.ranks.iter().all(|id| state.workers.contains_key(id));
                    (known, f.generation)
                });
                match whole {
                    Some((true, _)) => {
                        // The group may be training on: its rank 0 commits to us again.
                        state.phase = Phase::Formed;
                    }
                    Some((false, generation)) => {
                        // A member left for good before the restart (while the job was
                        // stopped, nobody re-formed the group): no heartbeat will ever time
                        // it out, so the group cannot go on. The first tick proposes anew.
                        tracing::info!(generation, "the stored group lost a member; it re-forms");
                        state.previous = state.job.formed.take();
                    }
                    None => {}
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

    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The sequence number of the newest change queued for the store: a reply that must not
    /// run ahead of the disk waits until it is durable (see [`crate::store::Store`]).
    pub fn store_queued(&self) -> u64 {
        self.store.queued()
    }

    /// Waits for the store's writes without holding the state.
    pub fn durability(&self) -> crate::store::DurableWaiter {
        self.store.durability()
    }

    /// Why the store stopped taking changes, if it did.
    pub fn store_failed(&self) -> Option<String> {
        self.store.failed()
    }

    pub fn subscribe_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn finished(&self) -> bool {
        self.job.committed >= self.spec.job.steps
    }

    fn emit(&self, kind: EventKind, worker_id: &str, message: String) {
        let world_size = match &self.job.formed {
            Some(f) => f.ranks.len() as u32,
            None => 0,
        };
        let _ = self.events.send(Event {
            kind,
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

    fn worker_mut(&mut self, id: &str, now: Instant) -> Result<&mut Worker, StateError> {
        let w = self.workers.get_mut(id).ok_or_else(|| {
            StateError::not_found(format!("unknown worker id {id:?}; join first"))
        })?;
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
}

impl Forming {
    fn has(&self, id: &str) -> bool {
        self.member_set.contains(id)
    }

    /// Every member has come (only members' arrivals are kept).
    fn complete(&self) -> bool {
        self.arrived.len() == self.members.len()
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
            collective: None,
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
