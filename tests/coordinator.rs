//! The coordinator against a real server process on loopback: scheduling invariants,
//! membership, failure detection, authentication and durability across `kill -9`.

mod support;

use ferry_rpc::client::with_backoff;
use ferry_rpc::proto::{self, commit_steps_reply::Directive, rendezvous_reply::Status as Rdzv};
use std::time::{Duration, Instant};
use support::cluster::*;
use tokio_stream::StreamExt;
use tonic::Code;

/// 256-token sequences of the shared corpus: about 9,800 of them, so with 512 per step an
/// epoch is 19.2 steps and 20 steps complete one and start the next.
const SEQ: u64 = 256;
const G: u64 = 512;
const MICRO: u64 = 8;

fn job(name: &str, cluster: &str) -> String {
    job_toml(
        &support::scratch(&format!("{name}-run")),
        G,
        MICRO,
        SEQ,
        cluster,
    )
}

async fn join_n(c: &CoordinatorProc, n: usize, host: &str) -> Vec<SimWorker> {
    let clients = c.clients();
    let mut out = Vec::new();
    for i in 0..n {
        out.push(SimWorker::join(&clients, &format!("{host}{i}")).await);
    }
    out
}

#[tokio::test]
async fn every_sequence_trained_once_for_world_sizes_1_to_8() {
    for world in 1..=8u32 {
        let c = CoordinatorProc::start(
            &format!("sched-w{world}"),
            &job("sched", &format!("min_workers = {world}\nsettle_s = 0.0")),
            &[],
        );
        let mut workers = join_n(&c, world as usize, "host").await;
        let statuses = rendezvous_all(&mut workers).await;
        assert!(statuses.iter().all(|s| *s == Rdzv::Ready), "{statuses:?}");
        let mut ranks: Vec<u32> = workers.iter().map(|w| w.rank).collect();
        ranks.sort();
        assert_eq!(ranks, (0..world).collect::<Vec<_>>());
        assert!(workers.iter().all(|w| w.world == world));
        // Every rank got rank 0's blob (its NCCL unique id, on GPUs).
        let rank0 = workers.iter().find(|w| w.rank == 0).unwrap().id.clone();
        assert!(
            workers.iter().all(|w| w.blob == rank0.as_bytes()),
            "rank 0's blob for all"
        );
        run_steps(&mut workers, 20).await;
        let ledger = c.ledger().await;
        assert_eq!(ledger.entries.len(), 20);
        assert!(ledger.entries.iter().all(|e| e.world_size == world));
        let trained: Vec<Trained> = workers.iter().flat_map(|w| w.trained.clone()).collect();
        assert_eq!(
            verify_exactly_once(&ledger, &trained),
            1,
            "world {world}: one full epoch"
        );
    }
}

#[tokio::test]
async fn world_size_changes_mid_epoch_keep_exactly_once() {
    let c = CoordinatorProc::start(
        "sched-elastic",
        &job("sched-elastic", "min_workers = 3\nsettle_s = 0.0"),
        &[],
    );
    let mut workers = join_n(&c, 3, "a").await;
    rendezvous_all(&mut workers).await;
    let g1 = workers[0].generation;
    run_steps(&mut workers, 7).await;

    // Two join mid-epoch: the group grows at the next step boundary, in a new generation.
    workers.extend(join_n(&c, 2, "b").await);
    run_steps(&mut workers, 6).await;
    assert_eq!(workers.len(), 5);
    assert!(workers
        .iter()
        .all(|w| w.world == 5 && w.generation == g1 + 1));

    // A graceful leave: the worker finishes the step in hand and is released at the boundary.
    let leaver = workers[1].id.clone();
    let left = workers[1]
        .c
        .coordinator
        .leave(proto::LeaveRequest {
            worker_id: leaver.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !left.left,
        "a training member leaves at the next boundary, not at once"
    );
    let gone = run_steps(&mut workers, 30).await;
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].id, leaver);
    assert!(workers
        .iter()
        .all(|w| w.world == 4 && w.generation == g1 + 2));

    let ledger = c.ledger().await;
    let sizes: Vec<u32> = ledger.entries.iter().map(|e| e.world_size).collect();
    // A change takes effect at rank 0's next commit, which answers REGROUP: the old group
    // trains that step and the one whose all-reduce carries the word (two steps), then the
    // new group takes over.
    assert_eq!(sizes[..9], [3; 9]);
    assert_eq!(sizes[9..15], [5; 6]);
    assert!(sizes[15..].iter().all(|&w| w == 4));
    let trained: Vec<Trained> = workers
        .iter()
        .chain(gone.iter())
        .flat_map(|w| w.trained.clone())
        .collect();
    // 43 steps of 512 over ~9,800 sequences: two full epochs, each exactly once.
    assert_eq!(verify_exactly_once(&ledger, &trained), 2);
    let status = c.status().await;
    assert_eq!(status.workers.len(), 4, "the leaver is gone from the table");
}

