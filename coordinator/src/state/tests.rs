//! The state machine on its own: no sockets, no gRPC, time passed in. Each test drives the
//! calls workers make (join, rendezvous with offered steps, rank 0's commits, heartbeats by
//! way of `tick`) and checks what the machine answers and records.

use super::*;
use crate::store::StateSourceRecord;
use ferry_spec::schedule::StepSchedule;
use std::collections::BTreeSet;

/// 16 sequences per step in micro-batches of 4; 1,000 sequences in the corpus.
const GLOBAL: u64 = 16;
const SEQUENCES: u64 = 1000;

/// What every rank of a group of `world` knows of `step` after its all-reduce.
fn trained(step: u64, world: u32) -> TrainedStep {
    TrainedStep {
        step,
        loss: 2.5,
        tokens: 100,
        step_time_s: 0.1,
        allreduce_s: 0.0,
        group_digest: StepSchedule::new(3, SEQUENCES, GLOBAL, 4).group_digest(step, world.into()),
    }
}

struct Harness {
    state: JobState,
    dir: tempfile::TempDir,
    now: Instant,
}

fn spec_toml(run_dir: &std::path::Path, cluster: &str) -> String {
    format!(
        r#"[job]
name = "machine"
steps = 10
run_dir = "{}"
seed = 3

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "unused"
seq_len = 8

[batch]
global = {GLOBAL}
micro = 4

[cluster]
settle_s = 0.0
heartbeat_timeout_s = 10.0
{cluster}
"#,
        run_dir.display()
    )
}

impl Harness {
    fn new(cluster: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let toml = spec_toml(&dir.path().join("run"), cluster);
        let spec = JobSpec::from_toml(&toml, "job.toml").unwrap();
        let store = Store::open(&dir.path().join("state")).unwrap();
        let now = Instant::now();
        let state = JobState::open(spec, toml, SEQUENCES, store, None, now).unwrap();
        Harness { state, dir, now }
    }

    /// The same job reopened from its store, as a restarted coordinator does.
    fn restart(self) -> Harness {
        let Harness { state, dir, now } = self;
        let (spec, toml) = (state.spec.clone(), state.spec_toml.clone());
        drop(state);
        let store = Store::open(&dir.path().join("state")).unwrap();
        let loaded = store.load().unwrap().expect("a stored job");
        let state = JobState::open(spec, toml, SEQUENCES, store, Some(loaded), now).unwrap();
        Harness { state, dir, now }
    }

    fn join(&mut self, host: &str) -> String {
        let req = JoinRequest {
            host: host.into(),
            data_addr: format!("{host}:9"),
            ..Default::default()
        };
        self.state.join(req, self.now).unwrap().worker_id
    }

    fn rendezvous(&mut self, id: &str, known: u64, holds: Option<u64>) -> RendezvousOutcome {
        let req = RendezvousRequest {
            worker_id: id.into(),
            known_generation: known,
            holds_step: holds,
            blob: id.as_bytes().to_vec(),
            ..Default::default()
        };
        self.state.rendezvous(&req, self.now).unwrap()
    }

    /// Rendezvous of a worker whose rank runs NCCL, offering `blob` (empty: none yet).
    fn rendezvous_nccl(&mut self, id: &str, blob: &[u8]) -> Result<RendezvousOutcome, StateError> {
        let req = RendezvousRequest {
            worker_id: id.into(),
            collective: CollectiveKind::Nccl,
            blob: blob.to_vec(),
            ..Default::default()
        };
        self.state.rendezvous(&req, self.now)
    }

    /// Rendezvous for every worker until each is Ready; returns the assignments in order.
    fn form(&mut self, ids: &[&str], known: u64, holds: &[Option<u64>]) -> Vec<Assignment> {
        for (id, h) in ids.iter().zip(holds) {
            self.rendezvous(id, known, *h);
        }
        ids.iter()
            .zip(holds)
            .map(|(id, h)| match self.rendezvous(id, known, *h) {
                RendezvousOutcome::Ready(a) => a,
                other => panic!("{id}: {other:?}"),
            })
            .collect()
    }

