//! `prepare`: corpus files in, a prepared data directory (tokenizer, shards, index, manifest)
//! out.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::corpus::{
    expand_inputs, is_csv, read_csv_documents, read_documents, CsvTexts, Document,
};
use crate::shards::{
    sha256_hex, token_bytes_for, Manifest, SourceInfo, SplitInfo, SplitWriter, FORMAT,
    MANIFEST_FILE, TOKENIZER_FILE, VERSION,
};
use crate::tokenizer::{
    load_tokenizer, save_tokenizer, token_id_count, train_tokenizer, TokenizerKind, GPT_UNK_TOKEN,
};
use crate::DataError;

/// The smallest vocabulary a byte-level tokenizer can have: 256 bytes and the EOS token.
const MIN_VOCAB_SIZE: usize = 257;

/// Documents encoded per parallel batch: enough to keep every core busy, few enough that the
/// encoded tokens held in memory stay small next to the corpus itself.
const ENCODE_BATCH: usize = 1024;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// Files, directories or glob patterns.
    pub inputs: Vec<String>,
    /// The prepared directory to create (or replace).
    pub output: PathBuf,
    /// Use this `tokenizer.json` instead of training one.
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_kind: TokenizerKind,
    pub vocab_size: usize,
    /// The share of documents held out for validation.
    pub val_fraction: f64,
    /// Seeds the train/val assignment.
    pub seed: u64,
    pub shard_tokens: u64,
    /// How `.csv` inputs are read.
    pub csv: CsvTexts,
    /// Progress bars on stderr.
    pub show_progress: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            inputs: Vec::new(),
            output: PathBuf::new(),
            tokenizer: None,
            tokenizer_kind: TokenizerKind::ByteLevelBpe,
            vocab_size: 8192,
            val_fraction: 0.02,
            seed: 0,
            shard_tokens: 16 << 20,
            csv: CsvTexts::default(),
            show_progress: false,
        }
    }
}

/// Reads the inputs, trains (or loads) a tokenizer on the training documents, and writes the
/// prepared directory `opts.output`. Everything is written to `<output>.tmp-<pid>` first and
/// renamed into place at the end, so `output` is either the old directory or the complete
/// new one. The result is the same for the same inputs and options, whatever the thread count.
pub fn prepare(opts: &PrepareOptions) -> Result<Manifest, DataError> {
    check_options(opts)?;
    check_output(&opts.output)?;
    let paths = expand_inputs(&opts.inputs)?;
    if opts.csv.split.is_some() && !paths.iter().any(|p| is_csv(p)) {
        return Err(DataError::InvalidOption {
            option: "split",
            message: "a split only selects records of `.csv` inputs, and there is none".to_owned(),
        });
    }
    let files = read_all(&paths, &opts.csv, opts.show_progress)?;
    let sources: Vec<SourceInfo> = files
        .iter()
        .map(|file| SourceInfo {
            path: file.path.display().to_string(),
            documents: file.docs.len() as u64,
            bytes: file.bytes,
        })
        .collect();
    let (train, val) = assign_splits(files, opts.val_fraction, opts.seed);
    if train.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: PathBuf::from(opts.inputs.join(" ")),
        });
    }

    let staging = Staging::create(&opts.output)?;
    let tokenizer_path = staging.path.join(TOKENIZER_FILE);
    let tokenizer = match &opts.tokenizer {
        Some(path) => {
            let tokenizer = load_tokenizer(path)?;
            fs::copy(path, &tokenizer_path).map_err(DataError::io(path))?;
            tokenizer
        }
        None => {
            // Trained on the training split only, so validation text stays unseen.
            let tokenizer = train_tokenizer(
                opts.tokenizer_kind,
                &train,
                opts.vocab_size,
                opts.show_progress,
            )?;
            save_tokenizer(&tokenizer, &tokenizer_path)?;
            tokenizer
        }
    };
    // Errors name the tokenizer file the user knows: theirs, or the one in the output.
    let named = opts
        .tokenizer
        .clone()
        .unwrap_or_else(|| opts.output.join(TOKENIZER_FILE));
    // A given tokenizer's kind is read off the tokenizer itself, not assumed.
    let kind = TokenizerKind::of(&tokenizer);
    let encoder = Encoder::new(tokenizer, kind, &named)?;

    let token_bytes = token_bytes_for(encoder.vocab_size);
    let mut splits = BTreeMap::new();
    for (name, docs) in [("train", &train), ("val", &val)] {
        let info = write_split(&staging.path, name, docs, &encoder, token_bytes, opts)?;
        splits.insert(name.to_owned(), info);
    }
    let tokenizer_json = fs::read(&tokenizer_path).map_err(DataError::io(&tokenizer_path))?;
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        tokenizer_file: TOKENIZER_FILE.to_owned(),
        tokenizer_sha256: sha256_hex(&tokenizer_json),
        tokenizer_kind: kind.as_str().to_owned(),
        vocab_size: encoder.vocab_size,
        token_bytes,
        eos_token_id: encoder.eos,
        splits,
        sources,
    };
    manifest.save(&staging.path)?;
    staging.commit(&opts.output)?;
    Ok(manifest)
}

