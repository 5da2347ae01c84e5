//! ferry-coordinator: the control plane of a pretraining job.
//!
//! * [`state`]: membership, generations, the sample schedule and the ledger: a state machine
//!   with its own types and errors, no gRPC (unit-tested in `state/tests.rs`);
//! * [`links`]: broken links between workers, and who is set aside for them;
//! * [`store`]: durable job state in redb;
//! * [`service`]: the gRPC services and the job-token check; `convert` translates between
//!   `proto/ferry.proto` and the state machine's types;
//! * [`http`]: `/metrics` and the status page;
//! * [`admin`]: finding a running coordinator and calling its admin service (status, scale,
//!   stop), and printing a status;
//! * [`loadgen`]: `ferry bench coordinator`, a real coordinator under many simulated workers;
//! * [`server`]: wiring it all together; [`cli`]: the arguments and the call of both
//!   `ferry coordinator` and the slim `ferry-coordinator` binary (`main.rs`).

pub mod admin;
pub mod cli;
mod convert;
pub mod http;
pub mod links;
pub mod loadgen;
pub mod server;
pub mod service;
pub mod state;
pub mod store;

pub use server::{serve, ServeConfig, ENDPOINT_FILE};

/// A digest of every source that decides how the coordinator behaves (`build.rs`): `ferry`
/// and `ferry-coordinator` carry the same id exactly when they run the same coordinator.
pub const BUILD_ID: &str = env!("COORDINATOR_BUILD_ID");

/// `ferry-coordinator --version`: the package version and the build id, which `ferry launch`
/// checks before it runs the slim binary instead of `ferry coordinator`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (build ",
    env!("COORDINATOR_BUILD_ID"),
    ")"
);