    /// A rendezvous offering the steps of `known`'s group this worker applied uncommitted.
    fn offer(
        &mut self,
        id: &str,
        known: u64,
        holds: u64,
        steps: &[u64],
        world: u32,
    ) -> RendezvousOutcome {
        let req = RendezvousRequest {
            worker_id: id.into(),
            known_generation: known,
            holds_step: Some(holds),
            blob: id.as_bytes().to_vec(),
            uncommitted: steps.iter().map(|&s| trained(s, world)).collect(),
            ..Default::default()
        };
        self.state.rendezvous(&req, self.now).unwrap()
    }

    fn commit(
        &mut self,
        id: &str,
        a: &Assignment,
        steps: &[u64],
    ) -> Result<CommitAnswer, StateError> {
        let req = StepsCommit {
            worker_id: id.into(),
            generation: a.generation,
            steps: steps.iter().map(|&s| trained(s, a.world_size)).collect(),
        };
        self.state.commit(&req, self.now)
    }

    /// The group trains the next step, each rank on its own plan, and rank 0 commits it.
    /// Returns the answer and the sequences trained, in rank order.
    fn step(&mut self, members: &[(&str, &Assignment)]) -> (Directive, Vec<u64>) {
        let step = self.state.committed();
        let world = members[0].1.world_size;
        let mut schedule = StepSchedule::new(3, SEQUENCES, GLOBAL, 4);
        let trained = (0..world)
            .flat_map(|r| schedule.plan(step, r.into(), world.into()).sequence_ids)
            .collect();
        let (id, a) = members
            .iter()
            .find(|(_, a)| a.rank == 0)
            .expect("a rank 0 among the members");
        let answer = self.commit(id, a, &[step]).unwrap();
        assert_eq!(answer.committed, step + 1);
        (answer.directive, trained)
    }

    /// The group trains and commits `steps` steps; returns the sequences trained per step.
    fn run(&mut self, members: &[(&str, &Assignment)], steps: u64) -> Vec<Vec<u64>> {
        (0..steps)
            .map(|_| {
                let (directive, trained) = self.step(members);
                assert_eq!(directive, Directive::Continue);
                trained
            })
            .collect()
    }

    /// The ledger as the service reads it: after the store's writer has caught up.
    fn ledger(&self, from: u64, to: u64) -> Vec<LedgerRecord> {
        self.state.store.sync().unwrap();
        self.state.ledger(from, to).unwrap()
    }

    fn later(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
    }
}

#[test]
fn a_group_forms_once_every_proposed_member_has_come_to_rendezvous() {
    let mut h = Harness::new("min_workers = 2");
    let a = h.join("a");
    match h.rendezvous(&a, 0, None) {
        RendezvousOutcome::Wait(why) => assert!(why.contains("quorum of 2"), "{why}"),
        other => panic!("{other:?}"),
    }
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a, &b], 0, &[None, None]);
    assert_eq!(got[0].generation, got[1].generation);
    assert_eq!((got[0].rank, got[1].rank, got[0].world_size), (0, 1, 2));
    assert_eq!(got[0].peers, ["a:9", "b:9"]);
    assert_eq!(
        (got[0].source, got[0].start_step),
        (StateSourceRecord::Init, 0)
    );
    // Rank 0's offer is everyone's.
    assert_eq!(got[1].blob, a.as_bytes());
    assert_eq!(h.state.status(h.now).phase, "running");
}

