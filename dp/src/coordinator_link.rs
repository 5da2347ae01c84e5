//! The link to the coordinator: retried calls, joining again, heartbeats, reported failures.

use super::telemetry;
use super::worker::{Progress, SharedId, Worker};
use anyhow::{bail, Result};
use ferry_collective::CollectiveError;
use ferry_rpc::client::{with_backoff, Clients};
use ferry_rpc::proto;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::{Code, Status};

/// A failed collective as the coordinator hears of it.
pub(super) struct Failure {
    pub(super) why: String,
    /// The rank whose link failed, when the error names one (see `CollectiveError::suspect`).
    pub(super) suspect: Option<usize>,
}

impl Failure {
    pub(super) fn of(what: &str, e: &CollectiveError) -> Failure {
        Failure {
            why: format!("{what}: {e}"),
            suspect: e.suspect(),
        }
    }
}

/// A failed coordinator call, naming the coordinator: after `--patience-s` of an unreachable
/// coordinator this is the line the worker exits with.
pub(super) fn rpc(coordinator: &str, what: &str, s: Status) -> anyhow::Error {
    anyhow::anyhow!(ferry_rpc::client::describe_failure(coordinator, what, &s))
}

/// Heartbeats, at the interval the coordinator asked for, on the async runtime. A worker the
/// coordinator no longer knows (declared lost while unreachable, or forgotten in a restart)
/// keeps its process and its weights: the training loop finds out at its next call and joins
/// again ([`Worker::rejoin`]); heartbeats follow the new id.
pub(super) fn spawn_heartbeats(
    rt: &tokio::runtime::Runtime,
    clients: &Clients,
    id: SharedId,
    interval_s: f64,
    progress: Arc<Mutex<Progress>>,
) {
    let mut c = clients.coordinator.clone();
    let every = Duration::from_secs_f64(if interval_s.is_finite() {
        interval_s.clamp(0.05, 60.0)
    } else {
        1.0
    });
    rt.spawn(async move {
        let mut tick = tokio::time::interval(every);
        let mut reported = String::new();
        loop {
            tick.tick().await;
            let p = progress.lock().map(|p| p.clone()).unwrap_or_default();
            let worker_id = id.lock().map(|id| id.clone()).unwrap_or_default();
            // A heartbeat that gets no answer within its interval is skipped, not queued.
            let r = tokio::time::timeout(
                every.max(Duration::from_secs(1)),
                c.heartbeat(proto::HeartbeatRequest {
                    worker_id: worker_id.clone(),
                    generation: p.generation,
                    step: p.step,
                    loss: p.loss,
                    tokens_per_s: p.tokens_per_s,
                }),
            )
            .await;
            if let Ok(Err(s)) = r {
                if s.code() == Code::NotFound && reported != worker_id {
                    eprintln!(
                        "heartbeat: the coordinator no longer knows worker {worker_id} ({}); \
                         it joins again at its next call",
                        s.message()
                    );
                    reported = worker_id;
                }
            }
        }
    });
}

impl Worker {
    /// A unary call with retries while the coordinator is unreachable.
    pub(super) fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(proto::coordinator_client::CoordinatorClient<ferry_rpc::client::Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_status(f)
            .map_err(|s| rpc(&self.coordinator, what, s))
    }

    /// [`call`](Self::call), keeping the coordinator's answer for callers that act on its code.
    pub(super) fn call_status<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(proto::coordinator_client::CoordinatorClient<ferry_rpc::client::Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let c = self.clients.coordinator.clone();
        self.rt.block_on(with_backoff(self.patience, || {
            let fut = f(c.clone());
            async move { fut.await.map(|r| r.into_inner()) }
        }))
    }

    /// The coordinator answered that it does not know this worker: it declared it lost while
    /// its link was down (or forgot it in a restart). The process and its weights are still
    /// here, so it joins again as a new member and offers the step it holds at rendezvous: the
    /// new group takes it if nobody holds a newer one, and otherwise broadcasts the group's
    /// state over it. Nothing it did under its old id is committed after it was declared lost:
    /// the coordinator refuses every call of a forgotten id.
    pub(super) fn rejoin(&mut self, why: &str) -> Result<()> {
        let old = self.id();
        let joined = self.call("join", |mut c| {
            let req = self.join_request.clone();
            async move { c.join(req).await }
        })?;
        if joined.job_id != self.job_id {
            bail!(
                "the coordinator now runs job {} instead of {}: this worker's state belongs to \
                 another job; start a new worker",
                joined.job_id,
                self.job_id
            );
        }
        let holds = match self.state_step {
            Some(step) => format!("offering the state of step {step}"),
            None => "holding no state yet".to_string(),
        };
        eprintln!(
            "the coordinator no longer knows worker {old} ({why}); joined again as {}, {holds}",
            joined.worker_id
        );
        telemetry::joined(&joined.worker_id, &joined.job_id);
        if let Ok(mut id) = self.id.lock() {
            *id = joined.worker_id;
        }
        Ok(())
    }
}
