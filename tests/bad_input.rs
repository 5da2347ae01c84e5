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

/// A tiny GPT-2 (256 positions) trained two steps on `small_prepared` data (vocabulary 400),
/// built once for the tests below: (prepared data, newest checkpoint directory).
fn tiny_gpt2() -> &'static (PathBuf, PathBuf) {
    static MODEL: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let data = small_prepared("tiny-gpt2");
        let run = scratch("tiny-gpt2-run");
        run_ok(&mut tiny_train(&data, &run, &[]));
        (data, run.join("checkpoints/step-00000002"))
    })
}

/// A labelled CSV (`text`, `label`: two classes, 20 texts each) whose texts are `chars`
/// characters of the shared Alice book.
fn labelled_csv(name: &str, chars: usize) -> PathBuf {
    let book = std::fs::read_to_string(data_dir().join("books/carroll-alice.txt")).unwrap();
    let words: Vec<&str> = book
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| !w.is_empty())
        .collect();
    let mut csv = String::from("text,label\n");
    let mut at = 0;
    for i in 0..40 {
        let mut text = String::new();
        while text.len() < chars {
            text.push_str(words[at % words.len()]);
            text.push(' ');
            at += 1;
        }
        csv.push_str(&format!("{},{}\n", text.trim(), ["yes", "no"][i % 2]));
    }
    let path = scratch(&format!("{name}-csv")).with_extension("csv");
    std::fs::write(&path, csv).unwrap();
    path
}

/// A tiny GPT-2 classifier fine-tuned one step from [`tiny_gpt2`], built once: its `model/`.
fn tiny_classifier() -> &'static PathBuf {
    static MODEL: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    MODEL.get_or_init(|| {
        let out = scratch("tiny-classifier");
        run_ok(&mut finetune(
            &tiny_gpt2().1,
            &labelled_csv("tiny-classifier", 60),
            &out,
            &[],
        ));
        out.join("model")
    })
}

fn finetune(from: &Path, csv: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = ferry();
    c.args([
        "finetune",
        "--no-progress",
        "--threads",
        "1",
        "--max-steps",
        "1",
    ])
    .args([
        "--batch-size",
        "4",
        "--label-column",
        "label",
        "--max-len",
        "32",
    ])
    .arg("--from")
    .arg(from)
    .arg("--data")
    .arg(csv)
    .arg("--output")
    .arg(out)
    .args(extra);
    c
}

