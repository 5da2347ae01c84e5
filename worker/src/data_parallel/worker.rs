//! `ferry worker`: one data-parallel rank of a cluster job, elastic.
//!
//! Read top to bottom in [`run_worker`]: join the coordinator, then forever: rendezvous into a
//! generation, connect the collective, take rank 0's state by broadcast, and train the steps
//! the coordinator plans until it says to regroup, finish, stop or go. A dead peer makes the
//! collective fail within its timeout; the worker reports it and goes back to rendezvous with
//! its weights at the last step it applied, so nothing is lost and nothing hangs.

use super::flat::{
    all_reduce_bytes, all_reduce_grads, broadcast_state, parameter_checksum, Buckets,
};
use super::group::group_peers;
use super::overlap::{self, Overlapped};
use super::telemetry::{self, TelemetryOptions};
use crate::checkpoint::{self, TrainerState};
use crate::collective::{nccl, Collective, CollectiveError, GroupSpec, RingAllReduce};
use crate::metrics::MetricsLog;
use crate::train::{Engine, TrainConfig, METRICS_FILE};
use anyhow::{bail, Context, Result};
use ferry_common::client::{with_backoff, ClientConfig, Clients};
use ferry_common::job::{Backend, GradientDtype, JobSpec};
use ferry_common::proto::{self, next_step_reply, rendezvous_reply, StateSource};
use ferry_common::sampler::sequences_digest;
use serde_json::json;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Code, Status};

/// How a worker process may end without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    Finished,
    Stopped,
    Released,
}

pub struct WorkerOptions {
    pub coordinator: ClientConfig,
    /// Where the collective listens ("host:port"; port 0 = any).
    pub data_listen: String,
    /// The host peers use to reach this worker's data port.
    pub advertise_host: String,
    pub threads: usize,
    pub device: String,
    /// How long to keep retrying a coordinator that does not answer.
    pub patience: Duration,
    pub telemetry: TelemetryOptions,
}

/// What heartbeats report, updated after every step.
#[derive(Default, Clone)]
struct Progress {
    generation: u64,
    step: u64,
    loss: f64,
    tokens_per_s: f64,
}

/// One step's outcome that sends the worker back to rendezvous.
enum Regroup {
    /// The coordinator moved on to a new generation.
    Asked,
    /// The collective failed (dead or wedged peer, cut link); reported to the coordinator.
    Failed(Failure),
}

/// A failed collective as the coordinator hears of it.
struct Failure {
    why: String,
    /// The rank whose link failed, when the error names one (see `CollectiveError::suspect`).
    suspect: Option<usize>,
}

impl Failure {
    fn of(what: &str, e: &CollectiveError) -> Failure {
        Failure {
            why: format!("{what}: {e}"),
            suspect: e.suspect(),
        }
    }
}

/// What rank 0 logs of a step once it counts: `step` is the number of steps committed with it.
#[derive(Clone, Debug)]
struct StepRecord {
    step: u64,
    generation: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    secs: f64,
    tokens_per_s: f64,
    allreduce_s: f64,
    /// Waiting for the coordinator: the plan and the commit.
    coordinator_s: f64,
    world: u32,
}

enum Outcome {
    Exit(WorkerExit),
    Regroup(Regroup),
}

/// This worker's id at the coordinator. It changes when the worker joins again after the
/// coordinator forgot it; heartbeats and the SIGTERM handler read the current one.
pub(super) type SharedId = Arc<Mutex<String>>;

struct Worker {
    rt: tokio::runtime::Runtime,
    clients: Clients,
    /// The coordinator's address, for errors.
    coordinator: String,
    id: SharedId,
    /// What this worker says when it joins, kept to join again (see [`Worker::rejoin`]).
    join_request: proto::JoinRequest,
    job_id: String,
    spec: JobSpec,
    cfg: TrainConfig,
    token: String,
    listener: TcpListener,
    engine: Engine,
    /// The CUDA device when the group talks NCCL; `None` for the CPU ring.
    nccl_device: Option<usize>,
    watchdog: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Steps applied to the weights this worker holds; `None` until it holds a group's state.
    state_step: Option<u64>,
    generation: u64,
    progress: Arc<Mutex<Progress>>,
    patience: Duration,
    metrics: Option<MetricsLog>,
    /// The last step this worker applied. If the next group starts right after it and this
    /// worker is that group's rank 0, the step may still lack its metrics line: its commit was
    /// refused while the group changed (the coordinator then records it from the held state),
    /// or the old rank 0 died between the step's commit and its line.
    last_applied: Option<StepRecord>,
    /// Fault injection for tests (see [`PAUSE_BEFORE_STEP_LINE`]).
    pause_before_step_line: Option<(u64, Duration)>,
    /// How gradients are grouped for the all-reduce (fixed by the model's parameters).
    buckets: Buckets,
}

