//! Data parallelism around the single-process engine, torchtitan-style: the model and the
//! train step know nothing of it. [`flat`] reduces gradients in buckets and broadcasts state;
//! `overlap` reduces the buckets while backward still runs;
//! [`worker`] is the elastic rank (it plans its own steps; `commits` holds what rank 0 commits); [`telemetry`] serves its
//! Prometheus metrics and health probes.

mod commits;
mod coordinator_link;
pub mod flat;
mod group;
mod overlap;
mod rank0;
mod rendezvous;
mod shutdown;
pub mod telemetry;
pub mod worker;

pub use telemetry::TelemetryOptions;
pub use worker::{run_worker, WorkerExit, WorkerOptions};