/// Each NCCL unique id starts a bootstrap thread in NCCL that lives until a communicator uses
/// it. Before, every worker made one at every rendezvous poll; now the group waits, once every
/// member is here, for the one that is to be rank 0, and only it is asked.
#[test]
fn with_nccl_only_rank_0_is_asked_for_its_unique_id_and_every_member_gets_it() {
    let mut h = Harness::new("min_workers = 2");
    let a = h.join("a");
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    assert!(matches!(
        h.rendezvous_nccl(&a, &[]).unwrap(),
        RendezvousOutcome::Wait(_)
    ));
    // Every member is here: b is not asked, and nothing forms without the id.
    match h.rendezvous_nccl(&b, &[]).unwrap() {
        RendezvousOutcome::Wait(why) => assert!(why.contains("rank 0's NCCL unique id"), "{why}"),
        other => panic!("formed without rank 0's id: {other:?}"),
    }
    match h.rendezvous_nccl(&a, &[]).unwrap() {
        RendezvousOutcome::SendBlob(why) => assert!(why.contains("rank 0"), "{why}"),
        other => panic!("rank 0 was not asked for its id: {other:?}"),
    }
    assert!(matches!(
        h.rendezvous_nccl(&b, &[]).unwrap(),
        RendezvousOutcome::Wait(_)
    ));
    let ready = |o: RendezvousOutcome| match o {
        RendezvousOutcome::Ready(a) => a,
        other => panic!("{other:?}"),
    };
    let a_side = ready(h.rendezvous_nccl(&a, b"id-of-a").unwrap());
    let b_side = ready(h.rendezvous_nccl(&b, &[]).unwrap());
    assert_eq!((a_side.rank, b_side.rank), (0, 1));
    assert_eq!(a_side.blob, b"id-of-a");
    assert_eq!(b_side.blob, b"id-of-a");
}

/// Rank 0 asked for its unique id and never sending it must not hold the group for ever: at
/// the formation deadline it is set aside like a member that never came, and the others form
/// without it.
#[test]
fn a_rank_0_that_never_sends_its_unique_id_is_set_aside_at_the_formation_deadline() {
    let mut h = Harness::new("min_workers = 1\ncollective_timeout_s = 30.0");
    let a = h.join("a");
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    h.rendezvous_nccl(&a, &[]).unwrap();
    h.rendezvous_nccl(&b, &[]).unwrap();
    assert!(matches!(
        h.rendezvous_nccl(&a, &[]).unwrap(),
        RendezvousOutcome::SendBlob(_)
    ));
    // Both stay alive (heartbeats) past the deadline: heartbeat timeout + collective timeout.
    for _ in 0..8 {
        h.later(9);
        for id in [&a, &b] {
            let beat = Heartbeat {
                worker_id: id.to_string(),
                ..Default::default()
            };
            h.state.heartbeat(&beat, h.now).unwrap();
        }
        h.state.tick(h.now).unwrap();
    }
    h.rendezvous_nccl(&b, &[]).unwrap();
    match h.rendezvous_nccl(&b, b"id-of-b").unwrap() {
        RendezvousOutcome::Ready(got) => {
            assert_eq!((got.rank, got.world_size), (0, 1));
            assert_eq!(got.blob, b"id-of-b");
        }
        other => panic!("the group still waits for a: {other:?}"),
    }
}

/// A GPU worker (NCCL) that joins a job of CPU workers (the ring), or the other way round,
/// could never connect to their group: before, it was proposed into every generation, which
/// then failed to connect, over and over. Now it is refused at rendezvous with the reason
/// and leaves the job; the workers already there go on.
#[test]
fn a_worker_whose_collective_differs_from_the_jobs_is_refused_with_the_reason() {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let first = h.form(&[&a], 0, &[None]);
    h.run(&[(&a, &first[0])], 1);
    let b = h.join("gpu-host");
    match h.rendezvous_nccl(&b, &[]) {
        Err(StateError::FailedPrecondition(why)) => {
            for part in [
                &b,
                "NCCL (GPU)",
                "the ring (CPU)",
                &a,
                "--device",
                "backend",
            ] {
                assert!(why.contains(part), "{part:?} missing from: {why}");
            }
        }
        other => panic!("a mixed group was not refused: {other:?}"),
    }
    let workers = h.state.status(h.now).workers;
    assert_eq!(workers.len(), 1, "the refused worker stays: {workers:?}");
    // The job goes on with the workers it had.
    h.run(&[(&a, &first[0])], 1);
    assert_eq!(h.state.committed(), 2);
}

