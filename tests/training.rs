//! The training engine end to end through the real `ferry` binary on the shared corpora:
//! it learns, and a run killed after a checkpoint resumes onto exactly the same trajectory.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

fn train_cmd(data: &Path, run: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = ferry();
    // One intra-op thread per run: the test harness runs two of these at once on a two-core
    // machine, and two 2-thread libtorch processes on two cores took twice as long in all.
    c.args(["train", "--no-progress", "--threads", "1", "--data"])
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
                "300",
                "--min-new-tokens",
                "300",
                "--prompt",
                "The history of",
                "--model",
            ])
            .arg(&run),
    );
    let sample = String::from_utf8_lossy(&sample.stdout);
    println!("sample: {sample}");
    // WikiText writes `<unk>` for about one word in fifty; it is a special token now, and
    // generate never samples it (special tokens are decoded, so one would show here, and 300
    // tokens give it ample chance).
    let tokenizer = ferry_dataset::tokenizer::load_tokenizer(&data.join("tokenizer.json")).unwrap();
    assert!(tokenizer.token_to_id("<unk>").is_some());
    assert!(!sample.contains("<unk>"), "{sample}");
}

#[test]
fn tiny_gpt_lowers_held_out_loss() {
    let data = prepared_shared_corpus_for("gpt");
    let run = scratch("learn-gpt");
    // Post-LN GPT wants a lower rate than GPT-2's default 1e-3 (at 2e-3 it stalls near the
    // unigram loss, 6.5).
    let args = [
        "--lr",
        "5e-4",
        "--model",
        "gpt",
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
    let records = read_jsonl(&run.join("metrics.jsonl"));
    let evals = series(&records, "eval", "val_loss");
    let (first, last) = (evals.first().unwrap().1, evals.last().unwrap().1);
    println!(
        "GPT held-out loss: before {first:.4} (ppl {:.0}), after 300 steps {last:.4} (ppl {:.0})",
        first.exp(),
        last.exp()
    );
    println!("evals: {evals:?}");
    assert_eq!(evals.last().unwrap().0, 300);
    // Untrained, the loss is about ln(8192) = 9.0.
    assert!(first > 8.5, "untrained held-out loss {first}");
    assert!(
        last < first - 2.5,
        "held-out loss only went from {first} to {last}"
    );
    // Perplexity is reported and is exp(loss).
    let ppl = series(&records, "eval", "val_ppl").last().unwrap().1;
    assert!((ppl - last.exp()).abs() < 1e-6 * ppl);
    let sample = run_ok(
        ferry()
            .args([
                "generate",
                "--max-new-tokens",
                "30",
                "--prompt",
                "the history of",
                "--model",
            ])
            .arg(&run),
    );
    let text = String::from_utf8_lossy(&sample.stdout);
    println!("sample: {text}");
    assert!(
        text.len() > "the history of".len() + 10,
        "no text generated: {text:?}"
    );
}

/// The share of the most frequent target among the masked tokens of held-out examples
/// 0..n: what always guessing one token would score.
fn majority_token_share(data: &Path, n: u64) -> f64 {
    let out = run_ok(
        ferry()
            .args(["examples", "--json", "--split", "val", "--seq-len", "128"])
            .args(["--count", &n.to_string(), "--data"])
            .arg(data),
    );
    let mut counts = std::collections::HashMap::new();
    let mut total = 0usize;
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        for l in e["mlm_labels"].as_array().unwrap() {
            let l = l.as_i64().unwrap();
            if l != -100 {
                *counts.entry(l).or_insert(0usize) += 1;
                total += 1;
            }
        }
    }
    *counts.values().max().unwrap() as f64 / total as f64
}

