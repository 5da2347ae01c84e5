//! The labelled-CSV reader (`ferry finetune`'s input): arbitrary file bytes in each encoding,
//! with and without a label column and a list of known labels; and the field decoders it
//! uses. Nothing may panic; what it returns must hold together (records numbered in order,
//! labels within the vocabulary, counts that add up).

#![no_main]

use ferry_dataset::textcls::{decode_html_entities, read_labelled_csv_encoded, CsvEncoding};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn scratch() -> &'static tempfile::TempDir {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(ferry_fuzz::scratch_dir)
}

/// Input: one byte of options, then the file. The byte's value modulo 3 is the encoding
/// (UTF-8, Latin-1, Windows-1252); divided by 3, modulo 3, the labels: from the column
/// `label`, none, or from `label` but limited to `KNOWN`. The text is always in `text`.
const KNOWN: [&str; 3] = ["negative", "neutral", "positive"];

fuzz_target!(|data: &[u8]| {
    let Some((&options, file)) = data.split_first() else {
        return;
    };
    let encoding = match options % 3 {
        0 => CsvEncoding::Utf8,
        1 => CsvEncoding::Latin1,
        _ => CsvEncoding::Windows1252,
    };

    // The decoders on their own.
    match encoding.decode(&file) {
        Ok(text) => {
            if encoding == CsvEncoding::Utf8 {
                assert_eq!(text.as_bytes(), &file[..]);
            } else {
                assert_eq!(text.chars().count(), file.len());
            }
            // Entities only ever shorten a text.
            assert!(decode_html_entities(&text).len() <= text.len());
        }
        Err(at) => {
            assert!(
                encoding != CsvEncoding::Latin1,
                "Latin-1 decodes every byte"
            );
            assert!(at < file.len());
        }
    }

    let known: Vec<String> = KNOWN.iter().map(|s| s.to_string()).collect();
    let (label_column, known_labels) = match options / 3 % 3 {
        0 => (Some("label"), None),
        1 => (None, None),
        _ => (Some("label"), Some(&known[..])),
    };
    let path = scratch().path().join("data.csv");
    std::fs::write(&path, file).expect("write the scratch CSV");
    let read = read_labelled_csv_encoded(&path, "text", label_column, known_labels, encoding);
    let set = match read {
        Ok(set) => set,
        Err(e) => return ferry_fuzz::debug(format!("refused: {e}")),
    };
    ferry_fuzz::debug(format!("{} records, labels {:?}", set.len(), set.labels));
    assert!(!set.is_empty());
    let mut line = 1;
    for (i, e) in set.examples.iter().enumerate() {
        assert_eq!(e.record, i);
        // Not strictly: a file whose lines end in CR alone is one line for the counter.
        assert!(e.line >= line, "lines go back");
        line = e.line;
        assert!(!e.text.trim().is_empty());
        assert_eq!(e.label.is_some(), label_column.is_some());
        if let Some(l) = e.label {
            assert!(l < set.labels.len());
        }
    }
    match (label_column, known_labels) {
        (None, _) => assert!(set.labels.is_empty() && set.label_counts.is_empty()),
        (Some(_), known) => {
            assert_eq!(set.label_counts.iter().sum::<usize>(), set.len());
            assert_eq!(set.label_counts.len(), set.labels.len());
            match known {
                Some(k) => assert_eq!(set.labels, k),
                None => assert!(set.labels.windows(2).all(|w| w[0] < w[1])),
            }
        }
    }
});