/// `STEP:MS`: as rank 0, wait MS milliseconds between step STEP's commit and its metrics line,
/// so a test can kill rank 0 in that window and check the next rank 0 writes the line.
pub const PAUSE_BEFORE_STEP_LINE: &str = "FERRY_FAULT_PAUSE_BEFORE_STEP_LINE";

fn pause_before_step_line() -> Result<Option<(u64, Duration)>> {
    let Ok(value) = std::env::var(PAUSE_BEFORE_STEP_LINE) else {
        return Ok(None);
    };
    let parsed = value
        .split_once(':')
        .and_then(|(step, ms)| Some((step.parse().ok()?, ms.parse().ok()?)));
    match parsed {
        Some((step, ms)) => Ok(Some((step, Duration::from_millis(ms)))),
        None => bail!("{PAUSE_BEFORE_STEP_LINE}={value:?}: expected STEP:MS, e.g. 5:2000"),
    }
}

/// A failed coordinator call, naming the coordinator: after `--patience-s` of an unreachable
/// coordinator this is the line the worker exits with.
fn rpc(coordinator: &str, what: &str, s: Status) -> anyhow::Error {
    anyhow::anyhow!(
        "coordinator {coordinator} {what}: {} ({:?})",
        s.message(),
        s.code()
    )
}

pub fn run_worker(opts: WorkerOptions) -> Result<WorkerExit> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let _in_runtime = rt.enter();
    let listener = TcpListener::bind(&opts.data_listen)
        .with_context(|| format!("--data-listen {}: cannot bind", opts.data_listen))?;
    let data_addr = format!("{}:{}", opts.advertise_host, listener.local_addr()?.port());
    let metrics_addr = telemetry::serve(&rt, &opts.telemetry)?
        .map(|a| format!("{}:{}", opts.advertise_host, a.port()))
        .unwrap_or_default();
    let clients = Clients::connect_lazy(&opts.coordinator)?;
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| opts.advertise_host.clone());
    let join_request = proto::JoinRequest {
        host,
        data_addr: data_addr.clone(),
        devices: vec![opts.device.clone()],
        pid: std::process::id(),
        metrics_addr,
    };
    let joined = rt
        .block_on(with_backoff(opts.patience, || {
            let mut c = clients.coordinator.clone();
            let req = join_request.clone();
            async move { c.join(req).await.map(|r| r.into_inner()) }
        }))
        .map_err(|s| rpc(&opts.coordinator.address, "join", s))?;
    telemetry::joined(&joined.worker_id, &joined.job_id);
    let id: SharedId = Arc::new(Mutex::new(joined.worker_id.clone()));
    super::shutdown::leave_on_sigterm(&rt, &clients, id.clone());
    // Heartbeats start at once: loading and checking the data can take longer than the timeout.
    let progress = Arc::new(Mutex::new(Progress::default()));
    spawn_heartbeats(
        &rt,
        &clients,
        id.clone(),
        joined.heartbeat_interval_s,
        progress.clone(),
    );
    let spec = JobSpec::from_toml(&joined.job_toml, "the coordinator's job spec")?;
    let cfg = TrainConfig::from_job(&spec, opts.threads, &opts.device);
    cfg.validate()?;
    let engine = Engine::new(&cfg)?;
    let buckets = Buckets::new(&engine.ps, spec.cluster.bucket_mib);
    // `auto` assumes a homogeneous group: GPU workers use NCCL, CPU workers the ring.
    let gpu = match engine.device {
        tch::Device::Cuda(i) => Some(i),
        _ => None,
    };
    let nccl_device = match (spec.cluster.backend, gpu) {
        (Backend::Ring, _) => None,
        (Backend::Auto, Some(i)) if nccl::nccl_available() => Some(i),
        (Backend::Auto, _) => None,
        (Backend::Nccl, Some(i)) if nccl::nccl_available() => Some(i),
        (Backend::Nccl, _) => bail!(
            "cluster.backend = \"nccl\" but this worker has no usable GPU and NCCL ({}); \
             use backend = \"ring\" or \"auto\"",
            if gpu.is_some() {
                "NCCL did not load"
            } else {
                "device is the CPU"
            }
        ),
    };
    eprintln!(
        "worker {} joined job {} ({}); data plane on {data_addr}",
        joined.worker_id, spec.job.name, joined.job_id
    );
    let mut w = Worker {
        rt,
        clients,
        coordinator: opts.coordinator.address.clone(),
        id,
        join_request,
        job_id: joined.job_id,
        token: opts.coordinator.token.clone(),
        spec,
        cfg,
        listener,
        engine,
        nccl_device,
        watchdog: Mutex::new(None),
        state_step: None,
        generation: 0,
        progress,
        patience: opts.patience,
        metrics: None,
        last_applied: None,
        pause_before_step_line: pause_before_step_line()?,
        buckets,
    };
    let exit = loop {
        let reply = w.rendezvous()?;
        match reply.status() {
            rendezvous_reply::Status::Ready => {}
            rendezvous_reply::Status::Released => break WorkerExit::Released,
            rendezvous_reply::Status::Stopped => break WorkerExit::Stopped,
            rendezvous_reply::Status::Finished => break WorkerExit::Finished,
            other => bail!("coordinator rendezvous: unexpected answer {other:?}"),
        }
        match w.run_generation(&reply)? {
            Outcome::Exit(exit) => break exit,
            Outcome::Regroup(Regroup::Asked) => {}
            Outcome::Regroup(Regroup::Failed(Failure { why, suspect })) => {
                eprintln!("generation {}: {why}; back to rendezvous", reply.generation);
                let req = proto::FailureReport {
                    worker_id: w.id(),
                    generation: reply.generation,
                    message: why,
                    suspect_rank: suspect.map(|r| r as u32),
                };
                let _ = w.call("report_failure", |mut c| {
                    let req = req.clone();
                    async move { c.report_failure(req).await }
                });
            }
        }
    };
    // Say goodbye so the coordinator need not wait out a heartbeat timeout (best effort).
    let mut c = w.clients.coordinator.clone();
    let id = w.id();
    let _ = w.rt.block_on(async move {
        tokio::time::timeout(
            Duration::from_secs(5),
            c.leave(proto::LeaveRequest { worker_id: id }),
        )
        .await
    });
    Ok(exit)
}

