//! The error type of the data pipeline.

use std::fmt::Display;
use std::path::{Path, PathBuf};

use crate::textcls::CsvEncoding;

/// Everything that can go wrong reading a corpus, a tokenizer or a prepared data directory.
///
/// Every message is one line that starts with the file (or pattern) at fault and says what is
/// wrong with it, so that it can be shown to a user as is.
#[derive(thiserror::Error, Debug)]
pub enum DataError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file, or the whole input, holds no text.
    #[error("{}: no text found (empty corpus)", path.display())]
    EmptyCorpus { path: PathBuf },
    #[error("{pattern}: no input files match this path or pattern")]
    NoInputs { pattern: String },
    #[error("{}: looks like a binary file (NUL byte at offset {offset})", path.display())]
    Binary { path: PathBuf, offset: u64 },
    #[error("{}: invalid UTF-8 on line {line} (byte offset {byte_offset})", path.display())]
    InvalidUtf8 {
        path: PathBuf,
        line: u64,
        byte_offset: u64,
    },
    #[error("{}: tokenizer file not found", path.display())]
    TokenizerMissing { path: PathBuf },
    #[error("{}: tokenizer error: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// A shard whose size differs from the manifest's (shorter or longer).
    #[error(
        "{}: file is {found} bytes but the manifest says {expected} (truncated or overwritten)",
        path.display()
    )]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "{}: sha256 mismatch, the file is corrupted (expected {expected}, found {found})",
        path.display()
    )]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{}: bad manifest: {message}", path.display())]
    Manifest { path: PathBuf, message: String },
    #[error("{}: bad index: {message}", path.display())]
    Index { path: PathBuf, message: String },
    /// A token read past the end of a split; `path` names the split (`<dir>/<split>`).
    #[error(
        "{}: cannot read {len} tokens at offset {start}, the split has {total} tokens",
        path.display()
    )]
    OutOfRange {
        path: PathBuf,
        start: u64,
        len: u64,
        total: u64,
    },
    /// `prepare` will not replace something that it did not write itself.
    #[error("{}: {reason}; refusing to overwrite it", path.display())]
    OutputExists { path: PathBuf, reason: String },
    #[error("invalid option {option}: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
    // Labelled CSV (`textcls::csv`). `line` is the 1-based line where the record starts (a
    // quoted field can span lines); `record` is the 0-based data record index, header excluded.
    /// A file with nothing in it, not even a header row.
    #[error("{}: line 1: empty file, no header row", path.display())]
    CsvEmpty { path: PathBuf },
    /// A header row and no data records after it.
    #[error("{}: line {line}: a header row but no data records", path.display())]
    CsvNoRecords { path: PathBuf, line: u64 },
    #[error(
        "{}: line {line}: no column {column:?} in the header (columns: {})",
        path.display(),
        quoted_list(available)
    )]
    CsvMissingColumn {
        path: PathBuf,
        line: u64,
        column: String,
        available: Vec<String>,
    },
    /// A column asked for by name that the header has more than once, so the name is ambiguous.
    #[error(
        "{}: line {line}: column {column:?} appears {count} times in the header",
        path.display()
    )]
    CsvDuplicateColumn {
        path: PathBuf,
        line: u64,
        column: String,
        count: usize,
    },
    /// A record whose field count differs from the header's.
    #[error(
        "{}: line {line}: record {record} has {found} fields, the header has {expected}",
        path.display()
    )]
    CsvRaggedRow {
        path: PathBuf,
        line: u64,
        record: usize,
        expected: usize,
        found: usize,
    },
    /// `column` is the header name of the field with the bad bytes (or `header field N`). Such
    /// a file is most often a spreadsheet's export in its ANSI code page, hence the hint.
    #[error(
        "{}: line {line}, column {column:?}: invalid UTF-8 (at byte {byte_offset} of the field; \
         if the file was saved by a spreadsheet, try --encoding windows-1252 or --encoding latin-1)",
        path.display()
    )]
    CsvInvalidUtf8 {
        path: PathBuf,
        line: u64,
        column: String,
        byte_offset: usize,
    },
    /// A byte that has no character in the `--encoding` asked for (0x81, 0x8D, 0x8F, 0x90 or
    /// 0x9D in Windows-1252, which Python's `cp1252` codec refuses too).
    #[error(
        "{}: line {line}, column {column:?}: byte 0x{byte:02X} (at byte {byte_offset} of the \
         field) is not a character in {encoding}; the file is in another encoding (try \
         --encoding utf-8 or --encoding latin-1)",
        path.display()
    )]
    CsvUndefinedByte {
        path: PathBuf,
        line: u64,
        column: String,
        byte_offset: usize,
        byte: u8,
        encoding: CsvEncoding,
    },
    #[error("{}: line {line}, column {column:?}: empty label", path.display())]
    CsvEmptyLabel {
        path: PathBuf,
        line: u64,
        record: usize,
        column: String,
    },
    #[error(
        "{}: line {line}, column {column:?}: unknown label {label:?} (known labels: {})",
        path.display(),
        quoted_list(known)
    )]
    CsvUnknownLabel {
        path: PathBuf,
        line: u64,
        record: usize,
        column: String,
        label: String,
        known: Vec<String>,
    },
    /// A text that is empty or only whitespace (after HTML entities are decoded).
    #[error("{}: line {line}, column {column:?}: empty text", path.display())]
    CsvEmptyText {
        path: PathBuf,
        line: u64,
        record: usize,
        column: String,
    },
    /// A CSV syntax error reported by the parser, kept to one line.
    #[error("{}: line {line}: {message}", path.display())]
    Csv {
        path: PathBuf,
        line: u64,
        message: String,
    },
    /// A `split.json` that cannot be used: unreadable, inconsistent, or for another data file.
    #[error("{}: bad split: {message}", path.display())]
    Split { path: PathBuf, message: String },
}

impl DataError {
    /// For `map_err`: an I/O error on `path`.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError {
        let path = path.to_path_buf();
        move |source| DataError::Io { path, source }
    }

    /// A tokenizers-library error about `path`, kept to one line.
    pub(crate) fn tokenizer(path: &Path, error: impl Display) -> DataError {
        DataError::Tokenizer {
            path: path.to_path_buf(),
            message: error.to_string().replace('\n', " "),
        }
    }
}

/// `"a", "b", "c"`: names quoted (and escaped, so the message stays one line), at most
/// `MAX_LISTED` of them.
fn quoted_list(names: &[String]) -> String {
    const MAX_LISTED: usize = 30;
    let mut listed: Vec<String> = names
        .iter()
        .take(MAX_LISTED)
        .map(|n| format!("{n:?}"))
        .collect();
    if names.len() > MAX_LISTED {
        listed.push(format!("... {} more", names.len() - MAX_LISTED));
    }
    listed.join(", ")
}
