//! Durable job state in an embedded redb database (`<state dir>/state.redb`).
//!
//! What must survive a `kill -9` of the coordinator: the job spec, the committed step count and
//! the ledger of committed steps (written in one transaction, fsynced), the current generation
//! and its ranks, the scale target, the stop flag and the latest checkpoint. Worker records
//! are written without a flush of their own (they reach the disk with the next durable
//! commit): losing one in a crash only makes that worker join again, and a join storm of
//! thousands of workers does not cost thousands of disk flushes.

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const LEDGER: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger");

const SPEC_KEY: &str = "job_spec";
const JOB_KEY: &str = "job";

#[derive(thiserror::Error, Debug)]
#[error("{}: {message}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub message: String,
}

/// The job's durable scalars.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub job_id: String,
    /// Steps committed so far = the next step to run.
    pub committed: u64,
    /// The newest generation number handed out (forming or formed).
    pub generation: u64,
    /// The formed group, if one is running.
    pub formed: Option<FormedRecord>,
    pub target_workers: u32,
    pub stopped: bool,
    pub checkpoint: Option<CheckpointRecord>,
    /// How many times the job fell back to a checkpoint because no worker held the state.
    pub rollbacks: u64,
    /// Committed steps thrown away by those fallbacks, and so trained twice.
    #[serde(default)]
    pub redone_steps: u64,
    pub next_join_seq: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct FormedRecord {
    pub generation: u64,
    /// Worker ids in rank order.
    pub ranks: Vec<String>,
    pub peers: Vec<String>,
    pub blob: Vec<u8>,
    pub start_step: u64,
    pub source: StateSourceRecord,
    pub checkpoint_path: String,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSourceRecord {
    Held,
    Checkpoint,
    Init,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CheckpointRecord {
    pub step: u64,
    pub path: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct WorkerRecord {
    pub id: String,
    pub host: String,
    pub data_addr: String,
    /// Empty when the worker serves no metrics; absent in state written before it existed.
    #[serde(default)]
    pub metrics_addr: String,
    pub devices: Vec<String>,
    pub pid: u32,
    pub join_seq: u64,
}

/// One committed step: who trained which positions of the sample stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LedgerRecord {
    pub step: u64,
    pub generation: u64,
    pub world_size: u32,
    pub slices: Vec<SliceRecord>,
    /// NaN when no rank reported one (a step recorded late, at rendezvous).
    #[serde(with = "nan_as_null")]
    pub loss: f64,
    pub tokens: u64,
    #[serde(with = "nan_as_null")]
    pub step_time_s: f64,
}

/// JSON has no NaN or infinity: serde_json writes them as `null` and then refuses `null` for
/// an `f64`, which made a ledger holding a late-recorded step unreadable, and the coordinator
/// unable to load its state after a restart. `null` reads back as NaN.
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct SliceRecord {
    pub rank: u32,
    pub worker_id: String,
    pub stream_start: u64,
    pub count: u64,
}

/// Everything read back at start-up.
pub struct Loaded {
    pub spec_toml: String,
    pub job: JobRecord,
    pub workers: Vec<WorkerRecord>,
    pub ledger: Vec<LedgerRecord>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.redb");
        std::fs::create_dir_all(dir).map_err(|e| StoreError {
            path: dir.to_path_buf(),
            message: format!("cannot create the state directory: {e}"),
        })?;
        let db = Database::create(&path).map_err(|e| StoreError {
            path: path.clone(),
            message: format!("cannot open the state database: {e}"),
        })?;
        let store = Store { db, path };
        // Create the tables so that reads never meet a missing table.
        store.write(Durability::Immediate, |txn| {
            txn.open_table(META)?;
            txn.open_table(WORKERS)?;
            txn.open_table(LEDGER)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    fn write(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.err(e))?;
        txn.set_durability(durability);
        f(&txn).map_err(|e| self.err(e))?;
        txn.commit().map_err(|e| self.err(e))
    }

    /// The stored job, if this directory holds one.
    pub fn load(&self) -> Result<Option<Loaded>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let meta = txn.open_table(META).map_err(|e| self.err(e))?;
        let Some(spec) = meta.get(SPEC_KEY).map_err(|e| self.err(e))? else {
            return Ok(None);
        };
        let spec_toml = String::from_utf8(spec.value().to_vec()).map_err(|e| self.err(e))?;
        let job_bytes = meta
            .get(JOB_KEY)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| self.err("the job record is missing"))?;
        let job: JobRecord = serde_json::from_slice(job_bytes.value())
            .map_err(|e| self.err(format!("job record: {e}")))?;
        let mut workers = Vec::new();
        for row in txn
            .open_table(WORKERS)
            .map_err(|e| self.err(e))?
            .iter()
            .map_err(|e| self.err(e))?
        {
            let (_, v) = row.map_err(|e| self.err(e))?;
            workers.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| self.err(format!("worker record: {e}")))?,
            );
        }
        let mut ledger = Vec::new();
        for row in txn
            .open_table(LEDGER)
            .map_err(|e| self.err(e))?
            .iter()
            .map_err(|e| self.err(e))?
        {
            let (_, v) = row.map_err(|e| self.err(e))?;
            ledger.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| self.err(format!("ledger record: {e}")))?,
            );
        }
        Ok(Some(Loaded {
            spec_toml,
            job,
            workers,
            ledger,
        }))
    }

    pub fn init(&self, spec_toml: &str, job: &JobRecord) -> Result<(), StoreError> {
        let job = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        self.write(Durability::Immediate, |txn| {
            let mut meta = txn.open_table(META)?;
            meta.insert(SPEC_KEY, spec_toml.as_bytes())?;
            meta.insert(JOB_KEY, job.as_slice())?;
            Ok(())
        })
    }

    pub fn save_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        let job = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(META)?.insert(JOB_KEY, job.as_slice())?;
            Ok(())
        })
    }

    /// Like [`Store::save_job`] but without a flush; for changes whose loss in a crash is
    /// harmless (the join counter). They reach the disk with the next durable commit.
    pub fn save_job_lazily(&self, job: &JobRecord) -> Result<(), StoreError> {
        let job = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        self.write(Durability::None, |txn| {
            txn.open_table(META)?.insert(JOB_KEY, job.as_slice())?;
            Ok(())
        })
    }

    /// Records a committed step and the new job record atomically.
    pub fn commit_step(&self, entry: &LedgerRecord, job: &JobRecord) -> Result<(), StoreError> {
        let entry_bytes = serde_json::to_vec(entry).map_err(|e| self.err(e))?;
        let job = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(LEDGER)?
                .insert(entry.step, entry_bytes.as_slice())?;
            txn.open_table(META)?.insert(JOB_KEY, job.as_slice())?;
            Ok(())
        })
    }

    /// Forgets committed steps from `from_step` on (a fall-back to an older checkpoint).
    pub fn truncate_ledger(&self, from_step: u64, job: &JobRecord) -> Result<(), StoreError> {
        let job = serde_json::to_vec(job).map_err(|e| self.err(e))?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(LEDGER)?.retain(|step, _| step < from_step)?;
            txn.open_table(META)?.insert(JOB_KEY, job.as_slice())?;
            Ok(())
        })
    }

    /// Committed steps in `[from, to)`.
    pub fn read_ledger(&self, from: u64, to: u64) -> Result<Vec<LedgerRecord>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(LEDGER).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for row in table.range(from..to).map_err(|e| self.err(e))? {
            let (_, v) = row.map_err(|e| self.err(e))?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| self.err(format!("ledger record: {e}")))?,
            );
        }
        Ok(out)
    }

    pub fn put_worker(&self, worker: &WorkerRecord) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(worker).map_err(|e| self.err(e))?;
        self.write(Durability::None, |txn| {
            txn.open_table(WORKERS)?
                .insert(worker.id.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    pub fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            txn.open_table(WORKERS)?.remove(id)?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ledger_record_without_a_loss_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut job = JobRecord {
            job_id: "j".into(),
            committed: 0,
            generation: 1,
            formed: None,
            target_workers: 1,
            stopped: false,
            checkpoint: None,
            rollbacks: 0,
            redone_steps: 0,
            next_join_seq: 0,
        };
        store.init("spec", &job).unwrap();
        let record = |step: u64, loss: f64, step_time_s: f64| LedgerRecord {
            step,
            generation: 1,
            world_size: 1,
            slices: vec![SliceRecord {
                rank: 0,
                worker_id: "w".into(),
                stream_start: step * 4,
                count: 4,
            }],
            loss,
            tokens: 0,
            step_time_s,
        };
        for (step, loss, time) in [(0, 2.5, 0.1), (1, f64::NAN, 0.0), (2, 1.5, f64::INFINITY)] {
            job.committed = step + 1;
            store.commit_step(&record(step, loss, time), &job).unwrap();
        }
        drop(store);
        let loaded = Store::open(dir.path()).unwrap().load().unwrap().unwrap();
        let got: Vec<(u64, f64, f64)> = loaded
            .ledger
            .iter()
            .map(|e| (e.step, e.loss, e.step_time_s))
            .collect();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].0, got[0].1, got[0].2), (0, 2.5, 0.1));
        assert!(got[1].1.is_nan() && got[1].2 == 0.0);
        assert!(
            got[2].1 == 1.5 && got[2].2.is_nan(),
            "not finite reads back as NaN"
        );
        assert_eq!(loaded.job.committed, 3);
    }
}