fn check_options(opts: &PrepareOptions) -> Result<(), DataError> {
    let invalid = |option, message: String| Err(DataError::InvalidOption { option, message });
    if opts.inputs.is_empty() {
        return invalid("inputs", "no input files given".to_owned());
    }
    if opts.output.file_name().is_none() {
        return invalid(
            "output",
            format!("{:?} does not name a directory", opts.output),
        );
    }
    if !(0.0..1.0).contains(&opts.val_fraction) {
        return invalid(
            "val_fraction",
            format!("must be at least 0 and below 1, not {}", opts.val_fraction),
        );
    }
    if opts.shard_tokens == 0 {
        return invalid("shard_tokens", "must be at least 1".to_owned());
    }
    if opts.tokenizer.is_none() && opts.vocab_size < MIN_VOCAB_SIZE {
        return invalid(
            "vocab_size",
            format!("must be at least {MIN_VOCAB_SIZE}, not {}", opts.vocab_size),
        );
    }
    Ok(())
}

/// Only a missing path, an empty directory or an earlier prepared directory may be replaced.
fn check_output(output: &Path) -> Result<(), DataError> {
    let refuse = |reason: String| {
        Err(DataError::OutputExists {
            path: output.to_path_buf(),
            reason,
        })
    };
    if !output.exists() {
        return Ok(());
    }
    if !output.is_dir() {
        return refuse("exists and is not a directory".to_owned());
    }
    let mut names = Vec::new();
    for entry in fs::read_dir(output).map_err(DataError::io(output))? {
        let entry = entry.map_err(DataError::io(output))?;
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        names.push((entry.file_name().to_string_lossy().into_owned(), is_file));
    }
    if names.is_empty() {
        return Ok(());
    }
    if !names.iter().any(|(n, f)| *f && n == MANIFEST_FILE) {
        return refuse(format!(
            "exists and is not a prepared data directory (no {MANIFEST_FILE})"
        ));
    }
    // A prepared directory is replaced whole, so it may hold nothing but what prepare writes.
    let mut foreign: Vec<&str> = names
        .iter()
        .filter(|(n, f)| !(*f && is_prepared_file(n)))
        .map(|(n, _)| n.as_str())
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort_unstable();
    let more = if foreign.len() > 3 { ", …" } else { "" };
    refuse(format!(
        "is a prepared data directory that also holds {}{more}, which prepare did not write \
         (replacing the directory would delete it)",
        foreign[..foreign.len().min(3)].join(", ")
    ))
}

/// The names `prepare` gives its files: the manifest, the tokenizer, and per split
/// `<split>-NNNNN.bin` shards and a `<split>.idx` index.
fn is_prepared_file(name: &str) -> bool {
    let split_name = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    if name == MANIFEST_FILE || name == TOKENIZER_FILE {
        return true;
    }
    if let Some(split) = name.strip_suffix(".idx") {
        return split_name(split);
    }
    name.strip_suffix(".bin")
        .and_then(|s| s.rsplit_once('-'))
        .is_some_and(|(split, n)| {
            split_name(split) && !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())
        })
}

