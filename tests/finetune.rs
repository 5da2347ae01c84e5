//! Fine-tuning on the airline CSV (issue: fine-tuning, must-shows 2 and 3) through the real
//! binary: the report is consistent with itself and with `ferry predict`, transformers loads
//! the fine-tuned model with the same outputs, and malformed CSVs get one error line naming the
//! row.

mod support;

use ferry_dataset::textcls::{read_labelled_csv, Split};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use support::*;

fn airline_csv() -> PathBuf {
    data_dir().join("airline/Tweets.csv")
}

/// A tiny model of `family` pretrained for a few steps on the shared corpora, once per binary.
fn pretrained(family: &'static str) -> &'static Path {
    static GPT2: OnceLock<PathBuf> = OnceLock::new();
    static BERT: OnceLock<PathBuf> = OnceLock::new();
    let cell = if family == "bert" { &BERT } else { &GPT2 };
    cell.get_or_init(|| {
        let run = scratch(&format!("ft-pretrain-{family}"));
        run_ok(
            ferry()
                .args([
                    "train",
                    "--no-progress",
                    "--threads",
                    "2",
                    "--model",
                    family,
                ])
                .args(["--size", "tiny", "--seq-len", "64", "--steps", "5"])
                .args([
                    "--global-batch",
                    "8",
                    "--micro-batch",
                    "8",
                    "--eval-sequences",
                    "8",
                ])
                .arg("--data")
                .arg(prepared_shared_corpus_for(family))
                .arg("--run-dir")
                .arg(&run),
        );
        run
    })
}

fn finetune(from: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    run_ok(
        ferry()
            .args([
                "finetune",
                "--no-progress",
                "--threads",
                "2",
                "--max-steps",
                "30",
            ])
            .args(["--eval-every", "10", "--lr", "5e-4", "--from"])
            .arg(from)
            .arg("--data")
            .arg(airline_csv())
            .arg("--output")
            .arg(out)
            .args(extra),
    )
}

/// Macro-F1 from a confusion matrix (rows gold, columns predicted), 0/0 taken as 0.
fn macro_f1(confusion: &[Vec<u64>]) -> f64 {
    let k = confusion.len();
    let f1s: Vec<f64> = (0..k)
        .map(|c| {
            let tp = confusion[c][c] as f64;
            let gold: u64 = confusion[c].iter().sum();
            let predicted: u64 = confusion.iter().map(|row| row[c]).sum();
            let p = if predicted == 0 {
                0.0
            } else {
                tp / predicted as f64
            };
            let r = if gold == 0 { 0.0 } else { tp / gold as f64 };
            if p + r == 0.0 {
                0.0
            } else {
                2.0 * p * r / (p + r)
            }
        })
        .collect();
    f1s.iter().sum::<f64>() / k as f64
}

fn check_part(report: &Value, part: &str, size: usize) {
    let m = &report[part];
    let confusion: Vec<Vec<u64>> = serde_json::from_value(m["confusion"].clone()).unwrap();
    let total: u64 = confusion.iter().flatten().sum();
    let trace: u64 = (0..confusion.len()).map(|i| confusion[i][i]).sum();
    assert_eq!(
        total as usize, size,
        "{part}: the confusion matrix sums to the split size"
    );
    assert_eq!(m["total"].as_u64(), Some(total));
    let accuracy = m["accuracy"].as_f64().unwrap();
    assert!(
        (accuracy - trace as f64 / total as f64).abs() < 1e-12,
        "{part}: accuracy"
    );
    let f1 = m["macro_f1"].as_f64().unwrap();
    assert!(
        (f1 - macro_f1(&confusion)).abs() < 1e-9,
        "{part}: macro-F1 {f1}"
    );
    for (c, class) in m["per_class"].as_array().unwrap().iter().enumerate() {
        let support: u64 = confusion[c].iter().sum();
        assert_eq!(class["support"].as_u64(), Some(support), "{part}: support");
    }
    println!(
        "{part}: {size} texts, accuracy {accuracy:.4}, macro-F1 {f1:.4}, confusion {confusion:?}"
    );
}

#[test]
fn a_short_finetune_writes_a_consistent_report() {
    let out = scratch("ft-report");
    finetune(pretrained("gpt2"), &out, &[]);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let set = read_labelled_csv(&airline_csv(), "text", Some("airline_sentiment"), None).unwrap();
    let split = Split::load(&out.join("split.json"), &set).unwrap();
    let sizes = [&split.train, &split.dev, &split.test].map(|p| p.len());
    assert_eq!(sizes.iter().sum::<usize>(), 14_640);
    assert_eq!(report["split"]["train"].as_u64(), Some(sizes[0] as u64));
    check_part(&report, "dev", sizes[1]);
    check_part(&report, "test", sizes[2]);
    assert_eq!(report["steps"].as_u64(), Some(30));
    // The dev curve has the three evaluations, and the kept step is the best of them.
    let f1s: Vec<(u64, f64)> =
        serde_json::from_value(report["curves"]["dev_macro_f1"].clone()).unwrap();
    assert_eq!(
        f1s.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![10, 20, 30]
    );
    let best = f1s
        .iter()
        .cloned()
        .fold((0, f64::MIN), |a, b| if b.1 > a.1 { b } else { a });
    assert_eq!(report["best_step"].as_u64(), Some(best.0));
    assert!((report["dev"]["macro_f1"].as_f64().unwrap() - best.1).abs() < 1e-9);
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("negative") && svg.contains("neutral"));

    // ferry predict on the test split's texts reproduces the reported test accuracy.
    let test_csv = out.join("test-split.csv");
    let mut rows = String::from("text,airline_sentiment\n");
    for e in split.examples(ferry_dataset::textcls::Part::Test, &set) {
        let label = &set.labels[e.label.unwrap()];
        rows.push_str(&format!("\"{}\",{label}\n", e.text.replace('"', "\"\"")));
    }
    std::fs::write(&test_csv, rows).unwrap();
    let predictions = out.join("predictions.csv");
    run_ok(
        ferry()
            .args(["predict", "--model"])
            .arg(&out)
            .arg("--input")
            .arg(&test_csv)
            .arg("--output")
            .arg(&predictions),
    );
    let gold = read_labelled_csv(&test_csv, "text", Some("airline_sentiment"), None).unwrap();
    let predicted =
        read_labelled_csv(&predictions, "text", Some("predicted"), Some(&set.labels)).unwrap();
    assert_eq!(predicted.len(), sizes[2]);
    let right = gold
        .examples
        .iter()
        .zip(&predicted.examples)
        .filter(|(g, p)| set.labels[g.label.unwrap()] == predicted.labels[p.label.unwrap()])
        .count();
    let accuracy = right as f64 / sizes[2] as f64;
    assert!(
        (accuracy - report["test"]["accuracy"].as_f64().unwrap()).abs() < 1e-12,
        "predict gives test accuracy {accuracy}, the report {}",
        report["test"]["accuracy"]
    );
}

