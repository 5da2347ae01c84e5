//! Reading text corpora (WikiText "tokens" files and plain-text books) into documents.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::textcls::{read_labelled_csv_encoded, CsvEncoding, Example, Part, Split};
use crate::DataError;

/// Books are cut into pieces of at most this many lines, so that a long book spreads over many
/// documents (and so over both splits) instead of being one giant unit.
const MAX_BOOK_LINES: usize = 200;

/// Lines that start a new chapter-like part of a book, and so a new document.
const CHAPTER_PREFIXES: [&str; 6] = ["CHAPTER", "Chapter", "BOOK ", "Book ", "ACT ", "PART "];

/// A unit of text that stays together in one split, followed by one end-of-text token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    /// The name of the file it came from.
    pub source: String,
    pub title: Option<String>,
    /// Sentence-like lines, trimmed and never empty.
    pub lines: Vec<String>,
}

impl Document {
    /// The text that gets tokenized: the lines joined with newlines.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// Expands files, directories (their visible regular files, not recursively) and glob
/// patterns into a sorted list of files without duplicates. A pattern that matches no file is
/// an error, since it is almost always a typo.
pub fn expand_inputs(patterns: &[String]) -> Result<Vec<PathBuf>, DataError> {
    let mut paths = Vec::new();
    for pattern in patterns {
        let found = expand_one(pattern)?;
        if found.is_empty() {
            return Err(DataError::NoInputs {
                pattern: pattern.clone(),
            });
        }
        paths.extend(found);
    }
    paths.sort();
    paths.dedup();
    Ok(paths)
}

fn expand_one(pattern: &str) -> Result<Vec<PathBuf>, DataError> {
    let path = Path::new(pattern);
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if path.is_dir() {
        return list_dir(path);
    }
    let options = glob::MatchOptions {
        require_literal_leading_dot: true,
        ..Default::default()
    };
    let entries = glob::glob_with(pattern, options).map_err(|e| DataError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad glob pattern: {e}"),
        ),
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::Io {
            path: e.path().to_path_buf(),
            source: e.into(),
        })?;
        if entry.is_file() {
            files.push(entry);
        }
    }
    Ok(files)
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).map_err(DataError::io(dir))? {
        let path = entry.map_err(DataError::io(dir))?.path();
        let hidden = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with('.'));
        // `is_file` follows symlinks, so a link to a file counts as a file.
        if !hidden && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads one corpus file into documents, detecting its format: WikiText when the name ends in
/// `.tokens` or `.raw` or the first non-blank line is an article title (` = Title = `),
/// otherwise a plain-text book with one sentence per line.
pub fn read_documents(path: &Path) -> Result<Vec<Document>, DataError> {
    let bytes = fs::read(path).map_err(DataError::io(path))?;
    let text = decode_text(path, &bytes)?;
    let source = source_name(path);
    let docs = if is_wikitext(path, text) {
        parse_wikitext(&source, text)
    } else {
        parse_book(&source, text)
    };
    if docs.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: path.to_path_buf(),
        });
    }
    Ok(docs)
}

/// How `.csv` inputs are read: a labelled set's texts as unlabelled documents, for
/// pretraining on the fine-tuning task's own text (ULMFiT's target-task language-model stage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsvTexts {
    /// The column holding the text (found by header name, as `ferry finetune` finds it).
    pub text_column: String,
    /// Keep only the records of one part of this `split.json`, so that a model pretrained on
    /// the training texts has never seen the dev and test texts it is scored on.
    pub split: Option<(PathBuf, Part)>,
    /// The CSVs' encoding: the one `ferry finetune` is given for the same file, so that the
    /// language model sees the texts the classifier will.
    pub encoding: CsvEncoding,
}

impl Default for CsvTexts {
    fn default() -> Self {
        CsvTexts {
            text_column: "text".to_owned(),
            split: None,
            encoding: CsvEncoding::Utf8,
        }
    }
}

