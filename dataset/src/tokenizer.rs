//! Training, saving and loading tokenizers (HuggingFace `tokenizers` JSON format, so the files
//! also load in Python).
//!
//! Three kinds, one per model family, each set up as `transformers` sets up that family's fast
//! tokenizer, so the files behave the same in Python:
//! - GPT-2: byte-level BPE (any text encodes, no unknown tokens; `<unk>` is a special token so
//!   that WikiText's placeholder for rare words is one id, not the text "<unk>");
//! - GPT: BPE over lower-cased words with a `</w>` end-of-word suffix (OpenAI GPT's scheme);
//! - BERT: lower-cased WordPiece with `##` continuations and [PAD] [UNK] [CLS] [SEP] [MASK].

use std::fmt::{self, Display};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::decoders::bpe::BPEDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::bert::BertNormalizer;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer, TokenizerImpl};

use crate::corpus::Document;
use crate::DataError;

/// Appended after every document by the BPE tokenizers; GPT-2's name for it.
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The BPE tokenizers' unknown token: OpenAI GPT's, and the placeholder WikiText writes for
/// the words it dropped from its vocabulary, so that in WikiText it is one special id.
pub const GPT_UNK_TOKEN: &str = "<unk>";
/// The end-of-word marker of OpenAI GPT's BPE.
pub const GPT_END_OF_WORD: &str = "</w>";

/// BERT's special tokens, in the order they get ids 0..5 when ferry trains a WordPiece
/// vocabulary ([PAD] is 0, as `BertConfig.pad_token_id` expects).
pub const BERT_SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// Which kind of tokenizer to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerKind {
    /// GPT-2 style byte-level BPE: any text encodes without unknown tokens.
    #[default]
    ByteLevelBpe,
    /// OpenAI GPT style BPE on lower-cased, punctuation-split words, `</w>` ending a word.
    Bpe,
    /// BERT style WordPiece on lower-cased, punctuation-split words.
    WordPiece,
}

impl TokenizerKind {
    pub const ALL: [TokenizerKind; 3] = [
        TokenizerKind::ByteLevelBpe,
        TokenizerKind::Bpe,
        TokenizerKind::WordPiece,
    ];

    /// The name recorded in manifests and accepted by [`FromStr`].
    pub fn as_str(self) -> &'static str {
        match self {
            TokenizerKind::ByteLevelBpe => "byte_level_bpe",
            TokenizerKind::Bpe => "bpe",
            TokenizerKind::WordPiece => "wordpiece",
        }
    }

    /// The tokenizer a model family is pretrained with (`gpt2`, `gpt`, `bert`).
    pub fn for_model_family(family: &str) -> Option<TokenizerKind> {
        match family {
            "gpt2" => Some(TokenizerKind::ByteLevelBpe),
            "gpt" => Some(TokenizerKind::Bpe),
            "bert" => Some(TokenizerKind::WordPiece),
            _ => None,
        }
    }

    /// The token the shard stream puts after every document: GPT-2's `<|endoftext|>` for the
    /// BPE kinds, [SEP] for WordPiece (BERT's separator; its examples are cut from document
    /// and sentence boundaries, never across this token).
    pub fn document_end_token(self) -> &'static str {
        match self {
            TokenizerKind::ByteLevelBpe | TokenizerKind::Bpe => EOS_TOKEN,
            TokenizerKind::WordPiece => "[SEP]",
        }
    }

    /// The token standing for a word the text does not give: WikiText's `<unk>` is read as
    /// this token. `generate` never samples it.
    pub fn unknown_token(self) -> &'static str {
        match self {
            TokenizerKind::ByteLevelBpe | TokenizerKind::Bpe => GPT_UNK_TOKEN,
            TokenizerKind::WordPiece => "[UNK]",
        }
    }

    /// The special tokens this kind's vocabulary starts with, in id order.
    pub fn special_tokens(self) -> &'static [&'static str] {
        match self {
            // EOS keeps id 0, as in the vocabularies made before `<unk>` was special.
            TokenizerKind::ByteLevelBpe => &[EOS_TOKEN, GPT_UNK_TOKEN],
            TokenizerKind::Bpe => &[GPT_UNK_TOKEN, EOS_TOKEN],
            TokenizerKind::WordPiece => &BERT_SPECIAL_TOKENS,
        }
    }

    /// The kind of a loaded tokenizer, from its model and pre-tokenizer.
    pub fn of(tokenizer: &Tokenizer) -> TokenizerKind {
        match tokenizer.get_model() {
            ModelWrapper::WordPiece(_) => TokenizerKind::WordPiece,
            _ => {
                let json = serde_json::to_value(tokenizer.get_pre_tokenizer()).unwrap_or_default();
                if json.get("type").and_then(|t| t.as_str()) == Some("ByteLevel") {
                    TokenizerKind::ByteLevelBpe
                } else {
                    TokenizerKind::Bpe
                }
            }
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
        TokenizerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<&str> = TokenizerKind::ALL.iter().map(|k| k.as_str()).collect();
                format!("unknown tokenizer kind {s:?} (known: {})", known.join(", "))
            })
    }
}

