//! `ferry coordinator`: opens (or resumes) the job's state, then serves gRPC and HTTP until
//! Ctrl-C or SIGTERM.

use crate::service::{Service, TokenCheck};
use crate::state::JobState;
use crate::store::Store;
use anyhow::{bail, Context, Result};
use ferry_dataset::shards::{sequences_in, Manifest};
use ferry_rpc::proto::{admin_server::AdminServer, coordinator_server::CoordinatorServer};
use ferry_spec::job::JobSpec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

/// Largest request the coordinator decodes; anything bigger is refused, not buffered.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The file in the state directory that says where a running coordinator listens.
pub const ENDPOINT_FILE: &str = "endpoint.json";

pub struct ServeConfig {
    /// The job spec; may be omitted when resuming from `state_dir`.
    pub job: Option<PathBuf>,
    pub listen: SocketAddr,
    /// HTTP (`/metrics`, status page); `None` = gRPC port + 1 on the same address.
    pub http: Option<SocketAddr>,
    pub state_dir: PathBuf,
    pub token: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
}

/// Counts the training sequences from the shard manifest alone (no shard is read).
fn count_sequences(spec: &JobSpec) -> Result<u64> {
    let dir = &spec.data.shards;
    let manifest =
        Manifest::load(dir).with_context(|| format!("data.shards = {}", dir.display()))?;
    let Some(train) = manifest.splits.get("train") else {
        bail!("{}: the manifest has no train split", dir.display());
    };
    let n = sequences_in(train.tokens, spec.data.seq_len);
    if n == 0 {
        bail!(
            "{}: the train split has {} tokens, too few for one sequence of data.seq_len = {}",
            dir.display(),
            train.tokens,
            spec.data.seq_len
        );
    }
    Ok(n)
}

fn open_state(cfg: &ServeConfig) -> Result<JobState> {
    let store = Store::open(&cfg.state_dir)?;
    let loaded = store.load()?;
    let given = match &cfg.job {
        Some(path) => Some((JobSpec::from_file(path)?, std::fs::read_to_string(path)?)),
        None => None,
    };
    let (spec, spec_toml, loaded) = match (loaded, given) {
        (Some(loaded), given) => {
            let origin = format!("{} (stored job)", cfg.state_dir.display());
            let stored = JobSpec::from_toml(&loaded.spec_toml, &origin)?;
            if let Some((spec, _)) = given {
                if spec != stored {
                    bail!(
                        "{}: holds job {:?} with a different spec than {}; use a new --state directory \
                         for a new job, or omit --job to resume",
                        cfg.state_dir.display(),
                        stored.job.name,
                        cfg.job.as_deref().unwrap_or(Path::new("")).display()
                    );
                }
            }
            tracing::info!(
                committed = loaded.job.committed,
                generation = loaded.job.generation,
                "resuming job {:?} from {}",
                stored.job.name,
                cfg.state_dir.display()
            );
            let toml = loaded.spec_toml.clone();
            (stored, toml, Some(loaded))
        }
        (None, Some((spec, toml))) => {
            // A new job over another run's checkpoints would skip its own final checkpoint
            // where a step directory exists, prune both runs' checkpoints together and
            // rewrite metrics.jsonl: refuse before anything starts, as `ferry train` does.
            let run_dir = &spec.job.run_dir;
            let held = ferry_spec::run_dir::held_by_another_run(run_dir)
                .with_context(|| format!("{}: cannot read", run_dir.display()))?;
            if let Some(why) = held {
                bail!(
                    "{}: [job] run_dir {}: {why}, and the state directory {} holds no job to \
                     resume. Choose a new run_dir for a new job, or resume that job with its \
                     own --state directory",
                    cfg.job.as_deref().unwrap_or(Path::new("")).display(),
                    run_dir.display(),
                    cfg.state_dir.display()
                );
            }
            (spec, toml, None)
        }
        (None, None) => bail!(
            "{}: holds no job; pass --job job.toml to start one",
            cfg.state_dir.display()
        ),
    };
    let num_sequences = count_sequences(&spec)?;
    let mut state = JobState::open(
        spec,
        spec_toml,
        num_sequences,
        store,
        loaded,
        Instant::now(),
    )?;
    // Started with its job file again: the user wants it to run, also after `ferry stop`.
    // A bare restart (no --job) keeps the state exactly as it was.
    if cfg.job.is_some() && state.resume_if_stopped()? {
        tracing::info!("the job was stopped; started again with --job, so it resumes");
    }
    Ok(state)
}

