//! The layout of a run directory, shared by the engine that writes it and the coordinator
//! that must refuse to start a new job over another job's: `checkpoints/step-00000100/` per
//! checkpoint and `metrics.jsonl` beside them.

use std::io;
use std::path::{Path, PathBuf};

/// The directory of checkpoints inside a run directory.
pub const CHECKPOINTS_DIR: &str = "checkpoints";
/// One JSON line per logged step.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Where the checkpoint of `step` lives.
pub fn checkpoint_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir
        .join(CHECKPOINTS_DIR)
        .join(format!("step-{step:08}"))
}

/// The checkpoint directories of a run, oldest first; none when it has no `checkpoints/`.
/// Hidden temp directories of unfinished checkpoints are not `step-*` and are left out.
pub fn checkpoint_dirs(run_dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let root = run_dir.join(CHECKPOINTS_DIR);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Why a new job may not start in `run_dir`: it already holds another run's checkpoints or
/// metrics, which the new job would mix with its own, prune or overwrite. `None` when it is
/// free (absent, empty, or holding only other files such as a coordinator state directory).
pub fn held_by_another_run(run_dir: &Path) -> io::Result<Option<String>> {
    let checkpoints = checkpoint_dirs(run_dir)?;
    if let Some((newest, _)) = checkpoints.last() {
        return Ok(Some(format!(
            "already holds {} checkpoint(s) of another run (newest: step {newest})",
            checkpoints.len()
        )));
    }
    match std::fs::metadata(run_dir.join(METRICS_FILE)) {
        Ok(m) if m.len() > 0 => Ok(Some(format!(
            "already holds another run's {METRICS_FILE} ({} bytes)",
            m.len()
        ))),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_are_listed_oldest_first_and_a_run_with_any_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        assert!(held_by_another_run(&run).unwrap().is_none(), "absent");
        std::fs::create_dir_all(run.join("coordinator")).unwrap();
        std::fs::write(run.join(METRICS_FILE), "").unwrap();
        assert!(
            held_by_another_run(&run).unwrap().is_none(),
            "state dir, empty metrics"
        );
        for step in [20, 3] {
            std::fs::create_dir_all(checkpoint_dir(&run, step)).unwrap();
        }
        std::fs::create_dir_all(run.join(CHECKPOINTS_DIR).join(".tmp-step-5")).unwrap();
        let steps: Vec<u64> = checkpoint_dirs(&run).unwrap().iter().map(|c| c.0).collect();
        assert_eq!(steps, [3, 20]);
        let why = held_by_another_run(&run).unwrap().unwrap();
        assert!(
            why.contains("2 checkpoint(s)") && why.contains("step 20"),
            "{why}"
        );
    }

    #[test]
    fn a_run_with_metrics_but_no_checkpoint_is_held() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), "{\"step\":1}\n").unwrap();
        let why = held_by_another_run(dir.path()).unwrap().unwrap();
        assert!(why.contains(METRICS_FILE), "{why}");
    }
}
