//! Reading a labelled CSV (one text and one label per record) by header names.
//!
//! The file is RFC 4180: a header row, quoted fields that hold commas, doubled quotes and
//! newlines. Records are read as bytes and decoded here, field by field, so that a bad byte is
//! reported with its line and column instead of as a parser error about the whole file. The
//! bytes are UTF-8 unless a [`CsvEncoding`] says otherwise: a spreadsheet on Windows saves
//! "CSV" in its ANSI code page (Windows-1252 in Western Europe and the Americas).
//! Tweets carry HTML entities (`&amp;`), which are decoded; emoji pass through untouched.
//!
//! Record numbering matches Python's `enumerate(csv.DictReader(f))`: 0-based data records in
//! file order, header excluded, blank lines skipped. The Python baseline relies on this to reuse
//! a ferry `split.json`.

use std::borrow::Cow;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::DataError;

/// The character encoding of a labelled CSV's bytes.
///
/// Only encodings in which every byte that CSV syntax uses (`,`, `"`, CR, LF) is that ASCII
/// character, and no other byte decodes to one, belong here: the parser then splits records on
/// the raw bytes and each field is decoded on its own, which keeps errors down to a line and a
/// column.
/// Both single-byte encodings here decode a file exactly as Python's codec of the same name, so
/// that the Python baseline, told the same encoding, sees the same texts.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
pub enum CsvEncoding {
    /// The default, and what ferry writes. A UTF-8 byte-order mark before the header is
    /// dropped.
    #[default]
    #[value(name = "utf-8", alias = "utf8")]
    #[serde(rename = "utf-8", alias = "utf8")]
    Utf8,
    /// ISO-8859-1: each byte is the code point of the same number (U+0000 to U+00FF).
    #[value(name = "latin-1", alias = "iso-8859-1")]
    #[serde(rename = "latin-1", alias = "iso-8859-1")]
    Latin1,
    /// Latin-1 with 27 printable characters (curly quotes, dashes, the euro sign, ...) in place
    /// of the control codes 0x80-0x9F; 0x81, 0x8D, 0x8F, 0x90 and 0x9D are undefined and, as in
    /// Python's `cp1252` codec, refused.
    #[value(name = "windows-1252", alias = "cp1252")]
    #[serde(rename = "windows-1252", alias = "cp1252")]
    Windows1252,
}

impl CsvEncoding {
    /// The name the command line takes (`--encoding`).
    pub fn name(self) -> &'static str {
        match self {
            CsvEncoding::Utf8 => "utf-8",
            CsvEncoding::Latin1 => "latin-1",
            CsvEncoding::Windows1252 => "windows-1252",
        }
    }

    /// Decodes one field. `Err(at)` is the offset of the first byte that is not text in this
    /// encoding: where UTF-8 stops being valid, or a byte that Windows-1252 leaves undefined
    /// (Latin-1 decodes everything). ASCII, the common case, is borrowed in every encoding.
    pub fn decode(self, bytes: &[u8]) -> Result<Cow<'_, str>, usize> {
        /// Windows-1252's 0x80-0x9F (the rest is Latin-1); `None` where it has no character.
        /// The table of the WHATWG Encoding Standard and of Python's `cp1252` codec.
        #[rustfmt::skip]
        const WINDOWS_1252_80_9F: [Option<char>; 32] = [
            Some('\u{20AC}'), None,              Some('\u{201A}'), Some('\u{0192}'),
            Some('\u{201E}'), Some('\u{2026}'), Some('\u{2020}'), Some('\u{2021}'),
            Some('\u{02C6}'), Some('\u{2030}'), Some('\u{0160}'), Some('\u{2039}'),
            Some('\u{0152}'), None,              Some('\u{017D}'), None,
            None,              Some('\u{2018}'), Some('\u{2019}'), Some('\u{201C}'),
            Some('\u{201D}'), Some('\u{2022}'), Some('\u{2013}'), Some('\u{2014}'),
            Some('\u{02DC}'), Some('\u{2122}'), Some('\u{0161}'), Some('\u{203A}'),
            Some('\u{0153}'), None,              Some('\u{017E}'), Some('\u{0178}'),
        ];
        match self {
            CsvEncoding::Utf8 => std::str::from_utf8(bytes)
                .map(Cow::Borrowed)
                .map_err(|e| e.valid_up_to()),
            _ if bytes.is_ascii() => Ok(Cow::Borrowed(
                std::str::from_utf8(bytes).map_err(|e| e.valid_up_to())?,
            )),
            CsvEncoding::Latin1 => Ok(Cow::Owned(bytes.iter().map(|&b| char::from(b)).collect())),
            CsvEncoding::Windows1252 => bytes
                .iter()
                .enumerate()
                .map(|(at, &b)| match b {
                    0x80..=0x9F => WINDOWS_1252_80_9F[usize::from(b - 0x80)].ok_or(at),
                    _ => Ok(char::from(b)),
                })
                .collect::<Result<String, usize>>()
                .map(Cow::Owned),
        }
    }
}

