//! The cluster subcommands: `ferry coordinator`, `ferry status`, `ferry scale`, `ferry stop`.

use anyhow::{Context, Result};
use clap::Args;
pub use ferry_coordinator::admin::LOG_ENV;
use ferry_coordinator::admin::{endpoint_from_state, status_json, status_table, AdminClient};
pub use ferry_coordinator::cli::{run as run_coordinator, CoordinatorArgs};
use ferry_rpc::client::{load_token, ClientConfig};
use std::path::PathBuf;
use std::time::Duration;

/// How admin commands find the coordinator.
#[derive(Args, Clone)]
pub struct ConnectArgs {
    /// Coordinator gRPC address (host:port).
    #[arg(long, env = "FERRY_COORDINATOR", default_value = "127.0.0.1:29400")]
    coordinator: String,
    /// Read the address from a coordinator's state directory instead (its endpoint.json).
    #[arg(long)]
    state: Option<PathBuf>,
    /// File holding the job token [default: $FERRY_JOB_TOKEN].
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) that signed the coordinator's TLS certificate: talk TLS to it
    /// (deploy/make-certs.sh writes one as ca.crt).
    #[arg(long, env = "FERRY_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Name to verify in the coordinator's certificate [default: the host of --coordinator].
    #[arg(long, env = "FERRY_TLS_DOMAIN", requires = "tls_ca")]
    tls_domain: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print the status as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct ScaleArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The number of workers the job should train with.
    #[arg(long)]
    workers: u32,
}

#[derive(Args)]
pub struct StopArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// An admin client for the coordinator these arguments name.
fn admin(c: &ConnectArgs) -> Result<AdminClient> {
    let address = match &c.state {
        Some(dir) => endpoint_from_state(dir)?,
        None => c.coordinator.clone(),
    };
    AdminClient::connect(&ClientConfig {
        address,
        token: load_token(c.token_file.as_deref())?,
        tls_ca: c.tls_ca.clone(),
        tls_domain: c.tls_domain.clone(),
    })
}

pub fn run_status(a: StatusArgs) -> Result<()> {
    let st = admin(&a.connect)?.status()?;
    if a.json {
        println!("{}", status_json(&st));
    } else {
        print!("{}", status_table(&st));
    }
    Ok(())
}

pub fn run_scale(a: ScaleArgs) -> Result<()> {
    let reply = admin(&a.connect)?.scale(a.workers)?;
    println!(
        "target set to {} workers ({} live); the change takes effect at the next step boundary",
        reply.target_workers, reply.live_workers
    );
    Ok(())
}

pub fn run_stop(a: StopArgs) -> Result<()> {
    let reply = admin(&a.connect)?.stop()?;
    println!(
        "job stopped after {} committed steps",
        reply.committed_steps
    );
    Ok(())
}

#[derive(Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Address the collective (data plane) listens on; port 0 picks a free one.
    #[arg(long, default_value = "0.0.0.0:0")]
    data_listen: String,
    /// Host name or IP that peers use to reach this worker [default: 127.0.0.1 when the
    /// coordinator is on loopback, else $HOSTNAME].
    #[arg(long)]
    advertise: Option<String>,
    /// libtorch intra-op threads; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seconds to keep retrying an unreachable coordinator before giving up.
    #[arg(long, default_value_t = 120)]
    patience_s: u64,
    /// HTTP address for Prometheus /metrics, /healthz (liveness) and /readyz (joined the
    /// coordinator); port 0 picks a free one (printed at start, and shown by
    /// `ferry status --json` as the worker's metrics_addr); "off" serves none.
    #[arg(long, default_value = "0.0.0.0:29500")]
    metrics_listen: String,
    /// /healthz answers 503 once the training loop has not moved for this many seconds (a
    /// wedged worker, for the liveness probe to restart). Allow for the slowest step,
    /// evaluation or checkpoint.
    #[arg(long, default_value_t = 900)]
    stall_timeout_s: u64,
}

pub fn run_worker(a: WorkerArgs) -> Result<()> {
    let address = match &a.connect.state {
        Some(dir) => endpoint_from_state(dir)?,
        None => a.connect.coordinator.clone(),
    };
    let host = address
        .rsplit_once(':')
        .map_or(address.as_str(), |(h, _)| h)
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .to_string();
    let loopback = host == "localhost" || host.starts_with("127.") || host == "[::1]";
    let advertise = match a.advertise {
        Some(h) => h,
        None if loopback => "127.0.0.1".to_string(),
        None => {
            std::env::var("HOSTNAME").context("no --advertise given and $HOSTNAME is not set")?
        }
    };
    let exit = ferry_dp::run_worker(ferry_dp::WorkerOptions {
        coordinator: ClientConfig {
            address,
            token: load_token(a.connect.token_file.as_deref())?,
            tls_ca: a.connect.tls_ca.clone(),
            tls_domain: a.connect.tls_domain.clone(),
        },
        data_listen: a.data_listen,
        advertise_host: advertise,
        threads: a.threads,
        device: a.device,
        patience: Duration::from_secs(a.patience_s),
        telemetry: ferry_dp::TelemetryOptions {
            listen: (a.metrics_listen != "off").then_some(a.metrics_listen),
            stall_timeout: Duration::from_secs(a.stall_timeout_s),
        },
    })?;
    eprintln!("worker done: {exit:?}");
    Ok(())
}
