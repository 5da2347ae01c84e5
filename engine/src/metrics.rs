//! The run's metrics log: one JSON object per line in `metrics.jsonl`.

use crate::error::{EngineError, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
    /// The newest step that has a `"event": "step"` record, in the file as opened or since.
    last_step_record: Option<u64>,
}

fn record_step(line: &str) -> Option<u64> {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| v.get("step").and_then(Value::as_u64))
}

fn is_step_event(line: &str) -> bool {
    serde_json::from_str::<Value>(line)
        .ok()
        .is_some_and(|v| v.get("event").and_then(Value::as_str) == Some("step"))
}

impl MetricsLog {
    /// Opens the log for appending. When resuming from `keep_through_step`, records of later
    /// steps (written after that checkpoint, then lost with the process) are dropped first so
    /// the log reads as one uninterrupted run.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        let mut last_step_record = None;
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| match keep_through_step {
                    Some(last) => record_step(l).is_some_and(|s| s <= last),
                    None => true,
                })
                .collect();
            last_step_record = kept
                .iter()
                .filter(|l| is_step_event(l))
                .filter_map(|l| record_step(l))
                .max();
            if keep_through_step.is_some() {
                let kept: String = kept.iter().map(|l| format!("{l}\n")).collect();
                crate::fsutil::write_atomic(path, kept.as_bytes())?;
            }
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| EngineError::io(path, e))?;
        Ok(MetricsLog {
            path: path.to_path_buf(),
            file,
            last_step_record,
        })
    }

    /// Whether the log already has the `"event": "step"` record of `step` (or of a later one).
    pub fn has_step_record(&self, step: u64) -> bool {
        self.last_step_record.is_some_and(|s| s >= step)
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| EngineError::io(&self.path, e))?;
        if record.get("event").and_then(Value::as_str) == Some("step") {
            if let Some(step) = record.get("step").and_then(Value::as_u64) {
                self.last_step_record = Some(self.last_step_record.map_or(step, |s| s.max(step)));
            }
        }
        Ok(())
    }

    /// Reads every record of a metrics file (for tests and reports).
    pub fn read_all(path: &Path) -> Result<Vec<Value>> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        text.lines()
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| EngineError::file(path, format!("line {}: {e}", i + 1)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn knows_which_step_records_it_holds_after_a_resume_cut_and_after_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::open(&path, None).unwrap();
        assert!(!log.has_step_record(1), "an empty log has no step records");
        for step in 1..=3 {
            log.write(&json!({"event": "step", "step": step, "loss": 1.0}))
                .unwrap();
        }
        log.write(&json!({"event": "eval", "step": 4})).unwrap();
        drop(log);

        let log = MetricsLog::open(&path, None).unwrap();
        assert!(log.has_step_record(3));
        assert!(
            !log.has_step_record(4),
            "an eval record is not a step record"
        );
        drop(log);

        // Resuming from step 2 drops step 3's record, so step 3 is missing again.
        let mut log = MetricsLog::open(&path, Some(2)).unwrap();
        assert!(log.has_step_record(2));
        assert!(!log.has_step_record(3));
        log.write(&json!({"event": "step", "step": 3, "loss": 1.0}))
            .unwrap();
        assert!(log.has_step_record(3));
        let steps: Vec<u64> = MetricsLog::read_all(&path)
            .unwrap()
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3]);
    }
}
