//! Training, saving and loading tokenizers (HuggingFace `tokenizers` JSON format, so the files
//! also load in Python).

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer, TokenizerImpl};

use crate::corpus::Document;
use crate::DataError;

/// Appended after every document; GPT-2's name for it.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Which kind of tokenizer to train. WordPiece (BERT) and plain BPE will join this list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE: any text encodes without unknown tokens.
    #[default]
    ByteLevelBpe,
}

impl TokenizerKind {
    /// The name recorded in manifests and accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::ByteLevelBpe => "byte_level_bpe",
        }
    }
}

impl fmt::Display for TokenizerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TokenizerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "byte_level_bpe" => Ok(TokenizerKind::ByteLevelBpe),
            other => Err(format!(
                "unknown tokenizer kind {other:?} (known: byte_level_bpe)"
            )),
        }
    }
}

/// Trains a tokenizer of `kind` on the documents' text. The result depends only on the
/// documents and the settings, not on thread timing.
pub fn train_tokenizer(
    kind: TokenizerKind,
    docs: &[Document],
    vocab_size: usize,
    show_progress: bool,
) -> Result<Tokenizer, DataError> {
    match kind {
        TokenizerKind::ByteLevelBpe => train_byte_level_bpe(docs, vocab_size, show_progress),
    }
}

fn train_byte_level_bpe(
    docs: &[Document],
    vocab_size: usize,
    show_progress: bool,
) -> Result<Tokenizer, DataError> {
    // GPT-2's settings: no space added before the text, and offsets that keep the spaces so
    // that they map tokens back onto the exact input bytes.
    let byte_level = ByteLevel::default()
        .add_prefix_space(false)
        .trim_offsets(false);
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(show_progress)
        .special_tokens(vec![AddedToken::from(EOS_TOKEN, true)])
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerImpl::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, docs.iter().map(Document::text))
        .map_err(|e| DataError::tokenizer(Path::new("<tokenizer training>"), e))?;
    Ok(tokenizer.into())
}

/// Loads a `tokenizer.json`.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer, DataError> {
    let bytes = fs::read(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => DataError::TokenizerMissing {
            path: path.to_path_buf(),
        },
        _ => DataError::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    Tokenizer::from_bytes(&bytes).map_err(|e| DataError::tokenizer(path, e))
}

/// Saves `tokenizer` as compact JSON. It goes to a temporary file in the same directory that
/// is then renamed, so readers never see a half-written file.
pub fn save_tokenizer(tokenizer: &Tokenizer, path: &Path) -> Result<(), DataError> {
    let json = serde_json::to_vec(tokenizer).map_err(|e| DataError::tokenizer(path, e))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    let written = fs::write(&tmp, json).and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        // Best effort: the error that matters is the one returned below.
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(DataError::io(path))
}