struct InputFile {
    path: PathBuf,
    bytes: u64,
    docs: Vec<Document>,
}

/// Reads every file in parallel, in input order. An empty file is kept with no documents (it
/// shows in the manifest's sources); any other bad file stops everything, and the error
/// reported is that of the first bad file in input order.
fn read_all(
    paths: &[PathBuf],
    csv: &CsvTexts,
    show_progress: bool,
) -> Result<Vec<InputFile>, DataError> {
    let bar = progress_bar(show_progress, paths.len(), "reading");
    let results: Vec<Result<InputFile, DataError>> = paths
        .par_iter()
        .map(|path| {
            let bytes = fs::metadata(path).map_err(DataError::io(path))?.len();
            let read = if is_csv(path) {
                read_csv_documents(path, csv)
            } else {
                read_documents(path)
            };
            let docs = match read {
                Err(DataError::EmptyCorpus { .. }) => Vec::new(),
                other => other?,
            };
            bar.inc(1);
            Ok(InputFile {
                path: path.clone(),
                bytes,
                docs,
            })
        })
        .collect();
    bar.finish();
    results.into_iter().collect()
}

/// Splits documents into (train, val), keeping input order within each. A document goes to
/// val when a stable hash of the seed, its file name and its position in that file falls
/// under `val_fraction`, so the assignment does not move when other files are added. With two
/// or more documents both splits get at least one.
fn assign_splits(
    files: Vec<InputFile>,
    val_fraction: f64,
    seed: u64,
) -> (Vec<Document>, Vec<Document>) {
    let docs: Vec<(u64, Document)> = files
        .into_iter()
        .flat_map(|file| file.docs.into_iter().enumerate())
        .map(|(ordinal, doc)| (stable_hash(seed, &doc.source, ordinal as u64), doc))
        .collect();
    let mut is_val: Vec<bool> = docs
        .iter()
        .map(|(hash, _)| unit_interval(*hash) < val_fraction)
        .collect();
    let by_hash = |i: &usize| docs[*i].0;
    if docs.len() == 1 {
        is_val[0] = false;
    } else if !is_val.contains(&true) {
        if let Some(i) = (0..docs.len()).min_by_key(by_hash) {
            is_val[i] = true;
        }
    } else if !is_val.contains(&false) {
        if let Some(i) = (0..docs.len()).max_by_key(by_hash) {
            is_val[i] = false;
        }
    }
    let (val, train): (Vec<_>, Vec<_>) = docs
        .into_iter()
        .zip(is_val)
        .partition(|(_, is_val)| *is_val);
    let strip =
        |docs: Vec<((u64, Document), bool)>| docs.into_iter().map(|((_, d), _)| d).collect();
    (strip(train), strip(val))
}

