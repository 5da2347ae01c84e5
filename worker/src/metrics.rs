//! The run's metrics log: one JSON object per line in `metrics.jsonl`.

use crate::error::{EngineError, Result};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log for appending. When resuming from `keep_through_step`, records of later
    /// steps (written after that checkpoint, then lost with the process) are dropped first so
    /// the log reads as one uninterrupted run.
    pub fn open(path: &Path, keep_through_step: Option<u64>) -> Result<Self> {
        if let Some(last) = keep_through_step {
            if path.exists() {
                let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= last)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
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
        })
    }

    pub fn write(&mut self, record: &Value) -> Result<()> {
        let line = format!("{record}\n");
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| EngineError::io(&self.path, e))
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
