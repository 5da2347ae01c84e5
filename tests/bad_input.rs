//! Bad input gets one clear error line naming the file and the problem, exit code 1, and no
//! panic (issue: training engine, must-show 4). Every case runs the real `ferry` binary.

mod support;

use std::path::{Path, PathBuf};
use support::*;

/// A small real-text corpus (from the shared books) prepared with a small vocabulary.
fn small_prepared(name: &str) -> PathBuf {
    small_prepared_for(name, "gpt2")
}

/// The same corpus prepared with the tokenizer of model family `family`.
fn small_prepared_for(name: &str, family: &str) -> PathBuf {
    let corpus = scratch(&format!("{name}-corpus"));
    std::fs::create_dir_all(&corpus).unwrap();
    let book = std::fs::read_to_string(data_dir().join("books/carroll-alice.txt")).unwrap();
    std::fs::write(
        corpus.join("alice.txt"),
        book.lines().take(1500).collect::<Vec<_>>().join("\n"),
    )
    .unwrap();
    let out = scratch(&format!("{name}-prepared"));
    run_ok(
        ferry()
            .args([
                "prepare",
                "--no-progress",
                "--model",
                family,
                "--vocab-size",
                "400",
                "--val-fraction",
                "0.2",
                "--input",
            ])
            .arg(&corpus)
            .arg("--output")
            .arg(&out),
    );
    out
}

fn prepare_err(input: &Path) -> String {
    let out = scratch("bad-prepare-out");
    run_err(
        ferry()
            .args(["prepare", "--no-progress", "--input"])
            .arg(input)
            .arg("--output")
            .arg(out),
    )
}

fn tiny_train(data: &Path, run: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = ferry();
    c.args(["train", "--no-progress", "--threads", "1"])
        .args(TWO_STEP_RUN)
        .arg("--data")
        .arg(data);
    c.arg("--run-dir").arg(run).args(extra);
    c
}

#[test]
fn empty_corpus_file() {
    let f = scratch("empty").with_extension("txt");
    std::fs::write(&f, "\n  \n").unwrap();
    let err = prepare_err(&f);
    assert!(
        err.contains(&f.display().to_string()) && err.contains("empty"),
        "{err}"
    );
}

#[test]
fn binary_file() {
    let f = scratch("binary").with_extension("txt");
    std::fs::write(&f, b"some text\n\x7fELF\x02\x01\x01\x00\x00\x00binary").unwrap();
    let err = prepare_err(&f);
    assert!(
        err.contains(&f.display().to_string()) && err.contains("binary"),
        "{err}"
    );
}

#[test]
fn invalid_utf8_names_the_line() {
    let f = scratch("latin1").with_extension("txt");
    std::fs::write(&f, b"first line\nsecond line\ncaf\xe9 au lait\n").unwrap();
    let err = prepare_err(&f);
    assert!(
        err.contains(&f.display().to_string()) && err.contains("UTF-8") && err.contains("line 3"),
        "{err}"
    );
}

#[test]
fn input_pattern_matching_nothing() {
    let err = prepare_err(Path::new("/nonexistent/dir/*.tokens"));
    assert!(err.contains("/nonexistent/dir/*.tokens"), "{err}");
}

#[test]
fn missing_tokenizer() {
    let missing = scratch("no-such-tokenizer").with_extension("json");
    let out = scratch("missing-tok-out");
    let err = run_err(
        ferry()
            .args(["prepare", "--no-progress", "--input"])
            .arg(data_dir().join("books/blake-poems.txt"))
            .arg("--tokenizer")
            .arg(&missing)
            .arg("--output")
            .arg(out),
    );
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("tokenizer"),
        "{err}"
    );
}

