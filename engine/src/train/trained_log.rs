//! A worker's own record of what it trained, for tests and debugging: with
//! `FERRY_TRAINED_SAMPLES_DIR=DIR` set, a data-parallel worker process appends one JSON line
//! per step it trains to `DIR/worker-<pid>.jsonl`:
//!
//! ```text
//! {"step":7,"generation":2,"rank":1,"world_size":2,"worker_id":"…","first_micro_batch":4,
//!  "micro_batches":[[812,90,…],[…]]}
//! ```
//!
//! `step` is the 0-based index of the step (the ledger's), `micro_batches` the sequence ids
//! each micro-batch fed through the model, as the engine fed them. A line is written before
//! the step's last backward pass, so before any of this rank's gradients leave the process:
//! a step that counts (its all-reduce finished on some rank) has a line from every rank that
//! trained it, and a step that did not (a peer died, the group changed) may have lines too.
//! Tests check exactly-once against these records instead of the coordinator's own ledger.

use crate::error::{EngineError, Result};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;

/// The directory of the records; unset, nothing is recorded.
pub const TRAINED_SAMPLES_DIR_ENV: &str = "FERRY_TRAINED_SAMPLES_DIR";

pub struct TrainedSamplesLog {
    path: PathBuf,
    file: std::fs::File,
    generation: u64,
    rank: u32,
    world_size: u32,
    worker_id: String,
}

impl TrainedSamplesLog {
    /// The log [`TRAINED_SAMPLES_DIR_ENV`] asks for, if it does.
    pub fn from_env() -> Result<Option<TrainedSamplesLog>> {
        let Some(dir) = std::env::var_os(TRAINED_SAMPLES_DIR_ENV).filter(|d| !d.is_empty()) else {
            return Ok(None);
        };
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::io(&dir, e))?;
        let path = dir.join(format!("worker-{}.jsonl", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| EngineError::io(&path, e))?;
        eprintln!(
            "{TRAINED_SAMPLES_DIR_ENV}: recording the sequences trained in {}",
            path.display()
        );
        Ok(Some(TrainedSamplesLog {
            path,
            file,
            generation: 0,
            rank: 0,
            world_size: 1,
            worker_id: String::new(),
        }))
    }

    /// The group the following steps are trained in.
    pub fn enter(&mut self, generation: u64, rank: u32, world_size: u32, worker_id: &str) {
        self.generation = generation;
        self.rank = rank;
        self.world_size = world_size;
        self.worker_id = worker_id.to_string();
    }

    /// One step's line, in one write: a process killed meanwhile leaves at most a last line
    /// without its newline.
    pub fn record(
        &mut self,
        step: u64,
        first_micro_batch: u64,
        micro_batches: &[Vec<u64>],
    ) -> Result<()> {
        let mut line = json!({
            "step": step,
            "generation": self.generation,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker_id": self.worker_id,
            "first_micro_batch": first_micro_batch,
            "micro_batches": micro_batches,
        })
        .to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| EngineError::io(&self.path, e))
    }
}
