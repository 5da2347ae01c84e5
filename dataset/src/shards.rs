//! The prepared-data format: a manifest, token shards and a document/sentence index per split,
//! and [`TokenSplit`], the memory-mapped reader of one split.
//!
//! A prepared directory holds `manifest.json`, `tokenizer.json`, and for each split (`train`,
//! `val`) the shards `<split>-NNNNN.bin` (raw little-endian token ids, no header, u16 when the
//! vocabulary has at most 65536 entries and u32 otherwise) and one index `<split>.idx`:
//! the 8-byte magic `FERRYIDX`, u32 version (1), u32 reserved, u64 n_docs, u64 n_sents, then
//! n_docs+1 u64 document starts and n_sents+1 u64 sentence starts, all little-endian token
//! offsets into the split's token stream whose last entries equal its token count.
//! The stream is each document's text (lines joined by newlines) encoded, then one EOS token.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::DataError;

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const FORMAT: &str = "ferry-shards";
pub const VERSION: u32 = 1;

const INDEX_MAGIC: &[u8; 8] = b"FERRYIDX";
const INDEX_VERSION: u32 = 1;
const INDEX_HEADER_BYTES: usize = 32;

/// Describes a prepared directory; written last, so its presence means the rest is complete.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub tokenizer_file: String,
    pub tokenizer_sha256: String,
    pub tokenizer_kind: String,
    pub vocab_size: usize,
    /// Bytes per token on disk: 2 or 4.
    pub token_bytes: u8,
    pub eos_token_id: u32,
    pub splits: BTreeMap<String, SplitInfo>,
    pub sources: Vec<SourceInfo>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SplitInfo {
    pub tokens: u64,
    pub documents: u64,
    pub sentences: u64,
    pub shards: Vec<ShardInfo>,
    pub index_file: String,
    pub index_sha256: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ShardInfo {
    pub file: String,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

/// One input file and how many documents it gave (0 for an empty file).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SourceInfo {
    pub path: String,
    pub documents: u64,
    pub bytes: u64,
}

/// Bytes per token on disk for a vocabulary of `vocab_size` ids.
pub(crate) fn token_bytes_for(vocab_size: usize) -> u8 {
    if vocab_size <= 1 << 16 {
        2
    } else {
        4
    }
}

/// Lowercase hex SHA-256, as the manifest records files.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Manifest {
    /// Reads and checks `<dir>/manifest.json`.
    pub fn load(dir: &Path) -> Result<Manifest, DataError> {
        let path = dir.join(MANIFEST_FILE);
        let bad = |message: String| DataError::Manifest {
            path: path.clone(),
            message,
        };
        let text = fs::read_to_string(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                bad("not found; is this a prepared data directory?".to_owned())
            }
            _ => bad(e.to_string()),
        })?;
        // serde_json's message says the line and column.
        let manifest: Manifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        manifest.check().map_err(bad)?;
        Ok(manifest)
    }

    pub(crate) fn save(&self, dir: &Path) -> Result<(), DataError> {
        let path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_string_pretty(self).map_err(|e| DataError::Manifest {
            path: path.clone(),
            message: e.to_string(),
        })?;
        fs::write(&path, json + "\n").map_err(DataError::io(&path))
    }

    /// The consistency a reader relies on to never index out of bounds.
    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT || self.version != VERSION {
            return Err(format!(
                "format {:?} version {} is not {FORMAT:?} version {VERSION}",
                self.format, self.version
            ));
        }
        if self.token_bytes != token_bytes_for(self.vocab_size) {
            return Err(format!(
                "token_bytes {} does not fit vocab_size {}",
                self.token_bytes, self.vocab_size
            ));
        }
        for (name, split) in &self.splits {
            check_file_name(&split.index_file)?;
            let mut tokens = 0u64;
            for shard in &split.shards {
                check_file_name(&shard.file)?;
                let bytes = shard.tokens.checked_mul(u64::from(self.token_bytes));
                if shard.tokens == 0 || bytes != Some(shard.bytes) {
                    return Err(format!(
                        "shard {} has {} tokens in {} bytes",
                        shard.file, shard.tokens, shard.bytes
                    ));
                }
                tokens = tokens
                    .checked_add(shard.tokens)
                    .ok_or_else(|| format!("split {name} has more than 2^64 tokens"))?;
            }
            if tokens != split.tokens {
                return Err(format!(
                    "split {name} has {} tokens but its shards hold {tokens}",
                    split.tokens
                ));
            }
        }
        Ok(())
    }
}