#[test]
fn truncated_shard() {
    let data = small_prepared("truncated");
    let shard = data.join("train-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 1]).unwrap();
    let err = run_err(&mut tiny_train(&data, &scratch("truncated-run"), &[]));
    assert!(
        err.contains("train-00000.bin") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn checkpoint_with_one_flipped_byte() {
    let data = small_prepared("flipped");
    let run = scratch("flipped-run");
    run_ok(&mut tiny_train(&data, &run, &[]));
    let model = run.join("checkpoints/step-00000002/model.safetensors");
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&model, bytes).unwrap();
    let err = run_err(ferry().args(["generate", "--model"]).arg(&run));
    assert!(
        err.contains("model.safetensors") && err.contains("checksum mismatch"),
        "{err}"
    );
    let err = run_err(&mut tiny_train(&data, &run, &["--resume", "--steps", "4"]));
    assert!(
        err.contains("model.safetensors") && err.contains("checksum mismatch"),
        "{err}"
    );
}

#[test]
fn unknown_model_size() {
    let data = small_prepared("size");
    let err = run_err(&mut tiny_train(
        &data,
        &scratch("size-run"),
        &["--size", "gigantic"],
    ));
    assert!(
        err.contains("gigantic") && err.contains("tiny, mini, small"),
        "{err}"
    );
}

#[test]
fn unknown_config_override() {
    let data = small_prepared("override");
    let err = run_err(&mut tiny_train(
        &data,
        &scratch("override-run"),
        &["--set", "n_layers=3"],
    ));
    assert!(err.contains("n_layers") && err.contains("n_layer"), "{err}");
}

#[test]
fn prepared_directory_without_tokenizer() {
    let data = small_prepared("notok");
    let run = scratch("notok-run");
    std::fs::remove_file(data.join("tokenizer.json")).unwrap();
    let err = run_err(&mut tiny_train(&data, &run, &[]));
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn generate_from_a_directory_that_is_not_a_model() {
    let dir = scratch("not-a-model");
    std::fs::create_dir_all(&dir).unwrap();
    let err = run_err(ferry().args(["generate", "--model"]).arg(&dir));
    assert!(err.contains(&dir.display().to_string()), "{err}");
}

#[test]
fn sequence_longer_than_the_model_context() {
    let data = small_prepared("ctx");
    let err = run_err(&mut tiny_train(
        &data,
        &scratch("ctx-run"),
        &["--set", "n_positions=16"],
    ));
    assert!(
        err.contains("seq_len") && err.contains("n_positions (16)"),
        "{err}"
    );
}

#[test]
fn bench_with_heads_not_dividing_the_width() {
    let err = run_err(ferry().args([
        "bench", "train", "--heads", "5", "--steps", "1", "--device", "cpu",
    ]));
    assert!(err.contains("n_head") && err.contains("384"), "{err}");
}

#[test]
fn unknown_model_family() {
    let data = small_prepared("family");
    let err = run_err(&mut tiny_train(
        &data,
        &scratch("family-run"),
        &["--model", "llama"],
    ));
    assert!(
        err.contains("llama") && err.contains("gpt2, gpt, bert"),
        "{err}"
    );
}

#[test]
fn bert_on_data_prepared_for_gpt2() {
    let data = small_prepared("bert-on-bpe");
    let err = run_err(&mut tiny_train(
        &data,
        &scratch("bert-on-bpe-run"),
        &["--model", "bert"],
    ));
    assert!(
        err.contains("tokenizer.json") && err.contains("[PAD]") && err.contains("--model bert"),
        "{err}"
    );
}

#[test]
fn generate_from_a_bert_checkpoint() {
    let data = small_prepared_for("bert-generate", "bert");
    let run = scratch("bert-generate-run");
    run_ok(&mut tiny_train(&data, &run, &["--model", "bert"]));
    let err = run_err(ferry().args(["generate", "--model"]).arg(&run));
    assert!(
        err.contains("bert") && err.contains("does not generate"),
        "{err}"
    );
}

/// A `launch`ed job whose `init_from` cannot start it is refused before any process starts:
/// one error naming the job file and what is wrong, not every worker failing in turn.
#[test]
fn launch_refuses_an_init_from_that_cannot_start_the_job() {
    let data = small_prepared("launch-init-gpt2");
    let bert_data = small_prepared_for("launch-init-bert", "bert");
    let bert_run = scratch("launch-init-bert-run");
    run_ok(&mut tiny_train(&bert_data, &bert_run, &["--model", "bert"]));
    let dir = scratch("launch-init-job");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, init_from, expected) in [
        (
            "missing",
            dir.join("no-such-run"),
            "no such model directory",
        ),
        (
            "bert",
            bert_run.clone(),
            "is a bert model, and this run trains gpt2",
        ),
    ] {
        let run = dir.join(format!("run-{name}"));
        let job = dir.join(format!("{name}.toml"));
        std::fs::write(
            &job,
            format!(
                "[job]\nname = \"init-{name}\"\nsteps = 2\nrun_dir = \"{}\"\n\n\
                 [model]\nfamily = \"gpt2\"\nsize = \"tiny\"\ninit_from = \"{}\"\n\n\
                 [data]\nshards = \"{}\"\nseq_len = 32\n\n[batch]\nglobal = 4\nmicro = 2\n",
                run.display(),
                init_from.display(),
                data.display()
            ),
        )
        .unwrap();
        let err = run_err(
            ferry()
                .args(["launch", "--local", "--workers", "2", "--no-progress"])
                .arg(&job),
        );
        assert!(
            err.contains(&job.display().to_string())
                && err.contains("init_from")
                && err.contains(expected),
            "{err}"
        );
        assert!(
            !run.exists(),
            "{}: created for a refused job",
            run.display()
        );
    }
}