fn write_endpoint(
    dir: &Path,
    grpc: SocketAddr,
    http: SocketAddr,
    job_id: &str,
    tls: bool,
) -> Result<()> {
    let body = serde_json::json!({
        "grpc": grpc.to_string(),
        "http": http.to_string(),
        "tls": tls,
        "pid": std::process::id(),
        "job_id": job_id,
    });
    let path = dir.join(ENDPOINT_FILE);
    let tmp = dir.join(format!("{ENDPOINT_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

pub async fn serve(cfg: ServeConfig) -> Result<()> {
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[
            1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0,
        ])?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let state = open_state(&cfg)?;
    let timing = state.timing();
    let (job_id, job_name) = {
        let st = state.status(Instant::now());
        (st.job_id, st.job_name)
    };
    let state = Arc::new(Mutex::new(state));

    let grpc_listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", cfg.listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = cfg.http.unwrap_or_else(|| {
        let mut a = grpc_addr;
        a.set_port(if grpc_addr.port() == 0 {
            0
        } else {
            grpc_addr.port().wrapping_add(1)
        });
        a
    });
    let http_addr = if cfg.http.is_none() && cfg.listen.port() == 0 {
        SocketAddr::new(grpc_addr.ip(), 0)
    } else {
        http_addr
    };
    let http_listener = tokio::net::TcpListener::bind(http_addr)
        .await
        .with_context(|| format!("--http {http_addr}: cannot bind"))?;
    let http_addr = http_listener.local_addr()?;

    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .tcp_nodelay(true);
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let cert_pem =
                std::fs::read(cert).with_context(|| format!("--tls-cert {}", cert.display()))?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("--tls-key {}", key.display()))?;
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem)))
                .context("TLS certificate or key is not usable")?;
            true
        }
        (None, None) => false,
        _ => bail!("--tls-cert and --tls-key go together"),
    };

    let service = Service::new(state.clone());
    let check = TokenCheck::new(&cfg.token);
    let router = builder
        .add_service(InterceptedService::new(
            CoordinatorServer::new(service.clone()).max_decoding_message_size(MAX_REQUEST_BYTES),
            check.clone(),
        ))
        .add_service(InterceptedService::new(
            AdminServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
            check,
        ));

    // Heartbeat timeouts, formation deadlines and the first quorum are checked on a timer.
    let ticker_state = state.clone();
    let tick_every = (timing.heartbeat_timeout / 10)
        .clamp(Duration::from_millis(20), Duration::from_millis(500));
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(tick_every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let mut s = ticker_state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(why) = s.store_failed() {
                // Memory may be ahead of the disk now: stop, and let a restart continue from
                // what is on disk (no call was answered beyond it).
                tracing::error!("the state store failed ({why}); the coordinator stops");
                std::process::exit(1);
            }
            if let Err(e) = s.tick(Instant::now()) {
                tracing::error!("periodic check failed: {e}");
            }
        }
    });

    let http_router = crate::http::router(state.clone(), prometheus);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(http_listener, http_router).await {
            tracing::error!("HTTP server stopped: {e}");
        }
    });

    if !tls && !grpc_addr.ip().is_loopback() {
        tracing::warn!(
            "gRPC on {grpc_addr} without TLS: the job token crosses the network in clear text; \
             pass --tls-cert and --tls-key (deploy/make-certs.sh makes them)"
        );
    }
    write_endpoint(&cfg.state_dir, grpc_addr, http_addr, &job_id, tls)?;
    let scheme = if tls { "grpcs" } else { "grpc" };
    eprintln!(
        "ferry coordinator: job {job_name:?} ({job_id}) on {scheme}://{grpc_addr}, status page and \
         /metrics on http://{http_addr}, state in {}",
        cfg.state_dir.display()
    );
    router
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            shutdown_signal(),
        )
        .await
        .context("gRPC server failed")?;
    eprintln!(
        "ferry coordinator: stopped; state is in {}",
        cfg.state_dir.display()
    );
    Ok(())
}