impl fmt::Display for CsvEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One labelled (or, when no label column was asked for, unlabelled) text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// 0-based data record index, header excluded, in file order.
    pub record: usize,
    /// 1-based line of the file where the record starts.
    pub line: u64,
    /// The text field with HTML entities decoded, otherwise as in the file.
    pub text: String,
    /// Index into [`LabelledSet::labels`]; `None` when the set was read without a label column.
    pub label: Option<usize>,
}

/// A whole labelled CSV: its examples and the label vocabulary.
#[derive(Debug, Clone)]
pub struct LabelledSet {
    pub path: PathBuf,
    pub text_column: String,
    pub label_column: Option<String>,
    /// Sorted when discovered from the file; the caller's order when `known_labels` was given
    /// (so that label indices keep matching a trained model's head). Empty without a label
    /// column.
    pub labels: Vec<String>,
    /// `label_counts[i]` records carry `labels[i]`.
    pub label_counts: Vec<usize>,
    /// Every record of the file, `examples[i].record == i`.
    pub examples: Vec<Example>,
}

impl LabelledSet {
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The label index of every record, in record order; `None` for an unlabelled set.
    pub fn label_indices(&self) -> Option<Vec<usize>> {
        self.examples.iter().map(|e| e.label).collect()
    }

    /// `(label, count)` pairs in label order.
    pub fn counts(&self) -> impl Iterator<Item = (&str, usize)> {
        self.labels
            .iter()
            .map(String::as_str)
            .zip(self.label_counts.iter().copied())
    }
}

/// Longest label quoted back in an unknown-label error: a wrong `--label-column` can point at
/// a column of long texts.
const MAX_LABEL_IN_ERROR: usize = 60;

/// Reads `path` as UTF-8, taking the text from the column named `text_column` and the label
/// from the column named `label_column` (when given). Labels are trimmed; a text is kept as in
/// the file apart from decoded HTML entities, and must not be blank.
///
/// With `known_labels`, a label outside them is an error and [`LabelledSet::labels`] is exactly
/// `known_labels` in the given order (counts may be 0); without, the labels found are sorted.
///
/// [`read_labelled_csv_encoded`] reads other encodings; UTF-8 is what ferry itself writes.
pub fn read_labelled_csv(
    path: &Path,
    text_column: &str,
    label_column: Option<&str>,
    known_labels: Option<&[String]>,
) -> Result<LabelledSet, DataError> {
    read_labelled_csv_encoded(
        path,
        text_column,
        label_column,
        known_labels,
        CsvEncoding::Utf8,
    )
}