/// Fine-tuned BERT and GPT-2 open in transformers (BertForSequenceClassification,
/// GPT2ForSequenceClassification) and give the probabilities ferry predict gives.
#[test]
fn transformers_loads_the_finetuned_models_with_the_same_outputs() {
    let texts = [
        "@united thanks, the crew was great & on time",
        "@AmericanAir my bag is lost AGAIN 😡 worst airline",
        "@SouthwestAir is there wifi on the 6am flight to Denver?",
    ];
    let texts_file = scratch("ft-hf-texts");
    std::fs::write(&texts_file, texts.join("\n")).unwrap();
    for family in ["bert", "gpt2"] {
        let out = scratch(&format!("ft-hf-{family}"));
        finetune(pretrained(family), &out, &["--max-steps", "10"]);
        let model = out.join("model");
        let theirs = run_ok(
            std::process::Command::new(python())
                .arg(root().join("tests/python/hf_parity.py"))
                .arg("classify")
                .arg(&model)
                .arg(&texts_file),
        );
        let theirs: Vec<Vec<f64>> = serde_json::from_slice(&theirs.stdout).unwrap();
        let csv = out.join("texts.csv");
        let mut rows = String::from("text\n");
        for t in texts {
            rows.push_str(&format!("\"{t}\"\n"));
        }
        std::fs::write(&csv, rows).unwrap();
        let ours = String::from_utf8(
            run_ok(
                ferry()
                    .args(["predict", "--model"])
                    .arg(&model)
                    .arg("--input")
                    .arg(&csv),
            )
            .stdout,
        )
        .unwrap();
        let mut worst = 0.0f64;
        for (line, theirs) in ours.lines().skip(1).zip(&theirs) {
            // "record","predicted","p_negative","p_neutral","p_positive","text"
            let fields: Vec<f64> = line
                .split(',')
                .skip(2)
                .take(3)
                .map(|f| f.trim_matches('"').parse().unwrap())
                .collect();
            for (a, b) in fields.iter().zip(theirs) {
                worst = worst.max((a - b).abs());
            }
        }
        println!("{family}: max |probability difference| ferry vs transformers = {worst:.2e}");
        assert_eq!(ours.lines().count(), texts.len() + 1);
        assert!(worst < 1e-4, "{family}: {worst}");
    }
}