#[test]
fn every_sequence_of_a_step_is_planned_to_exactly_one_rank_and_committed_once() {
    let mut h = Harness::new("min_workers = 3");
    let ids: Vec<String> = ["a", "b", "c"].iter().map(|n| h.join(n)).collect();
    let names: Vec<&str> = ids.iter().map(String::as_str).collect();
    h.state.tick(h.now).unwrap();
    let got = h.form(&names, 0, &[None; 3]);
    let members: Vec<(&str, &Assignment)> = names.iter().copied().zip(&got).collect();
    let trained = h.run(&members, 4);
    for (step, seqs) in trained.iter().enumerate() {
        assert_eq!(seqs.len() as u64, GLOBAL, "step {step}");
        assert_eq!(seqs.iter().collect::<BTreeSet<_>>().len() as u64, GLOBAL);
    }
    let all: BTreeSet<u64> = trained.iter().flatten().copied().collect();
    assert_eq!(all.len() as u64, 4 * GLOBAL, "a sequence was trained twice");
    let ledger = h.ledger(0, 0);
    assert_eq!(ledger.len(), 4);
    assert!(ledger
        .iter()
        .all(|e| e.slices.len() == 3 && e.world_size == 3));
    assert_eq!(ledger[3].step, 3);
}

#[test]
fn a_commit_must_match_the_schedule_and_come_from_a_member_of_its_group() {
    let mut h = Harness::new("min_workers = 1\nmax_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a], 0, &[None]);
    let b = h.join("b");
    let mut req = StepsCommit {
        worker_id: a.clone(),
        generation: got[0].generation,
        steps: vec![trained(0, 1)],
    };
    req.steps[0].group_digest ^= 1;
    assert!(
        matches!(h.state.commit(&req, h.now), Err(StateError::InvalidArgument(m)) if m.contains("digest"))
    );
    // Trained by a group of two: not this group's schedule.
    req.steps = vec![trained(0, 2)];
    assert!(matches!(
        h.state.commit(&req, h.now),
        Err(StateError::InvalidArgument(_))
    ));
    assert!(matches!(
        h.commit("w99-nobody", &got[0], &[0]),
        Err(StateError::NotFound(_))
    ));
    assert!(matches!(
        h.commit(&b, &got[0], &[0]),
        Err(StateError::FailedPrecondition(m)) if m.contains("not a member")
    ));
    assert!(matches!(
        h.commit(&a, &got[0], &[7]),
        Err(StateError::OutOfRange(_))
    ));
    assert_eq!(
        h.state.committed(),
        0,
        "a refused commit changed the ledger"
    );
    // Retried or repeated, a step is recorded once.
    assert_eq!(h.commit(&a, &got[0], &[0, 1]).unwrap().committed, 2);
    assert_eq!(h.commit(&a, &got[0], &[1, 2]).unwrap().committed, 3);
    assert_eq!(h.ledger(0, 0).len(), 3);
}

#[test]
fn a_join_regroups_at_the_next_step_boundary_and_the_holder_becomes_rank_0() {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let first = h.form(&[&a], 0, &[None]);
    h.run(&[(&a, &first[0])], 2);
    let b = h.join("b");
    // The step in flight is not broken: the join waits for rank 0's next commit, which says
    // to regroup after one more step (the directive travels in that step's all-reduce).
    assert_eq!(h.step(&[(&a, &first[0])]).0, Directive::Regroup);
    // a applied step 3 too and offers it: it is committed from the offer.
    let _ = h.offer(&a, first[0].generation, 4, &[3], 1);
    assert_eq!(h.state.committed(), 4);
    let second = h.form(&[&b, &a], first[0].generation, &[None, Some(4)]);
    let a_side = &second[1];
    assert!(a_side.generation > first[0].generation);
    assert_eq!(
        (a_side.rank, a_side.world_size),
        (0, 2),
        "the holder is rank 0"
    );
    assert_eq!(
        (a_side.source, a_side.start_step),
        (StateSourceRecord::Held, 4)
    );
    h.run(&[(&a, &second[1]), (&b, &second[0])], 1);
    assert_eq!(h.state.committed(), 5);
    assert_eq!(h.ledger(3, 4)[0].world_size, 1);
    assert_eq!(h.ledger(4, 5)[0].world_size, 2);
}

/// A graceful leave (SIGTERM) of the only worker holding the committed state, while a new
/// worker joins and no checkpoint exists: before, the leaver was released at the boundary (or
/// removed at once, when it left while its next group was forming) and the newcomer started
/// over from the seed, losing every step. Now the leaver stays one more generation as rank 0,
/// hands its state over (the broadcast, proved by one committed step), and only then is
/// released; the newcomer goes on from there.
fn the_only_holder_leaves_while_a_newcomer_joins(while_forming: bool) {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let alone = h.form(&[&a], 0, &[None]);
    h.run(&[(&a, &alone[0])], 2);
    let b = h.join("b");
    if !while_forming {
        assert!(
            !h.state.leave(&a, h.now).unwrap(),
            "a leaves at the boundary"
        );
    }
    assert_eq!(h.step(&[(&a, &alone[0])]).0, Directive::Regroup);
    // a applies one more step (3) and comes back offering it.
    let _ = h.offer(&a, alone[0].generation, 4, &[3], 1);
    if while_forming {
        assert!(
            !h.state.leave(&a, h.now).unwrap(),
            "a leaves once it handed over"
        );
    }
    let handover = h.form(&[&a, &b], alone[0].generation, &[Some(4), None]);
    assert_eq!(
        (handover[0].rank, handover[0].source, handover[0].start_step),
        (0, StateSourceRecord::Held, 4),
        "the leaver hands its state over as rank 0"
    );
    // b holds the state once the group commits a step: a is let go after the next one.
    let pair = [(a.as_str(), &handover[0]), (b.as_str(), &handover[1])];
    assert_eq!(h.step(&pair).0, Directive::Regroup);
    assert_eq!(
        h.offer(&a, handover[0].generation, 6, &[5], 2),
        RendezvousOutcome::Released,
        "the leaver is let go once the state is handed over"
    );
    assert_eq!(h.state.committed(), 6, "the leaver's offer was committed");
    let after = h.form(&[&b], handover[1].generation, &[Some(6)]);
    assert_eq!(
        (after[0].source, after[0].start_step),
        (StateSourceRecord::Held, 6)
    );
    let meta = h.state.ledger_meta();
    assert_eq!(
        (meta.rollbacks, meta.redone_steps),
        (0, 0),
        "no step was lost"
    );
}

#[test]
fn a_graceful_leave_of_the_only_holder_hands_the_state_over_first() {
    the_only_holder_leaves_while_a_newcomer_joins(false);
}

#[test]
fn the_only_holder_leaving_while_its_next_group_forms_hands_the_state_over_first() {
    the_only_holder_leaves_while_a_newcomer_joins(true);
}

/// Found by the coordinator_requests fuzz target: the leaver kept for the handover took a
/// place beyond max_workers when the job was full of newcomers.
#[test]
fn a_handover_never_makes_the_group_larger_than_max_workers() {
    let mut h = Harness::new("min_workers = 1\nmax_workers = 2");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let alone = h.form(&[&a], 0, &[None]);
    h.run(&[(&a, &alone[0])], 2);
    let b = h.join("b");
    let c = h.join("c");
    assert!(!h.state.leave(&a, h.now).unwrap());
    assert_eq!(h.step(&[(&a, &alone[0])]).0, Directive::Regroup);
    let _ = h.offer(&a, alone[0].generation, 4, &[3], 1);
    let handover = h.form(&[&a, &b], alone[0].generation, &[Some(4), None]);
    assert_eq!(handover[0].world_size, 2, "a hands over to b; c waits");
    assert_eq!(
        (handover[0].rank, handover[0].source),
        (0, StateSourceRecord::Held)
    );
    assert!(matches!(
        h.rendezvous(&c, alone[0].generation, None),
        RendezvousOutcome::Wait(_)
    ));
}

#[test]
fn a_silent_member_is_declared_dead_and_the_step_in_flight_is_redone() {
    let mut h = Harness::new("min_workers = 1");
    let (a, b) = (h.join("a"), h.join("b"));
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a, &b], 0, &[None, None]);
    h.run(&[(&a, &got[0]), (&b, &got[1])], 1);
    // Step 1 starts; b never heartbeats again, and a's all-reduce of step 1 never completes.
    h.later(11);
    h.state
        .heartbeat(
            &Heartbeat {
                worker_id: a.clone(),
                ..Default::default()
            },
            h.now,
        )
        .unwrap();
    h.state.tick(h.now).unwrap();
    assert_eq!(h.state.status(h.now).workers.len(), 1, "b is still listed");
    // The old group's commits are answered REGROUP.
    assert_eq!(
        h.commit(&a, &got[0], &[]).unwrap().directive,
        Directive::Regroup
    );
    let again = h.form(&[&a], got[0].generation, &[Some(1)]);
    assert_eq!((again[0].world_size, again[0].start_step), (1, 1));
    assert_eq!(h.state.committed(), 1, "the abandoned step was counted");
    h.run(&[(&a, &again[0])], 1);
    assert_eq!(h.state.committed(), 2);
}

