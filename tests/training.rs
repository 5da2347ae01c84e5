//! The training engine end to end through the real `ferry` binary on the shared corpora:
//! it learns, and a run killed after a checkpoint resumes onto exactly the same trajectory.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

fn train_cmd(data: &Path, run: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = ferry();
    c.args(["train", "--no-progress", "--threads", "2", "--data"])
        .arg(data)
        .arg("--run-dir")
        .arg(run)
        .args(extra);
    c
}

#[test]
fn tiny_gpt2_lowers_held_out_loss() {
    let data = prepared_shared_corpus();
    let run = scratch("learn");
    let args = [
        "--size",
        "tiny",
        "--seq-len",
        "128",
        "--steps",
        "300",
        "--global-batch",
        "16",
        "--micro-batch",
        "8",
        "--eval-interval",
        "100",
        "--eval-sequences",
        "64",
        "--checkpoint-interval",
        "300",
    ];
    run_ok(&mut train_cmd(data, &run, &args));
    let evals = series(&read_jsonl(&run.join("metrics.jsonl")), "eval", "val_loss");
    let (first, last) = (evals.first().unwrap().1, evals.last().unwrap().1);
    println!(
        "held-out loss: before {first:.4} (ppl {:.0}), after 300 steps {last:.4} (ppl {:.0})",
        first.exp(),
        last.exp()
    );
    println!("evals: {evals:?}");
    assert_eq!(evals.first().unwrap().0, 0);
    assert_eq!(evals.last().unwrap().0, 300);
    // Untrained, the loss is about ln(8192) = 9.0; a model that learned nothing stays there.
    assert!(first > 8.5, "untrained held-out loss {first}");
    assert!(
        last < first - 2.5,
        "held-out loss only went from {first} to {last}"
    );
    let sample = run_ok(
        ferry()
            .args([
                "generate",
                "--max-new-tokens",
                "30",
                "--prompt",
                "The history of",
                "--model",
            ])
            .arg(&run),
    );
    println!("sample: {}", String::from_utf8_lossy(&sample.stdout));
}

#[test]
fn resume_after_kill_retraces_the_uninterrupted_run() {
    let data = prepared_shared_corpus();
    let args = [
        "--size",
        "tiny",
        "--seq-len",
        "64",
        "--steps",
        "60",
        "--global-batch",
        "8",
        "--micro-batch",
        "4",
        "--eval-interval",
        "20",
        "--eval-sequences",
        "8",
        "--checkpoint-interval",
        "10",
        "--keep-checkpoints",
        "10",
        "--warmup-steps",
        "5",
    ];
    let whole = scratch("resume-whole");
    run_ok(&mut train_cmd(data, &whole, &args));

    let parted = scratch("resume-killed");
    let mut child = train_cmd(data, &parted, &args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let marker = parted.join("checkpoints/step-00000020");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !marker.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "training exited before its step-20 checkpoint"
        );
        assert!(
            Instant::now() < deadline,
            "no step-20 checkpoint within 300 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed; the test proves nothing"
    );
    let before = series(&read_jsonl(&parted.join("metrics.jsonl")), "step", "loss");
    assert!(before.len() < 60, "killed run logged all steps");
    println!("killed after logging {} steps", before.len());

    run_ok(&mut train_cmd(data, &parted, &["--resume"]));
    let expect = read_jsonl(&whole.join("metrics.jsonl"));
    let got = read_jsonl(&parted.join("metrics.jsonl"));
    let (expect_loss, got_loss) = (
        series(&expect, "step", "loss"),
        series(&got, "step", "loss"),
    );
    assert_eq!(expect_loss.len(), 60);
    assert_eq!(
        got_loss, expect_loss,
        "loss sequence after resume differs from the uninterrupted run"
    );
    assert_eq!(
        series(&got, "eval", "val_loss"),
        series(&expect, "eval", "val_loss")
    );
    let weights = |run: &Path| {
        std::fs::read(run.join("checkpoints/step-00000060/model.safetensors")).unwrap()
    };
    assert!(weights(&whole) == weights(&parted), "final weights differ");
}

#[test]
fn resume_changing_the_math_is_refused() {
    let data = prepared_shared_corpus();
    let run = scratch("resume-refused");
    run_ok(&mut train_cmd(data, &run, TWO_STEP_RUN));
    let err = run_err(&mut train_cmd(data, &run, &["--resume", "--lr", "0.5"]));
    assert!(err.contains("train.json") && err.contains("--lr"), "{err}");
    let err = run_err(&mut train_cmd(
        data,
        &run,
        &["--size", "tiny", "--steps", "2"],
    ));
    assert!(err.contains("already holds checkpoints"), "{err}");
}