/// Rank 0's commit can arrive after the group it speaks for was dissolved: a join was
/// proposed at its previous commit, the group trained its last step, and another member came
/// to rendezvous first offering that step. The step is recorded once, from whichever comes
/// first; rank 0's commit is then a confirmation, not an error, and a forged one is refused.
#[tokio::test]
async fn a_commit_arriving_after_a_join_dissolved_the_group_is_confirmed() {
    let c = CoordinatorProc::start(
        "late-confirm",
        &job("late-confirm", "min_workers = 2\nsettle_s = 0.0"),
        &[],
    );
    let mut workers = join_n(&c, 2, "l").await;
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 3).await;
    let g1 = workers[0].generation;
    let (r0, r1) = if workers[0].rank == 0 { (0, 1) } else { (1, 0) };
    workers.extend(join_n(&c, 1, "late").await);
    // Step 3: rank 0's commit answers REGROUP (the join takes effect here) ...
    workers[r0].train();
    workers[r1].train();
    let (committed, directive) = workers[r0].commit().await.unwrap();
    assert_eq!((committed, directive), (4, Directive::Regroup));
    workers[r1].heard_committed(4);
    assert_eq!(
        c.status().await.generation,
        g1 + 1,
        "the join proposed a generation"
    );
    // ... and the group trains step 4 with the word in its all-reduce, then comes back.
    workers[r0].train();
    workers[r1].train();
    // Rank 1 is at rendezvous first: its offer commits step 4.
    let mut early = workers.remove(r1);
    let offered = tokio::spawn(async move {
        early.rendezvous(Duration::from_secs(30)).await;
        early
    });
    let r0 = if r0 > r1 { r0 - 1 } else { r0 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.status().await.committed_steps < 5 {
        assert!(
            Instant::now() < deadline,
            "rank 1's offer was not committed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Rank 0's commit of the same step, in the dissolved generation's name, is a confirmation.
    assert_eq!(
        workers[r0].commit().await.expect("late confirmation"),
        (5, Directive::Regroup)
    );
    // A forged one is not: the digest must be the schedule's.
    let mut forged = workers[r0].trained_step(4);
    forged.step = 5;
    let err = workers[r0]
        .c
        .coordinator
        .clone()
        .commit_steps(proto::CommitStepsRequest {
            worker_id: workers[r0].id.clone(),
            generation: g1,
            steps: vec![forged],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let mut rest: Vec<SimWorker> = workers.drain(..).collect();
    let statuses = rendezvous_all(&mut rest).await;
    assert!(statuses.iter().all(|s| *s == Rdzv::Ready), "{statuses:?}");
    workers = rest;
    workers.push(offered.await.unwrap());
    assert!(workers
        .iter()
        .all(|w| w.world == 3 && w.generation == g1 + 1 && w.state_step == Some(5)));
    run_steps(&mut workers, 4).await;
    let ledger = c.ledger().await;
    let sizes: Vec<u32> = ledger.entries.iter().map(|e| e.world_size).collect();
    assert_eq!(sizes, [2, 2, 2, 2, 2, 3, 3, 3, 3]);
    let trained: Vec<Trained> = workers.iter().flat_map(|w| w.trained.clone()).collect();
    verify_exactly_once(&ledger, &trained);
}

#[tokio::test]
async fn silent_worker_is_declared_dead_and_survivor_regroups() {
    let c = CoordinatorProc::start(
        "heartbeat",
        &job(
            "heartbeat",
            "min_workers = 1\nsettle_s = 0.5\nheartbeat_timeout_s = 1.0",
        ),
        &[],
    );
    let mut workers = join_n(&c, 2, "h").await;
    rendezvous_all(&mut workers).await;
    assert!(workers.iter().all(|w| w.world == 2));
    run_steps(&mut workers, 3).await;
    let mut survivor = workers.remove(0);
    let silent = workers.remove(0);
    let silent_since = Instant::now();

    // The survivor keeps heartbeating; the other says nothing more.
    let detected = loop {
        survivor.heartbeat().await.unwrap();
        let st = c.status().await;
        if !st.workers.iter().any(|w| w.worker_id == silent.id) {
            break silent_since.elapsed();
        }
        assert!(
            silent_since.elapsed() < Duration::from_secs(10),
            "never declared dead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        detected >= Duration::from_millis(900) && detected < Duration::from_millis(2500),
        "declared dead after {detected:?} with a 1 s timeout"
    );
    assert!(c.log_text().contains("declared dead"));

    // The group re-forms without it; the uncommitted step is redone by the new group. A
    // commit in the old group's name is answered REGROUP.
    let g = survivor.generation;
    assert_eq!(survivor.commit().await.unwrap().1, Directive::Regroup);
    assert_eq!(
        survivor.rendezvous(Duration::from_secs(10)).await,
        Rdzv::Ready
    );
    assert_eq!((survivor.world, survivor.rank), (1, 0));
    assert!(survivor.generation > g);
    let mut alone = vec![survivor];
    run_steps(&mut alone, 2).await;
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 5);
    assert_eq!(ledger.entries[4].world_size, 1);

    // The dead worker's id is no longer accepted.
    let err = silent.heartbeat().await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

#[tokio::test]
async fn rpcs_without_the_job_token_are_rejected() {
    let c = CoordinatorProc::start("auth", &job("auth", ""), &[]);
    let wrong = c.clients_with_token("not-the-token");
    let err = wrong
        .coordinator
        .clone()
        .join(proto::JoinRequest {
            host: "intruder".into(),
            data_addr: "intruder:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let err = wrong
        .admin
        .clone()
        .stop(proto::StopRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // No token at all: a bare client without the interceptor.
    let mut bare = proto::admin_client::AdminClient::connect(format!("http://{}", c.grpc))
        .await
        .unwrap();
    let err = bare
        .scale(proto::ScaleRequest { workers: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let log = c.log_text();
    assert!(log.contains("rejected an RPC: wrong job token"), "{log}");
    assert!(log.contains("rejected an RPC: no job token"), "{log}");
    // Nothing they asked for happened.
    let st = c.status().await;
    assert_eq!(st.phase, "waiting");
    assert!(st.workers.is_empty());
    assert_eq!(st.target_workers, st.max_workers);
}

/// A new job whose run_dir holds another run's checkpoints and metrics is refused before it
/// starts, naming the run_dir, and leaves that run's files as they were.
#[test]
fn a_new_job_over_another_runs_checkpoints_is_refused_before_it_starts() {
    let dir = support::scratch("run-dir-held");
    let run = dir.join("run");
    let ckpt = run.join("checkpoints").join("step-00000040");
    std::fs::create_dir_all(&ckpt).unwrap();
    std::fs::write(ckpt.join("model.safetensors"), b"the other run's weights").unwrap();
    std::fs::write(run.join("metrics.jsonl"), "{\"step\":40}\n").unwrap();
    let job_path = dir.join("job.toml");
    std::fs::write(&job_path, job_toml(&run, G, MICRO, SEQ, "")).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let mut child = support::ferry()
        .arg("coordinator")
        .arg("--job")
        .arg(&job_path)
        .args(["--listen", "127.0.0.1:0", "--state"])
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(&token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the coordinator started a new job over another run's checkpoints");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&run.display().to_string())
            && stderr.contains("checkpoint(s) of another run (newest: step 40)"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(ckpt.join("model.safetensors")).unwrap(),
        b"the other run's weights"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("metrics.jsonl")).unwrap(),
        "{\"step\":40}\n"
    );
}

#[tokio::test]
async fn coordinator_killed_with_sigkill_resumes_from_its_state_directory() {
    let mut c = CoordinatorProc::start(
        "restart",
        &job(
            "restart",
            "min_workers = 2\nsettle_s = 0.0\nheartbeat_timeout_s = 5.0",
        ),
        &[],
    );
    let mut workers = join_n(&c, 2, "r").await;
    rendezvous_all(&mut workers).await;
    let generation = workers[0].generation;
    run_steps(&mut workers, 5).await;

    // Rank 0 commits steps 5 and 6 in one batch; steps 7 and 8 are trained and held,
    // uncommitted, when the coordinator is killed.
    let r0 = workers.iter().position(|w| w.rank == 0).unwrap();
    for _ in 0..2 {
        workers.iter_mut().for_each(SimWorker::train);
    }
    assert_eq!(
        workers[r0].commit().await.unwrap(),
        (7, Directive::Continue)
    );
    for _ in 0..2 {
        workers.iter_mut().for_each(SimWorker::train);
    }
    c.kill9();
    // A worker calling while the coordinator is down retries with backoff until it is back.
    let hb_worker = workers[1].id.clone();
    let hb_clients = workers[1].c.clone();
    let waiting = tokio::spawn(async move {
        let started = Instant::now();
        let r = with_backoff(Duration::from_secs(30), || {
            let mut coord = hb_clients.coordinator.clone();
            let id = hb_worker.clone();
            async move {
                coord
                    .heartbeat(proto::HeartbeatRequest {
                        worker_id: id,
                        generation,
                        ..Default::default()
                    })
                    .await
            }
        })
        .await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.restart();
    let (r, waited) = waiting.await.unwrap();
    r.expect("the heartbeat got through after the restart");
    assert!(
        waited >= Duration::from_millis(1000),
        "it really waited ({waited:?})"
    );

    let st = c.status().await;
    assert_eq!(
        st.committed_steps, 7,
        "the commit made before the kill survived"
    );
    assert_eq!(
        st.generation, generation,
        "the group goes on in the same generation"
    );
    assert_eq!(st.workers.len(), 2);
    // The batch the kill interrupted is committed once the coordinator is back, once.
    assert_eq!(
        workers[r0].commit().await.unwrap(),
        (9, Directive::Continue)
    );
    assert_eq!(
        workers[r0].commit().await.unwrap(),
        (9, Directive::Continue)
    );
    workers.iter_mut().for_each(|w| w.heard_committed(9));
    run_steps(&mut workers, 4).await;
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 13);
    let trained: Vec<Trained> = workers.iter().flat_map(|w| w.trained.clone()).collect();
    verify_exactly_once(&ledger, &trained);
    assert!(c.log_text().contains("resuming job"));
}

/// A late commit: both ranks applied step 3 (their all-reduce completed) and rank 0 died
/// before committing it. The survivor offers the step at rendezvous and the coordinator
/// records it, with the figures the group's all-reduce gave every rank. That record must read
/// back: through the ledger RPC, and from the state directory after `kill -9`.
#[tokio::test]
async fn a_step_committed_late_reads_back_after_a_restart() {
    let mut c = CoordinatorProc::start(
        "late-restart",
        &job(
            "late-restart",
            "min_workers = 1\nsettle_s = 0.5\nheartbeat_timeout_s = 1.0",
        ),
        &[],
    );
    let mut workers = join_n(&c, 2, "lr").await;
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 3).await;
    // Both apply step 3; rank 0 dies before its commit.
    workers.iter_mut().for_each(SimWorker::train);
    let r0 = workers.iter().position(|w| w.rank == 0).unwrap();
    let silent = workers.remove(r0);
    let mut survivor = workers.remove(0);
    let since = Instant::now();
    while c.status().await.workers.len() == 2 {
        survivor.heartbeat().await.unwrap();
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "never declared dead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        survivor.rendezvous(Duration::from_secs(10)).await,
        Rdzv::Ready
    );
    assert_eq!(survivor.state_step, Some(4), "step 3 was recorded late");
    assert!(c.log_text().contains("late commit"));
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 4);
    assert_eq!(ledger.entries[3].world_size, 2);
    assert_eq!(
        ledger.entries[3].loss, 2.5,
        "the group's loss, from the offer"
    );

    c.kill9();
    c.restart();
    assert_eq!(c.status().await.committed_steps, 4);
    let mut alone = vec![survivor];
    run_steps(&mut alone, 2).await;
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 6);
    assert_eq!(ledger.entries[3].loss, 2.5);
    assert!(ledger.entries[5].loss.is_finite());
    let trained: Vec<Trained> = alone
        .iter()
        .chain([&silent])
        .flat_map(|w| w.trained.clone())
        .collect();
    verify_exactly_once(&ledger, &trained);
}

/// A checkpoint report names what a later restore loads, so it is taken only from the
/// current generation's rank 0, for a committed step no older than the recorded one, at the
/// one path that step's checkpoint has in the job's run directory.
#[tokio::test]
async fn checkpoint_reports_come_only_from_rank_0_for_committed_steps_in_the_run_dir() {
    let run = support::scratch("ckpt-report-run");
    let c = CoordinatorProc::start(
        "ckpt-report",
        &job_toml(&run, G, MICRO, SEQ, "min_workers = 2\nsettle_s = 0.0"),
        &[],
    );
    let mut workers = join_n(&c, 2, "k").await;
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 3).await;
    let gen = workers[0].generation;
    let rank0 = workers.iter().find(|w| w.rank == 0).unwrap();
    let rank1 = workers.iter().find(|w| w.rank == 1).unwrap();
    let at = |step: u64| {
        run.join("checkpoints")
            .join(format!("step-{step:08}"))
            .display()
            .to_string()
    };
    let report = |w: &SimWorker, generation: u64, step: u64, path: String| {
        let mut coord = w.c.coordinator.clone();
        let req = proto::CheckpointReport {
            worker_id: w.id.clone(),
            generation,
            step,
            path,
            ..Default::default()
        };
        async move { coord.report_checkpoint(req).await }
    };
    let outside = format!("{}/../elsewhere/checkpoints/step-00000002", run.display());
    for (who, generation, step, path, code, says) in [
        (rank1, gen, 2, at(2), Code::PermissionDenied, "only rank 0"),
        (
            rank0,
            gen + 1,
            2,
            at(2),
            Code::PermissionDenied,
            "only rank 0",
        ),
        (
            rank0,
            gen,
            4,
            at(4),
            Code::OutOfRange,
            "not a committed step",
        ),
        (
            rank0,
            gen,
            0,
            at(0),
            Code::OutOfRange,
            "not a committed step",
        ),
        (
            rank0,
            gen,
            2,
            "/etc".into(),
            Code::InvalidArgument,
            "run directory",
        ),
        (
            rank0,
            gen,
            2,
            outside,
            Code::InvalidArgument,
            "run directory",
        ),
    ] {
        let err = report(who, generation, step, path.clone())
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{path} step {step}: {err:?}");
        assert!(err.message().contains(says), "{}", err.message());
    }
    assert_eq!(
        c.status().await.latest_checkpoint_step,
        0,
        "a refused report was recorded"
    );

    report(rank0, gen, 2, at(2)).await.unwrap();
    let err = report(rank0, gen, 1, at(1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let st = c.status().await;
    assert_eq!(st.latest_checkpoint_step, 2);
    assert_eq!(st.latest_checkpoint_path, at(2));
}

/// When no live worker holds the committed state, the job rolls back to its checkpoint and
/// trains the steps after it again: those steps are counted, in the ledger, the status and
/// /metrics, and the count survives a coordinator restart.
#[tokio::test]
async fn steps_redone_after_a_rollback_are_counted() {
    let run = support::scratch("redone-run");
    let mut c = CoordinatorProc::start(
        "redone",
        &job_toml(
            &run,
            G,
            MICRO,
            SEQ,
            "min_workers = 1\nsettle_s = 0.0\nheartbeat_timeout_s = 1.0",
        ),
        &[],
    );
    let mut first = join_n(&c, 1, "r").await;
    rendezvous_all(&mut first).await;
    run_steps(&mut first, 5).await;
    let lost = first.remove(0);
    let mut coord = lost.c.coordinator.clone();
    coord
        .report_checkpoint(proto::CheckpointReport {
            worker_id: lost.id.clone(),
            generation: lost.generation,
            step: 2,
            path: run
                .join("checkpoints")
                .join("step-00000002")
                .display()
                .to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    // The only holder of steps 3 to 5 goes silent and is declared dead.
    let since = Instant::now();
    while !c.status().await.workers.is_empty() {
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "never declared dead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut second = join_n(&c, 1, "s").await;
    rendezvous_all(&mut second).await;
    assert_eq!(
        second[0].state_step,
        Some(2),
        "not restored from the checkpoint"
    );
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 2);
    assert_eq!((ledger.rollbacks, ledger.redone_steps), (1, 3));
    run_steps(&mut second, 4).await;

    let st = c.status().await;
    assert_eq!(st.committed_steps, 6);
    assert_eq!((st.rollbacks, st.redone_steps), (1, 3));
    let (_, metrics) = http_get(&c.http, "/metrics");
    assert!(metrics.contains("ferry_redone_steps 3"), "{metrics}");
    assert!(metrics.contains("ferry_rollbacks 1"), "{metrics}");

    c.kill9();
    c.restart();
    let ledger = c.ledger().await;
    assert_eq!((ledger.rollbacks, ledger.redone_steps), (1, 3));
}

/// The coordinator never holds its state lock across a disk sync. With every durable commit
/// taking 1.5 s (a slow disk, injected), a commit waits for its record to reach the disk
/// before it answers, and meanwhile heartbeats and status answer at once.
#[tokio::test]
async fn a_slow_disk_sync_holds_up_no_other_call() {
    let slow = || {
        let mut cmd = support::ferry();
        cmd.env("FERRY_TEST_STORE_SYNC_DELAY_MS", "1500");
        cmd
    };
    let c = CoordinatorProc::start_with(
        "slow-disk",
        &job("slow-disk", "min_workers = 2\nsettle_s = 0.0"),
        &[],
        Box::new(slow),
        "127.0.0.1:0",
    );
    let mut workers = join_n(&c, 2, "d").await;
    rendezvous_all(&mut workers).await;
    let mut a = workers.remove(0);
    let b = workers.remove(0);
    a.train();
    let committing = tokio::spawn(async move {
        let t = Instant::now();
        a.commit().await.unwrap();
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    b.heartbeat().await.unwrap();
    let heartbeat = t.elapsed();
    let t = Instant::now();
    c.status().await;
    let status = t.elapsed();
    let commit = committing.await.unwrap();
    assert!(
        heartbeat < Duration::from_millis(500) && status < Duration::from_millis(500),
        "held up behind the disk: heartbeat {heartbeat:?}, status {status:?} (commit {commit:?})"
    );
    assert!(
        commit >= Duration::from_millis(1400),
        "the commit answered before its record was on disk ({commit:?})"
    );
}

/// A worker the coordinator answered is on disk: after a kill -9 right after its join, the
/// restarted coordinator still knows it.
#[tokio::test]
async fn a_joined_worker_is_known_after_a_coordinator_kill_9() {
    let mut c =
        CoordinatorProc::start("join-durable", &job("join-durable", "min_workers = 3"), &[]);
    let a = SimWorker::join(&c.clients(), "a").await;
    c.kill9();
    c.restart();
    let since = Instant::now();
    loop {
        match a.heartbeat().await {
            Ok(_) => break,
            // The old connection breaks with the restart: retried until the new one is up.
            Err(e)
                if matches!(e.code(), Code::Unavailable | Code::Unknown)
                    && since.elapsed() < Duration::from_secs(10) =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("the restarted coordinator forgot worker {}: {e:?}", a.id),
        }
    }
}

#[tokio::test]
async fn hostile_requests_get_clear_errors_and_leave_the_state_intact() {
    let c = CoordinatorProc::start(
        "hostile",
        &job("hostile", "min_workers = 2\nsettle_s = 0.0"),
        &[],
    );
    let mut workers = join_n(&c, 2, "x").await;
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 3).await;
    let before = c.ledger().await;
    let mut coord = workers[0].c.coordinator.clone();
    let id = workers[0].id.clone();
    let gen = workers[0].generation;

    // Wrong generation: one from the future, one from the past.
    let step3 = workers[0].trained_step(3);
    let commit = |generation: u64, steps: Vec<proto::TrainedStep>| proto::CommitStepsRequest {
        worker_id: id.clone(),
        generation,
        steps,
    };
    let err = coord
        .commit_steps(commit(gen + 5, vec![step3.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("from the future"),
        "{}",
        err.message()
    );
    let err = coord
        .commit_steps(commit(gen - 1, vec![step3.clone()]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("regroup"), "{}", err.message());

    // Unknown worker id.
    let err = coord
        .heartbeat(proto::HeartbeatRequest {
            worker_id: "w999-nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("w999-nobody"));

    // A step far ahead is out of range; one committed long ago is skipped (a retried commit).
    let mut far = step3.clone();
    far.step = 1_000_000;
    let err = coord
        .commit_steps(commit(gen, vec![far]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("the next step to commit is 3"),
        "{}",
        err.message()
    );
    let old = coord
        .commit_steps(commit(gen, vec![workers[0].trained_step(0)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.committed_steps, 3);

    // A commit that does not match the schedule it claims to have trained.
    let mut forged = step3.clone();
    forged.group_digest = 12345;
    let err = coord
        .commit_steps(commit(gen, vec![forged]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("digest"), "{}", err.message());

    // An oversized message is refused, not buffered.
    let err = coord
        .join(proto::JoinRequest {
            host: "h".repeat(3 << 20),
            data_addr: "h:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::Internal
        ),
        "{err:?}"
    );
    // Malformed fields.
    let err = coord
        .join(proto::JoinRequest {
            host: "h".into(),
            data_addr: "no-port".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = coord
        .join(proto::JoinRequest {
            host: "h".into(),
            data_addr: "h:1".into(),
            metrics_addr: "h:not-a-port".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("metrics_addr"), "{err:?}");
    let err = coord
        .rendezvous(proto::RendezvousRequest {
            worker_id: id.clone(),
            known_generation: gen + 100,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Random bytes straight to the gRPC port, and a half-open connection.
    {
        use std::io::{Read, Write};
        let mut junk = std::net::TcpStream::connect(&c.grpc).unwrap();
        let mut seed = 0x1234_5678_u64;
        let bytes: Vec<u8> = (0..64 * 1024)
            .map(|_| (ferry_spec::sampler::splitmix64(&mut seed) & 0xff) as u8)
            .collect();
        let _ = junk.write_all(&bytes);
        junk.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = Vec::new();
        let _ = junk.read_to_end(&mut sink);
        let _idle = std::net::TcpStream::connect(&c.grpc).unwrap();
    }

    // Still serving, and nothing changed: the honest workers carry on.
    let after = c.ledger().await;
    assert_eq!(after.entries, before.entries);
    run_steps(&mut workers, 2).await;
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len(), 5);
    let trained: Vec<Trained> = workers.iter().flat_map(|w| w.trained.clone()).collect();
    verify_exactly_once(&ledger, &trained);
}

#[tokio::test]
async fn metrics_status_page_and_admin_commands() {
    let c = CoordinatorProc::start(
        "observe",
        &job("observe", "min_workers = 2\nsettle_s = 0.0"),
        &[],
    );
    let mut workers = join_n(&c, 2, "o").await;
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 4).await;
    for w in &workers {
        w.heartbeat().await.unwrap();
    }

    let (status, metrics) = http_get(&c.http, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(metrics.contains("ferry_committed_steps 4"), "{metrics}");
    assert!(metrics.contains("ferry_world_size 2"), "{metrics}");
    assert!(metrics.contains("ferry_rpc_seconds"), "{metrics}");
    let (status, page) = http_get(&c.http, "/");
    assert!(status.contains("200"), "{status}");
    assert!(
        page.contains("<svg") && page.contains("<path d='M"),
        "the loss curve is drawn"
    );
    for w in &workers {
        assert!(page.contains(&w.id));
    }

    let state = c.state.clone();
    let token = c.token_file.clone();
    let admin = move |args: &[&str]| {
        support::run_ok(
            support::ferry()
                .args(args)
                .arg("--state")
                .arg(&state)
                .arg("--token-file")
                .arg(&token),
        )
    };
    let table = String::from_utf8(admin(&["status"]).stdout).unwrap();
    assert!(
        table.contains("phase running") && table.contains("step 4/100000"),
        "{table}"
    );
    for w in &workers {
        assert!(table.contains(&w.id), "{table}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&admin(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["world_size"], 2);

    let out = String::from_utf8(admin(&["scale", "--workers", "3"]).stdout).unwrap();
    assert!(out.contains("target set to 3"), "{out}");
    let err = support::run_err(
        support::ferry()
            .args(["scale", "--workers", "1000", "--state"])
            .arg(&c.state)
            .arg("--token-file")
            .arg(&c.token_file),
    );
    assert!(err.contains("cluster.max_workers"), "{err}");

    admin(&["stop"]);
    assert_eq!(workers[0].commit().await.unwrap().1, Directive::Stop);
    assert_eq!(
        workers[0].rendezvous(Duration::from_secs(10)).await,
        Rdzv::Stopped
    );
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_certificate() {
    let dir = support::scratch("tls-certs");
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let c = CoordinatorProc::start(
        "tls",
        &job("tls", ""),
        &[
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
        ],
    );
    let port = c.grpc.rsplit_once(':').unwrap().1.to_string();
    let secure = ferry_rpc::client::Clients::connect_lazy(&ferry_rpc::client::ClientConfig {
        address: format!("localhost:{port}"),
        token: TOKEN.into(),
        tls_ca: Some(cert_path.clone()),
        tls_domain: None,
    })
    .unwrap();
    let st = secure
        .admin
        .clone()
        .status(proto::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.job_name, "coordinator-test");
    // Plain text to a TLS port fails.
    let err = c
        .clients()
        .admin
        .clone()
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    // So does `ferry status` without --tls-ca, and it says what is missing.
    let out = support::ferry()
        .args(["status", "--coordinator", &format!("localhost:{port}")])
        .arg("--token-file")
        .arg(&c.token_file)
        .env_remove("FERRY_TLS_CA")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("pass --tls-ca"), "no hint at TLS: {stderr}");
    // A client that trusts another CA is refused for good: no retrying for --patience-s.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let other_path = dir.join("other-ca.pem");
    std::fs::write(&other_path, other.cert.pem()).unwrap();
    let wrong = ferry_rpc::client::Clients::connect_lazy(&ferry_rpc::client::ClientConfig {
        address: format!("localhost:{port}"),
        token: TOKEN.into(),
        tls_ca: Some(other_path.clone()),
        tls_domain: None,
    })
    .unwrap();
    let err = wrong
        .admin
        .clone()
        .status(proto::StatusRequest {})
        .await
        .unwrap_err();
    assert!(
        err.message().contains("invalid peer certificate"),
        "{err:?}"
    );
    assert!(!ferry_rpc::client::is_transient(&err), "{err:?}");
    let started = std::time::Instant::now();
    let out = support::ferry()
        .args(["status", "--coordinator", &format!("localhost:{port}")])
        .arg("--token-file")
        .arg(&c.token_file)
        .arg("--tls-ca")
        .arg(&other_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid peer certificate"), "{stderr}");
    assert!(stderr.contains("ca.crt"), "no hint at the fix: {stderr}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(20),
        "ferry status took {:?} to give up on a certificate that cannot verify",
        started.elapsed()
    );
}

#[tokio::test]
async fn quorum_standby_and_watch_events() {
    let c = CoordinatorProc::start(
        "quorum",
        &job("quorum", "min_workers = 2\nmax_workers = 2\nsettle_s = 0.0"),
        &[],
    );
    let mut events = c
        .clients()
        .coordinator
        .clone()
        .watch(proto::WatchRequest::default())
        .await
        .unwrap()
        .into_inner();
    let clients = c.clients();
    let mut first = SimWorker::join(&clients, "q0").await;
    // One worker is below the quorum: rendezvous answers WAIT, saying why.
    let reply = first
        .c
        .coordinator
        .rendezvous(proto::RendezvousRequest {
            worker_id: first.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), Rdzv::Wait);
    assert!(reply.message.contains("quorum of 2"), "{}", reply.message);

    let mut workers = vec![first, SimWorker::join(&clients, "q1").await];
    rendezvous_all(&mut workers).await;
    run_steps(&mut workers, 2).await;
    // A third worker beyond max_workers stands by.
    let mut spare = SimWorker::join(&clients, "q2").await;
    let reply = spare
        .c
        .coordinator
        .rendezvous(proto::RendezvousRequest {
            worker_id: spare.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.status(), Rdzv::Wait);
    assert!(reply.message.contains("standing by"), "{}", reply.message);
    run_steps(&mut workers, 1).await;
    assert!(
        workers.iter().all(|w| w.world == 2),
        "the spare did not displace anyone"
    );

    // A member leaves gracefully; the spare takes its place at the next boundary.
    let leaver = workers.remove(1);
    leaver
        .c
        .coordinator
        .clone()
        .leave(proto::LeaveRequest {
            worker_id: leaver.id.clone(),
        })
        .await
        .unwrap();
    assert_eq!(workers[0].commit().await.unwrap().1, Directive::Regroup);
    workers.push(spare);
    let statuses = rendezvous_all(&mut workers).await;
    assert!(statuses.iter().all(|s| *s == Rdzv::Ready), "{statuses:?}");
    run_steps(&mut workers, 1).await;
    spare = workers.pop().unwrap();
    assert_eq!(spare.world, 2);
    assert_eq!(c.ledger().await.entries.len(), 4);

    // The watch stream saw it all.
    let mut kinds = Vec::new();
    while let Ok(Some(Ok(e))) =
        tokio::time::timeout(Duration::from_millis(200), events.next()).await
    {
        kinds.push(e.kind());
    }
    use proto::watch_event::Kind;
    for want in [Kind::Membership, Kind::Committed, Kind::Released] {
        assert!(kinds.contains(&want), "no {want:?} event in {kinds:?}");
    }
}