/// [`read_labelled_csv`] for a file in `encoding`. Every field of every record is decoded (not
/// only the two used), as Python decodes the whole file: a byte that is not text in `encoding`
/// is an error naming its line and column, whichever column it is in.
pub fn read_labelled_csv_encoded(
    path: &Path,
    text_column: &str,
    label_column: Option<&str>,
    known_labels: Option<&[String]>,
    encoding: CsvEncoding,
) -> Result<LabelledSet, DataError> {
    if let Some(known) = known_labels {
        check_known_labels(known)?;
    }
    // Whole, so that record start lines can be counted from the bytes (see `LineCounter`).
    let bytes = fs::read(path).map_err(DataError::io(path))?;
    let mut lines = LineCounter::new(&bytes);
    let mut reader = ::csv::ReaderBuilder::new()
        .has_headers(true)
        // Field counts are checked below, so that the error names the record.
        .flexible(true)
        .from_reader(&bytes[..]);

    let header_record = reader
        .byte_headers()
        .map_err(|e| csv_error(path, e))?
        .clone();
    let header_line = lines.record_line(header_record.position());
    let headers = decode_headers(path, header_line, &header_record, encoding)?;
    if headers.is_empty() {
        return Err(DataError::CsvEmpty {
            path: path.to_path_buf(),
        });
    }
    let text_at = find_column(path, header_line, &headers, text_column)?;
    let label_at = label_column
        .map(|name| find_column(path, header_line, &headers, name))
        .transpose()?;

    let mut labels: Vec<String> = known_labels.map(<[String]>::to_vec).unwrap_or_default();
    let mut examples = Vec::new();
    let mut raw_labels = Vec::new();
    let mut record = ::csv::ByteRecord::new();
    loop {
        match reader.read_byte_record(&mut record) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => return Err(csv_error(path, e)),
        }
        let index = examples.len();
        let line = lines.record_line(record.position());
        if record.len() != headers.len() {
            return Err(DataError::CsvRaggedRow {
                path: path.to_path_buf(),
                line,
                record: index,
                expected: headers.len(),
                found: record.len(),
            });
        }
        // Every field, not only the two used: Python's reader (the baseline) would fail on any
        // bad byte, and both must see the same records.
        let mut fields = Vec::with_capacity(record.len());
        for (column, bytes) in record.iter().enumerate() {
            let decoded = encoding.decode(bytes).map_err(|at| {
                undecodable(path, line, headers[column].clone(), encoding, bytes, at)
            })?;
            fields.push(decoded);
        }
        let field = |at: usize| fields[at].as_ref();
        let text = decode_html_entities(field(text_at)).into_owned();
        if text.trim().is_empty() {
            return Err(DataError::CsvEmptyText {
                path: path.to_path_buf(),
                line,
                record: index,
                column: text_column.to_owned(),
            });
        }
        if let (Some(at), Some(column)) = (label_at, label_column) {
            let label = field(at).trim();
            if label.is_empty() {
                return Err(DataError::CsvEmptyLabel {
                    path: path.to_path_buf(),
                    line,
                    record: index,
                    column: column.to_owned(),
                });
            }
            if known_labels.is_some() && !labels.iter().any(|l| l == label) {
                return Err(DataError::CsvUnknownLabel {
                    path: path.to_path_buf(),
                    line,
                    record: index,
                    column: column.to_owned(),
                    label: shorten(label, MAX_LABEL_IN_ERROR),
                    known: labels,
                });
            }
            raw_labels.push(label.to_owned());
        }
        examples.push(Example {
            record: index,
            line,
            text,
            label: None,
        });
    }
    if examples.is_empty() {
        return Err(DataError::CsvNoRecords {
            path: path.to_path_buf(),
            line: header_line,
        });
    }

    let mut label_counts = Vec::new();
    if label_at.is_some() {
        if known_labels.is_none() {
            labels = raw_labels.clone();
            labels.sort();
            labels.dedup();
        }
        label_counts = vec![0; labels.len()];
        for (example, raw) in examples.iter_mut().zip(&raw_labels) {
            // Present: every raw label was either checked against `known_labels` or is one of
            // the labels collected from `raw_labels` itself.
            let index = labels.iter().position(|l| l == raw);
            example.label = index;
            if let Some(i) = index {
                label_counts[i] += 1;
            }
        }
    }
    Ok(LabelledSet {
        path: path.to_path_buf(),
        text_column: text_column.to_owned(),
        label_column: label_column.map(str::to_owned),
        labels,
        label_counts,
        examples,
    })
}

/// The 1-based line where each record starts. The `csv` crate's position for a record is where
/// the previous one ended, before the `\n` of a CRLF terminator and before any blank lines, so
/// its line number is one short on CRLF files (the airline file is one). Records are asked for in
/// file order, so counting is one pass over the file.
struct LineCounter<'a> {
    bytes: &'a [u8],
    counted_to: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(bytes: &'a [u8]) -> LineCounter<'a> {
        LineCounter {
            bytes,
            counted_to: 0,
            line: 1,
        }
    }

    /// The line of the record whose reader position is `position`: its first byte is the first
    /// one from there that is not a line terminator (a record cannot start with one).
    fn record_line(&mut self, position: Option<&::csv::Position>) -> u64 {
        let from = position
            .map_or(0, |p| p.byte() as usize)
            .max(self.counted_to);
        let start = self
            .bytes
            .get(from..)
            .unwrap_or_default()
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .map_or(self.bytes.len(), |skip| from + skip);
        let newlines = self.bytes[self.counted_to..start]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        self.line += newlines as u64;
        self.counted_to = start;
        self.line
    }
}

