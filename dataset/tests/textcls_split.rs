//! The stratified split on the real airline file and on small files written here, and the
//! checks on loading a `split.json`.

mod support;
use support::*;

use std::fs;
use std::path::Path;

use ferry_dataset::textcls::{read_labelled_csv, LabelledSet, Part, Split, SplitFractions};
use ferry_dataset::DataError;

fn ideal_within_one(set: &LabelledSet, split: &Split) {
    let fractions = [
        split.fractions.train,
        split.fractions.dev,
        split.fractions.test,
    ];
    for (part, fraction) in Part::ALL.iter().zip(fractions) {
        let mut per_class = vec![0usize; set.labels.len()];
        for e in split.examples(*part, set) {
            per_class[e.label.unwrap()] += 1;
        }
        for (class, (&got, &total)) in per_class.iter().zip(&set.label_counts).enumerate() {
            let ideal = total as f64 * fraction;
            assert!(
                (got as f64 - ideal).abs() <= 1.0,
                "{} class {class}: {got} records, ideal {ideal}",
                part.name()
            );
        }
    }
}

#[test]
fn split_of_the_airline_file_is_stratified_complete_and_seeded() {
    let path = tweets();
    let set = read_tweets(&path);
    let split = Split::stratified(&set, SplitFractions::default(), 0).unwrap();
    assert_eq!(
        (split.train.len(), split.dev.len(), split.test.len()),
        (7342 + 2479 + 1891, 918 + 310 + 236, 918 + 310 + 236)
    );
    ideal_within_one(&set, &split);
    let mut all: Vec<usize> = [&split.train, &split.dev, &split.test]
        .into_iter()
        .flatten()
        .copied()
        .collect();
    assert!(
        split.train.windows(2).all(|w| w[0] < w[1]),
        "train is sorted"
    );
    all.sort_unstable();
    assert_eq!(
        all,
        (0..set.len()).collect::<Vec<_>>(),
        "disjoint and complete"
    );

    assert_eq!(
        Split::stratified(&set, SplitFractions::default(), 0).unwrap(),
        split
    );
    let other = Split::stratified(&set, SplitFractions::default(), 1).unwrap();
    assert_ne!(other.dev, split.dev);
    assert_eq!(other.dev.len(), split.dev.len());
    ideal_within_one(&set, &other);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("split.json");
    split.save(&file).unwrap();
    assert_eq!(Split::load(&file, &set).unwrap(), split);
    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    let keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let mut expected = [
        "seed",
        "fractions",
        "source",
        "num_records",
        "labels",
        "train",
        "dev",
        "test",
    ];
    expected.sort_unstable();
    let mut keys = keys;
    keys.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(json["fractions"]["dev"], 0.1);
    assert_eq!(json["num_records"], 14_640);
}

/// A small labelled set written to `dir`: `counts[i]` records of label `l{i}`.
fn small_set(dir: &Path, counts: &[usize]) -> LabelledSet {
    let mut csv = String::from("text,label\n");
    for (label, &n) in counts.iter().enumerate() {
        for i in 0..n {
            csv.push_str(&format!("text {label} {i},l{label}\n"));
        }
    }
    let path = write(dir, "small.csv", csv);
    read_labelled_csv(&path, "text", Some("label"), None).unwrap()
}

#[test]
fn small_classes_reach_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), &[30, 5, 3]);
    let split = Split::stratified(&set, SplitFractions::default(), 3).unwrap();
    for part in Part::ALL {
        let mut seen = vec![false; 3];
        for e in split.examples(part, &set) {
            seen[e.label.unwrap()] = true;
        }
        assert_eq!(seen, [true; 3], "{} lacks a class", part.name());
    }
    let tiny = small_set(dir.path(), &[1, 1]);
    let err = Split::stratified(&tiny, SplitFractions::default(), 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("too few for a non-empty test part"),
        "{err}"
    );
    let bad = SplitFractions {
        train: 0.8,
        dev: 0.3,
        test: 0.1,
    };
    let err = Split::stratified(&set, bad, 0).unwrap_err();
    assert!(err.to_string().contains("sum to 1"), "{err}");
}