#[test]
fn with_no_holder_the_job_rolls_back_to_its_checkpoint_and_counts_the_redone_steps() {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a], 0, &[None]);
    let first = h.run(&[(&a, &got[0])], 5);
    let path = ferry_spec::run_dir::checkpoint_dir(&h.state.spec.job.run_dir, 3);
    let report = CheckpointReport {
        worker_id: a.clone(),
        generation: got[0].generation,
        step: 3,
        path: path.display().to_string(),
        ..Default::default()
    };
    h.state.report_checkpoint(&report, h.now).unwrap();
    h.later(11);
    h.state.tick(h.now).unwrap();
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    let back = h.form(&[&b], 0, &[None]);
    assert_eq!(back[0].source, StateSourceRecord::Checkpoint);
    assert_eq!(back[0].start_step, 3);
    assert_eq!(back[0].checkpoint_path, path.display().to_string());
    assert_eq!(h.ledger(0, 0).len(), 3, "the ledger was not cut back");
    let meta = h.state.ledger_meta();
    assert_eq!((meta.rollbacks, meta.redone_steps), (1, 2));
    // The redone steps train the same sequences as the first time: the order is the seed's.
    let redone = h.run(&[(&b, &back[0])], 2);
    assert_eq!(redone, first[3..], "the redone steps trained other data");
    assert_eq!(h.state.committed(), 5);
    let h = h.restart();
    assert_eq!(h.state.committed(), 5);
    assert_eq!(h.state.ledger_meta().redone_steps, 2);
}

