//! Shared helpers for the integration tests: the real `ferry` binary, the shared data, the
//! project's Python venv, and prepared-shard fixtures built once per test binary.
#![allow(dead_code)]

pub mod cluster;
pub mod dp;
pub mod netns;
pub mod observe;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Model and batch options for a two-step `ferry train` that finishes in about a second.
pub const TWO_STEP_RUN: &[&str] = &[
    "--size",
    "tiny",
    "--seq-len",
    "32",
    "--steps",
    "2",
    "--global-batch",
    "2",
    "--micro-batch",
    "2",
    "--eval-sequences",
    "2",
];

pub fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.env("RUST_BACKTRACE", "0");
    c
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn data_dir() -> PathBuf {
    std::env::var_os("FERRY_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/data"))
}

pub fn python() -> PathBuf {
    root().join(".venv/bin/python")
}

pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{:?} failed ({}):\nstdout: {}\nstderr: {}",
        cmd,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command that must fail cleanly: non-zero exit, no panic, and exactly one line on
/// stderr, which is returned.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "{cmd:?} should have failed; stderr: {stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "{cmd:?}: exit {:?} (a panic exits 101); stderr: {stderr}",
        out.status
    );
    assert!(!stderr.contains("panicked"), "{cmd:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{cmd:?}: expected one error line, got: {stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{cmd:?}: {stderr}");
    lines[0].to_string()
}

/// The shared WikiText + books corpus prepared once per test binary for GPT-2 (byte-level
/// BPE, vocabulary 8192).
pub fn prepared_shared_corpus() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| prepare_shared_corpus("gpt2"))
}

/// The same corpus prepared for `family` (`gpt`: BPE, `bert`: WordPiece), once per binary.
pub fn prepared_shared_corpus_for(family: &str) -> &'static Path {
    static GPT: OnceLock<PathBuf> = OnceLock::new();
    static BERT: OnceLock<PathBuf> = OnceLock::new();
    match family {
        "gpt2" => prepared_shared_corpus(),
        "gpt" => GPT.get_or_init(|| prepare_shared_corpus("gpt")),
        "bert" => BERT.get_or_init(|| prepare_shared_corpus("bert")),
        other => panic!("no prepared corpus for {other}"),
    }
}

fn prepare_shared_corpus(family: &str) -> PathBuf {
    let data = data_dir();
    assert!(
        data.join("wikitext").is_dir(),
        "shared data not found at {}: set FERRY_DATA_DIR",
        data.display()
    );
    let out = scratch(&format!("prepared-shared-{family}"));
    run_ok(
        ferry()
            .args(["prepare", "--no-progress", "--model", family, "--output"])
            .arg(&out)
            .arg("--input")
            .arg(data.join("wikitext"))
            .arg(data.join("books")),
    );
    out
}

/// A fresh directory under the target dir's scratch space, unique to this test process.
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
    dir
}

pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// (step, value) of every record with `event` == `kind` that has `field`.
pub fn series(records: &[serde_json::Value], kind: &str, field: &str) -> Vec<(u64, f64)> {
    records
        .iter()
        .filter(|r| r["event"] == kind)
        .filter_map(|r| Some((r["step"].as_u64()?, r[field].as_f64()?)))
        .collect()
}

/// The names in a directory, sorted (empty when it does not exist).
pub fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Damages a file the way a bad disk or an interrupted copy would: inverts one byte in the
/// middle, keeping its length.
pub fn flip_a_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// Cuts a file to half its length.
pub fn truncate_to_half(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
}