/// A malformed CSV: one error line that names the file and the line, exit 1, no panic.
fn finetune_err(name: &str, content: &[u8]) -> String {
    let csv = scratch(&format!("bad-csv-{name}.csv"));
    std::fs::write(&csv, content).unwrap();
    let err = run_err(
        ferry()
            .args(["finetune", "--no-progress", "--max-steps", "1", "--from"])
            .arg(pretrained("gpt2"))
            .arg("--data")
            .arg(&csv)
            .arg("--output")
            .arg(scratch(&format!("bad-csv-{name}-out"))),
    );
    assert!(err.contains(&csv.display().to_string()), "{err}");
    err
}

#[test]
fn malformed_csvs_name_the_row() {
    let header = "tweet_id,airline_sentiment,text\n";
    let good = "1,negative,late again\n2,positive,great crew\n";
    let case = |name: &str, body: &[u8], expect: &[&str]| {
        let mut content = header.as_bytes().to_vec();
        content.extend_from_slice(good.as_bytes());
        content.extend_from_slice(body);
        let err = finetune_err(name, &content);
        for e in expect {
            assert!(err.contains(e), "{name}: {err:?} lacks {e:?}");
        }
        println!("{name}: {err}");
    };
    case("empty-label", b"3,,no label here\n", &["line 4", "label"]);
    case("empty-text", b"3,neutral,   \n", &["line 4", "text"]);
    case("ragged", b"3,neutral,too,many,fields\n", &["line 4", "5"]);
    case(
        "not-utf8",
        b"3,neutral,caf\xe9 au lait\n",
        &["line 4", "UTF-8"],
    );
    case(
        "quoted-newline-then-bad",
        b"3,neutral,\"two\nlines\"\n4,,x\n",
        &["line 6"],
    );
    let err = finetune_err("missing-column", b"tweet_id,sentiment,text\n1,negative,x\n");
    assert!(
        err.contains("airline_sentiment") && err.contains("sentiment"),
        "{err}"
    );
    // predict with a label column scores against the model's labels: an unknown one is named.
    let out = scratch("ft-unknown-label");
    finetune(pretrained("gpt2"), &out, &["--max-steps", "2"]);
    let csv = scratch("unknown-label.csv");
    std::fs::write(&csv, "text,airline_sentiment\nok,negative\nmeh,furious\n").unwrap();
    let err = run_err(
        ferry()
            .args(["predict", "--label-column", "airline_sentiment", "--model"])
            .arg(&out)
            .arg("--input")
            .arg(&csv),
    );
    assert!(err.contains("line 3") && err.contains("furious"), "{err}");
}

