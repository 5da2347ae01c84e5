//! The labelled-CSV reader on the real airline file and on malformed files written here.

mod support;
use support::*;

use std::fs;
use std::path::Path;
use std::process::Command;

use ferry_dataset::textcls::{read_labelled_csv, read_labelled_csv_encoded, CsvEncoding};
use ferry_dataset::DataError;
use ferry_spec::sampler::splitmix64;

#[test]
fn reads_the_airline_file() {
    let path = tweets();
    let set = read_tweets(&path);
    assert_eq!(set.len(), 14_640);
    let counts: Vec<(&str, usize)> = set.counts().collect();
    assert_eq!(
        counts,
        [("negative", 9_178), ("neutral", 3_099), ("positive", 2_363)]
    );
    assert!(set.examples.iter().enumerate().all(|(i, e)| e.record == i));
    // Record 3: doubled quotes around "entertainment" and `&amp;` decoded.
    let e = &set.examples[3];
    assert_eq!(
        e.text,
        "@VirginAmerica it's really aggressive to blast obnoxious \"entertainment\" in your \
         guests' faces & they have little recourse"
    );
    assert_eq!((e.line, e.label), (5, Some(0)));
    // Record 5: a newline inside quotes, so the record spans lines 7 and 8...
    let e = &set.examples[5];
    assert_eq!(
        e.text,
        "@VirginAmerica seriously would pay $30 a flight for seats that didn't have this \
         playing.\nit's really the only bad thing about flying VA"
    );
    assert_eq!(e.line, 7);
    // ... and record 6 starts on line 9, with its curly quotes intact.
    assert_eq!(set.examples[6].line, 9);
    assert!(set.examples[6].text.contains("“ear worm” won’t"));
    // Record 11: `&lt;` decoded; record 18: emoji (with variation selectors) untouched.
    assert_eq!(
        set.examples[11].text,
        "@VirginAmerica I <3 pretty graphics. so much better than minimal iconography. :D"
    );
    assert_eq!(
        set.examples[18].text,
        "I \u{2764}\u{fe0f} flying @VirginAmerica. \u{263a}\u{fe0f}\u{1f44d}"
    );
    assert_eq!(set.examples[18].label, Some(2));
    // No entity of the kinds the file has is left.
    assert!(set
        .examples
        .iter()
        .all(|e| !e.text.contains("&amp;") && !e.text.contains("&gt;")));
    let multi_line = set
        .examples
        .iter()
        .filter(|e| e.text.contains('\n'))
        .count();
    assert_eq!(multi_line, 138);
}

/// The Python baseline reads the same records with the same numbering: compare every text and
/// label with `bench/tfidf_baseline.py`'s reader (standard library only).
#[test]
fn python_reader_sees_the_same_records() {
    let path = tweets();
    let bench = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench");
    let script = format!(
        "import json, sys; sys.path.insert(0, {bench:?}); import tfidf_baseline as t; \
         print(json.dumps(t.read_records(sys.argv[1], 'text', 'airline_sentiment')))"
    );
    // Python 3 is on every machine that runs the suite (scripts/setup.sh needs it): without
    // it this comparison cannot be made, which is a failure, not a pass.
    let output = Command::new("python3")
        .arg("-c")
        .arg(&script)
        .arg(&path)
        .output()
        .unwrap_or_else(|e| panic!("python3 is needed to compare with csv.DictReader: {e}"));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python: Vec<(String, String)> = serde_json::from_slice(&output.stdout).unwrap();
    let set = read_tweets(&path);
    assert_eq!(python.len(), set.len());
    for (e, (text, label)) in set.examples.iter().zip(&python) {
        assert_eq!(&e.text, text, "record {}", e.record);
        assert_eq!(&set.labels[e.label.unwrap()], label, "record {}", e.record);
    }
}