#[test]
fn with_no_holder_and_no_checkpoint_the_job_starts_over_from_the_seed() {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a], 0, &[None]);
    let first = h.run(&[(&a, &got[0])], 2);
    h.later(11);
    h.state.tick(h.now).unwrap();
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    let back = h.form(&[&b], 0, &[None]);
    assert_eq!(
        (back[0].source, back[0].start_step),
        (StateSourceRecord::Init, 0)
    );
    assert_eq!(h.state.ledger_meta().redone_steps, 2);
    assert_eq!(
        h.run(&[(&b, &back[0])], 2),
        first,
        "the redone steps trained other data"
    );
}

#[test]
fn a_restarted_machine_keeps_its_ledger_group_and_workers() {
    let mut h = Harness::new("min_workers = 2");
    let (a, b) = (h.join("a"), h.join("b"));
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a, &b], 0, &[None, None]);
    h.run(&[(&a, &got[0]), (&b, &got[1])], 3);
    let before = h.ledger(0, 0);
    let mut h = h.restart();
    assert_eq!(h.ledger(0, 0), before);
    // The group runs on: rank 0's next commit is taken for the same generation.
    h.run(&[(&a, &got[0]), (&b, &got[1])], 1);
    assert_eq!(h.state.committed(), 4);
    assert_eq!(h.state.status(h.now).workers.len(), 2);
}