#[test]
fn tiny_bert_learns_masked_tokens_and_next_sentences() {
    let data = prepared_shared_corpus_for("bert");
    let run = scratch("learn-bert");
    // The held-out split holds 570 pairs of 128 tokens; asking for more evaluates all of them.
    let eval_pairs = 1024;
    let args = [
        "--model",
        "bert",
        "--size",
        "tiny",
        "--seq-len",
        "128",
        "--steps",
        "1000",
        "--global-batch",
        "32",
        "--micro-batch",
        "16",
        "--eval-interval",
        "500",
        "--eval-sequences",
        &eval_pairs.to_string(),
        "--checkpoint-interval",
        "1000",
    ];
    run_ok(&mut train_cmd(data, &run, &args));
    let records = read_jsonl(&run.join("metrics.jsonl"));
    let mlm = series(&records, "eval", "val_mlm_acc");
    let nsp = series(&records, "eval", "val_nsp_acc");
    let loss = series(&records, "eval", "val_loss");
    let pairs = series(&records, "eval", "val_pairs").last().unwrap().1 as u64;
    assert!(pairs >= 500, "only {pairs} held-out pairs evaluated");
    let majority = majority_token_share(data, pairs);
    println!("BERT held-out loss (MLM + NSP): {loss:?}");
    println!("masked-LM accuracy: {mlm:?} (always the most frequent token: {majority:.4})");
    println!("next-sentence accuracy on {pairs} held-out pairs: {nsp:?} (chance 0.5)");
    let (mlm_first, mlm_last) = (mlm[0].1, mlm.last().unwrap().1);
    let nsp_last = nsp.last().unwrap().1;
    assert_eq!(mlm.last().unwrap().0, 1000);
    assert!(
        mlm_last > mlm_first + 0.05,
        "MLM accuracy {mlm_first} -> {mlm_last}"
    );
    assert!(
        mlm_last > majority + 0.02,
        "MLM accuracy {mlm_last} vs majority {majority}"
    );
    // 570 pairs: the standard error of an accuracy near one half is 2.1 points, so 0.6 is
    // 4.8 standard errors above chance. Next-sentence prediction takes off late and at a
    // seed-dependent step: after 600 steps seeds 1234, 5 and 99 gave 0.71, 0.51 and 0.70 here
    // (and 1234 gave 0.59 on the CI machine); after 1200 steps seeds 5 and 99 gave 0.70, 0.75.
    // As run here (one thread, 1000 steps) seed 1234 gave 0.68 at step 500 and 0.72 at 1000.
    assert!(nsp_last > 0.6, "NSP accuracy {nsp_last}");
    assert!(loss.last().unwrap().1 < loss[0].1 - 1.0, "loss {loss:?}");
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

/// Issue 22: `--resume` goes on from the newest checkpoint that verifies, naming each newer
/// one it passes over, the file and why, and setting it aside; the run then retraces the
/// uninterrupted one from there. With none that verifies it fails in one line and changes
/// nothing.
#[test]
fn resume_falls_back_to_the_newest_checkpoint_that_verifies_and_says_so() {
    let data = prepared_shared_corpus();
    let run = scratch("resume-fallback");
    let args = [
        "--size",
        "tiny",
        "--seq-len",
        "32",
        "--steps",
        "8",
        "--global-batch",
        "2",
        "--micro-batch",
        "2",
        "--eval-interval",
        "4",
        "--eval-sequences",
        "2",
        "--checkpoint-interval",
        "2",
        "--keep-checkpoints",
        "10",
        "--warmup-steps",
        "2",
    ];
    run_ok(&mut train_cmd(data, &run, &args));
    let expect = series(&read_jsonl(&run.join("metrics.jsonl")), "step", "loss");
    assert_eq!(expect.len(), 8);
    let ckpts = run.join("checkpoints");
    let weights =
        |step: u64| std::fs::read(ckpts.join(format!("step-{step:08}/model.safetensors"))).unwrap();
    let final_weights = weights(8);
    flip_a_byte(&ckpts.join("step-00000008/model.safetensors"));
    truncate_to_half(&ckpts.join("step-00000006/optimizer.safetensors"));

    let out = run_ok(&mut train_cmd(data, &run, &["--resume"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = |needle: &str| {
        stderr
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?}:\n{stderr}"))
            .to_string()
    };
    let eight = line("step-00000008/model.safetensors");
    assert!(
        eight.contains("does not verify") && eight.contains("checksum mismatch"),
        "{eight}"
    );
    assert!(eight.contains("corrupt-step-00000008"), "{eight}");
    let six = line("step-00000006/optimizer.safetensors");
    assert!(
        six.contains("does not verify") && six.contains("checksum mismatch"),
        "{six}"
    );
    let resumed = line("resuming");
    assert!(
        resumed.contains("step-00000004") && resumed.contains("at step 4"),
        "{resumed}"
    );
    assert!(
        resumed.contains("the newest checkpoint that verifies"),
        "{resumed}"
    );
    // Steps 5 to 8 trained again, as the first time.
    let got = series(&read_jsonl(&run.join("metrics.jsonl")), "step", "loss");
    assert_eq!(got, expect, "the resumed run did not retrace the first one");
    assert!(weights(8) == final_weights, "final weights differ");
    assert_eq!(
        names(&ckpts),
        [
            "corrupt-step-00000006",
            "corrupt-step-00000008",
            "step-00000002",
            "step-00000004",
            "step-00000006",
            "step-00000008",
        ]
    );

    // None verifies: one error line naming each, and nothing moved.
    flip_a_byte(&ckpts.join("step-00000008/model.safetensors"));
    truncate_to_half(&ckpts.join("step-00000006/model.safetensors"));
    std::fs::remove_file(ckpts.join("step-00000004/checksums.json")).unwrap();
    flip_a_byte(&ckpts.join("step-00000002/trainer_state.json"));
    let before = names(&ckpts);
    let err = run_err(&mut train_cmd(data, &run, &["--resume"]));
    assert!(err.contains("no checkpoint verifies"), "{err}");
    for step in [2, 4, 6, 8] {
        assert!(err.contains(&format!("step-{step:08}")), "{err}");
    }
    assert!(err.contains("checksums.json"), "{err}");
    assert_eq!(names(&ckpts), before);
}

#[test]
fn resume_changing_the_math_is_refused() {
    let data = prepared_shared_corpus();
    let run = scratch("resume-refused");
    run_ok(&mut train_cmd(data, &run, TWO_STEP_RUN));
    let err = run_err(&mut train_cmd(data, &run, &["--resume", "--lr", "0.5"]));
    assert!(err.contains("train.json") && err.contains("--lr"), "{err}");
    // Fewer steps than the run has trained: refused, and train.json keeps the run's length
    // (before, the step count went below zero).
    let config = std::fs::read_to_string(run.join("train.json")).unwrap();
    let err = run_err(&mut train_cmd(data, &run, &["--resume", "--steps", "1"]));
    assert!(
        err.contains("past --steps 1") && err.contains("step-00000002"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("train.json")).unwrap(),
        config
    );
    let err = run_err(&mut train_cmd(
        data,
        &run,
        &["--size", "tiny", "--steps", "2"],
    ));
    assert!(err.contains("already holds checkpoints"), "{err}");
}

/// `--init-from` starts a new run (step 0, fresh optimizer) from another run's weights: its
/// first held-out loss is the source's last one, not a fresh model's. Data prepared with
/// another tokenizer is refused, since the same ids would mean other tokens.
#[test]
fn init_from_starts_a_new_run_from_a_checkpoint_of_the_same_tokenizer() {
    let data = prepared_shared_corpus();
    let source = scratch("init-source");
    run_ok(&mut train_cmd(data, &source, TWO_STEP_RUN));
    let source_evals = series(
        &read_jsonl(&source.join("metrics.jsonl")),
        "eval",
        "val_loss",
    );
    let (first, last) = (source_evals[0], *source_evals.last().unwrap());
    assert_eq!((first.0, last.0), (0, 2));
    assert!(
        (first.1 - last.1).abs() > 1e-4,
        "two steps did not move the held-out loss; the test could not tell the runs apart"
    );

    let warm = scratch("init-warm");
    let mut args = TWO_STEP_RUN.to_vec();
    let source_arg = source.display().to_string();
    args.extend(["--init-from", source_arg.as_str()]);
    let out = run_ok(&mut train_cmd(data, &warm, &args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("initialised from"), "{stderr}");
    let warm_log = read_jsonl(&warm.join("metrics.jsonl"));
    let warm_first = series(&warm_log, "eval", "val_loss")[0];
    assert_eq!(warm_first.0, 0, "a new run starts at step 0");
    assert!(
        (warm_first.1 - last.1).abs() < 1e-5,
        "started at held-out loss {}, the source ended at {}",
        warm_first.1,
        last.1
    );
    assert_eq!(series(&warm_log, "step", "loss").len(), 2);

    // The same corpus with a tokenizer of another vocabulary size.
    let other = scratch("init-other-tokenizer");
    run_ok(
        ferry()
            .args(["prepare", "--no-progress", "--vocab-size", "600", "--input"])
            .arg(data_dir().join("books/austen-emma.txt"))
            .arg("--output")
            .arg(&other),
    );
    let refused = scratch("init-refused");
    let err = run_err(&mut train_cmd(&other, &refused, &args));
    assert!(
        err.contains("tokenizer.json") && err.contains("--tokenizer"),
        "{err}"
    );
}
