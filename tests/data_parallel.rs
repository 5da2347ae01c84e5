//! Data-parallel training across real worker processes: one worker and two give the same
//! model; a worker killed with SIGKILL and another joining mid-run change nothing either; a
//! wedged peer never hangs the survivor.

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::cluster::{CoordinatorProc, WorkerProc};
use support::dp::{
    assert_same_training, final_weights, job, launched_run, launched_run_from, single_worker_run,
    step_losses, STEPS,
};

#[test]
fn two_workers_train_the_same_model_as_one() {
    let reference = single_worker_run();
    let run = launched_run("dp-two", "gpt2", 2);
    assert_same_training(&reference, &run);
    let worlds: Vec<u64> = support::read_jsonl(&run.join("metrics.jsonl"))
        .iter()
        .filter(|r| r["event"] == "step")
        .map(|r| r["world_size"].as_u64().unwrap())
        .collect();
    assert!(worlds.iter().all(|&w| w == 2), "{worlds:?}");
}

/// `init_from` in a launched job: every worker loads the same weights, so two workers going on
/// from a trained model reach the same weights as one, and they start where that model ended,
/// not from a fresh initialisation.
#[test]
fn two_workers_started_from_a_checkpoint_train_the_same_model_as_one() {
    let source = single_worker_run();
    let one = launched_run_from("dp-init-one", "gpt2", 1, Some(&source.0));
    let reference = (one.clone(), final_weights(&one), step_losses(&one));
    let two = launched_run_from("dp-init-two", "gpt2", 2, Some(&source.0));
    assert_same_training(&reference, &two);
    // The same job seed gives the same first batch as the source's first step: a fresh model's
    // loss on it is the source's first loss; the loaded model has trained on it.
    let fresh_first = source.2[0].1;
    let source_last = source.2.last().unwrap().1;
    let first = reference.2[0].1;
    assert!(
        fresh_first - source_last > 0.5,
        "the source run learned too little to tell: {fresh_first} -> {source_last}"
    );
    assert!(
        first < source_last + 0.25 * (fresh_first - source_last),
        "first loss {first}: not started from the source (fresh {fresh_first}, source's last {source_last})"
    );
}

/// BERT's losses are divided by the step's global counts of predicted tokens and pairs, and
/// its examples are seeded by index: two workers must reach one worker's weights too.
#[test]
fn two_bert_workers_train_the_same_model_as_one() {
    let one = launched_run("dp-bert-one", "bert", 1);
    let reference = (one.clone(), final_weights(&one), step_losses(&one));
    let two = launched_run("dp-bert-two", "bert", 2);
    assert_same_training(&reference, &two);
}