/// A member that leaves while the job is stopped is removed at once, and nobody re-forms the
/// group then. Restarted and resumed, the job must not keep that group: the member would
/// never time out, and every new worker would stand by forever ("the group is full").
#[test]
fn a_group_whose_member_left_while_stopped_re_forms_after_a_restart() {
    let mut h = Harness::new("min_workers = 1");
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a], 0, &[None]);
    h.run(&[(&a, &got[0])], 2);
    h.state.stop().unwrap();
    assert!(
        h.state.leave(&a, h.now).unwrap(),
        "a stopped job lets a worker go at once"
    );
    let mut h = h.restart();
    assert!(h.state.resume_if_stopped().unwrap());
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    let again = h.form(&[&b], got[0].generation, &[None]);
    assert!(again[0].generation > got[0].generation);
    assert_eq!((again[0].rank, again[0].world_size), (0, 1));
    h.run(&[(&b, &again[0])], 1);
}

/// Issue 22: rank 0 of a group formed to restore the recorded checkpoint finds that it does
/// not verify and names the newest older one that does. The job falls back to it: the next
/// generation restores it, the ledger is cut back to its step, and the steps after it train
/// the same sequences again, once. With none that verifies, the job starts again from step 0.
#[test]
fn a_checkpoint_that_does_not_verify_on_rank_0_gives_way_to_the_older_one_it_names() {
    let mut h = Harness::new("min_workers = 1");
    let at = |h: &Harness, step: u64| {
        ferry_spec::run_dir::checkpoint_dir(&h.state.spec.job.run_dir, step)
            .display()
            .to_string()
    };
    let a = h.join("a");
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a], 0, &[None]);
    let first = h.run(&[(&a, &got[0])], 7);
    for step in [3, 6] {
        let report = CheckpointReport {
            worker_id: a.clone(),
            generation: got[0].generation,
            step,
            path: at(&h, step),
            ..Default::default()
        };
        h.state.report_checkpoint(&report, h.now).unwrap();
    }
    h.later(11);
    h.state.tick(h.now).unwrap();
    let b = h.join("b");
    h.state.tick(h.now).unwrap();
    let restore = h.form(&[&b], 0, &[None]);
    assert_eq!(restore[0].source, StateSourceRecord::Checkpoint);
    assert_eq!(restore[0].start_step, 6);
    let fallback = |step: u64, path: String, unverified_step: u64| CheckpointReport {
        worker_id: b.clone(),
        generation: restore[0].generation,
        step,
        path,
        unverified_step,
        unverified_reason: "model.safetensors: checksum mismatch".into(),
    };
    // Not the checkpoint this group restores; not older; not the job's run directory.
    for (report, says) in [
        (fallback(3, at(&h, 3), 5), "not the one generation"),
        (fallback(6, at(&h, 6), 6), "not older"),
        (
            fallback(3, "/elsewhere/step-00000003".into(), 6),
            "run directory",
        ),
        (fallback(0, at(&h, 3), 6), "step 0 has no checkpoint"),
    ] {
        let err = h.state.report_checkpoint(&report, h.now).unwrap_err();
        assert!(err.to_string().contains(says), "{report:?}: {err}");
    }
    assert_eq!(h.state.job.checkpoint.as_ref().unwrap().step, 6);
    h.state
        .report_checkpoint(&fallback(3, at(&h, 3), 6), h.now)
        .unwrap();
    let again = h.form(&[&b], restore[0].generation, &[None]);
    assert!(again[0].generation > restore[0].generation);
    assert_eq!(again[0].source, StateSourceRecord::Checkpoint);
    assert_eq!(again[0].start_step, 3);
    assert_eq!(again[0].checkpoint_path, at(&h, 3));
    assert_eq!(
        h.ledger(0, 0).len(),
        3,
        "the ledger was not cut back to step 3"
    );
    // One rollback, from step 7 to step 3, though it went by way of step 6.
    let meta = h.state.ledger_meta();
    assert_eq!((meta.rollbacks, meta.redone_steps), (1, 4));
    let redone = h.run(&[(&b, &again[0])], 4);
    assert_eq!(redone, first[3..], "the redone steps trained other data");
    assert_eq!(h.state.committed(), 7);
    let ledger = h.ledger(0, 0);
    assert!(ledger[3..]
        .iter()
        .all(|e| e.generation == again[0].generation));

    // None verifies: back to the start.
    h.later(11);
    h.state.tick(h.now).unwrap();
    let c = h.join("c");
    h.state.tick(h.now).unwrap();
    let restore = h.form(&[&c], 0, &[None]);
    assert_eq!(
        (restore[0].source, restore[0].start_step),
        (StateSourceRecord::Checkpoint, 3)
    );
    let report = CheckpointReport {
        worker_id: c.clone(),
        generation: restore[0].generation,
        step: 0,
        path: String::new(),
        unverified_step: 3,
        unverified_reason: "trainer_state.json: checksum mismatch".into(),
    };
    h.state.report_checkpoint(&report, h.now).unwrap();
    assert!(h.state.job.checkpoint.is_none());
    let fresh = h.form(&[&c], restore[0].generation, &[None]);
    assert_eq!(
        (fresh[0].source, fresh[0].start_step),
        (StateSourceRecord::Init, 0)
    );
    assert!(h.ledger(0, 0).is_empty());
    assert_eq!(h.run(&[(&c, &fresh[0])], 7), first);
}

