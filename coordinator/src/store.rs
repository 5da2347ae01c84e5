//! Durable job state in an embedded redb database (`<state dir>/state.redb`).
//!
//! What must survive a `kill -9` of the coordinator: the job spec, the committed step count and
//! the ledger of committed steps, the current generation and its ranks, the scale target, the
//! stop flag, the latest checkpoint and the workers it knows. Every change is written by one
//! writer thread in durable transactions that batch whatever is queued ([`Store`]); the gRPC
//! services answer a call only once its changes are on disk, so nothing a worker was told is
//! lost in a crash, and a join storm of thousands of workers costs a few disk flushes.
//!
//! A commit must cost the same at 2 ranks and at 100,000, so what grows with the group is
//! written once per generation, not once per step: the formed group (ranks, peers) goes into
//! the `generations` table when it forms, the job record names it by number, and a ledger
//! record holds the step's scalars only; who trained which slice is derived when the ledger is
//! read, from the generation's ranks and the step schedule. State written before this rule
//! holds the group inside the job record and every slice in the ledger record, and reads back
//! as it was.

use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
const LEDGER: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger");
/// Generation number -> its [`FormedRecord`].
const GENERATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("generations");

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
    /// The formed group, if one is running. On disk it is in the generations table and the
    /// record holds its number ([`JobOnDisk`]); state written before that holds it here.
    #[serde(default, skip_serializing)]
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

/// The job record as written: the formed group by its generation number.
#[derive(Serialize)]
struct JobOnDisk<'a> {
    #[serde(flatten)]
    job: &'a JobRecord,
    formed_generation: Option<u64>,
}

#[derive(Deserialize)]
struct JobFromDisk {
    #[serde(flatten)]
    job: JobRecord,
    #[serde(default)]
    formed_generation: Option<u64>,
}

/// One committed step: who trained which positions of the sample stream.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LedgerRecord {
    pub step: u64,
    pub generation: u64,
    pub world_size: u32,
    /// Every rank's slice. Empty as stored (derived when read, see the module's comment);
    /// full in state written before that.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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

/// Fault injection for tests: every durable commit first waits this many milliseconds, as a
/// slow disk's fsync would.
pub const SYNC_DELAY_ENV: &str = "FERRY_TEST_STORE_SYNC_DELAY_MS";

/// How far the writer has gone: every change up to this sequence number is on disk, or the
/// store failed and takes no more.
#[derive(Clone, Debug, PartialEq)]
pub enum Durable {
    Through(u64),
    Failed(String),
}

