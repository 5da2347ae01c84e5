//! The gRPC services: thin translations between protobuf messages and [`JobState`], plus
//! per-method latency metrics. All logic lives in the state machine.

use crate::state::{JobState, RendezvousOutcome, RendezvousRequest, StateError};
use crate::store::DurableWaiter;
use ferry_rpc::proto::{
    self, admin_server::Admin, coordinator_server::Coordinator, rendezvous_reply,
};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

/// How long one `Rendezvous` call waits for the group before answering WAIT. Short enough that
/// calls stay well inside client deadlines and survive coordinator restarts by being re-sent.
const RENDEZVOUS_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Service {
    state: Arc<Mutex<JobState>>,
    durable: DurableWaiter,
}

impl Service {
    pub fn new(state: Arc<Mutex<JobState>>) -> Service {
        let durable = state.lock().unwrap_or_else(|p| p.into_inner()).durability();
        Service { state, durable }
    }

    fn lock(&self) -> MutexGuard<'_, JobState> {
        // A panic while holding the lock would be a bug; keep serving what the state holds.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state, then, with the lock released, waits until every change made so
    /// far is on disk: an answer never runs ahead of what a restarted coordinator would know,
    /// and no lock is held while the disk syncs.
    async fn durably<T>(
        &self,
        f: impl FnOnce(&mut JobState) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        let (result, seq) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.store_queued())
        };
        self.durable.wait(seq).await?;
        result
    }
}

/// The status code a refusal of the state machine travels with.
impl From<StateError> for Status {
    fn from(e: StateError) -> Status {
        let message = e.to_string();
        match e {
            StateError::InvalidArgument(_) => Status::invalid_argument(message),
            StateError::NotFound(_) => Status::not_found(message),
            StateError::FailedPrecondition(_) => Status::failed_precondition(message),
            StateError::OutOfRange(_) => Status::out_of_range(message),
            StateError::PermissionDenied(_) => Status::permission_denied(message),
            StateError::Store(_) => Status::internal(message),
        }
    }
}