/// Issue 19: the coordinator was cut off long enough to declare every worker lost while the
/// group trained on. The workers join again under new ids and offer what they trained under
/// their old ones: accepted as the old member's (no rollback), refused without it.
#[test]
fn a_worker_that_joined_again_offers_the_steps_it_trained_under_its_old_id() {
    let mut h = Harness::new("min_workers = 2");
    let (a, b) = (h.join("a"), h.join("b"));
    h.state.tick(h.now).unwrap();
    let got = h.form(&[&a, &b], 0, &[None, None]);
    h.run(&[(&a, &got[0]), (&b, &got[1])], 2);
    // Step 2 is applied on both; no heartbeat reaches the coordinator for 11 s.
    h.later(11);
    h.state.tick(h.now).unwrap();
    assert!(h.state.status(h.now).workers.is_empty());
    let (a2, b2) = (h.join("a"), h.join("b"));
    let offer = |id: &str, old: Option<&str>| RendezvousRequest {
        worker_id: id.into(),
        known_generation: got[0].generation,
        holds_step: Some(3),
        blob: id.as_bytes().to_vec(),
        uncommitted: vec![trained(2, 2)],
        trained_as: old.map(str::to_string),
        ..Default::default()
    };
    h.state.rendezvous(&offer(&b2, None), h.now).unwrap();
    assert_eq!(h.state.committed(), 2, "a stranger's offer was taken");
    h.state.rendezvous(&offer(&a2, Some(&a)), h.now).unwrap();
    assert_eq!(h.state.committed(), 3, "the old member's offer was refused");
    let again = h.form(&[&a2, &b2], got[0].generation, &[Some(3), Some(3)]);
    assert_eq!(
        (again[0].source, again[0].start_step),
        (StateSourceRecord::Held, 3)
    );
    assert_eq!(h.state.ledger_meta().rollbacks, 0);
}