/// Issue 20, item 3: a labelled CSV saved by a spreadsheet in Windows-1252 (CRLF, accents,
/// curly quotes, dashes, the euro sign, doubled quotes, a quoted field over two lines), 24
/// records in three classes.
fn windows_1252_csv() -> Vec<u8> {
    let texts: [(&str, &[u8]); 3] = [
        (
            "positive",
            b"\"Caf\xe9 au lait on board, se\xf1or \x93Pe\xf1a\x94 said \x97 thanks! #N\"",
        ),
        (
            "negative",
            b"\"It\x92s the \x91worst\x92 delay:\r\nthree hours, \x80120 lost #N\"",
        ),
        (
            "neutral",
            b"\"Is \"\"wifi\"\" free on the ni\xf1o flight \x96 or \x8010? #N\"",
        ),
    ];
    let mut csv = b"airline_sentiment,text\r\n".to_vec();
    for n in 0..8 {
        for (label, text) in texts {
            csv.extend_from_slice(label.as_bytes());
            csv.push(b',');
            let at = text.len() - 2;
            csv.extend_from_slice(&text[..at]);
            csv.extend_from_slice(n.to_string().as_bytes());
            csv.extend_from_slice(&text[at + 1..]);
            csv.extend_from_slice(b"\r\n");
        }
    }
    csv
}

/// `prepare`, `finetune` and `predict` all read the spreadsheet's CSV with `--encoding`, and
/// see the texts and labels Python's `csv` module sees with `encoding="cp1252"`; without
/// `--encoding` the error names the option.
#[test]
fn a_windows_1252_csv_finetunes_with_encoding() {
    use ferry_dataset::textcls::{read_labelled_csv_encoded, CsvEncoding};
    let dir = scratch("ft-windows-1252");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("spreadsheet.csv");
    std::fs::write(&csv, windows_1252_csv()).unwrap();

    // What Python reads: (text, label) per record.
    let script = "import csv, json, sys\n\
        with open(sys.argv[1], newline='', encoding='cp1252') as f:\n    \
            rows = [(r['text'], r['airline_sentiment'].strip()) for r in csv.DictReader(f)]\n\
        print(json.dumps(rows))\n";
    let python = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(&csv)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed to compare with Python's csv module, and did not run: {e}")
        });
    assert!(
        python.status.success(),
        "{}",
        String::from_utf8_lossy(&python.stderr)
    );
    let python: Vec<(String, String)> = serde_json::from_slice(&python.stdout).unwrap();
    assert_eq!(python.len(), 24);
    assert!(python[0].0.contains("Café") && python[0].0.contains("“Peña” said —"));
    assert!(python[1]
        .0
        .contains("It’s the ‘worst’ delay:\r\nthree hours, €120"));

    // A tiny model whose tokenizer was trained on the same bytes, read the same way
    // (`prepare --encoding windows-1252`, then two training steps).
    let (_, run) = tiny_run();

    let finetune_cmd = |out: &Path, encoding: &[&str]| {
        let mut cmd = ferry();
        cmd.args([
            "finetune",
            "--no-progress",
            "--threads",
            "2",
            "--max-steps",
            "3",
        ])
        .args(["--batch-size", "4", "--max-len", "32", "--from"])
        .arg(&run)
        .arg("--data")
        .arg(&csv)
        .arg("--output")
        .arg(out)
        .args(encoding);
        cmd
    };
    let out = dir.join("ft");
    run_ok(&mut finetune_cmd(&out, &["--encoding", "windows-1252"]));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["config"]["encoding"], "windows-1252");
    assert_eq!(report["steps"].as_u64(), Some(3));
    let split: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("split.json")).unwrap()).unwrap();
    let mut labels: Vec<&str> = python.iter().map(|(_, l)| l.as_str()).collect();
    labels.sort();
    labels.dedup();
    assert_eq!(split["labels"], serde_json::json!(labels));
    assert_eq!(split["num_records"].as_u64(), Some(24));
    // The labels and texts fine-tuning read are Python's.
    let set = read_labelled_csv_encoded(
        &csv,
        "text",
        Some("airline_sentiment"),
        None,
        CsvEncoding::Windows1252,
    )
    .unwrap();
    let ours: Vec<(String, String)> = set
        .examples
        .iter()
        .map(|e| (e.text.clone(), set.labels[e.label.unwrap()].clone()))
        .collect();
    assert_eq!(ours, python);

    // predict --input reads it too (the alias cp1252), and writes the texts back as UTF-8.
    let predictions = dir.join("predictions.csv");
    run_ok(
        ferry()
            .args(["predict", "--encoding", "cp1252", "--model"])
            .arg(&out)
            .arg("--input")
            .arg(&csv)
            .arg("--output")
            .arg(&predictions),
    );
    let predicted = read_labelled_csv(&predictions, "text", Some("predicted"), None).unwrap();
    let texts: Vec<&str> = predicted.examples.iter().map(|e| e.text.as_str()).collect();
    let expected: Vec<&str> = python.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, expected);

    // Without --encoding: one error line naming the file, the line, the column and the option.
    let err = run_err(&mut finetune_cmd(&dir.join("ft-utf8"), &[]));
    assert!(err.contains(&csv.display().to_string()), "{err}");
    assert!(
        err.contains("line 2, column \"text\": invalid UTF-8")
            && err.contains("--encoding windows-1252"),
        "{err}"
    );
}

