//! Checkpoint directories: `checkpoints/step-00000100/` holding `model.safetensors` and
//! `config.json` (a `transformers` model directory), `tokenizer.json`, the optimizer moments,
//! the trainer state, and `checksums.json` over all of them.
//!
//! A checkpoint is built in a hidden temp directory and renamed into place, so a crash never
//! leaves a half-written `step-*` directory; checksums catch corruption after the fact.

use crate::error::{EngineError, Result};
use crate::fsutil::{read_json, sha256_file, sync_dir, write_json};
use ferry_common::run_dir as layout;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";
pub const CHECKSUMS_FILE: &str = "checksums.json";

/// Everything besides tensors needed to continue a run exactly.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps completed; the next step to run has this 0-based index.
    pub step: u64,
    /// Sequences consumed from the sample stream (`step * global_batch`): the data cursor.
    pub samples_seen: u64,
    pub tokens_seen: u64,
    /// The run's seed. Every random choice (sample order, dropout masks) is derived from it and
    /// the step and micro-batch indices, so this plus `step` is the complete RNG state.
    pub seed: u64,
    pub rng_derivation: String,
    pub optimizer_steps: i64,
    pub last_loss: Option<f64>,
}

/// Writes a checkpoint for `step` under `run_dir/checkpoints`; `write_files` fills the temp
/// directory with everything but the checksums.
pub fn save(
    run_dir: &Path,
    step: u64,
    write_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = layout::checkpoint_dir(run_dir, step);
    write_verified_dir(&dest, write_files)?;
    Ok(dest)
}

/// Builds directory `dest` the way checkpoints are built: `write_files` fills a hidden temp
/// directory beside it, `checksums.json` is added, and the whole is fsynced and renamed over
/// `dest`, so readers see the old directory or the complete new one.
pub fn write_verified_dir(
    dest: &Path,
    write_files: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let root = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(root).map_err(|e| EngineError::io(root, e))?;
    let name = dest
        .file_name()
        .ok_or_else(|| EngineError::file(dest, "does not name a directory"))?
        .to_string_lossy()
        .into_owned();
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let built = fill_verified(&tmp, write_files);
    if built.is_err() {
        // Best effort: the build's error is what matters.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    built?;
    if !dest.exists() {
        std::fs::rename(&tmp, dest).map_err(|e| EngineError::io(dest, e))?;
        return sync_dir(root);
    }
    // The old directory stays until the new one is in place: set aside, the new one renamed
    // in (the old one put back if that fails), and only then removed.
    let old = root.join(format!(".{name}.old-{}", std::process::id()));
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| EngineError::io(&old, e))?;
    }
    std::fs::rename(dest, &old).map_err(|e| EngineError::io(dest, e))?;
    if let Err(e) = std::fs::rename(&tmp, dest) {
        let _ = std::fs::rename(&old, dest);
        return Err(EngineError::io(dest, e));
    }
    sync_dir(root)?;
    // Best effort: the new directory is in place; a hidden leftover harms nothing.
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Fills `tmp` with `write_files`, then adds `checksums.json`; every file (copies such as
/// `tokenizer.json` included) and the directory itself are flushed to disk.
fn fill_verified(tmp: &Path, write_files: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_files(tmp)?;
    let mut sums = BTreeMap::new();
    for entry in std::fs::read_dir(tmp).map_err(|e| EngineError::io(tmp, e))? {
        let path = entry.map_err(|e| EngineError::io(tmp, e))?.path();
        let file = path
            .file_name()
            .expect("entry has a name")
            .to_string_lossy()
            .into_owned();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| EngineError::io(&path, e))?;
        sums.insert(file, sha256_file(&path)?);
    }
    write_json(&tmp.join(CHECKSUMS_FILE), &sums)?;
    sync_dir(tmp)
}

/// Completed checkpoints of a run, oldest first.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    layout::checkpoint_dirs(run_dir)
        .map_err(|e| EngineError::io(run_dir.join(layout::CHECKPOINTS_DIR), e))
}

pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, p)| p))
}

/// Deletes all but the newest `keep` checkpoints.
pub fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list(run_dir)?;
    let excess = all.len().saturating_sub(keep.max(1));
    for (_, path) in all.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|e| EngineError::io(&path, e))?;
    }
    Ok(())
}

/// Checks every file listed in `checksums.json`. A directory without one (a model from
/// `transformers`) is accepted as it is.
pub fn verify(dir: &Path) -> Result<()> {
    let sums_path = dir.join(CHECKSUMS_FILE);
    if !sums_path.exists() {
        return Ok(());
    }
    let sums: BTreeMap<String, String> = read_json(&sums_path)?;
    for (file, expected) in sums {
        // Keys are plain names of files in this directory: "../x" or "/dev/zero" would make
        // verification read (and hash, possibly forever) a file of someone else's choosing.
        if !is_plain_name(&file) {
            return Err(EngineError::file(
                &sums_path,
                format!(
                    "key {:?} is not a plain file name in this directory",
                    file.chars().take(256).collect::<String>()
                ),
            ));
        }
        let path = dir.join(&file);
        if !path.exists() {
            return Err(EngineError::file(
                &path,
                "listed in checksums.json but missing: the checkpoint is incomplete",
            ));
        }
        let found = sha256_file(&path)?;
        if found != expected {
            return Err(EngineError::Checksum {
                path,
                expected,
                found,
            });
        }
    }
    Ok(())
}

/// One normal path component: not empty, `.`, `..`, absolute or holding a separator.
fn is_plain_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(n)), None) if n == name
    ) && !name.contains('\\')
}

pub fn read_state(dir: &Path) -> Result<TrainerState> {
    read_json(&dir.join(STATE_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fsutil::tests::names;

    /// Issue 22: `checksums.json` names files of its own directory only.
    #[test]
    fn checksum_keys_outside_the_directory_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ckpt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(tmp.path().join("outside.bin"), b"x").unwrap();
        let sha_x = crate::fsutil::sha256_file(&tmp.path().join("outside.bin")).unwrap();
        for key in [
            "../outside.bin",
            "/dev/zero",
            "",
            ".",
            "sub/../../outside.bin",
        ] {
            let sums = std::collections::BTreeMap::from([(key.to_string(), sha_x.clone())]);
            crate::fsutil::write_json(&dir.join(CHECKSUMS_FILE), &sums).unwrap();
            let err = verify(&dir).expect_err(key);
            assert!(
                err.to_string().contains("not a plain file name"),
                "{key:?}: {err}"
            );
        }
        assert!(is_plain_name("model.safetensors"));
        assert!(!is_plain_name("a\\b"));
    }

    /// Issue 22: the old directory stays until the new one is complete; a failed build leaves
    /// it as it was and nothing temporary beside it.
    #[test]
    fn write_verified_dir_replaces_only_when_complete() {
        let tmp = tempfile::tempdir().unwrap();
        let dest = tmp.path().join("model");
        write_verified_dir(&dest, |d| {
            crate::fsutil::write_atomic(&d.join("a.bin"), b"old")
        })
        .unwrap();
        let err = write_verified_dir(&dest, |d| {
            crate::fsutil::write_atomic(&d.join("a.bin"), b"new")?;
            Err(EngineError::file(d, "failed halfway"))
        })
        .unwrap_err();
        assert!(err.to_string().contains("failed halfway"), "{err}");
        assert_eq!(std::fs::read(dest.join("a.bin")).unwrap(), b"old");
        assert_eq!(names(tmp.path()), ["model"]);
        write_verified_dir(&dest, |d| {
            crate::fsutil::write_atomic(&d.join("b.bin"), b"new")
        })
        .unwrap();
        assert_eq!(names(&dest), ["b.bin", CHECKSUMS_FILE]);
        verify(&dest).unwrap();
        assert_eq!(names(tmp.path()), ["model"]);
    }
}