/// True for the files [`read_csv_documents`] reads: names ending in `.csv`.
pub fn is_csv(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Reads a labelled CSV (the reader of `ferry finetune`: quoted newlines, HTML entities) into
/// one document per record, in record order: its text's non-blank lines, trimmed. With a split,
/// only the records of its chosen part are kept, and a split made for another file (another
/// record count) is refused.
pub fn read_csv_documents(path: &Path, csv: &CsvTexts) -> Result<Vec<Document>, DataError> {
    let set = read_labelled_csv_encoded(path, &csv.text_column, None, None, csv.encoding)?;
    let split = match &csv.split {
        Some((split_path, part)) => Some((Split::load(split_path, &set)?, *part)),
        None => None,
    };
    let source = source_name(path);
    let document = |example: &Example| Document {
        source: source.clone(),
        title: None,
        lines: example
            .text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    let docs: Vec<Document> = match &split {
        Some((split, part)) => split.examples(*part, &set).map(document).collect(),
        None => set.examples.iter().map(document).collect(),
    };
    let docs: Vec<Document> = docs.into_iter().filter(|d| !d.lines.is_empty()).collect();
    if docs.is_empty() {
        return Err(DataError::EmptyCorpus {
            path: path.to_path_buf(),
        });
    }
    Ok(docs)
}

/// The name a document records as its source: the file's name without its directories.
fn source_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Checks that `bytes` are UTF-8 text and returns them without a byte-order mark.
fn decode_text<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str, DataError> {
    if let Some(offset) = bytes.iter().position(|&b| b == 0) {
        return Err(DataError::Binary {
            path: path.to_path_buf(),
            offset: offset as u64,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let bad = e.valid_up_to();
        let newlines = bytes[..bad].iter().filter(|&&b| b == b'\n').count();
        DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            line: newlines as u64 + 1,
            byte_offset: bad as u64,
        }
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

fn is_wikitext(path: &Path, text: &str) -> bool {
    let by_name = path
        .extension()
        .is_some_and(|ext| ext == "tokens" || ext == "raw");
    by_name
        || text
            .lines()
            .find(|line| !line.trim().is_empty())
            .is_some_and(|line| wiki_title(line).is_some())
}

/// The title in a WikiText article title line ` = Title = `; `None` for any other line,
/// section headings ` = = Heading = = ` included.
fn wiki_title(line: &str) -> Option<&str> {
    let inner = line.trim().strip_prefix("= ")?.strip_suffix(" =")?.trim();
    let is_title = !inner.is_empty() && !inner.starts_with('=') && !inner.ends_with('=');
    is_title.then_some(inner)
}

/// One document per article. The title line stays in the article's text, as in the WikiText
/// language-modelling benchmark; text before the first title is one untitled document.
fn parse_wikitext(source: &str, text: &str) -> Vec<Document> {
    let mut docs = Vec::new();
    let mut current = Document {
        source: source.to_owned(),
        title: None,
        lines: Vec::new(),
    };
    for line in text.lines().map(str::trim) {
        if let Some(title) = wiki_title(line) {
            let next = Document {
                source: source.to_owned(),
                title: Some(title.to_owned()),
                lines: vec![line.to_owned()],
            };
            let done = std::mem::replace(&mut current, next);
            if !done.lines.is_empty() {
                docs.push(done);
            }
        } else if line.starts_with('=') && line.ends_with('=') {
            // A section heading: a line of its own.
            current.lines.push(line.to_owned());
        } else {
            current
                .lines
                .extend(split_sentences(line).into_iter().map(str::to_owned));
        }
    }
    if !current.lines.is_empty() {
        docs.push(current);
    }
    docs
}

/// Splits a WikiText paragraph after each lone ` . `, ` ? ` or ` ! ` token. WikiText is
/// space-tokenized, so `@.@` inside numbers and abbreviations like `U.S.` are not cut.
fn split_sentences(paragraph: &str) -> Vec<&str> {
    let bytes = paragraph.as_bytes();
    let mut sentences = Vec::new();
    let mut start = 0;
    for i in 1..bytes.len() {
        let ends_sentence = matches!(bytes[i], b'.' | b'?' | b'!')
            && bytes[i - 1] == b' '
            && bytes.get(i + 1).is_none_or(|&b| b == b' ');
        if ends_sentence {
            sentences.push(&paragraph[start..=i]);
            start = i + 1;
        }
    }
    sentences.push(&paragraph[start..]);
    sentences
        .into_iter()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A book, one sentence per line: an optional `[ Title by Author Year ]` header names it, and
/// it is cut into documents at chapter headings and every `MAX_BOOK_LINES` lines.
fn parse_book(source: &str, text: &str) -> Vec<Document> {
    let mut lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    let mut title = None;
    if let Some((header, rest)) = lines.first().copied().and_then(book_header) {
        title = Some(header.to_owned());
        // Some books start their text on the header line itself.
        if rest.is_empty() {
            lines.remove(0);
        } else {
            lines[0] = rest;
        }
    }
    let new_doc = || Document {
        source: source.to_owned(),
        title: title.clone(),
        lines: Vec::new(),
    };
    let mut docs = Vec::new();
    let mut current = new_doc();
    for line in lines {
        let is_chapter = CHAPTER_PREFIXES.iter().any(|p| line.starts_with(p));
        if current.lines.len() >= MAX_BOOK_LINES || (is_chapter && !current.lines.is_empty()) {
            docs.push(std::mem::replace(&mut current, new_doc()));
        }
        current.lines.push(line.to_owned());
    }
    if !current.lines.is_empty() {
        docs.push(current);
    }
    docs
}

/// Splits a `[ Title by Author Year ]` header line into the title and any text after it.
fn book_header(line: &str) -> Option<(&str, &str)> {
    let (inner, rest) = line.strip_prefix('[')?.split_once(']')?;
    Some((inner.trim(), rest.trim()))
}