async fn wait_for_step(
    c: &CoordinatorProc,
    step: u64,
    within: Duration,
) -> proto_status::StatusReply {
    let start = Instant::now();
    loop {
        let st = c.status().await;
        if st.committed_steps >= step {
            return st;
        }
        assert!(
            start.elapsed() < within,
            "no step {step} within {within:?}: {st:?}\n{}",
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

mod proto_status {
    pub use ferry_rpc::proto::StatusReply;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_and_worker_joining_mid_run_change_nothing() {
    let reference = tokio::task::spawn_blocking(single_worker_run)
        .await
        .unwrap();
    let dir = support::scratch("dp-elastic");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let c = CoordinatorProc::start(
        "dp-elastic-coord",
        &job(&run, "min_workers = 1\nsettle_s = 2.0\nheartbeat_timeout_s = 3.0\ncollective_timeout_s = 5.0"),
        &[],
    );
    // Every worker process keeps its own record of what it trains.
    let samples = support::dp::trained_samples_dir(&dir);
    let (key, value) = support::dp::trained_samples_env(&samples);
    let env = [(key, value.as_str())];
    let a = WorkerProc::start_with_env(&c, "a", &env);
    let b = WorkerProc::start_with_env(&c, "b", &env);
    // Both in one group before training starts.
    let start = Instant::now();
    loop {
        let st = c.status().await;
        if st.world_size == 2 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "{st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = wait_for_step(&c, 7, Duration::from_secs(120)).await;
    b.signal(libc::SIGKILL);
    let killed_at = c.status().await.committed_steps;
    let st = wait_for_step(&c, killed_at + 1, Duration::from_secs(60)).await;
    assert!(
        st.committed_steps < STEPS,
        "the job ran out before the join; slow it down"
    );
    let _ = wait_for_step(&c, 12.max(killed_at + 2), Duration::from_secs(120)).await;
    let joined_at = c.status().await.committed_steps;
    let d = WorkerProc::start_with_env(&c, "d", &env);
    let status = {
        let start = Instant::now();
        loop {
            let st = c.status().await;
            if st.phase == "finished" {
                break st;
            }
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{st:?}\n{}\n{}",
                a.log_text(),
                d.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    eprintln!(
        "killed at step {killed_at}, joined at step {joined_at}, generation {}",
        status.generation
    );
    assert!(
        status.generation >= 3,
        "two membership changes: {}",
        status.generation
    );

    // Rank 0 writes the final checkpoint after the last commit.
    let ckpt = run.join(format!("checkpoints/step-{STEPS:08}/model.safetensors"));
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no final checkpoint\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::thread::sleep(Duration::from_millis(200));

    // The ledger: every step once, slices cover every batch, sizes 2 → 1 → 2.
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len() as u64, STEPS);
    let worlds: Vec<u32> = ledger.entries.iter().map(|e| e.world_size).collect();
    assert!(
        worlds.contains(&1) && worlds[0] == 2 && *worlds.last().unwrap() == 2,
        "{worlds:?}"
    );
    let trained = support::cluster::trained_by_ledger(&ledger);
    support::cluster::verify_exactly_once(&ledger, &trained);
    // Exactly once by what the three worker processes say they trained, each in its own file;
    // checked before the weights, whose difference it would explain.
    let files: std::collections::BTreeSet<String> = support::cluster::read_worker_records(&samples)
        .into_iter()
        .map(|r| r.file)
        .collect();
    assert_eq!(files.len(), 3, "one record per worker process: {files:?}");
    let uncounted = support::dp::verify_workers_trained_exactly_once(&ledger, &samples, "gpt2");
    eprintln!("{uncounted} worker records of steps trained but not committed");
    assert_same_training(&reference, &run);
    assert!(
        a.log_text().contains("back to rendezvous"),
        "{}",
        a.log_text()
    );
}

/// Rank 0 (the worker that joins first) told by a fault-injection variable to pause at a
/// step, and a second worker beside it, on a coordinator that notices a dead worker quickly.
struct PausedRank0 {
    c: CoordinatorProc,
    run: std::path::PathBuf,
    paused: WorkerProc,
    survivor: WorkerProc,
}

impl PausedRank0 {
    async fn start(name: &str, fault: &str, at: u64) -> PausedRank0 {
        let dir = support::scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run");
        let c = CoordinatorProc::start(
            &format!("{name}-coord"),
            &job(&run, "min_workers = 1\nsettle_s = 2.0\nheartbeat_timeout_s = 3.0\ncollective_timeout_s = 5.0"),
            &[],
        );
        // Ranks follow the order of joining: the paused worker joins first and is rank 0.
        let paused = WorkerProc::start_with_env(&c, "paused", &[(fault, &format!("{at}:20000"))]);
        let start = Instant::now();
        while c.status().await.workers.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{}",
                paused.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let survivor = WorkerProc::start(&c, "survivor");
        PausedRank0 {
            c,
            run,
            paused,
            survivor,
        }
    }

    /// Waits until rank 0 of the pair is in its pause.
    async fn wait_for_pause(&self, within: Duration) {
        let start = Instant::now();
        while !self.paused.log_text().contains("pausing") {
            assert!(
                start.elapsed() < within,
                "{}\n{}",
                self.paused.log_text(),
                self.survivor.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            self.paused.log_text().contains("rank 0 of 2"),
            "{}",
            self.paused.log_text()
        );
    }

    /// Waits until the survivor has finished the job and written its final checkpoint.
    async fn wait_finished(&self) {
        let start = Instant::now();
        while self.c.status().await.phase != "finished" {
            assert!(
                start.elapsed() < Duration::from_secs(180),
                "{}",
                self.survivor.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ckpt = self
            .run
            .join(format!("checkpoints/step-{STEPS:08}/model.safetensors"));
        let start = Instant::now();
        while !ckpt.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{}",
                self.survivor.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The second race CI caught in the test above: rank 0 killed after step s was committed (the
/// other rank's commit got in) but before rank 0 wrote step s's metrics line. The survivor, rank
/// 1 then, holds step s and becomes rank 0; it must write the line. Rank 0 is made to wait in
/// that window (a fault-injection variable), so the kill lands there every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_0_killed_between_a_commit_and_its_metrics_line_loses_no_line() {
    let reference = tokio::task::spawn_blocking(single_worker_run)
        .await
        .unwrap();
    const AT: u64 = 5;
    let pair = PausedRank0::start("dp-line", "FERRY_FAULT_PAUSE_BEFORE_STEP_LINE", AT).await;
    let _ = wait_for_step(&pair.c, AT, Duration::from_secs(120)).await;
    pair.wait_for_pause(Duration::from_secs(20)).await;
    pair.paused.signal(libc::SIGKILL);
    pair.wait_finished().await;
    assert_same_training(&reference, &pair.run);
    assert!(
        pair.survivor.log_text().contains(&format!(
            "logging step {AT}, which this worker applied in generation 1"
        )),
        "{}",
        pair.survivor.log_text()
    );
}

/// Issue 19: rank 0 killed after a step's all-reduce (every rank applied it) and before its
/// commit. The other rank holds the step uncommitted and offers it at rendezvous: it is
/// committed once, from that offer, and nothing is lost or trained twice (the run reaches one
/// worker's weights and losses, with no rollback and no step redone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_0_killed_between_the_all_reduce_and_its_commit_loses_nothing() {
    let reference = tokio::task::spawn_blocking(single_worker_run)
        .await
        .unwrap();
    const AT: u64 = 5;
    let pair = PausedRank0::start("dp-commit", "FERRY_FAULT_PAUSE_BEFORE_COMMIT", AT).await;
    pair.wait_for_pause(Duration::from_secs(120)).await;
    // Commits run in the background: the one before may still be on its way.
    let committed = pair.c.status().await.committed_steps;
    assert!(
        committed < AT,
        "step {AT} is applied but not committed: {committed}"
    );
    pair.paused.signal(libc::SIGKILL);
    pair.wait_finished().await;
    assert_same_training(&reference, &pair.run);
    let ledger = pair.c.ledger().await;
    assert_eq!(
        (ledger.rollbacks, ledger.redone_steps),
        (0, 0),
        "a committed step was trained again"
    );
    assert_eq!(
        ledger.entries[(AT - 1) as usize].world_size,
        2,
        "step {AT} by the pair"
    );
    assert!(
        pair.c
            .log_text()
            .lines()
            .any(|l| l.contains("late commit of steps") && l.contains(&format!("..{AT}"))),
        "{}",
        pair.c.log_text()
    );
}

/// Issue 19: rank 0 commits every 4 steps; the coordinator is killed with SIGKILL mid-run
/// and restarted on its state directory. The group trains on meanwhile, and the batch the
/// kill interrupted is committed when the coordinator is back: the run reaches one worker's
/// weights, with no step redone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batched_commit_interrupted_by_a_coordinator_kill_9_loses_nothing() {
    let reference = tokio::task::spawn_blocking(single_worker_run)
        .await
        .unwrap();
    let dir = support::scratch("dp-batch");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let mut c = CoordinatorProc::start(
        "dp-batch-coord",
        &job(&run, "min_workers = 2\nsettle_s = 0.0\nheartbeat_timeout_s = 10.0\ncollective_timeout_s = 10.0\ncommit_every = 4"),
        &[],
    );
    let a = WorkerProc::start(&c, "a");
    let b = WorkerProc::start(&c, "b");
    let st = wait_for_step(&c, 4, Duration::from_secs(120)).await;
    assert_eq!(st.committed_steps % 4, 0, "commits come in batches of 4");
    c.kill9();
    std::thread::sleep(Duration::from_millis(1500));
    c.restart();
    let start = Instant::now();
    while c.status().await.phase != "finished" {
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{}\n{}",
            a.log_text(),
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ckpt = run.join(format!("checkpoints/step-{STEPS:08}/model.safetensors"));
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::thread::sleep(Duration::from_millis(200));
    assert_same_training(&reference, &run);
    let ledger = c.ledger().await;
    assert_eq!((ledger.rollbacks, ledger.redone_steps), (0, 0));
    assert!(ledger.entries.iter().all(|e| e.world_size == 2));
}

/// Issue 22: no worker holds the state and the checkpoint the coordinator recorded does not
/// verify on the worker that loads it. That worker falls back to the newest older checkpoint
/// that verifies and says so, the coordinator rolls the ledger back to that step, and the job
/// ends with the uninterrupted run's weights, every sequence trained exactly once by what the
/// worker processes trained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_checkpoint_that_does_not_verify_falls_back_to_the_newest_that_does() {
    let reference = tokio::task::spawn_blocking(single_worker_run)
        .await
        .unwrap();
    let dir = support::scratch("dp-bad-ckpt");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    const EVERY: u64 = 4;
    let spec = job(
        &run,
        "min_workers = 1\nsettle_s = 0.0\nheartbeat_timeout_s = 3.0\ncollective_timeout_s = 5.0",
    );
    let every = "[checkpoint]\nevery = 0\n";
    assert!(spec.contains(every));
    let spec = spec.replace(
        every,
        &format!("[checkpoint]\nevery = {EVERY}\nkeep = 10\n"),
    );
    let c = CoordinatorProc::start("dp-bad-ckpt-coord", &spec, &[]);
    let samples = support::dp::trained_samples_dir(&dir);
    let (key, value) = support::dp::trained_samples_env(&samples);
    let env = [(key, value.as_str())];
    let a = WorkerProc::start_with_env(&c, "a", &env);
    let start = Instant::now();
    let recorded = loop {
        let st = c.status().await;
        if st.latest_checkpoint_step >= 2 * EVERY {
            break st.latest_checkpoint_step;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no checkpoint of step {} recorded: {st:?}\n{}",
            2 * EVERY,
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    a.signal(libc::SIGKILL);
    let killed_at = c.status().await.committed_steps;
    assert!(killed_at < STEPS, "the job ran out before the kill");
    let bad = run.join(format!("checkpoints/step-{recorded:08}"));
    support::flip_a_byte(&bad.join("model.safetensors"));
    let fallback = recorded - EVERY;

    let b = WorkerProc::start_with_env(&c, "b", &env);
    let start = Instant::now();
    loop {
        let st = c.status().await;
        if st.phase == "finished" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "{st:?}\n{}\n{}",
            b.log_text(),
            c.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ckpt = run.join(format!("checkpoints/step-{STEPS:08}/model.safetensors"));
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no final checkpoint\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::thread::sleep(Duration::from_millis(200));
    eprintln!(
        "killed at step {killed_at}; recorded checkpoint {recorded}, fell back to {fallback}"
    );

    // Said by the worker (which file, why, where to) and by the coordinator.
    let log = b.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("does not verify"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&bad.display().to_string()) && line.contains("model.safetensors"),
        "{line}"
    );
    assert!(line.contains("checksum mismatch"), "{line}");
    assert!(
        log.contains(&format!("falling back to step {fallback}"))
            && log.contains(&format!("step-{fallback:08}")),
        "{log}"
    );
    let coord = c.log_text();
    assert!(
        coord.contains("does not verify") && coord.contains(&format!("step {fallback}")),
        "{coord}"
    );
    assert!(
        support::names(&run.join("checkpoints")).contains(&format!("corrupt-step-{recorded:08}")),
        "{:?}",
        support::names(&run.join("checkpoints"))
    );

    // The ledger went back to the fallback's step: the steps after it trained again, once.
    let ledger = c.ledger().await;
    assert_eq!(ledger.entries.len() as u64, STEPS);
    assert_eq!(
        ledger.redone_steps,
        killed_at - fallback,
        "committed steps thrown away"
    );
    let trained = support::cluster::trained_by_ledger(&ledger);
    support::cluster::verify_exactly_once(&ledger, &trained);
    let uncounted = support::dp::verify_workers_trained_exactly_once(&ledger, &samples, "gpt2");
    assert!(
        uncounted as u64 >= killed_at - fallback,
        "steps {fallback}.. trained before the kill count no more: {uncounted}"
    );
    assert_eq!(c.status().await.latest_checkpoint_step, STEPS);
    assert_same_training(&reference, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_peer_sends_the_survivor_back_to_rendezvous_within_the_timeout() {
    let dir = support::scratch("dp-wedged");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let timeout_s = 3.0;
    let c = CoordinatorProc::start(
        "dp-wedged-coord",
        &job(
            &run,
            &format!("min_workers = 1\nsettle_s = 2.0\nheartbeat_timeout_s = 30.0\ncollective_timeout_s = {timeout_s}"),
        ),
        &[],
    );
    let a = WorkerProc::start(&c, "a");
    let b = WorkerProc::start(&c, "b");
    let start = Instant::now();
    while c.status().await.world_size != 2 {
        assert!(start.elapsed() < Duration::from_secs(60));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = wait_for_step(&c, 3, Duration::from_secs(60)).await;
    // SIGSTOP: the peer neither dies nor answers; only a timeout can tell.
    b.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    loop {
        if a.log_text().contains("back to rendezvous") {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs_f64(timeout_s * 2.0 + 5.0),
            "survivor still stuck after {:?}:\n{}",
            stopped.elapsed(),
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = stopped.elapsed();
    eprintln!("survivor back at rendezvous {back:?} after its peer froze");
    assert!(
        back < Duration::from_secs_f64(timeout_s * 2.0 + 2.0),
        "{back:?}"
    );
    assert!(a.log_text().contains("failed"), "{}", a.log_text());
    b.signal(libc::SIGKILL);
}

/// `ferry status --json` of a launched job.
fn launched_status(state: &Path) -> Option<serde_json::Value> {
    let out = support::ferry()
        .args(["status", "--json", "--state"])
        .arg(state)
        .arg("--token-file")
        .arg(state.join("token"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A `ferry launch` that is stopped when the test ends, also when it fails: Ctrl-C (which
/// stops its coordinator and workers), then SIGKILL if it has not exited within 20 s. A failed
/// test once left a launcher and its processes running.
struct StopOnDrop(std::process::Child);

impl std::ops::Deref for StopOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for StopOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGINT) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The ledger of a launched job's running coordinator, over its admin API.
fn launched_ledger(state: &Path) -> ferry_rpc::proto::LedgerReply {
    let endpoint = std::fs::read_to_string(state.join("endpoint.json")).unwrap();
    let endpoint: serde_json::Value = serde_json::from_str(&endpoint).unwrap();
    let token = std::fs::read_to_string(state.join("token")).unwrap();
    let config = ferry_rpc::client::ClientConfig {
        address: endpoint["grpc"].as_str().unwrap().to_string(),
        token: token.trim().to_string(),
        tls_ca: None,
        tls_domain: None,
    };
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut c = ferry_rpc::client::Clients::connect_lazy(&config).unwrap();
            c.admin
                .ledger(ferry_rpc::proto::LedgerRequest::default())
                .await
                .unwrap()
                .into_inner()
        })
}

fn wait_launched(
    state: &Path,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Some(st) = launched_status(state) {
            if ok(&st) {
                return st;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn launch_scales_up_and_down_mid_run_and_stops_cleanly_on_ctrl_c() {
    let dir = support::scratch("dp-launch");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let spec = job(
        &run,
        "min_workers = 1\nsettle_s = 0.0\nheartbeat_timeout_s = 5.0",
    )
    .replace(&format!("steps = {STEPS}"), "steps = 100000");
    std::fs::write(dir.join("job.toml"), spec).unwrap();
    let log = dir.join("launch.log");
    // Every worker the launcher starts, in both runs, keeps its own record of what it trains.
    let samples = support::dp::trained_samples_dir(&dir);
    let (key, value) = support::dp::trained_samples_env(&samples);
    let mut launcher = support::ferry()
        .env(key, &value)
        .args([
            "launch",
            "--local",
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ])
        .arg(dir.join("job.toml"))
        .stdout(std::fs::File::create(dir.join("launch.out")).unwrap())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(StopOnDrop)
        .unwrap();
    let state = run.join("coordinator");
    wait_launched(&state, "one worker training", |s| {
        s["world_size"] == 1 && s["committed_steps"].as_u64() >= Some(2)
    });

    let scale = |n: &str| {
        support::run_ok(
            support::ferry()
                .args(["scale", "--workers", n, "--state"])
                .arg(&state)
                .arg("--token-file")
                .arg(state.join("token")),
        )
    };
    scale("2");
    let st = wait_launched(&state, "two workers", |s| s["world_size"] == 2);
    let grown_at = st["committed_steps"].as_u64().unwrap();
    wait_launched(&state, "steps at world 2", |s| {
        s["committed_steps"].as_u64() >= Some(grown_at + 2)
    });
    scale("1");
    wait_launched(&state, "back to one worker", |s| {
        s["world_size"] == 1 && s["workers"].as_array().is_some_and(|w| w.len() == 1)
    });
    let before_stop = wait_launched(&state, "steps at world 1", |_| true)["committed_steps"]
        .as_u64()
        .unwrap();

    // Ctrl-C: the job stops at a step boundary, rank 0 checkpoints, everything exits.
    unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{status}: {text}");
    assert!(text.contains("scaling up"), "{text}");
    assert!(
        text.contains("stopping at the next step boundary"),
        "{text}"
    );
    let out = std::fs::read_to_string(dir.join("launch.out")).unwrap();
    assert!(out.starts_with("stopped:"), "{out}");
    let ckpts: Vec<u64> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()
        })
        .collect();
    let last = ckpts.iter().max().copied().unwrap();
    assert!(
        last >= before_stop,
        "a final checkpoint at the stop ({last} vs {before_stop})"
    );
    // No process left behind: nothing running mentions the job's state directory.
    let left = processes_mentioning(&state.display().to_string());
    assert!(left.is_empty(), "left running: {left:?}");

    // The same command again resumes the stopped job from its state and checkpoint.
    let mut again = support::ferry()
        .env(key, &value)
        .args([
            "launch",
            "--local",
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ])
        .arg(dir.join("job.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("again.log")).unwrap())
        .spawn()
        .map(StopOnDrop)
        .unwrap();
    let resumed = wait_launched(&state, "training again", |s| {
        s["phase"] == "running" && s["committed_steps"].as_u64() > Some(last + 1)
    });
    assert!(resumed["generation"].as_u64() > st["generation"].as_u64());
    // Exactly once over both runs, by what the worker processes trained: the ledger so far
    // (steps committed after this read are left out, their records count for nothing).
    let ledger = launched_ledger(&state);
    assert!(
        ledger.entries.len() as u64 > last + 1,
        "{}",
        ledger.entries.len()
    );
    let worlds: Vec<u32> = ledger.entries.iter().map(|e| e.world_size).collect();
    assert!(worlds.contains(&2), "{worlds:?}");
    let uncounted = support::dp::verify_workers_trained_exactly_once(&ledger, &samples, "gpt2");
    eprintln!(
        "{} committed steps; {uncounted} worker records did not count",
        ledger.entries.len()
    );
    unsafe { libc::kill(again.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    while again.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "second launcher did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes whose command line mentions `needle` (a launched job's state directory).
fn processes_mentioning(needle: &str) -> Vec<(libc::pid_t, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")))
        })
        .filter(|(_, c)| c.contains(needle))
        .collect()
}

/// A coordinator that stops answering (SIGSTOP: its process and sockets stay, nothing replies)
/// must not wedge `ferry launch`: Ctrl-C twice kills everything within seconds. Before, the
/// launcher sat in a status call until HTTP/2 keep-alive gave up (20 s or more per call), and
/// only looked at Ctrl-C between calls.
#[test]
fn ctrl_c_stops_launch_while_its_coordinator_is_frozen() {
    let dir = support::scratch("dp-launch-frozen");
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let spec = job(&run, "min_workers = 1\nsettle_s = 0.0")
        .replace(&format!("steps = {STEPS}"), "steps = 100000");
    std::fs::write(dir.join("job.toml"), spec).unwrap();
    let log = dir.join("launch.log");
    let mut launcher = support::ferry()
        .args([
            "launch",
            "--local",
            "--workers",
            "1",
            "--threads",
            "1",
            "--no-progress",
        ])
        .arg(dir.join("job.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .map(StopOnDrop)
        .unwrap();
    let state = run.join("coordinator");
    wait_launched(&state, "a worker training", |s| {
        s["committed_steps"].as_u64() >= Some(1)
    });
    let needle = state.display().to_string();
    // `ferry-coordinator ...` when the slim binary is of this build, else `ferry coordinator ...`.
    let coordinator = processes_mentioning(&needle)
        .into_iter()
        .find(|(_, c)| c.contains(" coordinator ") || c.contains("ferry-coordinator "))
        .expect("the launched coordinator process")
        .0;
    unsafe { libc::kill(coordinator, libc::SIGSTOP) };
    // The launcher is now inside a call the coordinator will never answer.
    std::thread::sleep(Duration::from_millis(1500));
    unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
    let start = Instant::now();
    let status = loop {
        if let Some(s) = launcher.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(15) {
            // Thaw it so the cleanup below can end it.
            unsafe { libc::kill(coordinator, libc::SIGCONT) };
            panic!(
                "ferry launch still running 15 s after two Ctrl-Cs with its coordinator frozen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = start.elapsed();
    assert!(
        !status.success(),
        "two Ctrl-Cs are a kill, not a clean stop"
    );
    assert!(
        took < Duration::from_secs(5),
        "launch took {took:?} to exit"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("interrupted twice"), "{text}");
    // The frozen coordinator and the worker were killed with it.
    let start = Instant::now();
    while !processes_mentioning(&needle).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "left running: {:?}",
            processes_mentioning(&needle)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