#[test]
fn known_labels_fix_the_order_and_unlabelled_reading_works() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "a.csv",
        "id,label,text\n1,pos,good\n2,neg,bad\n3,pos,fine\n",
    );
    let known = strings(&["pos", "neg", "unused"]);
    let set = read_labelled_csv(&path, "text", Some("label"), Some(&known)).unwrap();
    assert_eq!(set.labels, known);
    assert_eq!(set.label_counts, [2, 1, 0]);
    assert_eq!(set.label_indices().unwrap(), [0, 1, 0]);
    let bare = read_labelled_csv(&path, "text", None, None).unwrap();
    assert!(bare.labels.is_empty() && bare.label_indices().is_none());
    assert_eq!(bare.examples[2].text, "fine");
    assert_eq!(bare.examples[2].line, 4);
    // A bad list of known labels is the caller's mistake, reported as such.
    let twice = strings(&["pos", "pos"]);
    let err = read_labelled_csv(&path, "text", Some("label"), Some(&twice)).unwrap_err();
    assert!(matches!(err, DataError::InvalidOption { .. }), "{err}");
}

#[test]
fn tolerates_bom_crlf_and_blank_lines_like_python() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "bom.csv",
        "\u{feff}text,label\r\n\"a, \"\"b\"\"\r\nc\",x\r\n\r\nlast,y\r\n",
    );
    let set = read_labelled_csv(&path, "text", Some("label"), None).unwrap();
    assert_eq!(set.len(), 2);
    assert_eq!(set.examples[0].text, "a, \"b\"\r\nc");
    assert_eq!(set.examples[0].line, 2);
    // The blank line is skipped, not a record (as in csv.DictReader).
    assert_eq!((set.examples[1].record, set.examples[1].line), (1, 5));
    assert_eq!(set.labels, strings(&["x", "y"]));
}

/// Reads `contents` as a labelled CSV that must fail; checks that the one-line message starts
/// with the file and names `line`.
fn error_for(contents: &[u8], known: Option<&[&str]>, line: u64) -> (DataError, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.csv", contents);
    let known = known.map(strings);
    let err = read_labelled_csv(&path, "text", Some("label"), known.as_deref()).unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: line {line}", path.display())),
        "{message:?} does not start with the file and line {line}"
    );
    assert!(!message.contains('\n'), "{message:?} is not one line");
    (err, message)
}

