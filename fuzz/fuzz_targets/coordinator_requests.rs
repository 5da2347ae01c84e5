//! The coordinator's state machine (`coordinator/src/state/`) driven by arbitrary sequences of
//! the requests workers and admins make: joins, heartbeats, rendezvous (offering steps not
//! known committed), commits of trained steps (digests from the shared `StepSchedule`, right or
//! corrupted), checkpoint and failure reports, scale/stop, the passing of time, restarts from
//! the durable store, and protobuf messages decoded from raw bytes and converted as the gRPC
//! service does. Nothing may panic; after every request the job's invariants must hold.

#![no_main]

use arbitrary::Arbitrary;
use ferry_coordinator::state::{
    CheckpointReport, CollectiveKind, Directive, FailureReport, Heartbeat, JobState, JobStatus,
    JoinRequest, RendezvousOutcome, RendezvousRequest, StateError, StepsCommit, TrainedStep,
};
use ferry_coordinator::store::Store;
use ferry_rpc::proto;
use ferry_spec::job::JobSpec;
use ferry_spec::schedule::StepSchedule;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Arbitrary, Debug)]
struct Input {
    job: u8,
    ops: Vec<Op>,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Join {
        host: u8,
        port: u16,
        metrics: bool,
    },
    JoinRaw {
        host: String,
        data_addr: String,
        metrics_addr: String,
        devices: Vec<String>,
    },
    Heartbeat {
        who: Who,
        generation: Gen,
        step: u64,
        loss: f64,
    },
    Leave(Who),
    Tick {
        advance_ms: u16,
    },
    Rendezvous {
        who: Who,
        known: Gen,
        holds: Option<StepSel>,
        /// The worker's rank runs NCCL (else the ring).
        nccl: bool,
        blob_len: u16,
    },
    /// A worker back at rendezvous offering steps of its last group (`known`) it applied
    /// but does not know committed.
    RendezvousOffer {
        who: Who,
        known: Gen,
        holds: Option<StepSel>,
        offer: Steps,
    },
    /// A worker commits steps its group trained.
    Commit {
        who: Who,
        generation: Gen,
        steps: Steps,
        loss: f64,
        step_time_s: f64,
    },
    Checkpoint {
        who: Who,
        generation: Gen,
        step: StepSel,
        path: Option<String>,
    },
    Failure {
        who: Who,
        generation: Gen,
        suspect: Option<u8>,
    },
    Scale(u8),
    Stop,
    Resume,
    Ledger {
        from: u8,
        to: u8,
    },
    Restart,
    /// Every joined worker comes to rendezvous (twice: to arrive, then to hear the group; one
    /// given its group the first time trains, and does not come back to break it).
    RendezvousAll {
        holds: Option<StepSel>,
    },
    /// The running group trains the next step and its rank 0 commits it, with the schedule's
    /// group digest (it must be accepted).
    StepAll {
        loss: f64,
    },
    /// A protobuf request decoded from raw bytes, converted as the service converts it.
    /// `kind % 7` picks the message (4: a commit given the schedule's digests); `kind / 7`
    /// odd: its worker id is a joined worker's, and a rendezvous offer has the right digests.
    Proto {
        kind: u8,
        bytes: Vec<u8>,
    },
    /// Rank 0 reports that the checkpoint it was to restore (`unverified`; None: the
    /// recorded one) does not verify, and names an older one (`step`, 0: none).
    Fallback {
        who: Who,
        generation: Gen,
        unverified: Option<StepSel>,
        step: StepSel,
        path: Option<String>,
    },
}

#[derive(Arbitrary, Debug)]
enum Who {
    Joined(u8),
    Unknown(String),
}

#[derive(Arbitrary, Debug)]
enum Gen {
    /// The newest generation.
    Current,
    /// The one this worker was last assigned.
    Assigned,
    Raw(u64),
}

/// Consecutive trained steps: `count % 6` of them from `from`.
#[derive(Arbitrary, Debug)]
struct Steps {
    from: StepSel,
    count: u8,
    digest: DigestSel,
}