/// Files named by a manifest must stay inside its directory.
fn check_file_name(name: &str) -> Result<(), String> {
    if Path::new(name).file_name() == Some(name.as_ref()) {
        Ok(())
    } else {
        Err(format!("{name:?} is not a plain file name"))
    }
}

/// Training windows of `seq_len` (+1 target token) that fit in `tokens` tokens. The coordinator
/// counts them from the manifest alone, so this must be the one formula everywhere.
pub fn sequences_in(tokens: u64, seq_len: u64) -> u64 {
    tokens.saturating_sub(1).checked_div(seq_len).unwrap_or(0)
}

/// A read-only view of one split of a prepared directory, backed by memory maps of its shards.
pub struct TokenSplit {
    /// `<dir>/<split>`, for error messages.
    name: PathBuf,
    manifest: Manifest,
    token_bytes: usize,
    shards: Vec<Mmap>,
    /// Token offset of each shard's first token, then the split's token count.
    shard_starts: Vec<u64>,
    doc_starts: Vec<u64>,
    sentence_starts: Vec<u64>,
}

impl TokenSplit {
    /// Opens split `split` of the prepared directory `dir`. Shard sizes are always checked
    /// against the manifest (cheap, and catches truncated copies); with `verify_checksums`
    /// the sha256 of every shard and of the index is checked too.
    pub fn open(dir: &Path, split: &str, verify_checksums: bool) -> Result<TokenSplit, DataError> {
        let manifest = Manifest::load(dir)?;
        let info = manifest
            .splits
            .get(split)
            .ok_or_else(|| DataError::Manifest {
                path: dir.join(MANIFEST_FILE),
                message: format!(
                    "no split {split:?} (it has {})",
                    manifest
                        .splits
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;

        let mut paths = Vec::with_capacity(info.shards.len());
        let mut shards = Vec::with_capacity(info.shards.len());
        let mut shard_starts = vec![0];
        for shard in &info.shards {
            let path = dir.join(&shard.file);
            let file = File::open(&path).map_err(DataError::io(&path))?;
            let found = file.metadata().map_err(DataError::io(&path))?.len();
            if found != shard.bytes {
                return Err(DataError::Truncated {
                    path,
                    expected: shard.bytes,
                    found,
                });
            }
            // SAFETY: prepared directories are written once and never modified in place
            // (`prepare` replaces them by renaming a new directory over them), so the mapped
            // bytes do not change under us.
            let map = unsafe { Mmap::map(&file) }.map_err(DataError::io(&path))?;
            shards.push(map);
            shard_starts.push(shard_starts[shard_starts.len() - 1] + shard.tokens);
            paths.push(path);
        }

        let index_path = dir.join(&info.index_file);
        let index = fs::read(&index_path).map_err(DataError::io(&index_path))?;
        if verify_checksums {
            let mut files: Vec<(&Path, &[u8], &str)> = paths
                .iter()
                .zip(&shards)
                .zip(&info.shards)
                .map(|((path, map), shard)| (path.as_path(), &map[..], shard.sha256.as_str()))
                .collect();
            files.push((&index_path, &index, &info.index_sha256));
            let results: Vec<Result<(), DataError>> = files
                .par_iter()
                .map(|&(path, bytes, expected)| verify_sha256(path, bytes, expected))
                .collect();
            results.into_iter().collect::<Result<(), _>>()?;
        }
        let (doc_starts, sentence_starts) = parse_index(&index_path, &index, info)?;

        Ok(TokenSplit {
            name: dir.join(split),
            token_bytes: usize::from(manifest.token_bytes),
            manifest,
            shards,
            shard_starts,
            doc_starts,
            sentence_starts,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn len_tokens(&self) -> u64 {
        self.shard_starts[self.shard_starts.len() - 1]
    }

    /// How many training windows of `seq_len + 1` tokens fit: window `i` starts at token
    /// `i * seq_len`, so consecutive windows share their boundary token.
    pub fn num_sequences(&self, seq_len: usize) -> u64 {
        sequences_in(self.len_tokens(), seq_len as u64)
    }

    /// Fills `out` with window `index`: the `seq_len + 1` tokens from token `index * seq_len`.
    pub fn sequence(
        &self,
        index: u64,
        seq_len: usize,
        out: &mut Vec<i64>,
    ) -> Result<(), DataError> {
        // Saturating: an overflowing window is out of range, which `tokens` reports.
        let start = index.saturating_mul(seq_len as u64);
        self.tokens(start, seq_len.saturating_add(1), out)
    }

    /// Fills `out` with the `len` tokens from token `start`, across shard boundaries.
    pub fn tokens(&self, start: u64, len: usize, out: &mut Vec<i64>) -> Result<(), DataError> {
        out.clear();
        let total = self.len_tokens();
        let end = start
            .checked_add(len as u64)
            .filter(|&end| end <= total)
            .ok_or_else(|| DataError::OutOfRange {
                path: self.name.clone(),
                start,
                len: len as u64,
                total,
            })?;
        out.reserve(len);
        let mut pos = start;
        while pos < end {
            // The last shard starting at or before `pos`; shard_starts[0] is 0, and shards
            // are never empty, so this is a valid shard index.
            let shard = self.shard_starts.partition_point(|&s| s <= pos) - 1;
            let shard_start = self.shard_starts[shard];
            let until = self.shard_starts[shard + 1].min(end);
            let from = (pos - shard_start) as usize * self.token_bytes;
            let to = (until - shard_start) as usize * self.token_bytes;
            let bytes = &self.shards[shard][from..to];
            if self.token_bytes == 2 {
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|b| i64::from(u16::from_le_bytes([b[0], b[1]]))),
                );
            } else {
                out.extend(
                    bytes
                        .chunks_exact(4)
                        .map(|b| i64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
                );
            }
            pos = until;
        }
        Ok(())
    }

    /// Token offset of each document's start, then the split's token count.
    pub fn doc_starts(&self) -> &[u64] {
        &self.doc_starts
    }

    /// Token offset of each sentence's (line's) start, then the split's token count.
    pub fn sentence_starts(&self) -> &[u64] {
        &self.sentence_starts
    }
}

fn verify_sha256(path: &Path, bytes: &[u8], expected: &str) -> Result<(), DataError> {
    let found = sha256_hex(bytes);
    if found == expected {
        Ok(())
    } else {
        Err(DataError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_owned(),
            found,
        })
    }
}

fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    word.copy_from_slice(bytes);
    u64::from_le_bytes(word)
}

/// Checks an index file against its split and returns its document and sentence starts.
fn parse_index(
    path: &Path,
    bytes: &[u8],
    split: &SplitInfo,
) -> Result<(Vec<u64>, Vec<u64>), DataError> {
    let bad = |message: String| DataError::Index {
        path: path.to_path_buf(),
        message,
    };
    if bytes.len() < INDEX_HEADER_BYTES || &bytes[..8] != INDEX_MAGIC {
        return Err(bad("not a ferry index (no FERRYIDX header)".to_owned()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != INDEX_VERSION {
        return Err(bad(format!(
            "version {version}, this reader knows {INDEX_VERSION}"
        )));
    }
    let n_docs = le_u64(&bytes[16..24]);
    let n_sents = le_u64(&bytes[24..32]);
    if n_docs != split.documents || n_sents != split.sentences {
        return Err(bad(format!(
            "{n_docs} documents and {n_sents} sentences, the manifest says {} and {}",
            split.documents, split.sentences
        )));
    }
    let expected_len = n_docs
        .checked_add(n_sents)
        .and_then(|n| n.checked_add(2))
        .and_then(|n| n.checked_mul(8))
        .and_then(|n| n.checked_add(INDEX_HEADER_BYTES as u64));
    if expected_len != Some(bytes.len() as u64) {
        return Err(bad(format!(
            "{} bytes, expected {} for {n_docs} documents and {n_sents} sentences",
            bytes.len(),
            expected_len.map_or_else(|| "more than 2^64".to_owned(), |n| n.to_string())
        )));
    }
    // The length check above makes these in bounds.
    let (docs, sents) = bytes[INDEX_HEADER_BYTES..].split_at((n_docs as usize + 1) * 8);
    let doc_starts: Vec<u64> = docs.chunks_exact(8).map(le_u64).collect();
    let sentence_starts: Vec<u64> = sents.chunks_exact(8).map(le_u64).collect();
    check_offsets(&doc_starts, split.tokens, "document").map_err(bad)?;
    check_offsets(&sentence_starts, split.tokens, "sentence").map_err(bad)?;
    Ok((doc_starts, sentence_starts))
}

fn check_offsets(offsets: &[u64], total: u64, what: &str) -> Result<(), String> {
    if offsets.first() != Some(&0) {
        return Err(format!("the first {what} start is not 0"));
    }
    if let Some(i) = offsets.windows(2).position(|w| w[0] > w[1]) {
        return Err(format!("{what} starts go backwards at entry {}", i + 1));
    }
    match offsets.last() {
        Some(&last) if last == total => Ok(()),
        last => Err(format!(
            "the last {what} offset is {last:?}, the split has {total} tokens"
        )),
    }
}

/// Writes one split: tokens into shards of at most `shard_tokens` tokens, then the index.
pub(crate) struct SplitWriter {
    dir: PathBuf,
    split: String,
    token_bytes: u8,
    shard_tokens: u64,
    shards: Vec<ShardInfo>,
    open: Option<OpenShard>,
    doc_starts: Vec<u64>,
    sentence_starts: Vec<u64>,
    tokens: u64,
    buf: Vec<u8>,
}

struct OpenShard {
    path: PathBuf,
    file: BufWriter<File>,
    hasher: Sha256,
    tokens: u64,
}

impl SplitWriter {
    pub(crate) fn new(dir: &Path, split: &str, token_bytes: u8, shard_tokens: u64) -> Self {
        SplitWriter {
            dir: dir.to_path_buf(),
            split: split.to_owned(),
            token_bytes,
            shard_tokens,
            shards: Vec::new(),
            open: None,
            doc_starts: Vec::new(),
            sentence_starts: Vec::new(),
            tokens: 0,
            buf: Vec::new(),
        }
    }

    /// Appends one document: its tokens, EOS included, and the offset of each of its
    /// sentences relative to its first token. Ids must fit in `token_bytes`.
    pub(crate) fn push_document(
        &mut self,
        tokens: &[u32],
        sentence_starts: &[u64],
    ) -> Result<(), DataError> {
        self.doc_starts.push(self.tokens);
        let doc_start = self.tokens;
        self.sentence_starts
            .extend(sentence_starts.iter().map(|&s| doc_start + s));
        let mut rest = tokens;
        while !rest.is_empty() {
            let mut shard = match self.open.take() {
                Some(shard) if shard.tokens < self.shard_tokens => shard,
                full => {
                    if let Some(shard) = full {
                        self.close(shard)?;
                    }
                    self.create_shard()?
                }
            };
            let room = (self.shard_tokens - shard.tokens).min(rest.len() as u64) as usize;
            let (chunk, tail) = rest.split_at(room);
            self.buf.clear();
            for &id in chunk {
                if self.token_bytes == 2 {
                    self.buf.extend_from_slice(&(id as u16).to_le_bytes());
                } else {
                    self.buf.extend_from_slice(&id.to_le_bytes());
                }
            }
            shard
                .file
                .write_all(&self.buf)
                .map_err(DataError::io(&shard.path))?;
            shard.hasher.update(&self.buf);
            shard.tokens += chunk.len() as u64;
            self.open = Some(shard);
            rest = tail;
        }
        self.tokens += tokens.len() as u64;
        Ok(())
    }

    fn create_shard(&self) -> Result<OpenShard, DataError> {
        let name = format!("{}-{:05}.bin", self.split, self.shards.len());
        let path = self.dir.join(name);
        let file = File::create(&path).map_err(DataError::io(&path))?;
        Ok(OpenShard {
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            tokens: 0,
        })
    }

    fn close(&mut self, shard: OpenShard) -> Result<(), DataError> {
        let OpenShard {
            path,
            mut file,
            hasher,
            tokens,
        } = shard;
        file.flush().map_err(DataError::io(&path))?;
        self.shards.push(ShardInfo {
            file: path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            tokens,
            bytes: tokens * u64::from(self.token_bytes),
            sha256: hex::encode(hasher.finalize()),
        });
        Ok(())
    }

    /// Closes the last shard and writes the index.
    pub(crate) fn finish(mut self) -> Result<SplitInfo, DataError> {
        if let Some(shard) = self.open.take() {
            self.close(shard)?;
        }
        let mut index = Vec::with_capacity(
            INDEX_HEADER_BYTES + 8 * (self.doc_starts.len() + self.sentence_starts.len() + 2),
        );
        index.extend_from_slice(INDEX_MAGIC);
        index.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        index.extend_from_slice(&0u32.to_le_bytes());
        index.extend_from_slice(&(self.doc_starts.len() as u64).to_le_bytes());
        index.extend_from_slice(&(self.sentence_starts.len() as u64).to_le_bytes());
        for offsets in [&self.doc_starts, &self.sentence_starts] {
            for &offset in offsets.iter().chain([&self.tokens]) {
                index.extend_from_slice(&offset.to_le_bytes());
            }
        }
        let index_file = format!("{}.idx", self.split);
        let path = self.dir.join(&index_file);
        fs::write(&path, &index).map_err(DataError::io(&path))?;
        Ok(SplitInfo {
            tokens: self.tokens,
            documents: self.doc_starts.len() as u64,
            sentences: self.sentence_starts.len() as u64,
            shards: self.shards,
            index_file,
            index_sha256: sha256_hex(&index),
        })
    }
}