fn check_known_labels(known: &[String]) -> Result<(), DataError> {
    let invalid = |message: String| {
        Err(DataError::InvalidOption {
            option: "known_labels",
            message,
        })
    };
    if known.is_empty() {
        return invalid("no labels given".to_owned());
    }
    for (i, label) in known.iter().enumerate() {
        if label.trim().is_empty() || label.trim() != label {
            return invalid(format!(
                "label {label:?} is blank or has surrounding spaces"
            ));
        }
        if known[..i].contains(label) {
            return invalid(format!("label {label:?} is listed twice"));
        }
    }
    Ok(())
}

/// The header names as text, without a UTF-8 byte-order mark (in UTF-8 only: Python's `cp1252`
/// and `latin-1` keep those bytes as characters, and so does this); a header that is one empty
/// field (an empty file) comes back as no names at all.
fn decode_headers(
    path: &Path,
    line: u64,
    header: &::csv::ByteRecord,
    encoding: CsvEncoding,
) -> Result<Vec<String>, DataError> {
    if header.is_empty() || (header.len() == 1 && header[0].is_empty()) {
        return Ok(Vec::new());
    }
    let mut names = Vec::with_capacity(header.len());
    for (i, field) in header.iter().enumerate() {
        let field = if i == 0 && encoding == CsvEncoding::Utf8 {
            field.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(field)
        } else {
            field
        };
        let name = encoding.decode(field).map_err(|at| {
            undecodable(
                path,
                line,
                format!("header field {}", i + 1),
                encoding,
                field,
                at,
            )
        })?;
        names.push(name.into_owned());
    }
    Ok(names)
}

/// The error for `field` (of `column`) that `encoding` could not decode at byte `at`.
fn undecodable(
    path: &Path,
    line: u64,
    column: String,
    encoding: CsvEncoding,
    field: &[u8],
    at: usize,
) -> DataError {
    match encoding {
        CsvEncoding::Utf8 => DataError::CsvInvalidUtf8 {
            path: path.to_path_buf(),
            line,
            column,
            byte_offset: at,
        },
        CsvEncoding::Latin1 | CsvEncoding::Windows1252 => DataError::CsvUndefinedByte {
            path: path.to_path_buf(),
            line,
            column,
            byte_offset: at,
            byte: field.get(at).copied().unwrap_or_default(),
            encoding,
        },
    }
}

fn find_column(path: &Path, line: u64, headers: &[String], name: &str) -> Result<usize, DataError> {
    let found: Vec<usize> = (0..headers.len()).filter(|&i| headers[i] == name).collect();
    match found[..] {
        [at] => Ok(at),
        [] => Err(DataError::CsvMissingColumn {
            path: path.to_path_buf(),
            line,
            column: name.to_owned(),
            available: headers.to_vec(),
        }),
        _ => Err(DataError::CsvDuplicateColumn {
            path: path.to_path_buf(),
            line,
            column: name.to_owned(),
            count: found.len(),
        }),
    }
}

fn csv_error(path: &Path, error: ::csv::Error) -> DataError {
    let line = error.position().map_or(0, |p| p.line());
    match error.into_kind() {
        ::csv::ErrorKind::Io(source) => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
        kind => DataError::Csv {
            path: path.to_path_buf(),
            line,
            message: format!("{kind:?}").replace('\n', " "),
        },
    }
}

fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Decodes the HTML entities that tweets carry: `&amp;`, `&lt;`, `&gt;`, `&quot;`, `&apos;` and
/// numeric `&#NNN;` / `&#xHH;`. Anything else (an unknown name, a missing `;`, a number that is
/// no Unicode scalar value, or 0) stays as written. One pass, left to right, so `&amp;lt;`
/// becomes `&lt;`, as in a browser. `bench/tfidf_baseline.py` implements the same grammar.
pub fn decode_html_entities(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let from_amp = &rest[amp..];
        match entity_at(from_amp) {
            Some((decoded, len)) => {
                out.push(decoded);
                rest = &from_amp[len..];
            }
            None => {
                out.push('&');
                rest = &from_amp[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The character and byte length of the entity at the start of `s` (which starts with `&`).
fn entity_at(s: &str) -> Option<(char, usize)> {
    let body = s.get(1..)?;
    let (value, body_len) = if let Some(num) = body.strip_prefix('#') {
        let (digits, radix, prefix) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16, 2),
            None => (num, 10, 1),
        };
        let max_digits = if radix == 16 { 6 } else { 7 };
        let len = digits
            .bytes()
            .take(max_digits + 1)
            .take_while(|b| (*b as char).is_digit(radix))
            .count();
        if len == 0 || len > max_digits {
            return None;
        }
        let code = u32::from_str_radix(&digits[..len], radix).ok()?;
        if code == 0 {
            return None;
        }
        (char::from_u32(code)?, prefix + len)
    } else {
        let len = body
            .bytes()
            .take(5)
            .take_while(u8::is_ascii_alphabetic)
            .count();
        let decoded = match &body[..len] {
            "amp" => '&',
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            _ => return None,
        };
        (decoded, len)
    };
    body[body_len..]
        .starts_with(';')
        .then_some((value, 1 + body_len + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_named_and_numeric_entities() {
        let cases = [
            ("fish &amp; chips", "fish & chips"),
            ("&lt;3 &gt;:(", "<3 >:("),
            ("&quot;hi&quot; &apos;x&#39;", "\"hi\" 'x'"),
            ("&#128512; &#x1F600; &#X41;", "😀 😀 A"),
            ("&amp;lt;", "&lt;"),
            (
                "a&b &amp &nbsp; &AMP; &#; &#x; &#xZZ;",
                "a&b &amp &nbsp; &AMP; &#; &#x; &#xZZ;",
            ),
            (
                "&#0; &#xD800; &#x110000; &#12345678;",
                "&#0; &#xD800; &#x110000; &#12345678;",
            ),
            ("end &", "end &"),
            ("&&amp;&", "&&&"),
            ("no entities ✈️", "no entities ✈️"),
        ];
        for (input, expected) in cases {
            assert_eq!(decode_html_entities(input), expected, "{input:?}");
        }
    }

    #[test]
    fn decodes_the_three_encodings() {
        use CsvEncoding::*;
        assert!(matches!(Utf8.decode(b"plain"), Ok(Cow::Borrowed("plain"))));
        assert!(matches!(
            Windows1252.decode(b"plain"),
            Ok(Cow::Borrowed("plain"))
        ));
        assert_eq!(Utf8.decode("café".as_bytes()).unwrap(), "café");
        assert_eq!(Utf8.decode(b"caf\xe9 au lait"), Err(3));
        assert_eq!(
            Latin1.decode(b"caf\xe9 ni\xf1o \xff").unwrap(),
            "café niño ÿ"
        );
        // Latin-1 keeps 0x80-0x9F as the C1 control codes; Windows-1252 prints them.
        assert_eq!(Latin1.decode(b"\x80\x93").unwrap(), "\u{80}\u{93}");
        assert_eq!(
            Windows1252
                .decode(b"\x80 \x93caf\xe9\x94 \x91\x92 \x97 \x85 \x99 \x9f")
                .unwrap(),
            "€ “café” ‘’ — … ™ Ÿ"
        );
        for undefined in [0x81u8, 0x8D, 0x8F, 0x90, 0x9D] {
            assert_eq!(Windows1252.decode(&[b'a', b'b', undefined]), Err(2));
            assert_eq!(
                Latin1.decode(&[undefined]).unwrap(),
                char::from(undefined).to_string()
            );
        }
    }

    #[test]
    fn encoding_names_and_aliases() {
        use clap::ValueEnum;
        for (name, encoding) in [
            ("utf-8", CsvEncoding::Utf8),
            ("utf8", CsvEncoding::Utf8),
            ("latin-1", CsvEncoding::Latin1),
            ("iso-8859-1", CsvEncoding::Latin1),
            ("windows-1252", CsvEncoding::Windows1252),
            ("cp1252", CsvEncoding::Windows1252),
        ] {
            assert_eq!(CsvEncoding::from_str(name, true), Ok(encoding), "{name}");
            let json = serde_json::to_string(name).unwrap();
            assert_eq!(
                serde_json::from_str::<CsvEncoding>(&json).unwrap(),
                encoding
            );
        }
        assert_eq!(
            CsvEncoding::from_str("CP1252", true),
            Ok(CsvEncoding::Windows1252)
        );
        assert!(CsvEncoding::from_str("utf-16", true).is_err());
        assert_eq!(CsvEncoding::default(), CsvEncoding::Utf8);
        assert_eq!(
            serde_json::to_string(&CsvEncoding::Windows1252).unwrap(),
            "\"windows-1252\""
        );
        assert_eq!(CsvEncoding::Latin1.to_string(), "latin-1");
    }

    #[test]
    fn shorten_cuts_at_a_character_boundary() {
        assert_eq!(shorten("ééé", 2), "éé...");
        assert_eq!(shorten("ab", 2), "ab");
    }
}
