//! Data parallelism around the single-process engine, torchtitan-style: the model and the
//! train step know nothing of it. [`flat`] reduces gradients in buckets and broadcasts state;
//! [`worker`] is the elastic rank that the coordinator drives.

pub mod flat;
pub mod worker;

pub use worker::{run_worker, WorkerExit, WorkerOptions};