/// How many ids a tokenizer's vocabulary spans (its largest id + 1, special tokens included):
/// the entry count for a trained tokenizer, more when a loaded one has gaps in its ids. A model
/// needs an embedding row for each.
pub fn token_id_count(tokenizer: &Tokenizer) -> usize {
    tokenizer
        .get_vocab(true)
        .values()
        .max()
        .map_or(0, |&id| id as usize + 1)
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
        TokenizerKind::Bpe => train_gpt_bpe(docs, vocab_size, show_progress),
        TokenizerKind::WordPiece => train_wordpiece(docs, vocab_size, show_progress),
    }
}

/// A document's text as the tokenizer trainers see it: without WikiText's `<unk>`, which is
/// encoded as the unknown token and would only spend vocabulary on "<", "unk" and ">".
fn training_text(doc: &Document) -> String {
    doc.text().replace(GPT_UNK_TOKEN, "")
}

fn special_tokens(kind: TokenizerKind) -> Vec<AddedToken> {
    kind.special_tokens()
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect()
}

fn training_error(e: impl Display) -> DataError {
    DataError::tokenizer(Path::new("<tokenizer training>"), e)
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
        .special_tokens(special_tokens(TokenizerKind::ByteLevelBpe))
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let mut tokenizer: TokenizerImpl<BPE, NormalizerWrapper, ByteLevel, ByteLevel, ByteLevel> =
        TokenizerImpl::new(BPE::default());
    tokenizer
        .with_pre_tokenizer(Some(byte_level))
        .with_post_processor(Some(byte_level))
        .with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, docs.iter().map(training_text))
        .map_err(training_error)?;
    Ok(tokenizer.into())
}

/// OpenAI GPT's tokenizer as `transformers` builds its fast version: BERT's normalizer
/// (lower case) and pre-tokenizer, BPE whose word-final pieces end in `</w>`, `<unk>` for
/// characters never seen in training.
fn train_gpt_bpe(
    docs: &[Document],
    vocab_size: usize,
    show_progress: bool,
) -> Result<Tokenizer, DataError> {
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(show_progress)
        .special_tokens(special_tokens(TokenizerKind::Bpe))
        .end_of_word_suffix(GPT_END_OF_WORD.to_owned())
        .build();
    let model = BPE::builder()
        .unk_token(GPT_UNK_TOKEN.to_owned())
        .end_of_word_suffix(GPT_END_OF_WORD.to_owned())
        .build()
        .map_err(training_error)?;
    let mut tokenizer: TokenizerImpl<
        BPE,
        BertNormalizer,
        BertPreTokenizer,
        TemplateProcessing,
        BPEDecoder,
    > = TokenizerImpl::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(BPEDecoder::new(GPT_END_OF_WORD.to_owned())));
    tokenizer
        .train(&mut trainer, docs.iter().map(training_text))
        .map_err(training_error)?;
    Ok(tokenizer.into())
}

/// BERT's uncased WordPiece tokenizer: BERT's normalizer and pre-tokenizer, `##` for pieces
/// inside a word, and a post-processor that frames inputs as `[CLS] A [SEP] B [SEP]` with
/// segment ids 0 and 1 (used when encoding with special tokens, as for fine-tuning; shards are
/// encoded without).
fn train_wordpiece(
    docs: &[Document],
    vocab_size: usize,
    show_progress: bool,
) -> Result<Tokenizer, DataError> {
    let mut trainer = WordPieceTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(show_progress)
        .special_tokens(special_tokens(TokenizerKind::WordPiece))
        .build();
    let model = WordPiece::builder()
        .unk_token("[UNK]".to_owned())
        .build()
        .map_err(training_error)?;
    let mut tokenizer: TokenizerImpl<
        WordPiece,
        BertNormalizer,
        BertPreTokenizer,
        TemplateProcessing,
        WordPieceDecoder,
    > = TokenizerImpl::new(model);
    tokenizer
        .with_normalizer(Some(BertNormalizer::default()))
        .with_pre_tokenizer(Some(BertPreTokenizer))
        .with_decoder(Some(WordPieceDecoder::default()));
    tokenizer
        .train(&mut trainer, docs.iter().map(training_text))
        .map_err(training_error)?;
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .ok_or_else(|| training_error(format!("{t} missing after training")))
    };
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let framing = TemplateProcessing::builder()
        .try_single("[CLS] $A:0 [SEP]:0")
        .and_then(|b| b.try_pair("[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1"))
        .map_err(training_error)?
        .special_tokens(vec![("[CLS]", cls), ("[SEP]", sep)])
        .build()
        .map_err(training_error)?;
    tokenizer.with_post_processor(Some(framing));
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
