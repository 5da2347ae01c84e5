//! `ferry data fetch`: download the public corpora into the data layout ferry reads.
//!
//! For each source: download into `<data>/.ferry-fetch/<name>.part` (continuing a part left by
//! an interrupted run), check the download against its pinned digests, unpack the listed files
//! into a staging directory and check each of those, then move them into place and write a
//! stamp. A file that fails a check is deleted, never left where ferry would read it. A source
//! whose stamp matches the files on disk is skipped without touching the network, so running
//! the command twice does nothing the second time.

pub mod cli;
mod digest;
mod download;
mod install;
pub mod sources;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use download::Patience;
pub use sources::{Pins, Source, Sources};

use digest::Digest;
use download::Downloader;

/// Where the downloads, staging directories and stamps live, inside the data directory.
pub const WORK_DIR: &str = ".ferry-fetch";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{origin}: {reason}")]
    Sources { origin: String, reason: String },
    #[error("{source_name}: could not download {url}: {reason} ({attempts} attempt{s})", s = if *attempts == 1 { "" } else { "s" })]
    Download {
        source_name: String,
        url: String,
        reason: String,
        attempts: u32,
    },
    #[error("{source_name}: {what} has {algorithm} {got}, but {expected} is pinned; deleted the download, so the next run starts clean")]
    Mismatch {
        source_name: String,
        what: String,
        algorithm: &'static str,
        expected: String,
        got: String,
    },
    #[error("{source_name}: {reason}")]
    Install { source_name: String, reason: String },
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

#[derive(Debug, Clone)]
pub struct Options {
    pub patience: Patience,
    /// Replace files in the data directory that differ from what the sources give.
    pub overwrite: bool,
    /// Progress bars (a terminal) or one line per step (a log).
    pub show_progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            patience: Patience {
                timeout: Duration::from_secs(30),
                retries: 3,
                backoff: Duration::from_secs(1),
            },
            overwrite: false,
            show_progress: false,
        }
    }
}

/// What happened to one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Its stamp matched the files on disk; nothing was downloaded.
    UpToDate,
    /// Downloaded, checked and installed.
    Fetched {
        download_bytes: u64,
        download_sha256: String,
        files: usize,
    },
}

/// Fetch `sources` into `data_dir`, one after another. Stops at the first failure, which names
/// the source; whatever was fetched before it stays.
pub fn fetch(
    data_dir: &Path,
    sources: &[&Source],
    options: &Options,
) -> Result<Vec<(String, Outcome)>, FetchError> {
    let work = data_dir.join(WORK_DIR);
    std::fs::create_dir_all(&work).map_err(|e| io(&work, e))?;
    let _lock = install::WorkLock::take(&work)?;
    let downloader = Downloader::new(options.patience.clone(), options.show_progress);
    let mut outcomes = Vec::new();
    for source in sources {
        let outcome = if install::is_up_to_date(data_dir, source) {
            eprintln!("{}: up to date", source.name);
            Outcome::UpToDate
        } else {
            fetch_one(data_dir, &work, source, &downloader, options)?
        };
        outcomes.push((source.name.clone(), outcome));
    }
    Ok(outcomes)
}

fn fetch_one(
    data_dir: &Path,
    work: &Path,
    source: &Source,
    downloader: &Downloader,
    options: &Options,
) -> Result<Outcome, FetchError> {
    let part = work.join(format!("{}.part", source.name));
    let mut last = None;
    for url in &source.urls {
        match downloader.fetch(&source.name, url, &part) {
            Ok(()) => {
                last = None;
                break;
            }
            Err((reason, attempts)) => {
                if source.urls.len() > 1 {
                    eprintln!("{}: {url} failed: {reason}", source.name);
                }
                last = Some(FetchError::Download {
                    source_name: source.name.clone(),
                    url: url.clone(),
                    reason,
                    attempts,
                });
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    let got = Digest::of_file(&part)?;
    if let Err(e) = check(
        &source.name,
        "the download",
        &got,
        &source.pins,
        source.min_bytes,
    ) {
        std::fs::remove_file(&part).ok();
        return Err(e);
    }
    if let Some(why) = &source.unpinned {
        eprintln!(
            "WARNING: {}: the download is not pinned ({why}); it has sha256 {} and {} bytes. \
             Once you trust it, add `sha256 = \"{}\"` to the source.",
            source.name, got.sha256, got.bytes, got.sha256
        );
    }
    let files = install::install(data_dir, work, source, &part, &got, options.overwrite)?;
    Ok(Outcome::Fetched {
        download_bytes: got.bytes,
        download_sha256: got.sha256,
        files,
    })
}

/// Check a file's digest against its pins and its size against `min_bytes`.
fn check(
    source_name: &str,
    what: &str,
    got: &Digest,
    pins: &Pins,
    min_bytes: Option<u64>,
) -> Result<(), FetchError> {
    let mismatch = |algorithm, expected: &String, got: &String| FetchError::Mismatch {
        source_name: source_name.to_string(),
        what: what.to_string(),
        algorithm,
        expected: expected.clone(),
        got: got.clone(),
    };
    if let Some(expected) = &pins.sha256 {
        if expected != &got.sha256 {
            return Err(mismatch("sha256", expected, &got.sha256));
        }
    }
    if let Some(expected) = &pins.sha1 {
        if expected != &got.sha1 {
            return Err(mismatch("sha1", expected, &got.sha1));
        }
    }
    if let Some(min) = min_bytes {
        if got.bytes < min {
            return Err(FetchError::Install {
                source_name: source_name.to_string(),
                reason: format!(
                    "{what} is {} bytes, less than the {min} expected (a truncated file or an error \
                     page?); deleted the download",
                    got.bytes
                ),
            });
        }
    }
    Ok(())
}

fn io(path: &Path, e: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}