/// One change, queued by the state machine and applied by the writer thread.
enum Change {
    Meta { key: &'static str, value: Vec<u8> },
    Ledger { step: u64, value: Vec<u8> },
    Generation { generation: u64, value: Vec<u8> },
    TruncateLedger { from_step: u64 },
    PutWorker { id: String, value: Vec<u8> },
    RemoveWorker { id: String },
}

#[derive(Default)]
struct Queue {
    changes: Vec<Change>,
    /// Sequence number of the newest change queued (0: none yet).
    queued: u64,
    closing: bool,
}

struct Shared {
    queue: std::sync::Mutex<Queue>,
    wake: std::sync::Condvar,
    durable: std::sync::Mutex<Durable>,
    durable_changed: std::sync::Condvar,
    /// The same, for async callers.
    durable_watch: tokio::sync::watch::Sender<Durable>,
}

/// The job's durable state. Changes are queued in memory, in order, by the state machine
/// (under its lock, never touching the disk) and written by one writer thread, which puts
/// everything queued so far into one transaction and fsyncs it: a burst of joins or commits
/// costs one disk flush, and no lock of the state machine is held while the disk syncs. A
/// caller that must not answer before its change is on disk waits with [`Store::wait_durable`]
/// after releasing the state lock.
pub struct Store {
    db: std::sync::Arc<Database>,
    path: PathBuf,
    shared: std::sync::Arc<Shared>,
    writer: Option<std::thread::JoinHandle<()>>,
    /// The newest generation whose group is queued into the generations table.
    generation_written: std::sync::Mutex<Option<u64>>,
}

impl Store {
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join("state.redb");
        std::fs::create_dir_all(dir).map_err(|e| StoreError {
            path: dir.to_path_buf(),
            message: format!("cannot create the state directory: {e}"),
        })?;
        let db = builder().create(&path).map_err(|e| StoreError {
            path: path.clone(),
            message: format!("cannot open the state database: {e}"),
        })?;
        // Create the tables so that reads never meet a missing table.
        let txn = db.begin_write().map_err(|e| store_err(&path, e))?;
        for result in [
            txn.open_table(META).map(drop),
            txn.open_table(WORKERS).map(drop),
            txn.open_table(LEDGER).map(drop),
            txn.open_table(GENERATIONS).map(drop),
        ] {
            result.map_err(|e| store_err(&path, e))?;
        }
        txn.commit().map_err(|e| store_err(&path, e))?;
        let sync_delay = std::env::var(SYNC_DELAY_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(std::time::Duration::ZERO, std::time::Duration::from_millis);
        let db = std::sync::Arc::new(db);
        let shared = std::sync::Arc::new(Shared {
            queue: Default::default(),
            wake: Default::default(),
            durable: std::sync::Mutex::new(Durable::Through(0)),
            durable_changed: Default::default(),
            durable_watch: tokio::sync::watch::channel(Durable::Through(0)).0,
        });
        let writer = {
            let (db, shared, at) = (db.clone(), shared.clone(), path.clone());
            std::thread::Builder::new()
                .name("state-writer".into())
                .spawn(move || write_loop(&db, &shared, &at, sync_delay))
                .map_err(|e| store_err(&path, format!("cannot start the writer thread: {e}")))?
        };
        Ok(Store {
            db,
            path,
            shared,
            writer: Some(writer),
            generation_written: std::sync::Mutex::new(None),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        store_err(&self.path, e)
    }

    /// Queues changes to be written together; returns the sequence number of the last.
    /// Refused once the store has failed: memory must not run ahead of a disk that stopped.
    fn queue(&self, changes: impl IntoIterator<Item = Change>) -> Result<u64, StoreError> {
        if let Durable::Failed(why) = &*lock(&self.shared.durable) {
            return Err(self.err(format!("an earlier write failed: {why}")));
        }
        let mut q = lock(&self.shared.queue);
        for c in changes {
            q.changes.push(c);
            q.queued += 1;
        }
        self.shared.wake.notify_one();
        Ok(q.queued)
    }

    /// The sequence number of the newest change queued: waiting for it makes every change
    /// made so far durable.
    pub fn queued(&self) -> u64 {
        lock(&self.shared.queue).queued
    }

    /// A handle to wait for durability without holding the store (or the state around it).
    pub fn durability(&self) -> DurableWaiter {
        DurableWaiter {
            rx: self.shared.durable_watch.subscribe(),
            path: self.path.clone(),
        }
    }

    /// Blocks until everything queued so far is on disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        let seq = self.queued();
        let mut d = lock(&self.shared.durable);
        loop {
            match &*d {
                Durable::Through(n) if *n >= seq => return Ok(()),
                Durable::Failed(why) => return Err(self.err(why)),
                Durable::Through(_) => {
                    d = self
                        .shared
                        .durable_changed
                        .wait(d)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }

    /// Whether a write failed; the coordinator then stops taking changes.
    pub fn failed(&self) -> Option<String> {
        match &*lock(&self.shared.durable) {
            Durable::Failed(why) => Some(why.clone()),
            Durable::Through(_) => None,
        }
    }

    /// The stored job, if this directory holds one.
    pub fn load(&self) -> Result<Option<Loaded>, StoreError> {
        self.sync()?;
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
        let JobFromDisk {
            mut job,
            formed_generation,
        } = serde_json::from_slice(job_bytes.value())
            .map_err(|e| self.err(format!("job record: {e}")))?;
        if let Some(g) = formed_generation {
            let formed = self
                .generation(g)
                .map_err(|e| self.err(format!("the job record's formed group: {}", e.message)))?;
            job.formed = Some(formed);
            *lock(&self.generation_written) = Some(g);
        } else if let Some(f) = &job.formed {
            // Written before the generations table: put the group there now, since steps it
            // commits from here on are read back through it.
            let value = serde_json::to_vec(f).map_err(|e| self.err(e))?;
            self.queue([Change::Generation {
                generation: f.generation,
                value,
            }])?;
            *lock(&self.generation_written) = Some(f.generation);
        }
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

    /// The job record, and its formed group when that is not yet in the generations table.
    fn job_change(&self, job: &JobRecord) -> Result<Vec<Change>, StoreError> {
        let mut changes = Vec::with_capacity(2);
        if let Some(f) = &job.formed {
            let mut written = lock(&self.generation_written);
            if *written != Some(f.generation) {
                changes.push(Change::Generation {
                    generation: f.generation,
                    value: serde_json::to_vec(f).map_err(|e| self.err(e))?,
                });
                *written = Some(f.generation);
            }
        }
        let on_disk = JobOnDisk {
            job,
            formed_generation: job.formed.as_ref().map(|f| f.generation),
        };
        changes.push(Change::Meta {
            key: JOB_KEY,
            value: serde_json::to_vec(&on_disk).map_err(|e| self.err(e))?,
        });
        Ok(changes)
    }

    /// The group that formed as `generation`, as written so far. Every generation that
    /// committed a step or is named by the job record is there.
    pub fn generation(&self, generation: u64) -> Result<FormedRecord, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(GENERATIONS).map_err(|e| self.err(e))?;
        let v = table
            .get(generation)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| {
                self.err(format!(
                    "generation {generation} is missing from the generations table"
                ))
            })?;
        serde_json::from_slice(v.value())
            .map_err(|e| self.err(format!("generation {generation}'s record: {e}")))
    }

    /// Stores a new job and waits until it is on disk.
    pub fn init(&self, spec_toml: &str, job: &JobRecord) -> Result<(), StoreError> {
        let spec = Change::Meta {
            key: SPEC_KEY,
            value: spec_toml.as_bytes().to_vec(),
        };
        self.queue(std::iter::once(spec).chain(self.job_change(job)?))?;
        self.sync()
    }

    pub fn save_job(&self, job: &JobRecord) -> Result<(), StoreError> {
        self.queue(self.job_change(job)?).map(drop)
    }

    /// Records a committed step (its scalars; its slices are derived when read) and the new
    /// job record, in one transaction.
    pub fn commit_step(&self, entry: &LedgerRecord, job: &JobRecord) -> Result<(), StoreError> {
        debug_assert!(entry.slices.is_empty(), "slices are derived, not stored");
        let ledger = Change::Ledger {
            step: entry.step,
            value: serde_json::to_vec(entry).map_err(|e| self.err(e))?,
        };
        self.queue(std::iter::once(ledger).chain(self.job_change(job)?))
            .map(drop)
    }

    /// Forgets committed steps from `from_step` on (a fall-back to an older checkpoint).
    pub fn truncate_ledger(&self, from_step: u64, job: &JobRecord) -> Result<(), StoreError> {
        self.queue(
            std::iter::once(Change::TruncateLedger { from_step }).chain(self.job_change(job)?),
        )
        .map(drop)
    }

    /// Committed steps in `[from, to)`, as written so far (wait for durability first to
    /// include the newest).
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
        let value = serde_json::to_vec(worker).map_err(|e| self.err(e))?;
        self.queue([Change::PutWorker {
            id: worker.id.clone(),
            value,
        }])
        .map(drop)
    }

    pub fn remove_worker(&self, id: &str) -> Result<(), StoreError> {
        self.queue([Change::RemoveWorker { id: id.into() }])
            .map(drop)
    }
}

impl Drop for Store {
    /// Writes what is queued, then stops the writer.
    fn drop(&mut self) {
        lock(&self.shared.queue).closing = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Waits for durability of a [`Store`] without borrowing it.
#[derive(Clone)]
pub struct DurableWaiter {
    rx: tokio::sync::watch::Receiver<Durable>,
    path: PathBuf,
}

impl DurableWaiter {
    /// Returns once every change up to `seq` is on disk, or the error that stopped the writer.
    pub async fn wait(&self, seq: u64) -> Result<(), StoreError> {
        let mut rx = self.rx.clone();
        let reached = rx
            .wait_for(|d| !matches!(d, Durable::Through(n) if *n < seq))
            .await
            .map(|d| d.clone());
        match reached {
            Ok(Durable::Through(_)) => Ok(()),
            Ok(Durable::Failed(why)) => Err(store_err(&self.path, why)),
            Err(_) => Err(store_err(&self.path, "the writer thread is gone")),
        }
    }
}

fn store_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The writer thread: takes everything queued, writes it in one durable transaction, tells
/// the waiters, and goes on until the store is dropped; after a failed write it writes
/// nothing more.
/// How databases are made. Under cargo-fuzz (`cfg(fuzzing)`, see `fuzz/`) with small regions,
/// as redb's own fuzzing does: creating and closing a database then takes a millisecond instead
/// of a quarter of a second in redb's allocator bookkeeping, so `coordinator_requests` runs the
/// state machine many times more often. Ordinary builds keep redb's defaults.
fn builder() -> redb::Builder {
    #[allow(unused_mut)]
    let mut builder = redb::Builder::new();
    #[cfg(fuzzing)]
    builder.set_region_size(1 << 20);
    builder
}

fn write_loop(db: &Database, shared: &Shared, path: &Path, sync_delay: std::time::Duration) {
    loop {
        let (changes, through) = {
            let mut q = lock(&shared.queue);
            while q.changes.is_empty() && !q.closing {
                q = shared.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.changes.is_empty() {
                return;
            }
            (std::mem::take(&mut q.changes), q.queued)
        };
        // A panic here would leave every waiting call waiting forever: it counts as a failure.
        let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            apply(db, &changes, sync_delay).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|_| Err("the writer panicked".into()));
        let state = match written {
            Ok(()) => Durable::Through(through),
            Err(e) => {
                let why = format!("{}: {e}", path.display());
                tracing::error!("state store write failed: {why}");
                Durable::Failed(why)
            }
        };
        let failed = matches!(state, Durable::Failed(_));
        *lock(&shared.durable) = state.clone();
        shared.durable_changed.notify_all();
        shared.durable_watch.send_replace(state);
        if failed {
            return;
        }
    }
}

fn apply(
    db: &Database,
    changes: &[Change],
    sync_delay: std::time::Duration,
) -> Result<(), redb::Error> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate);
    {
        let mut meta = txn.open_table(META)?;
        let mut ledger = txn.open_table(LEDGER)?;
        let mut workers = txn.open_table(WORKERS)?;
        let mut generations = txn.open_table(GENERATIONS)?;
        for c in changes {
            match c {
                Change::Meta { key, value } => {
                    meta.insert(*key, value.as_slice())?;
                }
                Change::Ledger { step, value } => {
                    ledger.insert(*step, value.as_slice())?;
                }
                Change::Generation { generation, value } => {
                    generations.insert(*generation, value.as_slice())?;
                }
                Change::TruncateLedger { from_step } => {
                    ledger.retain(|step, _| step < *from_step)?;
                }
                Change::PutWorker { id, value } => {
                    workers.insert(id.as_str(), value.as_slice())?;
                }
                Change::RemoveWorker { id } => {
                    workers.remove(id.as_str())?;
                }
            }
        }
    }
    std::thread::sleep(sync_delay);
    txn.commit()?;
    Ok(())
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
            slices: vec![],
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

    fn group(generation: u64, ranks: &[&str]) -> FormedRecord {
        FormedRecord {
            generation,
            ranks: ranks.iter().map(|r| r.to_string()).collect(),
            peers: ranks.iter().map(|r| format!("{r}:1")).collect(),
            blob: vec![],
            start_step: 0,
            source: StateSourceRecord::Init,
            checkpoint_path: String::new(),
        }
    }

    fn job_with(formed: Option<FormedRecord>) -> JobRecord {
        JobRecord {
            job_id: "j".into(),
            committed: 0,
            generation: formed.as_ref().map_or(0, |f| f.generation),
            formed,
            target_workers: 2,
            stopped: false,
            checkpoint: None,
            rollbacks: 0,
            redone_steps: 0,
            next_join_seq: 0,
        }
    }

    fn step_record(step: u64, generation: u64) -> LedgerRecord {
        LedgerRecord {
            step,
            generation,
            world_size: 2,
            slices: vec![],
            loss: 1.0,
            tokens: 8,
            step_time_s: 0.1,
        }
    }

    #[test]
    fn a_commit_writes_the_group_once_per_generation_and_it_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut job = job_with(Some(group(3, &["a", "b"])));
        store.init("spec", &job).unwrap();
        for step in 0..3 {
            job.committed = step + 1;
            store.commit_step(&step_record(step, 3), &job).unwrap();
        }
        store.sync().unwrap();
        // The job record names the group; neither it nor the ledger repeats the ranks.
        let txn = store.db.begin_read().unwrap();
        let meta = txn.open_table(META).unwrap();
        let job_json = String::from_utf8(meta.get(JOB_KEY).unwrap().unwrap().value().to_vec());
        let job_json = job_json.unwrap();
        assert!(job_json.contains("\"formed_generation\":3"), "{job_json}");
        assert!(!job_json.contains("\"ranks\""), "{job_json}");
        let ledger = txn.open_table(LEDGER).unwrap();
        let row = String::from_utf8(ledger.get(1).unwrap().unwrap().value().to_vec()).unwrap();
        assert!(!row.contains("slices"), "{row}");
        drop((meta, ledger, txn));
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.job.formed, Some(group(3, &["a", "b"])));
        assert_eq!(loaded.ledger.len(), 3);
        assert_eq!(store.generation(3).unwrap().ranks, ["a", "b"]);
        let missing = store.generation(4).unwrap_err().to_string();
        assert!(missing.contains("generation 4 is missing"), "{missing}");
    }

