//! The cluster subcommands: `ferry coordinator`, `ferry status`, `ferry scale`, `ferry stop`.

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_common::client::{load_token, with_backoff, ClientConfig, Clients};
use ferry_common::proto;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// PEM certificate: serve gRPC over TLS (with --tls-key).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long)]
    tls_key: Option<PathBuf>,
}

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
    /// CA certificate (PEM) that signed the coordinator's TLS certificate.
    #[arg(long)]
    tls_ca: Option<PathBuf>,
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

/// The log filter of every subcommand (`error`, `warn`, `info`, `debug`, or per-module
/// directives as in `RUST_LOG`).
pub const LOG_ENV: &str = "FERRY_LOG";

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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn run_coordinator(a: CoordinatorArgs) -> Result<()> {
    init_logging();
    let token = load_token(a.token_file.as_deref())?;
    runtime()?.block_on(ferry_coordinator::serve(ferry_coordinator::ServeConfig {
        job: a.job,
        listen: a.listen,
        http: a.http,
        state_dir: a.state,
        token,
        tls_cert: a.tls_cert,
        tls_key: a.tls_key,
    }))
}

/// The gRPC address in a coordinator state directory's endpoint.json.
pub fn endpoint_from_state(dir: &Path) -> Result<String> {
    let path = dir.join(ferry_coordinator::ENDPOINT_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: no running coordinator recorded here", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    match v.get("grpc").and_then(|g| g.as_str()) {
        Some(addr) => Ok(addr.to_string()),
        None => bail!("{}: field \"grpc\" is missing", path.display()),
    }
}

