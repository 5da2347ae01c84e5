//! The error type of the data pipeline.

use std::fmt::Display;
use std::path::{Path, PathBuf};

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
    #[error(
        "{}: exists and is not a prepared data directory (no manifest.json); refusing to overwrite it",
        path.display()
    )]
    OutputExists { path: PathBuf },
    #[error("invalid option {option}: {message}")]
    InvalidOption {
        option: &'static str,
        message: String,
    },
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
