//! What the labelled-text tests share: the airline file from the shared data folder, and small
//! files written on the spot.

use std::fs;
use std::path::{Path, PathBuf};

use ferry_dataset::textcls::{read_labelled_csv, LabelledSet};

fn data_dir() -> PathBuf {
    std::env::var_os("FERRY_DATA_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data")),
        PathBuf::from,
    )
}

/// `airline/Tweets.csv` of the shared data. The tests need it: a missing file fails them
/// rather than skipping them, so a wrong path cannot pass unnoticed.
pub fn tweets() -> PathBuf {
    let path = data_dir().join("airline/Tweets.csv");
    assert!(
        path.is_file(),
        "{} not found: set FERRY_DATA_DIR to the shared data folder",
        path.display()
    );
    path
}

pub fn read_tweets(path: &Path) -> LabelledSet {
    read_labelled_csv(path, "text", Some("airline_sentiment"), None).unwrap()
}

pub fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

/// Writes `contents` to `dir/name` and returns the path.
#[allow(dead_code)] // not every test file writes files
pub fn write(dir: &Path, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, contents).unwrap();
    path
}