/// Waits for the coordinator started as `child` to write its endpoint into `state` (the pid
/// must match, so a stale file from an earlier run is not taken); returns its gRPC address.
pub fn wait_for_endpoint(state: &Path, child: &mut std::process::Child) -> Result<String> {
    let path = state.join(ferry_coordinator::ENDPOINT_FILE);
    let pid = u64::from(child.id());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let endpoint = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter(|v| v["pid"].as_u64() == Some(pid))
            .and_then(|v| v["grpc"].as_str().map(str::to_string));
        if let Some(addr) = endpoint {
            return Ok(addr);
        }
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator exited ({status})");
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "{}: the coordinator did not start within 60 s",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn clients(c: &ConnectArgs) -> Result<(Clients, String)> {
    let address = match &c.state {
        Some(dir) => endpoint_from_state(dir)?,
        None => c.coordinator.clone(),
    };
    let cfg = ClientConfig {
        address: address.clone(),
        token: load_token(c.token_file.as_deref())?,
        tls_ca: c.tls_ca.clone(),
        tls_domain: None,
    };
    Ok((Clients::connect_lazy(&cfg)?, address))
}

fn rpc_error(address: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!(
        "coordinator {address}: {} ({:?})",
        status.message(),
        status.code()
    )
}

/// Admin calls wait a little for a coordinator that is restarting, then give up.
const ADMIN_PATIENCE: Duration = Duration::from_secs(10);

pub fn run_status(a: StatusArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_runtime = rt.enter();
    let (clients, address) = clients(&a.connect)?;
    let st = rt.block_on(with_backoff(ADMIN_PATIENCE, || {
        let mut admin = clients.admin.clone();
        async move {
            admin
                .status(proto::StatusRequest {})
                .await
                .map(|r| r.into_inner())
        }
    }));
    let st = st.map_err(|s| rpc_error(&address, s))?;
    if a.json {
        println!("{}", status_json(&st));
        return Ok(());
    }
    print!("{}", status_table(&st));
    Ok(())
}

pub fn status_json(st: &proto::StatusReply) -> serde_json::Value {
    serde_json::json!({
        "job_id": st.job_id, "job_name": st.job_name, "phase": st.phase,
        "generation": st.generation, "world_size": st.world_size,
        "committed_steps": st.committed_steps, "total_steps": st.total_steps,
        "target_workers": st.target_workers, "min_workers": st.min_workers,
        "max_workers": st.max_workers, "tokens_per_s": st.tokens_per_s,
        "latest_checkpoint_step": st.latest_checkpoint_step,
        "latest_checkpoint_path": st.latest_checkpoint_path,
        "rollbacks": st.rollbacks, "redone_steps": st.redone_steps,
        "last_loss": st.recent_loss.last().map(|p| p.loss),
        "workers": st.workers.iter().map(|w| serde_json::json!({
            "worker_id": w.worker_id, "host": w.host, "data_addr": w.data_addr,
            "metrics_addr": w.metrics_addr,
            "rank": w.rank, "state": w.state, "generation": w.generation, "step": w.step,
            "loss": if w.loss.is_finite() { Some(w.loss) } else { None },
            "tokens_per_s": w.tokens_per_s, "last_seen_s": w.last_seen_s,
        })).collect::<Vec<_>>(),
    })
}

pub fn status_table(st: &proto::StatusReply) -> String {
    let mut out = format!(
        "job {} ({})  phase {}  step {}/{}  generation {}  world {} (target {}, {}..{})  {:.0} tokens/s\n",
        st.job_name,
        st.job_id,
        st.phase,
        st.committed_steps,
        st.total_steps,
        st.generation,
        st.world_size,
        st.target_workers,
        st.min_workers,
        st.max_workers,
        st.tokens_per_s
    );
    if st.rollbacks > 0 {
        out.push_str(&format!(
            "rolled back to a checkpoint {} time(s): {} committed step(s) trained again\n",
            st.rollbacks, st.redone_steps
        ));
    }
    out.push_str(&format!(
        "{:<18} {:<20} {:>4} {:<8} {:>4} {:>7} {:>8} {:>9} {:>9}\n",
        "WORKER", "HOST", "RANK", "STATE", "GEN", "STEP", "LOSS", "TOKENS/S", "SEEN"
    ));
    for w in &st.workers {
        out.push_str(&format!(
            "{:<18} {:<20} {:>4} {:<8} {:>4} {:>7} {:>8} {:>9.0} {:>8.1}s\n",
            w.worker_id,
            w.host.chars().take(20).collect::<String>(),
            if w.rank < 0 {
                "-".to_string()
            } else {
                w.rank.to_string()
            },
            w.state,
            w.generation,
            w.step,
            if w.loss.is_finite() {
                format!("{:.4}", w.loss)
            } else {
                "-".into()
            },
            w.tokens_per_s,
            w.last_seen_s
        ));
    }
    if st.workers.is_empty() {
        out.push_str("(no workers)\n");
    }
    out
}

pub fn run_scale(a: ScaleArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_runtime = rt.enter();
    let (clients, address) = clients(&a.connect)?;
    let reply = rt.block_on(with_backoff(ADMIN_PATIENCE, || {
        let mut admin = clients.admin.clone();
        async move {
            admin
                .scale(proto::ScaleRequest { workers: a.workers })
                .await
                .map(|r| r.into_inner())
        }
    }));
    let reply = reply.map_err(|s| rpc_error(&address, s))?;
    println!(
        "target set to {} workers ({} live); the change takes effect at the next step boundary",
        reply.target_workers, reply.live_workers
    );
    Ok(())
}

pub fn run_stop(a: StopArgs) -> Result<()> {
    let rt = runtime()?;
    let _in_runtime = rt.enter();
    let (clients, address) = clients(&a.connect)?;
    let reply = rt.block_on(with_backoff(ADMIN_PATIENCE, || {
        let mut admin = clients.admin.clone();
        async move {
            admin
                .stop(proto::StopRequest {})
                .await
                .map(|r| r.into_inner())
        }
    }));
    let reply = reply.map_err(|s| rpc_error(&address, s))?;
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
    let exit =
        ferry_worker::data_parallel::run_worker(ferry_worker::data_parallel::WorkerOptions {
            coordinator: ClientConfig {
                address,
                token: load_token(a.connect.token_file.as_deref())?,
                tls_ca: a.connect.tls_ca.clone(),
                tls_domain: None,
            },
            data_listen: a.data_listen,
            advertise_host: advertise,
            threads: a.threads,
            device: a.device,
            patience: Duration::from_secs(a.patience_s),
            telemetry: ferry_worker::data_parallel::TelemetryOptions {
                listen: (a.metrics_listen != "off").then_some(a.metrics_listen),
                stall_timeout: Duration::from_secs(a.stall_timeout_s),
            },
        })?;
    eprintln!("worker done: {exit:?}");
    Ok(())
}
