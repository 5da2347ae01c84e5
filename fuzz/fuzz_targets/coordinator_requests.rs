//! The coordinator's state machine (`coordinator/src/state/`) driven by arbitrary sequences of
//! the requests workers and admins make: joins, heartbeats, rendezvous, steps, commits,
//! checkpoint and failure reports, scale/stop, the passing of time, restarts from the durable
//! store, and protobuf messages decoded from raw bytes and converted as the gRPC service
//! does. Nothing may panic; after every request the job's invariants must hold.

#![no_main]

use arbitrary::Arbitrary;
use ferry_spec::job::JobSpec;
use ferry_rpc::proto;
use ferry_spec::sampler::sequences_digest;
use ferry_coordinator::state::{
    CheckpointReport, CollectiveKind, FailureReport, Heartbeat, JobState, JobStatus, JoinRequest,
    NextStepOutcome, RendezvousOutcome, RendezvousRequest, StateError, StepCommit, StepPlan,
    StepRequest,
};
use ferry_coordinator::store::Store;
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
    NextStep {
        who: Who,
        generation: Gen,
        step: StepSel,
    },
    Commit {
        who: Who,
        generation: Gen,
        step: StepSel,
        digest: Option<u64>,
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
    /// Every joined worker comes to rendezvous (twice: to arrive, then to hear the group).
    RendezvousAll {
        holds: Option<StepSel>,
    },
    /// Every worker asks for the next step in its assigned generation, then each one that got
    /// a plan commits it (with the plan's digest).
    StepAll {
        loss: f64,
    },
    /// A protobuf request decoded from raw bytes, converted as the service converts it.
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
    /// Per worker: the generation of its last assignment, and its last plan.
    assigned: HashMap<String, u64>,
    plans: HashMap<String, StepPlan>,
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
                };
                self.rendezvous(&req)?;
            }
            Op::NextStep {
                who,
                generation,
                step,
            } => {
                let worker_id = self.who(&who);
                let req = StepRequest {
                    generation: self.generation(&worker_id, &generation),
                    step: self.step(&step),
                    worker_id,
                };
                self.next_step(&req)?;
            }
            Op::Commit {
                who,
                generation,
                step,
                digest,
                loss,
                step_time_s,
            } => {
                let worker_id = self.who(&who);
                let plan = self.plans.get(&worker_id);
                let plan_digest = plan.map_or(0, |p| sequences_digest(&p.sequence_ids));
                let req = StepCommit {
                    generation: self.generation(&worker_id, &generation),
                    step: self.step(&step),
                    loss,
                    tokens: 100,
                    step_time_s,
                    allreduce_s: 0.01,
                    sequences_digest: digest.unwrap_or(plan_digest),
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
                self.state().report_checkpoint(&req, now)?;
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
                for _ in 0..2 {
                    for id in self.ids.clone() {
                        let req = RendezvousRequest {
                            known_generation: self.assigned.get(&id).copied().unwrap_or(0),
                            holds_step: holds,
                            blob: id.as_bytes().to_vec(),
                            worker_id: id,
                            ..Default::default()
                        };
                        self.rendezvous(&req).or_else(expected)?;
                    }
                }
            }
            Op::StepAll { loss } => {
                let step = self.before.committed_steps;
                let mut planned = Vec::new();
                for id in self.ids.clone() {
                    let req = StepRequest {
                        generation: self.assigned.get(&id).copied().unwrap_or(0),
                        step,
                        worker_id: id.clone(),
                    };
                    self.plans.remove(&id);
                    self.next_step(&req).or_else(expected)?;
                    if self.plans.contains_key(&id) {
                        planned.push(id);
                    }
                }
                for id in planned {
                    let plan = &self.plans[&id];
                    let req = StepCommit {
                        generation: plan.generation,
                        step: plan.step,
                        loss,
                        tokens: 100,
                        step_time_s: 0.5,
                        allreduce_s: 0.01,
                        sequences_digest: sequences_digest(&plan.sequence_ids),
                        worker_id: id,
                    };
                    self.commit(&req).or_else(expected)?;
                }
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
                self.state().report_checkpoint(&req, now)?;
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
        match self.state().rendezvous(req, now)? {
            RendezvousOutcome::Ready(a) => {
                let status = self.state().status(now);
                assert_eq!(a.generation, status.generation);
                assert_eq!(a.world_size, status.world_size);
                assert!(a.rank < a.world_size);
                assert_eq!(a.peers.len(), a.world_size as usize);
                assert!(a.start_step <= status.committed_steps);
                self.assigned.insert(req.worker_id.clone(), a.generation);
            }
            // Only a worker that runs NCCL is asked for a unique id.
            RendezvousOutcome::SendBlob(_) => assert_eq!(req.collective, CollectiveKind::Nccl),
            _ => {}
        }
        Ok(())
    }

    fn next_step(&mut self, req: &StepRequest) -> Result<(), StateError> {
        let now = self.now;
        if let NextStepOutcome::Plan(plan) = self.state().next_step(req, now)? {
            let status = self.state().status(now);
            assert_eq!(plan.step, status.committed_steps);
            assert!(plan.rank < plan.world_size);
            assert!(plan.global_batch == self.spec.batch.global);
            assert!(!plan.sequence_ids.is_empty());
            assert!(plan.sequence_ids.iter().all(|&id| id < self.sequences));
            self.plans.insert(req.worker_id.clone(), plan);
        }
        Ok(())
    }

    fn commit(&mut self, req: &StepCommit) -> Result<(), StateError> {
        let now = self.now;
        let committed = self.state().commit(req, now)?;
        assert_eq!(committed, self.state().committed());
        Ok(())
    }

    fn proto(&mut self, kind: u8, bytes: &[u8]) -> Result<(), StateError> {
        let now = self.now;
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
                let m = decode!(proto::HeartbeatRequest);
                self.state().heartbeat(&(&m).into(), now).map(drop)
            }
            2 => {
                let m = decode!(proto::RendezvousRequest);
                self.rendezvous(&(&m).into())
            }
            3 => {
                let m = decode!(proto::NextStepRequest);
                self.next_step(&(&m).into())
            }
            4 => {
                let m = decode!(proto::CommitStepRequest);
                self.commit(&(&m).into())
            }
            5 => {
                let m = decode!(proto::CheckpointReport);
                self.state().report_checkpoint(&(&m).into(), now)
            }
            _ => {
                let m = decode!(proto::FailureReport);
                self.state().report_failure(&(&m).into(), now).map(drop)
            }
        }
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
                s.rollbacks > before.rollbacks,
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
    let mut h = Harness {
        dir,
        spec,
        toml,
        sequences,
        state: Some(state),
        now,
        ids: Vec::new(),
        assigned: HashMap::new(),
        plans: HashMap::new(),
        before,
    };
    for op in input.ops.into_iter().take(200) {
        match h.apply(op) {
            Ok(()) | Err(StateError::InvalidArgument(_)) | Err(StateError::NotFound(_)) => {}
            Err(StateError::FailedPrecondition(_)) | Err(StateError::OutOfRange(_)) => {}
            Err(StateError::PermissionDenied(_)) => {}
            Err(e @ StateError::Store(_)) => panic!("the store failed: {e}"),
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