#[test]
fn tampered_split_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let set = small_set(dir.path(), &[20, 10]);
    let split = Split::stratified(&set, SplitFractions::default(), 0).unwrap();
    let file = dir.path().join("split.json");
    let refused = |edit: &dyn Fn(&mut Split), expect: &str| {
        let mut bad = split.clone();
        edit(&mut bad);
        fs::write(&file, serde_json::to_string(&bad).unwrap()).unwrap();
        let err = Split::load(&file, &set).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("{}: bad split: ", file.display())),
            "{message}"
        );
        assert!(message.contains(expect), "{message:?} lacks {expect:?}");
    };
    let in_dev = split.dev[0];
    refused(
        &|s| s.test.push(in_dev),
        &format!("record {in_dev} is in both dev and test"),
    );
    refused(
        &|s| s.train.push(30),
        "train index 30 is out of range (num_records is 30)",
    );
    refused(
        &|s| s.dev.push(in_dev),
        &format!("record {in_dev} is listed twice in dev"),
    );
    refused(&|s| s.num_records = 31, "made for 31 records");
    refused(&|s| s.labels = strings(&["l0", "other"]), "made for labels");
    refused(&|s| s.labels = strings(&["l0", "l0"]), "listed twice");
    refused(&|s| s.fractions.train = 0.5, "sum to 1");
    fs::write(&file, r#"{"seed": 0}"#).unwrap();
    let err = Split::load(&file, &set).unwrap_err();
    assert!(err.to_string().contains("missing field"), "{err}");
    fs::write(&file, "not json").unwrap();
    assert!(matches!(
        Split::load(&file, &set),
        Err(DataError::Split { .. })
    ));
}

/// The texts `ferry prepare` takes from a labelled CSV for pretraining on the task (ULMFiT's
/// second stage) are exactly those of the split's training part, in record order: dev and test
/// tweets never reach the language model that is later scored on them.
#[test]
fn pretraining_texts_of_a_split_are_its_training_part_only() {
    use ferry_dataset::corpus::{read_csv_documents, CsvTexts};
    use ferry_dataset::prepare::{prepare, PrepareOptions};

    let path = tweets();
    let set = read_tweets(&path);
    let split = Split::stratified(&set, SplitFractions::default(), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split_path = dir.path().join("split.json");
    split.save(&split_path).unwrap();

    let csv = CsvTexts {
        text_column: "text".into(),
        split: Some((split_path.clone(), Part::Train)),
        ..CsvTexts::default()
    };
    let docs = read_csv_documents(&path, &csv).unwrap();
    assert_eq!(docs.len(), split.train.len());
    for (doc, &record) in docs.iter().zip(&split.train) {
        let lines: Vec<&str> = set.examples[record]
            .text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(doc.text(), lines.join("\n"), "record {record}");
    }
    // A record of dev was in the file, and is not among the documents.
    let dev_record = split.dev[0];
    assert!(
        !split.train.contains(&dev_record) && docs.len() < set.len(),
        "the split keeps records out"
    );

    let all = read_csv_documents(&path, &CsvTexts::default()).unwrap();
    assert_eq!(all.len(), set.len(), "without a split, every record");

    // Through `prepare`: every training tweet lands in the train or val split of the shards.
    let out = dir.path().join("prepared");
    let manifest = prepare(&PrepareOptions {
        inputs: vec![path.display().to_string()],
        output: out.clone(),
        vocab_size: 512,
        val_fraction: 0.05,
        csv,
        ..PrepareOptions::default()
    })
    .unwrap();
    let documents: u64 = manifest.splits.values().map(|s| s.documents).sum();
    assert_eq!(documents, split.train.len() as u64);
    assert!(manifest.splits["val"].documents > 0);
}

#[test]
fn pretraining_texts_refuse_a_split_of_another_file_and_a_split_without_a_csv() {
    use ferry_dataset::corpus::{read_csv_documents, CsvTexts};
    use ferry_dataset::prepare::{prepare, PrepareOptions};

    let set = read_tweets(&tweets());
    let split = Split::stratified(&set, SplitFractions::default(), 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let split_path = dir.path().join("split.json");
    split.save(&split_path).unwrap();
    let other = write(
        dir.path(),
        "other.csv",
        "text,airline_sentiment\nhello,positive\nawful,negative\n",
    );
    let csv = CsvTexts {
        text_column: "text".into(),
        split: Some((split_path.clone(), Part::Train)),
        ..CsvTexts::default()
    };
    let err = read_csv_documents(&other, &csv).unwrap_err();
    assert!(matches!(err, DataError::Split { .. }), "{err}");
    assert!(err.to_string().contains("14640 records"), "{err}");

    let err = read_csv_documents(
        &other,
        &CsvTexts {
            text_column: "tweet".into(),
            ..CsvTexts::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("tweet"), "{err}");

    let book = write(dir.path(), "book.txt", "One sentence here.\nAnother one.\n");
    let err = prepare(&PrepareOptions {
        inputs: vec![book.display().to_string()],
        output: dir.path().join("prepared"),
        csv,
        ..PrepareOptions::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains(".csv"), "{err}");
}