#[test]
fn missing_column_lists_the_headers() {
    let (err, message) = error_for(b"id,sentiment,text\n1,pos,good\n", None, 1);
    assert!(matches!(err, DataError::CsvMissingColumn { ref column, .. } if column == "label"));
    assert!(
        message
            .ends_with(r#"no column "label" in the header (columns: "id", "sentiment", "text")"#),
        "{message}"
    );
    let (err, _) = error_for(b"label,text,label\npos,good,neg\n", None, 1);
    assert!(
        matches!(err, DataError::CsvDuplicateColumn { count: 2, .. }),
        "{err}"
    );
}

#[test]
fn unknown_label_names_the_known_ones() {
    let csv = b"text,label\ngood,pos\n\"two\nlines\",neg\nmeh,neutral\n";
    let (err, message) = error_for(csv, Some(&["neg", "pos"]), 5);
    assert!(
        matches!(err, DataError::CsvUnknownLabel { record: 2, .. }),
        "{err}"
    );
    assert!(
        message
            .ends_with(r#"column "label": unknown label "neutral" (known labels: "neg", "pos")"#),
        "{message}"
    );
}

#[test]
fn empty_label_and_empty_text_name_their_column() {
    let (err, message) = error_for(b"text,label\ngood,pos\nbad,  \n", None, 3);
    assert!(
        matches!(err, DataError::CsvEmptyLabel { record: 1, .. }),
        "{err}"
    );
    assert!(
        message.ends_with(r#"column "label": empty label"#),
        "{message}"
    );
    let (err, message) = error_for(b"text,label\ngood,pos\nok,neg\n\" \n \",pos\n", None, 4);
    assert!(
        matches!(err, DataError::CsvEmptyText { record: 2, .. }),
        "{err}"
    );
    assert!(
        message.ends_with(r#"column "text": empty text"#),
        "{message}"
    );
}

#[test]
fn ragged_row_says_expected_and_found() {
    let (err, message) = error_for(b"text,label,extra\na,pos,1\nb,neg\n", None, 3);
    assert!(
        matches!(
            err,
            DataError::CsvRaggedRow {
                expected: 3,
                found: 2,
                record: 1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        message.ends_with("record 1 has 2 fields, the header has 3"),
        "{message}"
    );
    let (_, message) = error_for(b"text,label\na,pos\nb,neg,extra,more\n", None, 3);
    assert!(
        message.contains("has 4 fields, the header has 2"),
        "{message}"
    );
}

#[test]
fn invalid_utf8_names_the_row_and_field() {
    // Line 4 starts the third record, after a quoted field that spans lines 2 and 3.
    let (err, message) = error_for(
        b"text,label,note\n\"a\nb\",pos,x\nok,neg,caf\xe9 au lait\n",
        None,
        4,
    );
    assert!(
        matches!(err, DataError::CsvInvalidUtf8 { ref column, byte_offset: 3, .. } if column == "note"),
        "{err}"
    );
    assert!(
        message.contains(r#"column "note": invalid UTF-8"#),
        "{message}"
    );
    let (_, message) = error_for(b"te\xffxt,label\na,b\n", None, 1);
    assert!(message.contains(r#"column "header field 1""#), "{message}");
}

#[test]
fn header_only_and_empty_files_are_errors() {
    let (err, _) = error_for(b"text,label\n", None, 1);
    assert!(
        matches!(err, DataError::CsvNoRecords { line: 1, .. }),
        "{err}"
    );
    let (err, _) = error_for(b"text,label\n\n\n", None, 1);
    assert!(matches!(err, DataError::CsvNoRecords { .. }), "{err}");
    let (err, _) = error_for(b"", None, 1);
    assert!(matches!(err, DataError::CsvEmpty { .. }), "{err}");
}

#[test]
fn missing_file_is_an_io_error_naming_it() {
    let err = read_labelled_csv(Path::new("/nonexistent/x.csv"), "text", None, None).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }));
    assert!(err.to_string().starts_with("/nonexistent/x.csv: "), "{err}");
}

/// Small CSVs built from CSV-ish pieces, half of them then mutated at random: every outcome is
/// a value or an error, never a panic, and every error is one line that names the file.
#[test]
fn arbitrary_bytes_never_panic() {
    const PIECES: [&[u8]; 14] = [
        b",",
        b"\"",
        b"\n",
        b"\r\n",
        b"text",
        b"label",
        b"a",
        b"b",
        b" ",
        b"&amp;",
        b"&#x41;",
        b"&#xD800;",
        b"\xff",
        b"\xe2\x9d",
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fuzz.csv");
    let mut state = 7u64;
    let mut draw = |n: usize| (splitmix64(&mut state) % n as u64) as usize;
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..400 {
        let mut bytes = b"text,label\n".to_vec();
        for _ in 0..draw(6) {
            // A text of 1-3 harmless pieces (a, b, space, entities), a comma, a label.
            for _ in 0..1 + draw(3) {
                bytes.extend_from_slice(PIECES[6 + draw(6)]);
            }
            bytes.extend_from_slice(if draw(2) == 0 { b",pos\n" } else { b",neg\r\n" });
        }
        if draw(2) == 0 {
            for _ in 0..1 + draw(4) {
                let at = draw(bytes.len() + 1);
                let piece = PIECES[draw(PIECES.len())];
                bytes.splice(at..at, piece.iter().copied());
            }
        }
        fs::write(&path, &bytes).unwrap();
        match read_labelled_csv(&path, "text", Some("label"), None) {
            Ok(set) => {
                ok += 1;
                assert!(set.examples.iter().all(|e| !e.text.trim().is_empty()));
                assert!(set.examples.windows(2).all(|w| w[0].line < w[1].line));
            }
            Err(e) => {
                failed += 1;
                let message = e.to_string();
                assert!(
                    message.starts_with(&path.display().to_string()),
                    "{message}"
                );
                assert!(!message.contains('\n'), "{message:?}");
            }
        }
    }
    // Both outcomes occur often, so the inputs exercise the reader and its errors.
    println!("{ok} read, {failed} refused");
    assert!(ok > 50 && failed > 50, "{ok} read, {failed} refused");
}

/// A labelled CSV as a spreadsheet on Windows saves it: Windows-1252, CRLF, with accents,
/// curly quotes (0x93/0x94, 0x91/0x92), dashes (0x97, 0x96), the euro sign (0x80), an ellipsis
/// (0x85), doubled quotes and a quoted field over two lines.
const WINDOWS_1252_CSV: &[u8] = b"id,airline_sentiment,text,note\r\n\
    1,positive,\"Caf\xe9 au lait on board, se\xf1or \x93Pe\xf1a\x94 said \x97 thanks!\",\x80 5\r\n\
    2,negative,\"It\x92s the \x91worst\x92 delay:\r\nthree hours, \x80120 lost\",\r\n\
    3,neutral,\"Is \"\"wifi\"\" free on the ni\xf1o flight \x96 or \x8010?\",ok\r\n\
    4, negative ,Lost bag \x85 again,\r\n";

/// What [`WINDOWS_1252_CSV`] says: (text, label, line) per record.
const WINDOWS_1252_RECORDS: [(&str, &str, u64); 4] = [
    (
        "Café au lait on board, señor “Peña” said — thanks!",
        "positive",
        2,
    ),
    (
        "It’s the ‘worst’ delay:\r\nthree hours, €120 lost",
        "negative",
        3,
    ),
    (
        "Is \"wifi\" free on the niño flight – or €10?",
        "neutral",
        5,
    ),
    ("Lost bag … again", "negative", 6),
];

/// Python's `csv.DictReader` over `path` opened with `encoding`: (text, label) of every record,
/// the label stripped as ferry strips it; `Err` with Python's stderr when Python refuses the
/// file. Without python3 the calling test fails: comparing with Python is its point.
fn python_csv(path: &Path, encoding: &str) -> Result<Vec<(String, String)>, String> {
    let script = "import csv, json, sys\n\
        with open(sys.argv[1], newline='', encoding=sys.argv[2]) as f:\n    \
            rows = [(r['text'], r['airline_sentiment'].strip()) for r in csv.DictReader(f)]\n\
        print(json.dumps(rows))\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .arg(encoding)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed to compare with Python's csv module, and did not run: {e}")
        });
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&output.stdout).unwrap())
}

/// (text, label) of every example of a labelled set.
fn texts_and_labels(set: &ferry_dataset::textcls::LabelledSet) -> Vec<(String, String)> {
    set.examples
        .iter()
        .map(|e| (e.text.clone(), set.labels[e.label.unwrap()].clone()))
        .collect()
}

/// Issue 20, item 3: a spreadsheet's Windows-1252 export reads, with `--encoding
/// windows-1252`, exactly as Python's `csv` module reads it with `encoding="cp1252"`.
#[test]
fn windows_1252_reads_as_python_reads_cp1252() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "spreadsheet.csv", WINDOWS_1252_CSV);
    let set = read_labelled_csv_encoded(
        &path,
        "text",
        Some("airline_sentiment"),
        None,
        CsvEncoding::Windows1252,
    )
    .unwrap();
    assert_eq!(set.labels, strings(&["negative", "neutral", "positive"]));
    for (e, (text, label, line)) in set.examples.iter().zip(WINDOWS_1252_RECORDS) {
        assert_eq!(e.text, text);
        assert_eq!(set.labels[e.label.unwrap()], label);
        assert_eq!(e.line, line, "{text:?}");
    }
    assert_eq!(set.len(), WINDOWS_1252_RECORDS.len());
    let python = python_csv(&path, "cp1252").unwrap();
    assert_eq!(texts_and_labels(&set), python);
}