/// FNV-1a over the file name, mixed with the seed and ordinal by splitmix64: unlike std's
/// `DefaultHasher`, stable across Rust versions and platforms.
fn stable_hash(seed: u64, source: &str, ordinal: u64) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325 ^ splitmix64(seed);
    for &byte in source.as_bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix64(hash ^ splitmix64(ordinal))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to [0, 1) using its top 53 bits (an f64's precision).
fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// Turns documents into token ids and sentence starts.
struct Encoder {
    tokenizer: Tokenizer,
    /// Where the tokenizer came from, for error messages.
    path: PathBuf,
    eos: u32,
    vocab_size: usize,
    /// How WikiText's `<unk>` is rewritten in every line before encoding, so that it becomes
    /// the tokenizer's unknown token: see [`unknown_rewrite`].
    unknown: Option<(&'static str, &'static str)>,
}

impl Encoder {
    fn new(tokenizer: Tokenizer, kind: TokenizerKind, path: &Path) -> Result<Encoder, DataError> {
        let end = kind.document_end_token();
        let eos = tokenizer.token_to_id(end).ok_or_else(|| {
            DataError::tokenizer(path, format!("has no {end} token to end documents"))
        })?;
        let vocab_size = token_id_count(&tokenizer);
        let unknown = unknown_rewrite(kind);
        Ok(Encoder {
            tokenizer,
            path: path.to_path_buf(),
            eos,
            vocab_size,
            unknown,
        })
    }

    /// The document's tokens followed by EOS, and where each of its lines starts.
    fn encode(&self, doc: &Document) -> Result<(Vec<u32>, Vec<u64>), DataError> {
        let rewritten: Vec<String>;
        let lines = match self.unknown {
            // Most documents (every book) hold no `<unk>`: no copy for them.
            Some((from, to)) if doc.lines.iter().any(|l| l.contains(from)) => {
                rewritten = doc.lines.iter().map(|l| l.replace(from, to)).collect();
                &rewritten
            }
            _ => &doc.lines,
        };
        let text = lines.join("\n");
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| DataError::tokenizer(&self.path, e))?;
        // A line starts at the first token whose byte offset is at or after the line's first
        // byte. Encoding the whole text once (rather than line by line) keeps the tokens
        // exactly those of the document, whatever the tokenizer does at line breaks.
        let offsets = encoding.get_offsets();
        let mut line_start = 0;
        let mut sentences = Vec::with_capacity(lines.len());
        for line in lines {
            sentences.push(offsets.partition_point(|&(start, _)| start < line_start) as u64);
            line_start += line.len() + 1;
        }
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend_from_slice(encoding.get_ids());
        ids.push(self.eos);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(DataError::tokenizer(
                &self.path,
                format!(
                    "produced id {id}, outside its vocabulary of {}",
                    self.vocab_size
                ),
            ));
        }
        Ok((ids, sentences))
    }
}

/// What WikiText's `<unk>` (its placeholder for the words it dropped) is rewritten to so that
/// it encodes as `kind`'s unknown token, one id. WordPiece spells it `[UNK]`. Byte-level BPE
/// would leave the space before `<unk>` as a token of its own, which a model then learns to
/// emit before the `<unk>` that generate never samples, so the space goes into the token.
/// GPT's BPE splits at whitespace anyway.
fn unknown_rewrite(kind: TokenizerKind) -> Option<(&'static str, &'static str)> {
    match kind {
        TokenizerKind::ByteLevelBpe => Some((" <unk>", GPT_UNK_TOKEN)),
        TokenizerKind::Bpe => None,
        TokenizerKind::WordPiece => Some((GPT_UNK_TOKEN, "[UNK]")),
    }
}

/// Encodes a split's documents in parallel batches and writes them in order.
fn write_split(
    dir: &Path,
    name: &str,
    docs: &[Document],
    encoder: &Encoder,
    token_bytes: u8,
    opts: &PrepareOptions,
) -> Result<SplitInfo, DataError> {
    let bar = progress_bar(opts.show_progress, docs.len(), &format!("encoding {name}"));
    let mut writer = SplitWriter::new(dir, name, token_bytes, opts.shard_tokens);
    for batch in docs.chunks(ENCODE_BATCH) {
        let encoded: Vec<(Vec<u32>, Vec<u64>)> = batch
            .par_iter()
            .map(|doc| {
                let encoded = encoder.encode(doc);
                bar.inc(1);
                encoded
            })
            .collect::<Result<_, _>>()?;
        for (tokens, sentences) in &encoded {
            writer.push_document(tokens, sentences)?;
        }
    }
    let info = writer.finish()?;
    bar.finish();
    Ok(info)
}

fn progress_bar(show: bool, len: usize, message: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>16} [{elapsed_precise}] {wide_bar} {pos}/{len}")
    {
        bar.set_style(style);
    }
    bar.set_message(message.to_owned());
    bar
}

/// `<output>.<tag>-<pid>`, next to the output so that renames stay on one file system.
fn sibling(output: &Path, tag: &str) -> PathBuf {
    let mut name = output.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}-{}", std::process::id()));
    output.with_file_name(name)
}

