//! `ferry coordinator` and the slim `ferry-coordinator` binary: the same arguments and the
//! same one call, so the two cannot drift apart. This crate links no libtorch, so the slim
//! binary is what a deployment runs where only the control plane lives.

use anyhow::{Context, Result};
use clap::Args;
use ferry_rpc::client::load_token;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::admin::LOG_ENV;

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Job spec (TOML). May be left out to resume the job stored in --state.
    #[arg(long)]
    job: Option<PathBuf>,
    /// gRPC address to listen on.
    #[arg(long, default_value = "0.0.0.0:29400")]
    listen: SocketAddr,
    /// HTTP address for /metrics and the status page [default: gRPC port + 1].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Directory for the durable job state; a restarted coordinator continues from it.
    #[arg(long)]
    state: PathBuf,
    /// File holding the job token [default: $FERRY_JOB_TOKEN].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// PEM certificate: serve gRPC over TLS (with --tls-key; deploy/make-certs.sh makes both).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    // The job's state is one lock and the disk has its own writer thread, so one thread
    // serves 10,000 workers without the cross-thread wake-ups a second costs on every call
    // (`ferry bench coordinator`, BENCHMARKS.md); more help only a join storm's TLS handshakes.
    /// Threads serving RPCs (one serves 10,000 workers heartbeating).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
}

/// Logs to stderr at the level `FERRY_LOG` asks for (default info).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(LOG_ENV)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// Serves the job until it ends or the process is told to stop.
pub fn run(a: CoordinatorArgs) -> Result<()> {
    init_logging();
    let token = load_token(a.token_file.as_deref())?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(a.threads))
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(crate::serve(crate::ServeConfig {
            job: a.job,
            listen: a.listen,
            http: a.http,
            state_dir: a.state,
            token,
            tls_cert: a.tls_cert,
            tls_key: a.tls_key,
        }))
}