#[test]
fn windows_1252_read_as_utf8_names_the_encoding_option() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "spreadsheet.csv", WINDOWS_1252_CSV);
    let err = read_labelled_csv(&path, "text", Some("airline_sentiment"), None).unwrap_err();
    assert!(
        matches!(err, DataError::CsvInvalidUtf8 { line: 2, byte_offset: 3, ref column, .. } if column == "text"),
        "{err}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: line 2, column \"text\"", path.display())),
        "{message}"
    );
    assert!(
        message.contains("try --encoding windows-1252 or --encoding latin-1"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message:?}");
    // Python refuses it as UTF-8 as well.
    let python = python_csv(&path, "utf-8").unwrap_err();
    assert!(python.contains("UnicodeDecodeError"), "{python}");
}

#[test]
fn latin_1_reads_as_python_reads_it() {
    let csv = b"airline_sentiment,text\n\
        positive,\"Se\xf1or M\xfcller \xe0 la cr\xe8me br\xfbl\xe9e, \xabsuper\xbb \xa3 5\"\n\
        negative,\"\xbfD\xf3nde est\xe1\n mi maleta? Stra\xdfe \xa9 \xff\"\n\
        neutral,C1 codes stay codes: \x80 \x93\n";
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "latin1.csv", csv);
    for encoding in ["latin-1", "iso-8859-1"] {
        let encoding = <CsvEncoding as clap::ValueEnum>::from_str(encoding, false).unwrap();
        assert_eq!(encoding, CsvEncoding::Latin1);
    }
    let set = read_labelled_csv_encoded(
        &path,
        "text",
        Some("airline_sentiment"),
        None,
        CsvEncoding::Latin1,
    )
    .unwrap();
    let expected = [
        ("Señor Müller à la crème brûlée, «super» £ 5", "positive"),
        ("¿Dónde está\n mi maleta? Straße © ÿ", "negative"),
        ("C1 codes stay codes: \u{80} \u{93}", "neutral"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(t, l)| (t.to_string(), l.to_string()))
        .collect();
    assert_eq!(texts_and_labels(&set), expected);
    assert_eq!(python_csv(&path, "latin-1").unwrap(), expected);
    let err = read_labelled_csv(&path, "text", Some("airline_sentiment"), None).unwrap_err();
    assert!(err.to_string().contains("--encoding"), "{err}");
}