/// A tiny GPT-2 run (tokenizer and two steps on the 24-record spreadsheet CSV), made once per
/// binary: `(csv, run)`. Seconds, where `pretrained` trains on the shared corpus.
fn tiny_run() -> &'static (PathBuf, PathBuf) {
    static TINY: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    TINY.get_or_init(|| {
        let dir = scratch("ft-tiny");
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("tweets.csv");
        std::fs::write(&csv, windows_1252_csv()).unwrap();
        let prepared = dir.join("prepared");
        run_ok(
            ferry()
                .args(["prepare", "--no-progress", "--encoding", "windows-1252"])
                .args(["--vocab-size", "300", "--input"])
                .arg(&csv)
                .arg("--output")
                .arg(&prepared),
        );
        let run = dir.join("run");
        run_ok(
            ferry()
                .args(["train", "--no-progress", "--threads", "2"])
                .args(TWO_STEP_RUN)
                .arg("--data")
                .arg(&prepared)
                .arg("--run-dir")
                .arg(&run),
        );
        (csv, run)
    })
}

/// `ferry finetune` of the tiny run, 3 steps, into `out`.
fn tiny_finetune(out: &Path, extra: &[&str]) -> std::process::Command {
    let (csv, run) = tiny_run();
    let mut cmd = ferry();
    cmd.args(["finetune", "--no-progress", "--threads", "2"])
        .args(["--max-steps", "3", "--batch-size", "4", "--max-len", "32"])
        .args(["--encoding", "windows-1252", "--from"])
        .arg(run)
        .arg("--data")
        .arg(csv)
        .arg("--output")
        .arg(out)
        .args(extra);
    cmd
}

