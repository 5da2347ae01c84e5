//! Checkpoint directories: `checkpoints/step-00000100/` holding `model.safetensors` and
//! `config.json` (a `transformers` model directory), `tokenizer.json`, the optimizer moments,
//! the trainer state, and `checksums.json` over all of them.
//!
//! A checkpoint is built in a hidden temp directory and renamed into place, so a crash never
//! leaves a half-written `step-*` directory; checksums catch corruption after the fact.

use crate::error::{EngineError, Result};
use crate::fsutil::{read_json, sha256_file, sync_dir, write_json};
use crate::models::ParamStore;
use crate::optim::AdamW;
use crate::weights;
use ferry_spec::run_dir as layout;
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

/// Checks that `dir` is an intact checkpoint of `step` to continue a run from, and returns
/// its trainer state: its `checksums.json` (every checkpoint ferry writes has one, so one
/// without cannot be told from a damaged one) and every file it lists, and a trainer state
/// of that step.
pub fn verify_checkpoint(dir: &Path, step: u64) -> Result<TrainerState> {
    let sums = dir.join(CHECKSUMS_FILE);
    if !sums.is_file() {
        return Err(EngineError::file(
            sums,
            "is missing: the checkpoint cannot be verified",
        ));
    }
    verify(dir)?;
    let state = read_state(dir)?;
    if state.step != step {
        return Err(EngineError::file(
            dir.join(STATE_FILE),
            format!("is the state of step {}, not {step}", state.step),
        ));
    }
    Ok(state)
}

/// A checkpoint passed over because it does not verify.
#[derive(Debug)]
pub struct Unverified {
    pub step: u64,
    pub dir: PathBuf,
    pub why: EngineError,
}

/// The newest checkpoint of `run_dir` that verifies ([`verify_checkpoint`]), only those below
/// step `below` when given, with the newer ones that do not: newest first.
pub fn newest_verified(
    run_dir: &Path,
    below: Option<u64>,
) -> Result<(Option<(u64, PathBuf)>, Vec<Unverified>)> {
    let mut skipped = Vec::new();
    for (step, dir) in list(run_dir)?.into_iter().rev() {
        if below.is_some_and(|b| step >= b) {
            continue;
        }
        match verify_checkpoint(&dir, step) {
            Ok(_) => return Ok((Some((step, dir)), skipped)),
            Err(why) => skipped.push(Unverified { step, dir, why }),
        }
    }
    Ok((None, skipped))
}

/// Renames a checkpoint that does not verify out of the `step-*` names, to
/// `corrupt-step-…` beside it (`.1`, `.2`, … when taken), and returns the new path. Left in
/// place it would be the newest checkpoint still: [`prune`] would keep it and delete the good
/// ones written after the run went on from an older one.
pub fn set_aside(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| EngineError::file(dir, "does not name a directory"))?
        .to_string_lossy()
        .into_owned();
    let parent = dir.parent().unwrap_or(Path::new("."));
    let base = format!("corrupt-{name}");
    let mut to = parent.join(&base);
    let mut n = 0;
    while to.exists() {
        n += 1;
        to = parent.join(format!("{base}.{n}"));
    }
    std::fs::rename(dir, &to).map_err(|e| EngineError::io(dir, e))?;
    sync_dir(parent)?;
    Ok(to)
}

/// Loads checkpoint `dir`, already verified ([`verify_checkpoint`]) with trainer state
/// `state`, as `ferry train --resume` and a data-parallel rank do: the state's seed must be
/// the run's `seed`; the model's weights go into `ps` (names with or without `base_prefix`)
/// and the optimizer's moments into `opt`. Every fault of the files is an error naming the
/// file.
pub fn load(
    dir: &Path,
    state: TrainerState,
    ps: &ParamStore,
    opt: &mut AdamW,
    seed: u64,
    base_prefix: &str,
) -> Result<TrainerState> {
    if state.seed != seed {
        return Err(EngineError::file(
            dir,
            format!(
                "was trained with seed {}, the run config says {seed}",
                state.seed
            ),
        ));
    }
    let model_path = dir.join(MODEL_FILE);
    weights::load_into(
        ps,
        &weights::load_safetensors(&model_path)?,
        base_prefix,
        &model_path,
    )?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    opt.load_state(
        &weights::load_safetensors(&opt_path)?,
        state.optimizer_steps,
        &opt_path,
    )?;
    Ok(state)
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

    /// A checkpoint of `step` as the engine writes one, with a trainer state of that step.
    fn fake_checkpoint(run_dir: &Path, step: u64) -> PathBuf {
        save(run_dir, step, |d| {
            crate::fsutil::write_atomic(&d.join(MODEL_FILE), &[step as u8; 64])?;
            write_json(
                &d.join(STATE_FILE),
                &TrainerState {
                    step,
                    samples_seen: 0,
                    tokens_seen: 0,
                    seed: 1,
                    rng_derivation: String::new(),
                    optimizer_steps: step as i64,
                    last_loss: None,
                },
            )
        })
        .unwrap()
    }

    /// Issue 22: resuming passes over checkpoints that do not verify (a flipped byte, a
    /// truncated file, no checksums, a state of another step), newest first, and names why.
    #[test]
    fn the_newest_checkpoint_that_verifies_is_found_and_the_others_named() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path();
        let dirs: Vec<PathBuf> = (1..=6).map(|s| fake_checkpoint(run, s)).collect();
        let mut model = std::fs::read(dirs[5].join(MODEL_FILE)).unwrap();
        model[10] ^= 0xff;
        std::fs::write(dirs[5].join(MODEL_FILE), &model).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dirs[4].join(MODEL_FILE))
            .unwrap();
        f.set_len(3).unwrap();
        std::fs::remove_file(dirs[3].join(CHECKSUMS_FILE)).unwrap();
        // Step 3's directory holds step 2's files, checksums and all.
        std::fs::remove_dir_all(&dirs[2]).unwrap();
        std::fs::rename(&dirs[1], &dirs[2]).unwrap();
        let (found, skipped) = newest_verified(run, None).unwrap();
        assert_eq!(found, Some((1, dirs[0].clone())));
        let why: Vec<(u64, String)> = skipped
            .iter()
            .map(|u| (u.step, u.why.to_string()))
            .collect();
        assert_eq!(why.len(), 4, "{why:?}");
        assert!(
            why[0].0 == 6 && why[0].1.contains("checksum mismatch"),
            "{why:?}"
        );
        assert!(why[0].1.contains(MODEL_FILE), "{why:?}");
        assert!(
            why[1].0 == 5 && why[1].1.contains("checksum mismatch"),
            "{why:?}"
        );
        assert!(
            why[2].0 == 4 && why[2].1.contains("cannot be verified"),
            "{why:?}"
        );
        assert!(
            why[3].0 == 3 && why[3].1.contains("state of step 2"),
            "{why:?}"
        );
        // Below a step: only older ones are looked at.
        let (found, skipped) = newest_verified(run, Some(2)).unwrap();
        assert_eq!((found, skipped.len()), (Some((1, dirs[0].clone())), 0));
        let (found, _) = newest_verified(run, Some(1)).unwrap();
        assert_eq!(found, None);

        let aside = set_aside(&dirs[5]).unwrap();
        assert_eq!(aside, run.join("checkpoints/corrupt-step-00000006"));
        fake_checkpoint(run, 6);
        let again = set_aside(&dirs[5]).unwrap();
        assert_eq!(again, run.join("checkpoints/corrupt-step-00000006.1"));
        let steps: Vec<u64> = list(run).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, [1, 3, 4, 5], "set aside means out of the list");
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