/// Every byte from 0x80 up decodes to what Python's `cp1252` and `latin-1` codecs give, and the
/// bytes `cp1252` refuses are exactly the ones refused here.
#[test]
fn every_high_byte_decodes_as_python_decodes_it() {
    let script = "import json\n\
        def one(b, codec):\n    \
            try:\n        return bytes([b]).decode(codec)\n    \
            except UnicodeDecodeError:\n        return None\n\
        print(json.dumps({c: [one(b, c) for b in range(0x80, 0x100)] for c in ('cp1252', 'latin-1')}))\n";
    let output = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap_or_else(|e| {
            panic!("python3 is needed to compare with Python's codecs, and did not run: {e}")
        });
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let python: std::collections::BTreeMap<String, Vec<Option<String>>> =
        serde_json::from_slice(&output.stdout).unwrap();
    for (codec, encoding) in [
        ("cp1252", CsvEncoding::Windows1252),
        ("latin-1", CsvEncoding::Latin1),
    ] {
        let ours: Vec<Option<String>> = (0x80..=0xFFu8)
            .map(|b| encoding.decode(&[b]).ok().map(|s| s.into_owned()))
            .collect();
        assert_eq!(ours, python[codec], "{codec}");
    }
    let refused: Vec<u8> = (0x80..=0xFFu8)
        .filter(|&b| CsvEncoding::Windows1252.decode(&[b]).is_err())
        .collect();
    assert_eq!(refused, [0x81, 0x8D, 0x8F, 0x90, 0x9D]);
}

#[test]
fn undefined_windows_1252_byte_names_line_column_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "undefined.csv",
        b"text,airline_sentiment,note\r\nok \x80,positive,x\r\n\"two\r\nlines\",negative,ab\x9dc\r\n",
    );
    let err = read_labelled_csv_encoded(
        &path,
        "text",
        Some("airline_sentiment"),
        None,
        CsvEncoding::Windows1252,
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            DataError::CsvUndefinedByte {
                line: 3,
                byte: 0x9D,
                byte_offset: 2,
                encoding: CsvEncoding::Windows1252,
                ref column,
                ..
            } if column == "note"
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.starts_with(&format!(
            "{}: line 3, column \"note\": byte 0x9D",
            path.display()
        )),
        "{message}"
    );
    assert!(message.contains("windows-1252"), "{message}");
    assert!(!message.contains('\n'), "{message:?}");
    // Python refuses the file too; as Latin-1 both read it.
    let python = python_csv(&path, "cp1252").unwrap_err();
    assert!(python.contains("UnicodeDecodeError"), "{python}");
    let latin1 = read_labelled_csv_encoded(
        &path,
        "text",
        Some("airline_sentiment"),
        None,
        CsvEncoding::Latin1,
    )
    .unwrap();
    assert_eq!(
        texts_and_labels(&latin1),
        python_csv(&path, "latin-1").unwrap()
    );
    // A header is decoded the same way.
    let header = write(
        dir.path(),
        "header.csv",
        b"te\x81xt,airline_sentiment\r\na,b\r\n",
    );
    let err = read_labelled_csv_encoded(&header, "text", None, None, CsvEncoding::Windows1252)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("line 1, column \"header field 1\": byte 0x81"),
        "{err}"
    );
}