/// The files under `dir`, relative, with their bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                out.push((path.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// Issue 22: `finetune --output` onto a directory that holds something (a previous
/// fine-tuning, a model directory, anything) is refused, naming it and `--overwrite`, and
/// nothing in it changes; `--overwrite` replaces the previous output and keeps other files.
#[test]
fn finetune_refuses_an_existing_output_unless_overwrite() {
    let dir = scratch("ft-overwrite");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("ft");
    run_ok(&mut tiny_finetune(&out, &[]));
    let before = snapshot(&out);
    let err = run_err(&mut tiny_finetune(&out, &["--seed", "1"]));
    assert!(
        err.contains(&out.display().to_string()) && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(snapshot(&out), before, "a refused run changed {out:?}");

    // A model directory (config.json, model.safetensors) given as --output.
    let model = dir.join("model-copy");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(out.join("model").join(file), model.join(file)).unwrap();
    }
    let before_model = snapshot(&model);
    let err = run_err(&mut tiny_finetune(&model, &[]));
    assert!(
        err.contains(&model.display().to_string()) && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(snapshot(&model), before_model);
    // A file is no output directory, --overwrite or not.
    let file = dir.join("file.txt");
    std::fs::write(&file, "keep me").unwrap();
    let err = run_err(&mut tiny_finetune(&file, &["--overwrite"]));
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");

    // --overwrite replaces the earlier output; a file of the user's in it stays.
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    run_ok(&mut tiny_finetune(&out, &["--seed", "1", "--overwrite"]));
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["config"]["seed"].as_u64(), Some(1));
    assert_ne!(
        std::fs::read(out.join("model/model.safetensors")).unwrap(),
        before
            .iter()
            .find(|(p, _)| p == Path::new("model/model.safetensors"))
            .unwrap()
            .1
    );
    assert_eq!(
        std::fs::read_to_string(out.join("notes.txt")).unwrap(),
        "mine"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model",
            "notes.txt",
            "report.json",
            "report.svg",
            "split.json"
        ],
        "temporary or set-aside directories left in {out:?}"
    );
    // An empty directory is no one's work: fine without --overwrite.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    run_ok(&mut tiny_finetune(&empty, &[]));
    assert!(empty.join("model/model.safetensors").is_file());
}

/// Issue 22: `predict --output` never replaces its own `--input` (the same path, another
/// spelling of it, or a symlink to it), refused before the model is even read; an existing
/// file is replaced only with `--overwrite`, atomically (no temporary file left).
#[test]
fn predict_never_overwrites_its_input_or_an_existing_file() {
    let dir = scratch("predict-overwrite");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("in.csv");
    std::fs::write(&input, windows_1252_csv()).unwrap();
    let original = std::fs::read(&input).unwrap();
    let predict = |model: &Path, output: &Path, extra: &[&str]| {
        let mut cmd = ferry();
        cmd.current_dir(&dir)
            .args(["predict", "--encoding", "cp1252", "--model"])
            .arg(model)
            .args(["--input", "in.csv", "--output"])
            .arg(output)
            .args(extra);
        cmd
    };
    // The model does not exist: the output is refused before anything is read.
    let missing = dir.join("no-such-model");
    #[cfg(unix)]
    std::os::unix::fs::symlink("in.csv", dir.join("link.csv")).unwrap();
    let mut spellings = vec![
        PathBuf::from("in.csv"),
        PathBuf::from("./in.csv"),
        input.clone(),
    ];
    if cfg!(unix) {
        spellings.push(PathBuf::from("link.csv"));
    }
    for output in &spellings {
        for extra in [&[][..], &["--overwrite"][..]] {
            let err = run_err(&mut predict(&missing, output, extra));
            assert!(
                err.contains("--input") && err.contains(&output.display().to_string()),
                "{output:?} {extra:?}: {err}"
            );
            assert!(!err.contains("no-such-model"), "{err}");
            assert_eq!(std::fs::read(&input).unwrap(), original);
        }
    }
    // Another existing file: refused without --overwrite.
    let other = dir.join("predictions.csv");
    std::fs::write(&other, "keep me").unwrap();
    let err = run_err(&mut predict(&missing, &other, &[]));
    assert!(
        err.contains(&other.display().to_string()) && err.contains("--overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&other).unwrap(), "keep me");

    // With --overwrite it is replaced, and nothing temporary is left beside it.
    let model = dir.join("ft");
    run_ok(&mut tiny_finetune(&model, &[]));
    run_ok(&mut predict(&model, &other, &["--overwrite"]));
    let predicted = read_labelled_csv(&other, "text", Some("predicted"), None).unwrap();
    assert_eq!(predicted.len(), 24);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("predictions"))
        .collect();
    names.sort();
    assert_eq!(names, ["predictions.csv"]);
    assert_eq!(std::fs::read(&input).unwrap(), original);
}