/// Heartbeats, at the interval the coordinator asked for, on the async runtime. A worker the
/// coordinator no longer knows (declared lost while unreachable, or forgotten in a restart)
/// keeps its process and its weights: the training loop finds out at its next call and joins
/// again ([`Worker::rejoin`]); heartbeats follow the new id.
fn spawn_heartbeats(
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
    /// Whether this step reduces gradients while backward runs: asked for, with peers to
    /// sum with (the ring on the host, NCCL on a side stream).
    fn overlaps(&self, coll: &dyn Collective) -> bool {
        self.spec.cluster.overlap_backward && coll.world_size() > 1
    }

    fn id(&self) -> String {
        self.id.lock().map(|id| id.clone()).unwrap_or_default()
    }

    /// A unary call with retries while the coordinator is unreachable.
    fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(proto::coordinator_client::CoordinatorClient<ferry_common::client::Authed>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.call_status(f)
            .map_err(|s| rpc(&self.coordinator, what, s))
    }

    /// [`call`](Self::call), keeping the coordinator's answer for callers that act on its code.
    fn call_status<T, F, Fut>(&self, f: F) -> Result<T, Status>
    where
        F: Fn(proto::coordinator_client::CoordinatorClient<ferry_common::client::Authed>) -> Fut,
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
    fn rejoin(&mut self, why: &str) -> Result<()> {
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

    fn rendezvous(&mut self) -> Result<proto::RendezvousReply> {
        let mut last_message = String::new();
        loop {
            // With NCCL every worker offers a unique id; the coordinator hands rank 0's to all.
            let blob = match self.nccl_device {
                Some(_) => nccl::unique_id().map_err(|e| anyhow::anyhow!("NCCL unique id: {e}"))?,
                None => Vec::new(),
            };
            let req = proto::RendezvousRequest {
                worker_id: self.id(),
                known_generation: self.generation,
                has_state: self.state_step.is_some(),
                state_step: self.state_step.unwrap_or(0),
                blob,
            };
            let reply = match self.call_status(|mut c| {
                let req = req.clone();
                async move { c.rendezvous(req).await }
            }) {
                Ok(reply) => reply,
                Err(s) if s.code() == Code::NotFound => {
                    self.rejoin(s.message())?;
                    continue;
                }
                Err(s) => return Err(rpc(&self.coordinator, "rendezvous", s)),
            };
            telemetry::beat();
            if reply.status() != rendezvous_reply::Status::Wait {
                return Ok(reply);
            }
            if reply.message != last_message {
                eprintln!("rendezvous: {}", reply.message);
                last_message = reply.message;
            }
        }
    }

    fn connect(&self, reply: &proto::RendezvousReply) -> Result<Box<dyn Collective>, Failure> {
        let peers = group_peers(reply, self.spec.max_workers()).map_err(|why| Failure {
            why: format!("the coordinator's rendezvous reply is malformed: {why}"),
            suspect: None,
        })?;
        let spec = GroupSpec {
            rank: reply.rank as usize,
            world_size: reply.world_size as usize,
            peers,
            generation: reply.generation,
            job_token: self.token.clone(),
            timeout: Duration::from_secs_f64(self.spec.cluster.collective_timeout_s),
        };
        match self.nccl_device {
            None => RingAllReduce::connect(&self.listener, &spec)
                .map(|r| Box::new(r) as Box<dyn Collective>)
                .map_err(|e| Failure::of("cannot connect the ring", &e)),
            Some(device) => {
                let comm = nccl::NcclCollective::new(&spec, &reply.blob, device)
                    .map_err(|e| Failure::of("cannot create the NCCL communicator", &e))?;
                self.watch_for_regroup(reply.generation, comm.abort_handle());
                Ok(Box::new(comm))
            }
        }
    }

    /// NCCL's watchdog: a membership change announced while a collective is blocked aborts the
    /// communicator, so the rank goes back to rendezvous instead of waiting out the timeout.
    fn watch_for_regroup(&self, generation: u64, abort: nccl::NcclAbortHandle) {
        let mut c = self.clients.coordinator.clone();
        let id = self.id();
        let task = self.rt.spawn(async move {
            let Ok(stream) = c.watch(proto::WatchRequest { worker_id: id }).await else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(event)) = stream.message().await {
                let membership = event.kind() == proto::watch_event::Kind::Membership
                    || event.kind() == proto::watch_event::Kind::WorkerLost;
                if membership && event.generation > generation {
                    abort.abort();
                    return;
                }
            }
        });
        // One watchdog per generation: the previous one's communicator is gone.
        if let Some(old) = self.watchdog.lock().ok().and_then(|mut w| w.replace(task)) {
            old.abort();
        }
    }

    /// Rank 0 makes its state the group's starting point; everyone else receives it.
    fn take_group_state(
        &mut self,
        reply: &proto::RendezvousReply,
        coll: &mut dyn Collective,
    ) -> Result<Option<Failure>> {
        let start = reply.start_step;
        if reply.rank == 0 {
            match reply.state_source() {
                StateSource::Held => {
                    if self.state_step != Some(start) {
                        bail!("coordinator made this worker rank 0 holding step {start}, but it holds {:?}", self.state_step);
                    }
                }
                StateSource::Checkpoint => {
                    let dir = PathBuf::from(&reply.checkpoint_path);
                    eprintln!("restoring {} for step {start}", dir.display());
                    let st = self.engine.restore(&dir)?;
                    if st.step != start {
                        bail!(
                            "{}: holds step {}, the coordinator resumes at {start}",
                            dir.display(),
                            st.step
                        );
                    }
                }
                StateSource::Init | StateSource::Unspecified => {
                    if self.state_step.is_some() {
                        self.engine = Engine::new(&self.cfg)?;
                    }
                }
            }
        }
        if let Err(e) = broadcast_state(&self.engine.ps, &self.engine.opt, 0, coll) {
            return Ok(Some(Failure::of("state broadcast failed", &e)));
        }
        self.engine.opt.set_steps(start as i64);
        self.state_step = Some(start);
        Ok(None)
    }

    fn run_generation(&mut self, reply: &proto::RendezvousReply) -> Result<Outcome> {
        self.generation = reply.generation;
        let rank = reply.rank;
        let mut coll = match self.connect(reply) {
            Ok(c) => c,
            Err(why) => return Ok(Outcome::Regroup(Regroup::Failed(why))),
        };
        if let Some(why) = self.take_group_state(reply, coll.as_mut())? {
            return Ok(Outcome::Regroup(Regroup::Failed(why)));
        }
        eprintln!(
            "generation {}: rank {rank} of {}, starting at step {}, gradients over {}{}",
            reply.generation,
            reply.world_size,
            reply.start_step,
            coll.transport(),
            match self.spec.cluster.gradient_dtype {
                GradientDtype::Fp32 => "",
                GradientDtype::Bf16 => " as bf16",
            }
        );
        telemetry::enter_generation(reply.generation, rank, reply.world_size);
        if rank == 0 {
            std::fs::create_dir_all(&self.spec.job.run_dir)
                .with_context(|| format!("job.run_dir = {}", self.spec.job.run_dir.display()))?;
            self.metrics = Some(MetricsLog::open(
                &self.spec.job.run_dir.join(METRICS_FILE),
                Some(reply.start_step),
            )?);
        } else {
            self.metrics = None;
        }
        if let Some(record) = self.last_applied.take() {
            let logged = self
                .metrics
                .as_ref()
                .is_some_and(|log| log.has_step_record(record.step));
            if rank == 0 && record.step == reply.start_step && !logged {
                eprintln!(
                    "generation {}: logging step {}, which this worker applied in generation {} \
                     and which has no metrics line yet",
                    reply.generation, record.step, record.generation
                );
                self.after_step(&record)?;
            }
        }
        let tokens_per_step = self.spec.batch.global * self.spec.data.seq_len;
        loop {
            let step = self.state_step.expect("holds the group state");
            telemetry::beat();
            // A step as the user waits for it: from asking for the plan to the commit's answer.
            let t_step = Instant::now();
            let req = proto::NextStepRequest {
                worker_id: self.id(),
                generation: self.generation,
                step,
            };
            let next = match self.call_status(|mut c| {
                let req = req.clone();
                async move { c.next_step(req).await }
            }) {
                Ok(next) => next,
                // Declared lost while it could not be reached: join again at rendezvous.
                Err(s) if s.code() == Code::NotFound => {
                    return Ok(Outcome::Regroup(Regroup::Asked))
                }
                Err(s) => return Err(rpc(&self.coordinator, "next_step", s)),
            };
            let plan = match next.status() {
                next_step_reply::Status::Plan => {
                    next.plan.context("coordinator sent PLAN without a plan")?
                }
                next_step_reply::Status::Regroup => return Ok(Outcome::Regroup(Regroup::Asked)),
                next_step_reply::Status::Finished => {
                    self.finish(rank, step)?;
                    return Ok(Outcome::Exit(WorkerExit::Finished));
                }
                next_step_reply::Status::Stopped => {
                    self.finish(rank, step)?;
                    return Ok(Outcome::Exit(WorkerExit::Stopped));
                }
                next_step_reply::Status::Released => {
                    return Ok(Outcome::Exit(WorkerExit::Released))
                }
                other => bail!("coordinator next_step: unexpected answer {other:?}"),
            };
            let planned_s = t_step.elapsed().as_secs_f64();
            let dtype = self.spec.cluster.gradient_dtype;
            // allreduce_s: the communication the step waited for, after backward.
            let (reduced, allreduce_s) = if self.overlaps(coll.as_ref()) {
                match overlap::forward_backward_all_reduce(
                    &mut self.engine,
                    step,
                    plan.first_micro_batch,
                    &plan.sequence_ids,
                    &self.buckets,
                    dtype,
                    coll.as_mut(),
                )? {
                    Overlapped::Reduced { scalars, exposed_s } => (Ok(scalars), exposed_s),
                    Overlapped::Failed(e) => (Err(e), 0.0),
                }
            } else {
                let partial = self.engine.forward_backward(
                    step,
                    plan.first_micro_batch,
                    &plan.sequence_ids,
                )?;
                let t_reduce = Instant::now();
                let r = all_reduce_grads(
                    &self.engine.ps,
                    &self.buckets,
                    &[partial],
                    dtype,
                    coll.as_mut(),
                );
                (r, t_reduce.elapsed().as_secs_f64())
            };
            let reduced = match reduced {
                Ok(r) => r,
                Err(e) => {
                    self.engine.ps.zero_grad();
                    return Ok(Outcome::Regroup(Regroup::Failed(Failure::of(
                        &format!("all-reduce of step {step} failed"),
                        &e,
                    ))));
                }
            };
            let loss = reduced.first().copied().unwrap_or(f64::NAN);
            let lr = self.engine.schedule.at(step);
            let grad_norm = self.engine.apply_update(step, lr, loss)?;
            self.state_step = Some(step + 1);
            let every = self.spec.cluster.checksum_every;
            if every > 0 && (step + 1) % every == 0 {
                if let Some(why) = self.compare_checksums(step + 1, coll.as_mut())? {
                    return Ok(Outcome::Regroup(Regroup::Failed(why)));
                }
            }
            let secs = t_step.elapsed().as_secs_f64();
            let tps = tokens_per_step as f64 / secs;
            let commit = proto::CommitStepRequest {
                worker_id: self.id(),
                generation: self.generation,
                step,
                loss,
                tokens: tokens_per_step,
                step_time_s: secs,
                allreduce_s,
                sequences_digest: sequences_digest(&plan.sequence_ids),
            };
            let mut record = StepRecord {
                step: step + 1,
                generation: self.generation,
                loss,
                lr,
                grad_norm,
                secs,
                tokens_per_s: tps,
                allreduce_s,
                coordinator_s: planned_s,
                world: plan.world_size,
            };
            self.last_applied = Some(record.clone());
            let t_commit = Instant::now();
            let committed = self.call_status(|mut c| {
                let req = commit.clone();
                async move { c.commit_step(req).await }
            });
            match committed {
                Ok(_) => {}
                // The group changed while this step ran; the step is ours (applied) and the
                // coordinator learns so at rendezvous. NotFound: this worker was declared lost
                // meanwhile; it joins again there and offers the step.
                Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                    return Ok(Outcome::Regroup(Regroup::Asked));
                }
                Err(s) => return Err(rpc(&self.coordinator, "commit_step", s)),
            }
            // The step's wall time now includes the commit's round trip.
            record.coordinator_s += t_commit.elapsed().as_secs_f64();
            record.secs = t_step.elapsed().as_secs_f64();
            record.tokens_per_s = tokens_per_step as f64 / record.secs;
            self.last_applied = Some(record.clone());
            let (secs, tps) = (record.secs, record.tokens_per_s);
            if let Ok(mut p) = self.progress.lock() {
                *p = Progress {
                    generation: self.generation,
                    step: step + 1,
                    loss,
                    tokens_per_s: tps,
                };
            }
            telemetry::record_step(&telemetry::StepSample {
                committed_step: step + 1,
                loss,
                tokens: tokens_per_step,
                step_s: secs,
                allreduce_s,
                allreduce_bytes: all_reduce_bytes(
                    &self.engine.ps,
                    1,
                    self.spec.cluster.gradient_dtype,
                    coll.world_size(),
                ),
                flops_per_token: self.engine.flops_per_token,
                peak_gflops: self.engine.peak_gflops,
                world_size: plan.world_size,
            });
            if rank == 0 {
                if let Some((at, pause)) = self.pause_before_step_line {
                    if at == record.step {
                        eprintln!(
                            "{PAUSE_BEFORE_STEP_LINE}: pausing {pause:?} before step {at}'s line"
                        );
                        std::thread::sleep(pause);
                    }
                }
                self.after_step(&record)?;
            }
        }
    }

    /// Ranks compare a checksum of their weights; a difference is a bug that would silently
    /// ruin the run, so the job stops.
    fn compare_checksums(
        &mut self,
        step: u64,
        coll: &mut dyn Collective,
    ) -> Result<Option<Failure>> {
        let mine = parameter_checksum(&self.engine.ps);
        let all = match coll.all_gather(&mine.to_le_bytes()) {
            Ok(all) => all,
            Err(e) => return Ok(Some(Failure::of("checksum exchange failed", &e))),
        };
        if all.iter().any(|b| b.as_slice() != mine.to_le_bytes()) {
            let sums: Vec<String> = all
                .iter()
                .map(|b| {
                    format!(
                        "{:016x}",
                        u64::from_le_bytes(b.as_slice().try_into().unwrap_or([0; 8]))
                    )
                })
                .collect();
            let _ = self.call("stop", |_| {
                let mut admin = self.clients.admin.clone();
                async move { admin.stop(proto::StopRequest {}).await }
            });
            bail!(
                "parameter checksums differ between ranks after step {step} ({}): the replicas diverged; job stopped",
                sums.join(", ")
            );
        }
        Ok(None)
    }

    /// Rank 0, once a step counts: its metrics line, and the evaluation and checkpoint due.
    fn after_step(&mut self, r: &StepRecord) -> Result<()> {
        let StepRecord {
            step,
            loss,
            lr,
            world,
            ..
        } = *r;
        let tps = r.tokens_per_s;
        let mfu = telemetry::model_flops_utilization(
            self.engine.flops_per_token,
            tps,
            self.engine.peak_gflops,
            world,
        );
        if let Some(log) = &mut self.metrics {
            log.write(&json!({
                "event": "step", "step": step, "loss": loss, "lr": lr, "grad_norm": r.grad_norm,
                "tokens": step * self.spec.batch.global * self.spec.data.seq_len,
                "step_ms": r.secs * 1e3, "allreduce_ms": r.allreduce_s * 1e3,
                "coordinator_ms": r.coordinator_s * 1e3, "tokens_per_s": tps,
                "mfu": mfu, "world_size": world, "generation": r.generation,
            }))?;
        }
        if step % 10 == 0 || step == self.spec.job.steps {
            eprintln!(
                "step {step:>6}/{}  loss {loss:.4}  lr {lr:.2e}  {tps:.0} tok/s  world {world}",
                self.spec.job.steps
            );
        }
        let eval_every = self.spec.eval.every;
        if eval_every > 0 && step % eval_every == 0 {
            self.evaluate(step)?;
        }
        let ck = self.spec.checkpoint.every;
        if ck > 0 && step % ck == 0 {
            self.checkpoint(step)?;
        }
        Ok(())
    }

    /// Rank 0's held-out evaluation, printed and logged.
    fn evaluate(&mut self, step: u64) -> Result<()> {
        let report = self.engine.evaluate()?;
        eprintln!("{}", report.summary(step));
        if let Some(log) = &mut self.metrics {
            log.write(&report.record(step))?;
        }
        Ok(())
    }

    fn checkpoint(&mut self, step: u64) -> Result<()> {
        let state = TrainerState {
            step,
            samples_seen: step * self.spec.batch.global,
            tokens_seen: step * self.spec.batch.global * self.spec.data.seq_len,
            seed: self.spec.job.seed,
            rng_derivation:
                "splitmix64(seed, epoch) sample order; dropout seed = mix(seed, step, micro_batch)"
                    .into(),
            optimizer_steps: self.engine.opt.steps(),
            last_loss: None,
        };
        let run_dir = self.spec.job.run_dir.clone();
        let dir = self.engine.save_checkpoint(&run_dir, &state)?;
        checkpoint::prune(&run_dir, self.spec.checkpoint.keep as usize)?;
        if let Some(log) = &mut self.metrics {
            log.write(&json!({"event": "checkpoint", "step": step, "path": dir}))?;
        }
        let req = proto::CheckpointReport {
            worker_id: self.id(),
            generation: self.generation,
            step,
            path: dir.display().to_string(),
        };
        let reported = self.call_status(|mut c| {
            let req = req.clone();
            async move { c.report_checkpoint(req).await }
        });
        match reported {
            Ok(_) => Ok(()),
            // Refused, e.g. the group changed since this step: the checkpoint stays on disk
            // and the next one is reported; the coordinator restores only what it recorded.
            Err(s)
                if matches!(
                    s.code(),
                    Code::PermissionDenied | Code::FailedPrecondition | Code::OutOfRange
                ) =>
            {
                eprintln!(
                    "checkpoint of step {step} not recorded by the coordinator: {}",
                    s.message()
                );
                Ok(())
            }
            Err(s) => Err(rpc(&self.coordinator, "report_checkpoint", s)),
        }
    }

    /// At the end (finished or stopped), rank 0 leaves a checkpoint of the last step.
    fn finish(&mut self, rank: u32, step: u64) -> Result<()> {
        if rank != 0 || step == 0 {
            return Ok(());
        }
        let every = self.spec.eval.every;
        if every > 0 && step % every != 0 {
            self.evaluate(step)?;
        }
        let exists = checkpoint::list(&self.spec.job.run_dir)?
            .iter()
            .any(|(s, _)| *s == step);
        if !exists {
            self.checkpoint(step)?;
        }
        Ok(())
    }
}