#[derive(Arbitrary, Debug)]
enum DigestSel {
    /// The schedule's group digest for the generation's group.
    Right,
    /// The right one but at one step (`at % count`), xored with `flip | 1`.
    Corrupt {
        at: u8,
        flip: u64,
    },
    /// The digest a group of `world % 9` ranks would have summed.
    World(u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum StepSel {
    /// The next step to run (committed steps so far), plus a small offset.
    Near(i8),
    Raw(u64),
}

/// Jobs of different shapes: (min_workers, max_workers, global, micro, steps, settle_s,
/// sequences in the data).
const JOBS: [(u32, Option<u32>, u64, u64, u64, f64, u64); 4] = [
    (1, None, 16, 4, 10, 0.0, 1000),
    (2, Some(3), 8, 2, 5, 1.0, 7),
    (1, Some(1), 4, 4, 3, 0.0, 1),
    (3, None, 6, 1, 4, 0.5, 50),
];

fn spec_toml(run_dir: &Path, job: u8) -> (String, u64) {
    let (min, max, global, micro, steps, settle, sequences) = JOBS[usize::from(job) % JOBS.len()];
    let max = max.map_or(String::new(), |m| format!("max_workers = {m}\n"));
    let toml = format!(
        r#"[job]
name = "fuzz"
steps = {steps}
run_dir = "{}"
seed = 3

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "unused"
seq_len = 8

[batch]
global = {global}
micro = {micro}

[cluster]
min_workers = {min}
{max}settle_s = {settle}
heartbeat_timeout_s = 10.0
collective_timeout_s = 5.0
"#,
        run_dir.display()
    );
    (toml, sequences)
}

struct Harness {
    dir: tempfile::TempDir,
    spec: JobSpec,
    toml: String,
    sequences: u64,
    state: Option<JobState>,
    now: Instant,
    ids: Vec<String>,
    /// Per worker: the generation of its last assignment.
    assigned: HashMap<String, u64>,
    /// The size of every group seen formed, by generation.
    worlds: HashMap<u64, u64>,
    /// A checkpoint that does not verify was reported since the last formation: the roll-back
    /// of the next formation continues the last one, and is not counted as another.
    fell_back: bool,
    /// Built as the state builds its own: what every rank plans its steps from.
    schedule: StepSchedule,
    before: JobStatus,
}

impl Harness {
    fn state(&mut self) -> &mut JobState {
        self.state.as_mut().expect("a state between requests")
    }

    fn who(&self, who: &Who) -> String {
        match who {
            Who::Joined(i) if !self.ids.is_empty() => {
                self.ids[usize::from(*i) % self.ids.len()].clone()
            }
            Who::Joined(i) => format!("w{i}-000000"),
            Who::Unknown(s) => s.clone(),
        }
    }

    fn generation(&self, id: &str, g: &Gen) -> u64 {
        match g {
            Gen::Current => self.before.generation,
            Gen::Assigned => self.assigned.get(id).copied().unwrap_or(0),
            Gen::Raw(g) => *g,
        }
    }

    fn step(&self, s: &StepSel) -> u64 {
        match s {
            StepSel::Near(d) => self
                .before
                .committed_steps
                .saturating_add_signed(i64::from(*d)),
            StepSel::Raw(s) => *s,
        }
    }

    fn restart(&mut self) {
        let job_id = self.before.job_id.clone();
        // The coordinator forgets it: the next roll-back counts.
        self.fell_back = false;
        drop(self.state.take());
        let store = Store::open(&self.dir.path().join("state")).expect("reopen the store");
        let loaded = store
            .load()
            .expect("load the stored job")
            .expect("a stored job");
        assert_eq!(loaded.spec_toml, self.toml);
        assert_eq!(loaded.job.job_id, job_id);
        assert_eq!(loaded.job.committed, self.before.committed_steps);
        assert_eq!(loaded.job.generation, self.before.generation);
        let ledger: Vec<u64> = loaded.ledger.iter().map(|e| e.step).collect();
        assert_eq!(
            ledger,
            (0..loaded.job.committed).collect::<Vec<_>>(),
            "the stored ledger is not the committed steps"
        );
        let state = JobState::open(
            self.spec.clone(),
            self.toml.clone(),
            self.sequences,
            store,
            Some(loaded),
            self.now,
        )
        .expect("reopen the job");
        self.state = Some(state);
    }

    fn apply(&mut self, op: Op) -> Result<(), StateError> {
        let now = self.now;
        match op {
            Op::Join {
                host,
                port,
                metrics,
            } => {
                let host = format!("host{}", host % 8);
                let req = JoinRequest {
                    data_addr: format!("{host}:{}", port.max(1)),
                    metrics_addr: if metrics {
                        format!("{host}:9100")
                    } else {
                        String::new()
                    },
                    host,
                    devices: vec!["cpu".into()],
                    pid: 1,
                };
                self.join(req)?;
            }
            Op::JoinRaw {
                host,
                data_addr,
                metrics_addr,
                devices,
            } => {
                self.join(JoinRequest {
                    host,
                    data_addr,
                    metrics_addr,
                    devices,
                    pid: 0,
                })?;
            }
            Op::Heartbeat {
                who,
                generation,
                step,
                loss,
            } => {
                let worker_id = self.who(&who);
                let req = Heartbeat {
                    generation: self.generation(&worker_id, &generation),
                    worker_id,
                    step,
                    loss,
                    tokens_per_s: 1.0,
                };
                let a = self.state().heartbeat(&req, now)?;
                assert_eq!(a.generation, self.state().status(now).generation);
            }
            Op::Leave(who) => {
                let id = self.who(&who);
                self.state().leave(&id, now)?;
            }
            Op::Tick { advance_ms } => {
                self.now += Duration::from_millis(u64::from(advance_ms));
                let now = self.now;
                self.state().tick(now)?;
            }
            Op::Rendezvous {
                who,
                known,
                holds,
                nccl,
                blob_len,
            } => {
                let worker_id = self.who(&who);
                let req = RendezvousRequest {
                    known_generation: self.generation(&worker_id, &known),
                    holds_step: holds.map(|s| self.step(&s)),
                    collective: if nccl {
                        CollectiveKind::Nccl
                    } else {
                        CollectiveKind::Ring
                    },
                    blob: vec![7; usize::from(blob_len)],
                    worker_id,
                    uncommitted: Vec::new(),
                    trained_as: None,
                };
                self.rendezvous(&req)?;
            }
            Op::RendezvousOffer {
                who,
                known,
                holds,
                offer,
            } => {
                let worker_id = self.who(&who);
                let known_generation = self.generation(&worker_id, &known);
                let req = RendezvousRequest {
                    known_generation,
                    holds_step: holds.map(|s| self.step(&s)),
                    uncommitted: self.trained(known_generation, &offer, 2.0, 0.5),
                    worker_id,
                    ..Default::default()
                };
                self.rendezvous(&req)?;
            }
            Op::Commit {
                who,
                generation,
                steps,
                loss,
                step_time_s,
            } => {
                let worker_id = self.who(&who);
                let generation = self.generation(&worker_id, &generation);
                let req = StepsCommit {
                    steps: self.trained(generation, &steps, loss, step_time_s),
                    generation,
                    worker_id,
                };
                self.commit(&req)?;
            }
            Op::Checkpoint {
                who,
                generation,
                step,
                path,
            } => {
                let worker_id = self.who(&who);
                let step = self.step(&step);
                let path = path.unwrap_or_else(|| {
                    ferry_spec::run_dir::checkpoint_dir(&self.spec.job.run_dir, step)
                        .display()
                        .to_string()
                });
                let req = CheckpointReport {
                    generation: self.generation(&worker_id, &generation),
                    step,
                    path,
                    worker_id,
                    ..Default::default()
                };
                self.report_checkpoint(&req)?;
                let status = self.state().status(now);
                assert_eq!(status.latest_checkpoint.map(|c| c.0), Some(step));
            }
            Op::Failure {
                who,
                generation,
                suspect,
            } => {
                let worker_id = self.who(&who);
                let req = FailureReport {
                    generation: self.generation(&worker_id, &generation),
                    message: "peer lost".into(),
                    suspect_rank: suspect.map(u32::from),
                    worker_id,
                };
                self.state().report_failure(&req, now)?;
            }
            Op::Scale(n) => {
                self.state().scale(u32::from(n), now)?;
            }
            Op::Stop => {
                self.state().stop()?;
            }
            Op::Resume => {
                self.state().resume_if_stopped()?;
            }
            Op::Ledger { from, to } => {
                let _ = self.state().ledger(u64::from(from), u64::from(to));
            }
            Op::Restart => self.restart(),
            Op::RendezvousAll { holds } => {
                let holds = holds.map(|s| self.step(&s));
                let mut placed = BTreeSet::new();
                for _ in 0..2 {
                    for id in self.ids.clone() {
                        if placed.contains(&id) {
                            continue;
                        }
                        let known = self.assigned.get(&id).copied().unwrap_or(0);
                        let req = RendezvousRequest {
                            known_generation: known,
                            holds_step: holds,
                            blob: id.as_bytes().to_vec(),
                            worker_id: id.clone(),
                            ..Default::default()
                        };
                        self.rendezvous(&req).or_else(expected)?;
                        if self.assigned.get(&id).copied().unwrap_or(0) != known {
                            placed.insert(id);
                        }
                    }
                }
            }
            Op::StepAll { loss } => {
                let s = self.state().status(now);
                if s.phase != "running" {
                    return Ok(());
                }
                let step = s.committed_steps;
                let world = u64::from(s.world_size);
                // Every member trains it (and says so: a heartbeat, which changes nothing).
                let mut rank0 = None;
                for w in s.workers.iter().filter(|w| w.rank.is_some()) {
                    let req = Heartbeat {
                        worker_id: w.worker_id.clone(),
                        generation: s.generation,
                        step,
                        loss,
                        tokens_per_s: 1.0,
                    };
                    let a = self.state().heartbeat(&req, now)?;
                    assert_eq!((a.generation, a.stop), (s.generation, false));
                    if w.rank == Some(0) {
                        rank0 = Some(w.worker_id.clone());
                    }
                }
                let worker_id = rank0.expect("a running group has a rank 0");
                let req = StepsCommit {
                    worker_id,
                    generation: s.generation,
                    steps: vec![TrainedStep {
                        step,
                        loss,
                        tokens: 100,
                        step_time_s: 0.5,
                        allreduce_s: 0.01,
                        group_digest: self.digest(step, world),
                    }],
                };
                if let Err(e) = self.commit(&req) {
                    panic!("the running group's rank 0 could not commit step {step}: {e}");
                }
                assert_eq!(self.state().committed(), step + 1);
            }
            Op::Proto { kind, bytes } => self.proto(kind, &bytes)?,
            Op::Fallback {
                who,
                generation,
                unverified,
                step,
                path,
            } => {
                let worker_id = self.who(&who);
                let recorded = self.state().status(now).latest_checkpoint.map(|c| c.0);
                let unverified_step = match &unverified {
                    Some(s) => self.step(s),
                    None => recorded.unwrap_or(0),
                };
                let step = self.step(&step);
                let path = path.unwrap_or_else(|| match step {
                    0 => String::new(),
                    s => ferry_spec::run_dir::checkpoint_dir(&self.spec.job.run_dir, s)
                        .display()
                        .to_string(),
                });
                let req = CheckpointReport {
                    generation: self.generation(&worker_id, &generation),
                    step,
                    path,
                    worker_id,
                    unverified_step,
                    unverified_reason: "model.safetensors: checksum mismatch".into(),
                };
                self.report_checkpoint(&req)?;
                let latest = self.state().status(now).latest_checkpoint.map(|c| c.0);
                if unverified_step == 0 {
                    // No step that does not verify: a plain report.
                    assert_eq!(latest, Some(step));
                } else {
                    assert!(step < unverified_step, "fell back to a step not older");
                    assert_eq!(
                        recorded,
                        Some(unverified_step),
                        "fell back from another one"
                    );
                    assert_eq!(latest, (step > 0).then_some(step));
                }
            }
        }
        Ok(())
    }

    fn join(&mut self, req: JoinRequest) -> Result<(), StateError> {
        let now = self.now;
        let joined = self.state().join(req, now)?;
        assert!(!self.ids.contains(&joined.worker_id), "an id given twice");
        assert_eq!(joined.job_toml, self.toml);
        self.ids.push(joined.worker_id);
        Ok(())
    }

    fn rendezvous(&mut self, req: &RendezvousRequest) -> Result<(), StateError> {
        let now = self.now;
        let at_most = self.expect_committed(req.known_generation, &req.uncommitted);
        let outcome = self.state().rendezvous(req, now);
        // Offered steps are committed at most as far as they continue the ledger with the
        // schedule's digests; the formation that may follow can only roll back.
        assert!(
            self.state().committed() <= at_most,
            "rendezvous committed offered steps beyond the valid ones ({} > {at_most})",
            self.state().committed()
        );
        match outcome? {
            RendezvousOutcome::Ready(a) => {
                let status = self.state().status(now);
                assert_eq!(a.generation, status.generation);
                assert_eq!(a.world_size, status.world_size);
                assert!(a.rank < a.world_size);
                assert_eq!(a.peers.len(), a.world_size as usize);
                assert!(a.start_step <= status.committed_steps);
                self.assigned.insert(req.worker_id.clone(), a.generation);
                self.saw_group(a.generation, a.world_size);
            }
            // Only a worker that runs NCCL is asked for a unique id.
            RendezvousOutcome::SendBlob(_) => assert_eq!(req.collective, CollectiveKind::Nccl),
            _ => {}
        }
        Ok(())
    }

    fn commit(&mut self, req: &StepsCommit) -> Result<(), StateError> {
        let now = self.now;
        let before = self.state().committed();
        let valid = self.expect_committed(req.generation, &req.steps);
        let answer = self.state().commit(req, now);
        let after = self.state().committed();
        // Steps are committed in order, each once, only with the schedule's digest, and
        // never taken back by a commit: up to the first invalid one, or none if the worker
        // may not commit for that generation.
        assert!(
            after == before || after == valid,
            "a commit took the ledger from {before} to {after} steps (valid: {valid})"
        );
        let answer = answer?;
        assert_eq!(answer.committed, after);
        assert_eq!(after, valid, "an accepted commit left valid steps out");
        let s = self.state().status(now);
        assert_eq!(
            answer.directive == Directive::Stop,
            s.phase == "stopped",
            "directive {:?} to a job {}",
            answer.directive,
            s.phase
        );
        if answer.directive == Directive::Continue {
            assert!(s.phase == "running" || s.phase == "finished");
            assert_eq!(
                s.generation, req.generation,
                "a group told to continue that is not the newest"
            );
        }
        Ok(())
    }

    /// Where the ledger ends if `steps`, trained by `generation`'s group, are accepted: steps
    /// below the committed count are skipped, and the first one that does not continue the
    /// ledger, is beyond the job, or does not carry the schedule's digest stops them.
    fn expect_committed(&mut self, generation: u64, steps: &[TrainedStep]) -> u64 {
        let mut committed = self.state().committed();
        let Some(&world) = self.worlds.get(&generation) else {
            return committed;
        };
        for s in steps {
            if s.step < committed {
                continue;
            }
            if s.step != committed
                || committed >= self.spec.job.steps
                || s.group_digest != self.digest(s.step, world)
            {
                break;
            }
            committed += 1;
        }
        committed
    }

    /// The group digest of `step` for `world` ranks (0 for steps beyond the job: nothing is
    /// planned there).
    fn digest(&mut self, step: u64, world: u64) -> u64 {
        if step < self.spec.job.steps {
            self.schedule.group_digest(step, world)
        } else {
            0
        }
    }

    /// The steps `sel` names, as `generation`'s group would report them.
    fn trained(
        &mut self,
        generation: u64,
        sel: &Steps,
        loss: f64,
        step_time_s: f64,
    ) -> Vec<TrainedStep> {
        let from = self.step(&sel.from);
        let count = u64::from(sel.count % 6);
        let world = match self.worlds.get(&generation) {
            Some(&w) => w,
            None => u64::from(self.before.world_size),
        };
        (0..count)
            .map(|i| {
                let step = from.saturating_add(i);
                let group_digest = match sel.digest {
                    DigestSel::Right => self.digest(step, world),
                    DigestSel::Corrupt { at, flip } if u64::from(at) % count == i => {
                        self.digest(step, world) ^ (flip | 1)
                    }
                    DigestSel::Corrupt { .. } => self.digest(step, world),
                    DigestSel::World(w) => self.digest(step, u64::from(w % 9)),
                    DigestSel::Raw(d) => d,
                };
                TrainedStep {
                    step,
                    loss,
                    tokens: 100,
                    step_time_s,
                    allreduce_s: 0.01,
                    group_digest,
                }
            })
            .collect()
    }

    /// A group of `world` ranks formed as `generation`: one generation, one group.
    fn saw_group(&mut self, generation: u64, world: u32) {
        let world = u64::from(world);
        let known = *self.worlds.entry(generation).or_insert(world);
        assert_eq!(known, world, "generation {generation} formed twice");
    }

    /// Replaces the worker id of a decoded request by a joined worker's when `pick` is odd
    /// (random bytes never name one).
    fn pick_worker(&self, pick: u8, worker_id: &mut String) {
        if pick % 2 == 1 && !self.ids.is_empty() {
            *worker_id = self.ids[usize::from(pick / 2) % self.ids.len()].clone();
        }
    }

    /// The decoded steps of `generation` with the schedule's digests.
    fn fix_digests(&mut self, generation: u64, steps: &mut [TrainedStep]) {
        let world = self.worlds.get(&generation).copied().unwrap_or(0);
        for s in steps {
            s.group_digest = self.digest(s.step, world);
        }
    }

    fn proto(&mut self, kind: u8, bytes: &[u8]) -> Result<(), StateError> {
        let now = self.now;
        let pick = kind / 7;
        macro_rules! decode {
            ($t:ty) => {
                match <$t>::decode(bytes) {
                    Ok(m) => m,
                    Err(_) => return Ok(()),
                }
            };
        }
        match kind % 7 {
            0 => self.join(decode!(proto::JoinRequest).into()),
            1 => {
                let mut m = decode!(proto::HeartbeatRequest);
                self.pick_worker(pick, &mut m.worker_id);
                self.state().heartbeat(&(&m).into(), now).map(drop)
            }
            2 => {
                let mut m = decode!(proto::RendezvousRequest);
                self.pick_worker(pick, &mut m.worker_id);
                let mut req: RendezvousRequest = (&m).into();
                if pick % 2 == 1 {
                    self.fix_digests(req.known_generation, &mut req.uncommitted);
                }
                self.rendezvous(&req)
            }
            k @ (3 | 4) => {
                let mut m = decode!(proto::CommitStepsRequest);
                self.pick_worker(pick, &mut m.worker_id);
                let mut req: StepsCommit = (&m).into();
                if k == 4 {
                    // Nor do they carry the schedule's digests.
                    self.fix_digests(req.generation, &mut req.steps);
                }
                self.commit(&req)
            }
            5 => {
                let mut m = decode!(proto::CheckpointReport);
                self.pick_worker(pick, &mut m.worker_id);
                self.report_checkpoint(&(&m).into())
            }
            _ => {
                let mut m = decode!(proto::FailureReport);
                self.pick_worker(pick, &mut m.worker_id);
                self.state().report_failure(&(&m).into(), now).map(drop)
            }
        }
    }

    fn report_checkpoint(&mut self, req: &CheckpointReport) -> Result<(), StateError> {
        let now = self.now;
        self.state().report_checkpoint(req, now)?;
        self.fell_back |= req.unverified_step != 0;
        Ok(())
    }

    /// What must hold between any two requests.
    fn check(&mut self) {
        let now = self.now;
        let before = self.before.clone();
        let s = self.state().status(now);
        assert!(s.committed_steps <= s.total_steps);
        assert!(
            s.generation >= before.generation,
            "the generation went back"
        );
        assert!(s.rollbacks >= before.rollbacks && s.redone_steps >= before.redone_steps);
        if s.committed_steps < before.committed_steps {
            assert!(
                s.rollbacks > before.rollbacks || self.fell_back,
                "steps lost without a rollback"
            );
            assert!(
                s.redone_steps - before.redone_steps >= before.committed_steps - s.committed_steps,
                "rolled back steps not counted"
            );
        }
        assert!(s.world_size <= s.max_workers);
        let ranks: Vec<u32> = s.workers.iter().filter_map(|w| w.rank).collect();
        assert_eq!(
            ranks.iter().collect::<BTreeSet<_>>().len(),
            ranks.len(),
            "a rank held twice"
        );
        assert!(ranks.iter().all(|&r| r < s.world_size.max(1)));
        if s.world_size > 0 {
            // A group is formed: it is the newest generation.
            self.saw_group(s.generation, s.world_size);
            self.fell_back = false;
        }
        if let Some((step, path)) = &s.latest_checkpoint {
            assert!(*step >= 1);
            let expected = ferry_spec::run_dir::checkpoint_dir(&self.spec.job.run_dir, *step);
            assert_eq!(Path::new(path), expected);
        }
        self.before = s;
    }
}

/// Refusals a well-behaved request can meet (the job moved on meanwhile): only a store
/// failure goes on.
fn expected(e: StateError) -> Result<(), StateError> {
    match e {
        StateError::Store(_) => Err(e),
        _ => Ok(()),
    }
}

fuzz_target!(|input: Input| {
    let dir = ferry_fuzz::scratch_dir();
    let (toml, sequences) = spec_toml(&dir.path().join("run"), input.job);
    let spec = JobSpec::from_toml(&toml, "job.toml").expect("the fuzz job is valid");
    let store = Store::open(&dir.path().join("state")).expect("open the store");
    let now = Instant::now();
    let state = JobState::open(spec.clone(), toml.clone(), sequences, store, None, now)
        .expect("open the job");
    let before = state.status(now);
    let schedule = StepSchedule::for_job(&spec, sequences);
    let mut h = Harness {
        dir,
        spec,
        toml,
        sequences,
        state: Some(state),
        now,
        ids: Vec::new(),
        assigned: HashMap::new(),
        worlds: HashMap::new(),
        fell_back: false,
        schedule,
        before,
    };
    for (i, op) in input.ops.into_iter().take(200).enumerate() {
        ferry_fuzz::debug(format_args!("request {i}: {op:?}"));
        match h.apply(op) {
            Ok(()) => {}
            Err(e @ StateError::Store(_)) => panic!("the store failed: {e}"),
            Err(e) => ferry_fuzz::debug(format_args!("request {i} refused: {e}")),
        }
        h.check();
    }
    let s = &h.before;
    ferry_fuzz::debug(format!(
        "{} workers, generation {}, world {}, {} steps committed, {} rollbacks, {}",
        s.workers.len(),
        s.generation,
        s.world_size,
        s.committed_steps,
        s.rollbacks,
        s.phase
    ));
});
