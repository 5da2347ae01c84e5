//! The data-parallel equivalence harness shared by the single-host and multi-host tests: the
//! test job, the one-worker reference run (once per test binary), and the comparison of a run's
//! losses and final weights with it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const STEPS: u64 = 20;
/// The test job's seed, global batch and sequence length.
pub const SEED: u64 = 11;
pub const GLOBAL_BATCH: u64 = 32;
pub const SEQ_LEN: usize = 128;

pub fn job(run_dir: &Path, cluster: &str) -> String {
    job_for("gpt2", run_dir, cluster)
}

pub fn job_for(family: &str, run_dir: &Path, cluster: &str) -> String {
    format!(
        r#"[job]
name = "dp-test"
steps = {STEPS}
run_dir = "{run}"
seed = {SEED}

[model]
family = "{family}"
size = "tiny"

[data]
shards = "{shards}"
seq_len = {SEQ_LEN}

[batch]
global = {GLOBAL_BATCH}
micro = 4

[optimizer]
lr = 0.002
warmup_steps = 5

[eval]
every = 0

[checkpoint]
every = 0

[cluster]
{cluster}
"#,
        run = run_dir.display(),
        shards = super::prepared_shared_corpus_for(family).display(),
    )
}

/// Final weights of a run, by name.
pub fn final_weights(run_dir: &Path) -> Vec<(String, tch::Tensor)> {
    let path = run_dir.join(format!("checkpoints/step-{STEPS:08}/model.safetensors"));
    let mut w =
        tch::Tensor::read_safetensors(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

/// ‖a − b‖ / ‖a‖ over all parameters.
pub fn relative_distance(a: &[(String, tch::Tensor)], b: &[(String, tch::Tensor)]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut diff, mut norm) = (0.0, 0.0);
    for ((na, ta), (nb, tb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        let d = (ta - tb).to_kind(tch::Kind::Double);
        diff += d.square().sum(tch::Kind::Double).double_value(&[]);
        norm += ta
            .to_kind(tch::Kind::Double)
            .square()
            .sum(tch::Kind::Double)
            .double_value(&[]);
    }
    (diff / norm).sqrt()
}

pub fn step_losses(run_dir: &Path) -> Vec<(u64, f64)> {
    super::series(
        &super::read_jsonl(&run_dir.join("metrics.jsonl")),
        "step",
        "loss",
    )
}

pub type Reference = (PathBuf, Vec<(String, tch::Tensor)>, Vec<(u64, f64)>);

/// The reference: one worker, the whole batch; run once per test binary.
pub fn single_worker_run() -> Reference {
    static RUN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(single_worker_training).clone();
    let w = final_weights(&run);
    let l = step_losses(&run);
    assert_eq!(l.len() as u64, STEPS);
    (run, w, l)
}

pub fn single_worker_training() -> PathBuf {
    launched_run("dp-one", "gpt2", 1)
}

/// A whole `ferry launch --local` run of the test job with `workers` processes.
pub fn launched_run(name: &str, family: &str, workers: u32) -> PathBuf {
    launched_run_from(name, family, workers, None)
}

/// [`launched_run`], starting from `init_from`'s weights when given.
pub fn launched_run_from(
    name: &str,
    family: &str,
    workers: u32,
    init_from: Option<&Path>,
) -> PathBuf {
    let dir = super::scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    let run = dir.join("run");
    let cluster = format!("min_workers = {workers}\nsettle_s = 0.0");
    let mut spec = job_for(family, &run, &cluster);
    if let Some(source) = init_from {
        let size = "size = \"tiny\"\n";
        assert!(spec.contains(size));
        spec = spec.replace(
            size,
            &format!("{size}init_from = \"{}\"\n", source.display()),
        );
    }
    std::fs::write(dir.join("job.toml"), spec).unwrap();
    super::run_ok(
        super::ferry()
            .args(["launch", "--local", "--threads", "1", "--no-progress"])
            .args(["--workers", &workers.to_string()])
            .arg(dir.join("job.toml")),
    );
    run
}

/// Where worker processes started with [`trained_samples_env`] keep their own records.
pub fn trained_samples_dir(scratch: &Path) -> PathBuf {
    scratch.join("trained-samples")
}

/// The variable that makes every worker process record what it trains, under `dir`.
pub fn trained_samples_env(dir: &Path) -> (&'static str, String) {
    ("FERRY_TRAINED_SAMPLES_DIR", dir.display().to_string())
}

/// Exactly-once against the worker processes' own records in `dir` (see
/// [`super::cluster::verify_exactly_once_by_workers`]) for the test job on `family`'s
/// corpus; returns how many records did not count (attempts rolled back or abandoned).
pub fn verify_workers_trained_exactly_once(
    ledger: &ferry_rpc::proto::LedgerReply,
    dir: &Path,
    family: &str,
) -> usize {
    let records = super::cluster::read_worker_records(dir);
    let n = super::cluster::num_sequences(super::prepared_shared_corpus_for(family), SEQ_LEN);
    super::cluster::verify_exactly_once_by_workers(ledger, &records, SEED, n, GLOBAL_BATCH)
}

pub fn assert_same_training(reference: &Reference, run: &Path) {
    let rel = relative_distance(&reference.1, &final_weights(run));
    eprintln!("relative parameter distance to the 1-worker run: {rel:.3e}");
    assert!(rel <= 1e-5, "‖θ1 − θ2‖/‖θ1‖ = {rel:e}");
    let losses = step_losses(run);
    assert_eq!(losses.len() as u64, STEPS);
    for ((s1, l1), (s2, l2)) in reference.2.iter().zip(&losses) {
        assert_eq!(s1, s2);
        assert!(
            (l1 - l2).abs() <= 1e-5 * l1.abs().max(1.0),
            "step {s1}: loss {l1} vs {l2}"
        );
    }
}
