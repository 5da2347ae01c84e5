use std::path::PathBuf;

/// Errors of the training engine. Each message is one line that names the file or field.
#[derive(thiserror::Error, Debug)]
pub enum EngineError {
    #[error("unknown {family} size `{size}`; known sizes: {known}")]
    UnknownSize {
        family: &'static str,
        size: String,
        known: String,
    },
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: checksum mismatch (expected sha256 {expected}, found {found}): the file is corrupt or was modified")]
    Checksum {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error(transparent)]
    Data(#[from] ferry_dataset::DataError),
}

impl EngineError {
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        EngineError::File {
            path: path.into(),
            message: message.to_string(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        EngineError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