/// Records latency and outcome of one RPC.
fn observe<T>(
    method: &'static str,
    start: Instant,
    result: Result<T, StateError>,
) -> Result<Response<T>, Status> {
    let result = result.map_err(Status::from);
    let code = match &result {
        Ok(_) => "ok".to_string(),
        Err(s) => format!("{:?}", s.code()).to_lowercase(),
    };
    metrics::histogram!("ferry_rpc_seconds", "method" => method)
        .record(start.elapsed().as_secs_f64());
    metrics::counter!("ferry_rpc_total", "method" => method, "code" => code).increment(1);
    if let Err(s) = &result {
        if !matches!(s.code(), tonic::Code::FailedPrecondition) {
            tracing::debug!(method, code = ?s.code(), "{}", s.message());
        }
    }
    result.map(Response::new)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Service {
    async fn join(
        &self,
        req: Request<proto::JoinRequest>,
    ) -> Result<Response<proto::JoinReply>, Status> {
        let start = Instant::now();
        let r = req.into_inner();
        let result = self
            .durably(|s| s.join(r.into(), Instant::now()))
            .await
            .map(proto::JoinReply::from);
        observe("join", start, result)
    }

    async fn heartbeat(
        &self,
        req: Request<proto::HeartbeatRequest>,
    ) -> Result<Response<proto::HeartbeatReply>, Status> {
        let start = Instant::now();
        let result = self
            .lock()
            .heartbeat(&req.get_ref().into(), Instant::now())
            .map(proto::HeartbeatReply::from);
        observe("heartbeat", start, result)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _req: Request<proto::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let rx = self.lock().subscribe_events();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx)
            // A slow watcher that fell behind just misses events; it re-reads Status if it cares.
            .filter_map(|e| e.ok().map(|e| Ok(proto::WatchEvent::from(e))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn rendezvous(
        &self,
        req: Request<proto::RendezvousRequest>,
    ) -> Result<Response<proto::RendezvousReply>, Status> {
        let start = Instant::now();
        let mut req = RendezvousRequest::from(req.get_ref());
        let deadline = tokio::time::Instant::now() + RENDEZVOUS_WAIT;
        let mut changes = self.lock().subscribe_changes();
        let result = loop {
            changes.borrow_and_update();
            let outcome = self.durably(|s| s.rendezvous(&req, Instant::now())).await;
            // The offered steps were taken (or refused) on the first pass.
            req.uncommitted.clear();
            let status = match outcome {
                Err(e) => break Err(e),
                Ok(RendezvousOutcome::Ready(assignment)) => break Ok(assignment.into()),
                Ok(RendezvousOutcome::Released) => rendezvous_reply::Status::Released,
                Ok(RendezvousOutcome::Stopped) => rendezvous_reply::Status::Stopped,
                Ok(RendezvousOutcome::Finished) => rendezvous_reply::Status::Finished,
                Ok(RendezvousOutcome::SendBlob(message)) => {
                    break Ok(proto::RendezvousReply {
                        status: rendezvous_reply::Status::Wait as i32,
                        message,
                        send_blob: true,
                        ..Default::default()
                    })
                }
                Ok(RendezvousOutcome::Wait(message)) => {
                    let timed_out = tokio::select! {
                        r = changes.changed() => r.is_err(),
                        _ = tokio::time::sleep_until(deadline) => true,
                    };
                    if !timed_out {
                        continue;
                    }
                    break Ok(proto::RendezvousReply {
                        status: rendezvous_reply::Status::Wait as i32,
                        message,
                        ..Default::default()
                    });
                }
            };
            break Ok(proto::RendezvousReply {
                status: status as i32,
                ..Default::default()
            });
        };
        observe("rendezvous", start, result)
    }

    async fn commit_steps(
        &self,
        req: Request<proto::CommitStepsRequest>,
    ) -> Result<Response<proto::CommitStepsReply>, Status> {
        let start = Instant::now();
        let req = req.get_ref().into();
        let result = self
            .durably(|s| s.commit(&req, Instant::now()))
            .await
            .map(proto::CommitStepsReply::from);
        observe("commit_steps", start, result)
    }

    async fn report_checkpoint(
        &self,
        req: Request<proto::CheckpointReport>,
    ) -> Result<Response<proto::CheckpointReply>, Status> {
        let start = Instant::now();
        let req = req.get_ref().into();
        let result = self
            .durably(|s| s.report_checkpoint(&req, Instant::now()))
            .await
            .map(|()| proto::CheckpointReply {});
        observe("report_checkpoint", start, result)
    }

    async fn report_failure(
        &self,
        req: Request<proto::FailureReport>,
    ) -> Result<Response<proto::FailureReply>, Status> {
        let start = Instant::now();
        let req = req.get_ref().into();
        let result = self
            .durably(|s| s.report_failure(&req, Instant::now()))
            .await
            .map(|generation| proto::FailureReply { generation });
        observe("report_failure", start, result)
    }

    async fn leave(
        &self,
        req: Request<proto::LeaveRequest>,
    ) -> Result<Response<proto::LeaveReply>, Status> {
        let start = Instant::now();
        let id = req.get_ref().worker_id.clone();
        let result = self
            .durably(|s| s.leave(&id, Instant::now()))
            .await
            .map(|left| proto::LeaveReply { left });
        observe("leave", start, result)
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn status(
        &self,
        _req: Request<proto::StatusRequest>,
    ) -> Result<Response<proto::StatusReply>, Status> {
        let start = Instant::now();
        let result = Ok(self.lock().status(Instant::now()).into());
        observe("status", start, result)
    }

    async fn scale(
        &self,
        req: Request<proto::ScaleRequest>,
    ) -> Result<Response<proto::ScaleReply>, Status> {
        let start = Instant::now();
        let workers = req.get_ref().workers;
        let result = self
            .durably(|s| s.scale(workers, Instant::now()))
            .await
            .map(proto::ScaleReply::from);
        observe("scale", start, result)
    }

    async fn stop(
        &self,
        _req: Request<proto::StopRequest>,
    ) -> Result<Response<proto::StopReply>, Status> {
        let start = Instant::now();
        let result = self
            .durably(|s| s.stop())
            .await
            .map(|committed_steps| proto::StopReply { committed_steps });
        observe("stop", start, result)
    }

    async fn ledger(
        &self,
        req: Request<proto::LedgerRequest>,
    ) -> Result<Response<proto::LedgerReply>, Status> {
        let start = Instant::now();
        let r = req.get_ref();
        // The ledger is read from the store: first let every commit made so far reach it.
        if let Err(e) = self.durably(|_| Ok(())).await {
            return observe("ledger", start, Err(e));
        }
        let state = self.lock();
        let result = state.ledger(r.from_step, r.to_step).map(|entries| {
            let meta = state.ledger_meta();
            proto::LedgerReply {
                entries: entries
                    .into_iter()
                    .map(|e| proto::LedgerEntry {
                        step: e.step,
                        generation: e.generation,
                        world_size: e.world_size,
                        slices: e
                            .slices
                            .into_iter()
                            .map(|s| proto::RankSlice {
                                rank: s.rank,
                                worker_id: s.worker_id,
                                stream_start: s.stream_start,
                                count: s.count,
                            })
                            .collect(),
                        loss: e.loss,
                        tokens: e.tokens,
                        step_time_s: e.step_time_s,
                    })
                    .collect(),
                num_sequences: meta.num_sequences,
                global_batch: meta.global_batch,
                seed: meta.seed,
                rollbacks: meta.rollbacks,
                redone_steps: meta.redone_steps,
            }
        });
        drop(state);
        observe("ledger", start, result)
    }
}

/// The server-side token check: every RPC must carry `authorization: Bearer <job token>`.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Arc<Vec<u8>>,
}

impl TokenCheck {
    pub fn new(token: &str) -> TokenCheck {
        TokenCheck {
            expected: Arc::new(format!("Bearer {token}").into_bytes()),
        }
    }
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req.metadata().get("authorization").map(|v| v.as_bytes());
        let ok = given.is_some_and(|g| constant_time_eq(g, &self.expected));
        if ok {
            return Ok(req);
        }
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown peer".to_string(), |a| a.to_string());
        let why = if given.is_none() {
            "no job token"
        } else {
            "wrong job token"
        };
        tracing::warn!(%peer, "rejected an RPC: {why}");
        metrics::counter!("ferry_rpc_rejected_total", "reason" => why).increment(1);
        Err(Status::unauthenticated(format!(
            "{why}: this coordinator needs the job's token"
        )))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
