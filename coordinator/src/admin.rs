//! The admin side of a running job: finding its coordinator (the `endpoint.json` it writes
//! in its state directory), the admin calls (status, scale, stop) with a short patience for
//! a coordinator that is restarting, and how a status prints. Used by `ferry status`,
//! `ferry scale`, `ferry stop`, `ferry launch` and `ferry bench coordinator`.

use crate::ENDPOINT_FILE;
use anyhow::{bail, Context, Result};
use ferry_rpc::client::{with_backoff, ClientConfig, Clients};
use ferry_rpc::proto;
use std::path::Path;
use std::time::Duration;

/// The log filter of every subcommand (`error`, `warn`, `info`, `debug`, or per-module
/// directives as in `RUST_LOG`).
pub const LOG_ENV: &str = "FERRY_LOG";

/// Admin calls wait a little for a coordinator that is restarting, then give up.
const ADMIN_PATIENCE: Duration = Duration::from_secs(10);

/// The gRPC address in a coordinator state directory's endpoint.json.
pub fn endpoint_from_state(dir: &Path) -> Result<String> {
    let path = dir.join(ENDPOINT_FILE);
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
    let path = state.join(ENDPOINT_FILE);
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

/// A connection to a coordinator's admin service, with its own runtime: for commands that
/// make a call or two and exit.
pub struct AdminClient {
    rt: tokio::runtime::Runtime,
    clients: Clients,
    address: String,
}

impl AdminClient {
    pub fn connect(cfg: &ClientConfig) -> Result<AdminClient> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let clients = {
            let _in_runtime = rt.enter();
            Clients::connect_lazy(cfg)?
        };
        Ok(AdminClient {
            rt,
            clients,
            address: cfg.address.clone(),
        })
    }

    /// One admin call, retried while the coordinator is unreachable for up to
    /// [`ADMIN_PATIENCE`]; a refusal names the coordinator and the status code.
    fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: Fn(proto::admin_client::AdminClient<ferry_rpc::client::Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let admin = self.clients.admin.clone();
        self.rt
            .block_on(with_backoff(ADMIN_PATIENCE, || {
                let fut = f(admin.clone());
                async move { fut.await.map(|r| r.into_inner()) }
            }))
            .map_err(|s| {
                anyhow::anyhow!(ferry_rpc::client::describe_failure(&self.address, "", &s))
            })
    }

    pub fn status(&self) -> Result<proto::StatusReply> {
        self.call(|mut a| async move { a.status(proto::StatusRequest {}).await })
    }

    pub fn scale(&self, workers: u32) -> Result<proto::ScaleReply> {
        self.call(|mut a| async move { a.scale(proto::ScaleRequest { workers }).await })
    }

    pub fn stop(&self) -> Result<proto::StopReply> {
        self.call(|mut a| async move { a.stop(proto::StopRequest {}).await })
    }
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
