//! `ferry coordinator` refuses a job spec with any field wrong, before it starts anything, with
//! one line that names the file, the line, the field and what is allowed.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};
use support::cluster::job_toml;

/// Runs the coordinator on `job` and returns its one error line; fails if it starts serving.
fn refusal(dir: &std::path::Path, job: &str) -> String {
    let path = dir.join("job.toml");
    std::fs::write(&path, job).unwrap();
    let state = dir.join("state");
    let _ = std::fs::remove_dir_all(&state);
    let mut child = support::ferry()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--job"])
        .arg(&path)
        .arg("--state")
        .arg(&state)
        .env("FERRY_JOB_TOKEN", "t")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the coordinator accepted this job spec:\n{job}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    lines[0].to_string()
}

#[test]
fn each_wrong_field_is_named_with_its_line() {
    let dir = support::scratch("job-spec");
    std::fs::create_dir_all(&dir).unwrap();
    let good = job_toml(
        &dir.join("run"),
        64,
        8,
        128,
        "min_workers = 1\nmax_workers = 4",
    );
    // (what to replace, with what, expected field in the message, expected words)
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "name = \"coordinator-test\"",
            "name = \"\"",
            "job.name",
            "empty",
        ),
        ("steps = 100000", "steps = 0", "job.steps", "at least 1"),
        ("steps = 100000", "steps = -3", "job.steps", "invalid value"),
        ("steps = 100000", "steps = \"many\"", "job.steps", "u64"),
        ("seed = 7", "seed = 1.5", "job.seed", "u64"),
        (
            "family = \"gpt2\"",
            "family = \"llama\"",
            "model.family",
            "`gpt2`",
        ),
        (
            "size = \"tiny\"",
            "size = \"xxl\"",
            "model.size",
            "tiny, mini, small",
        ),
        (
            "seq_len = 128",
            "seq_len = 100000",
            "data.seq_len",
            "context length",
        ),
        (
            "seq_len = 128",
            "seq_len = 0",
            "data.seq_len",
            "outside 1..=",
        ),
        ("global = 64", "global = 0", "batch.global", "at least 1"),
        ("micro = 8", "micro = 7", "batch.micro", "does not divide"),
        (
            "min_workers = 1",
            "min_workers = 0",
            "cluster.min_workers",
            "at least 1",
        ),
        (
            "max_workers = 4",
            "max_workers = 9",
            "cluster.max_workers",
            "micro-batches",
        ),
        (
            "max_workers = 4",
            "max_workers = 0",
            "cluster.max_workers",
            "below",
        ),
        (
            "max_workers = 4",
            "max_workers = 4\nbackend = \"mpi\"",
            "cluster.backend",
            "`ring`",
        ),
        (
            "max_workers = 4",
            "max_workers = 4\nheartbeat_timeout_s = 0.0",
            "cluster.heartbeat_timeout_s",
            "0.1",
        ),
        (
            "max_workers = 4",
            "max_workers = 4\ncolective_timeout_s = 5",
            "colective_timeout_s",
            "unknown field",
        ),
        (
            "[batch]",
            "[optimizer]\nlr = -1.0\n\n[batch]",
            "optimizer.lr",
            "positive",
        ),
        (
            "[batch]",
            "[optimizer]\nmin_lr = 5.0\n\n[batch]",
            "optimizer.min_lr",
            "0..=optimizer.lr",
        ),
        (
            "[batch]",
            "[optimizer]\nbeta2 = 1.0\n\n[batch]",
            "optimizer.beta2",
            "[0, 1)",
        ),
        (
            "[batch]",
            "[optimizer]\ndecay = \"step\"\n\n[batch]",
            "optimizer.decay",
            "`cosine`",
        ),
        (
            "[batch]",
            "[optimizer]\nname = \"sgd\"\n\n[batch]",
            "optimizer.name",
            "`adamw`",
        ),
        (
            "[batch]",
            "[checkpoint]\nkeep = 0\n\n[batch]",
            "checkpoint.keep",
            "at least 1",
        ),
        (
            "[batch]",
            "[eval]\nevery = 10\nsequences = 0\n\n[batch]",
            "eval.sequences",
            "at least 1",
        ),
        (
            "[batch]",
            "[tokenizer]\nkind = \"bpe\"\n\n[batch]",
            "tokenizer",
            "unknown field",
        ),
    ];
    for (from, to, field, words) in cases {
        assert!(good.contains(from), "{from}");
        let bad = good.replacen(from, to, 1);
        let line = refusal(&dir, &bad);
        assert!(line.contains(field), "{field}: {line}");
        assert!(line.contains(words), "{field} ({words}): {line}");
        // Names the file and a line between the field's section header and the field.
        let start = bad[..bad.find(to).unwrap()].lines().count() + 1;
        let end = start + to.lines().count() - 1;
        let header = bad
            .lines()
            .take(start)
            .enumerate()
            .filter(|(_, l)| l.starts_with('['))
            .map(|(i, _)| i + 1)
            .last()
            .unwrap();
        assert!(
            (header..=end).any(|l| line.contains(&format!("job.toml:{l}:"))),
            "{field}: wants a line in {header}..={end}: {line}"
        );
    }
    // Shards that do not exist; not TOML at all.
    let line = refusal(
        &dir,
        &good.replace(
            &support::prepared_shared_corpus().display().to_string(),
            "/nonexistent/shards",
        ),
    );
    assert!(line.contains("/nonexistent/shards"), "{line}");
    let line = refusal(&dir, "this is not = = toml");
    assert!(line.contains("job.toml:1"), "{line}");
}

#[test]
fn a_state_directory_keeps_its_job() {
    let dir = support::scratch("job-spec-state");
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let a = job_toml(&dir.join("run"), 64, 8, 128, "");
    std::fs::write(dir.join("a.toml"), &a).unwrap();
    // Start and stop a coordinator so the state directory holds job a.
    let mut child = support::ferry()
        .args(["coordinator", "--listen", "127.0.0.1:0", "--job"])
        .arg(dir.join("a.toml"))
        .arg("--state")
        .arg(&state)
        .env("FERRY_JOB_TOKEN", "t")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !state.join("endpoint.json").exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let b = a.replace("steps = 100000", "steps = 5");
    std::fs::write(dir.join("b.toml"), &b).unwrap();
    let err = support::run_err(
        support::ferry()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--job"])
            .arg(dir.join("b.toml"))
            .arg("--state")
            .arg(&state)
            .env("FERRY_JOB_TOKEN", "t"),
    );
    assert!(err.contains("different spec"), "{err}");
    // No token: refused before anything starts.
    let err = support::run_err(
        support::ferry()
            .args(["coordinator", "--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .env_remove("FERRY_JOB_TOKEN"),
    );
    assert!(err.contains("no job token"), "{err}");
}