/// The directory a run writes into; removed unless committed, so that a failed run leaves
/// nothing behind.
struct Staging {
    path: PathBuf,
    committed: bool,
}

impl Staging {
    fn create(output: &Path) -> Result<Staging, DataError> {
        let path = sibling(output, "tmp");
        if path.exists() {
            // Left by an earlier run that died and happened to have our pid.
            fs::remove_dir_all(&path).map_err(DataError::io(&path))?;
        }
        fs::create_dir_all(&path).map_err(DataError::io(&path))?;
        Ok(Staging {
            path,
            committed: false,
        })
    }

    /// Renames the staged directory to `output`, replacing an earlier prepared directory.
    fn commit(mut self, output: &Path) -> Result<(), DataError> {
        if output.exists() {
            // Checked again: something may have appeared there while we worked.
            check_output(output)?;
            let old = sibling(output, "old");
            fs::rename(output, &old).map_err(DataError::io(output))?;
            if let Err(e) = fs::rename(&self.path, output) {
                // Put the earlier directory back rather than leave nothing under its name.
                let _ = fs::rename(&old, output);
                return Err(DataError::io(output)(e));
            }
            fs::remove_dir_all(&old).map_err(DataError::io(&old))?;
        } else {
            fs::rename(&self.path, output).map_err(DataError::io(output))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: this runs on the error path, whose error is what matters.
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_file_names() {
        for ours in [
            "manifest.json",
            "tokenizer.json",
            "train-00000.bin",
            "val-00012.bin",
            "val.idx",
        ] {
            assert!(is_prepared_file(ours), "{ours}");
        }
        for theirs in [
            "notes.txt",
            "train.bin",
            "train-.bin",
            "train-0a.bin",
            ".idx",
            "book.txt",
        ] {
            assert!(!is_prepared_file(theirs), "{theirs}");
        }
    }

    /// The train/val assignment is part of the data format: pin it so it cannot change by
    /// accident. (Values computed independently, in Python.)
    #[test]
    fn split_hash_is_pinned() {
        assert_eq!(
            stable_hash(0, "wiki.valid.tokens", 0),
            0x1d51_4c98_3acf_baa9
        );
        assert_eq!(stable_hash(42, "austen-emma.txt", 7), 0x9b96_f614_1fa1_0fb5);
        assert!(unit_interval(u64::MAX) < 1.0);
    }

    fn files(docs_per_file: &[usize]) -> Vec<InputFile> {
        docs_per_file
            .iter()
            .enumerate()
            .map(|(f, &n)| InputFile {
                path: PathBuf::from(format!("f{f}.txt")),
                bytes: 0,
                docs: (0..n)
                    .map(|d| Document {
                        source: format!("f{f}.txt"),
                        title: None,
                        lines: vec![format!("doc {d}")],
                    })
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn both_splits_get_a_document_when_there_are_two() {
        for fraction in [0.0, 0.999_999] {
            let (train, val) = assign_splits(files(&[1, 1]), fraction, 0);
            assert_eq!((train.len(), val.len()), (1, 1), "val_fraction {fraction}");
        }
        let (train, val) = assign_splits(files(&[1]), 0.999_999, 0);
        assert_eq!((train.len(), val.len()), (1, 0));
        let (train, val) = assign_splits(files(&[0, 0]), 0.5, 0);
        assert!(train.is_empty() && val.is_empty());
    }

    #[test]
    fn val_share_follows_the_fraction_and_keeps_order() {
        let (train, val) = assign_splits(files(&[5000, 5000]), 0.1, 9);
        let share = val.len() as f64 / 10_000.0;
        assert!((0.08..0.12).contains(&share), "{share}");
        let order = |docs: &[Document]| {
            docs.iter()
                .map(|d| (d.source.clone(), d.lines[0][4..].parse::<usize>().unwrap()))
                .collect::<Vec<_>>()
        };
        for docs in [&train, &val] {
            let got = order(docs);
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(got, sorted);
        }
    }
}