    #[test]
    fn state_written_with_the_group_inside_the_job_record_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.init("spec", &job_with(None)).unwrap();
        // As the coordinator wrote it before the generations table: the group inside the
        // job record, every slice in the ledger record.
        let legacy_job = r#"{"job_id":"j","committed":1,"generation":2,
            "formed":{"generation":2,"ranks":["a","b"],"peers":["a:1","b:1"],"blob":[],
                      "start_step":0,"source":"Init","checkpoint_path":""},
            "target_workers":2,"stopped":false,"checkpoint":null,"rollbacks":0,
            "redone_steps":0,"next_join_seq":2}"#;
        let legacy_step = r#"{"step":0,"generation":2,"world_size":2,"slices":[
            {"rank":0,"worker_id":"a","stream_start":0,"count":4},
            {"rank":1,"worker_id":"b","stream_start":4,"count":4}],
            "loss":2.0,"tokens":8,"step_time_s":0.1}"#;
        let txn = store.db.begin_write().unwrap();
        {
            let mut meta = txn.open_table(META).unwrap();
            meta.insert(JOB_KEY, legacy_job.as_bytes()).unwrap();
            let mut ledger = txn.open_table(LEDGER).unwrap();
            ledger.insert(0, legacy_step.as_bytes()).unwrap();
        }
        txn.commit().unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(loaded.job.formed, Some(group(2, &["a", "b"])));
        assert_eq!(loaded.job.committed, 1);
        assert_eq!(loaded.ledger[0].slices.len(), 2);
        assert_eq!(loaded.ledger[0].slices[1].worker_id, "b");
        // Steps the old group commits from here on are read back through the generations
        // table, which loading filled.
        store.sync().unwrap();
        assert_eq!(store.generation(2).unwrap().ranks, ["a", "b"]);
    }
}