/// A copy of model directory `src` without its `checksums.json` (so that it can be edited),
/// with `edit` applied to the JSON of file `file`.
fn edited_copy(
    src: &Path,
    name: &str,
    file: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> PathBuf {
    let dir = scratch(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "checksums.json" {
            std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    let path = dir.join(file);
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(&path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    dir
}

#[test]
fn generate_refuses_bad_sampling_options() {
    let model = &tiny_gpt2().1;
    for (flag, value) in [
        ("--top-p", "0"),
        ("--top-p", "1.5"),
        ("--top-p", "NaN"),
        ("--temperature", "NaN"),
        ("--temperature", "inf"),
        ("--temperature", "-1"),
    ] {
        let err = run_err(
            ferry()
                .args(["generate", "--max-new-tokens", "4", "--model"])
                .arg(model)
                .arg(format!("{flag}={value}")),
        );
        assert!(
            err.contains(flag) && err.contains(value),
            "{flag} {value}: {err}"
        );
    }
}

/// A temperature so small that logits / temperature overflow samples greedily, as 0 does, and
/// so does a nucleus so small that it holds only the most likely token.
#[test]
fn generate_at_a_vanishing_temperature_or_nucleus_is_greedy() {
    let model = &tiny_gpt2().1;
    let sample = |extra: &[&str]| {
        let out = run_ok(
            ferry()
                .args(["generate", "--prompt", "Alice was", "--max-new-tokens", "8"])
                .arg("--model")
                .arg(model)
                .args(extra),
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let greedy = sample(&["--temperature", "0"]);
    assert_eq!(sample(&["--temperature", "1e-300"]), greedy);
    assert_eq!(sample(&["--temperature", "1", "--top-p", "1e-9"]), greedy);
}

#[test]
fn vocab_size_override_smaller_than_the_tokenizer() {
    let data = &tiny_gpt2().0;
    let err = run_err(&mut tiny_train(
        data,
        &scratch("vocab-override-run"),
        &["--set", "vocab_size=100"],
    ));
    assert!(
        err.contains("vocab_size")
            && err.contains("100")
            && err.contains("400")
            && err.contains(&data.join("tokenizer.json").display().to_string()),
        "{err}"
    );
}

/// A dropout probability outside [0, 1) is refused naming the field: from `--set`, from a job
/// file (with its line) and from a model directory's `config.json`.
#[test]
fn dropout_probability_outside_0_1() {
    let (data, checkpoint) = tiny_gpt2();
    for set in ["resid_pdrop=1.5", "attn_pdrop=-0.1", "embd_pdrop=1"] {
        let err = run_err(&mut tiny_train(
            data,
            &scratch("dropout-run"),
            &["--set", set],
        ));
        let (field, value) = set.split_once('=').unwrap();
        assert!(err.contains(field) && err.contains(value), "{set}: {err}");
    }

    let dir = scratch("dropout-job");
    std::fs::create_dir_all(&dir).unwrap();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"dropout\"\nsteps = 2\nrun_dir = \"{}\"\n\n\
             [model]\nfamily = \"gpt2\"\nsize = \"tiny\"\n\n[model.overrides]\nembd_pdrop = 2.0\n\n\
             [data]\nshards = \"{}\"\nseq_len = 32\n\n[batch]\nglobal = 4\nmicro = 2\n",
            dir.join("run").display(),
            data.display()
        ),
    )
    .unwrap();
    let err = run_err(
        ferry()
            .args(["launch", "--local", "--workers", "1", "--no-progress"])
            .arg(&job),
    );
    assert!(
        err.contains(&format!("{}:11", job.display()))
            && err.contains("model.overrides.embd_pdrop"),
        "{err}"
    );

    let model = edited_copy(checkpoint, "dropout-model", "config.json", |c| {
        c["resid_pdrop"] = 1.5.into()
    });
    let err = run_err(ferry().args(["generate", "--model"]).arg(&model));
    assert!(
        err.contains(&model.join("config.json").display().to_string())
            && err.contains("resid_pdrop"),
        "{err}"
    );
}

#[test]
fn finetune_max_len_beyond_the_model_positions() {
    let out = scratch("max-len-out");
    let err = run_err(&mut finetune(
        &tiny_gpt2().1,
        &labelled_csv("max-len", 4000),
        &out,
        &["--max-len", "1000"],
    ));
    assert!(
        err.contains("--max-len") && err.contains("1000") && err.contains("n_positions (256)"),
        "{err}"
    );
}

#[test]
fn device_index_past_the_last_gpu() {
    let err = run_err(ferry().args([
        "bench",
        "train",
        "--device",
        "cuda:5",
        "--steps",
        "1",
        "--warmup-steps",
        "0",
    ]));
    assert!(err.contains("cuda:5") && err.contains("GPU"), "{err}");
}

/// An empty `id2label` in `config.json` is named, for `predict` (a directory without
/// `finetune.json`, as `transformers` saves it) and for `finetune --from`.
#[test]
fn empty_id2label() {
    let model = edited_copy(tiny_classifier(), "empty-id2label", "config.json", |c| {
        c["id2label"] = serde_json::json!({});
        c["label2id"] = serde_json::json!({});
    });
    std::fs::remove_file(model.join("finetune.json")).unwrap();
    let err = run_err(
        ferry()
            .args(["predict", "--model"])
            .arg(&model)
            .arg("a text"),
    );
    let config = model.join("config.json").display().to_string();
    assert!(err.contains(&config) && err.contains("id2label"), "{err}");

    let lm = edited_copy(&tiny_gpt2().1, "empty-id2label-lm", "config.json", |c| {
        c["id2label"] = serde_json::json!({});
    });
    let err = run_err(&mut finetune(
        &lm,
        &labelled_csv("empty-id2label", 60),
        &scratch("empty-id2label-out"),
        &[],
    ));
    let config = lm.join("config.json").display().to_string();
    assert!(err.contains(&config) && err.contains("id2label"), "{err}");
}

/// A tokenizer with ids past the model's vocabulary is refused when the model is opened, by
/// `generate`, `finetune --from` and `predict`, naming both files and both numbers.
#[test]
fn tokenizer_with_more_ids_than_the_model_vocabulary() {
    // 50 more entries in the BPE vocabulary: ids 400..449, which the model has no rows for.
    let widen = |t: &mut serde_json::Value| {
        let vocab = t["model"]["vocab"].as_object_mut().unwrap();
        for i in 0..50 {
            vocab.insert(format!("zzextra{i}"), (400 + i).into());
        }
    };
    let lm = edited_copy(&tiny_gpt2().1, "wide-tok-lm", "tokenizer.json", widen);
    let classifier = edited_copy(tiny_classifier(), "wide-tok-cls", "tokenizer.json", widen);
    let check = |err: &str, dir: &Path| {
        assert!(
            err.contains(&dir.join("tokenizer.json").display().to_string())
                && err.contains(&dir.join("config.json").display().to_string())
                && err.contains("450")
                && err.contains("400"),
            "{err}"
        );
    };
    let err = run_err(
        ferry()
            .args(["generate", "--prompt", "Alice", "--model"])
            .arg(&lm),
    );
    check(&err, &lm);
    let err = run_err(&mut finetune(
        &lm,
        &labelled_csv("wide-tok", 60),
        &scratch("wide-tok-out"),
        &[],
    ));
    check(&err, &lm);
    let err = run_err(
        ferry()
            .args(["predict", "--model"])
            .arg(&classifier)
            .arg("a text"),
    );
    check(&err, &classifier);
}
