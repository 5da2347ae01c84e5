//! `ferry worker`: one data-parallel rank of a cluster job, elastic.
//!
//! Read top to bottom in [`run_worker`]: join the coordinator, then forever: rendezvous into a
//! generation, connect the collective, take rank 0's state by broadcast, and train: each rank
//! plans its steps from the shared schedule, the all-reduce carries the group's digest and
//! rank 0's word, and rank 0 alone commits the group's steps to the coordinator
//! (`proto/ferry.proto` has the whole protocol). A dead peer makes the collective fail within
//! its timeout; the worker reports it and goes back to rendezvous with its weights at the last
//! step it applied and the steps it cannot know committed, so nothing is lost and nothing hangs.
use super::commits::{control_scalars, read_control, Uncommitted};
use super::coordinator_link::{rpc, spawn_heartbeats, Failure};
use super::flat::{all_reduce_bytes, all_reduce_grads, parameter_checksum, Buckets};
use super::overlap::{self, Overlapped};
use super::rank0::StepRecord;
use super::telemetry::{self, TelemetryOptions};
use anyhow::{bail, Context, Result};
use ferry_collective::{nccl, Collective};
use ferry_engine::metrics::MetricsLog;
use ferry_engine::train::{Engine, TrainConfig, TrainedSamplesLog, METRICS_FILE};
use ferry_rpc::client::{is_transient, with_backoff, ClientConfig, Clients, ATTEMPT_DEADLINE};
use ferry_rpc::proto::{self, commit_steps_reply::Directive, rendezvous_reply};
use ferry_spec::job::{Backend, GradientDtype, JobSpec};
use ferry_spec::schedule::StepSchedule;
use std::net::TcpListener;
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
pub(super) struct Progress {
    pub(super) generation: u64,
    pub(super) step: u64,
    pub(super) loss: f64,
    pub(super) tokens_per_s: f64,
}

/// One step's outcome that sends the worker back to rendezvous.
enum Regroup {
    /// The coordinator moved on to a new generation, stopped the job, or the job's last step
    /// is applied: rendezvous says which.
    Asked,
    /// The collective failed (dead or wedged peer, cut link); reported to the coordinator.
    Failed(Failure),
}

/// This worker's id at the coordinator. It changes when the worker joins again after the
/// coordinator forgot it; heartbeats and the SIGTERM handler read the current one.
pub(super) type SharedId = Arc<Mutex<String>>;

pub(super) struct Worker {
    pub(super) rt: tokio::runtime::Runtime,
    pub(super) clients: Clients,
    /// The coordinator's address, for errors.
    pub(super) coordinator: String,
    pub(super) id: SharedId,
    /// What this worker says when it joins, kept to join again (see [`Worker::rejoin`]).
    pub(super) join_request: proto::JoinRequest,
    pub(super) job_id: String,
    pub(super) spec: JobSpec,
    pub(super) cfg: TrainConfig,
    pub(super) token: String,
    pub(super) listener: TcpListener,
    pub(super) engine: Engine,
    /// What every rank plans its steps from.
    schedule: StepSchedule,
    /// Steps applied in this rank's last generation that it does not know committed.
    pub(super) uncommitted: Uncommitted,
    /// Rank 0's commit on its way to the coordinator.
    inflight: Option<tokio::task::JoinHandle<Result<proto::CommitStepsReply, Status>>>,
    /// This worker's rank in its last generation, and its id then.
    pub(super) last_rank: Option<u32>,
    pub(super) member_id: Option<String>,
    /// The CUDA device when the group talks NCCL; `None` for the CPU ring.
    pub(super) nccl_device: Option<usize>,
    /// An NCCL unique id this worker made as rank 0 of a forming group and no communicator
    /// has used yet.
    pub(super) nccl_id: Option<Vec<u8>>,
    pub(super) watchdog: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Steps applied to the weights this worker holds; `None` until it holds a group's state.
    pub(super) state_step: Option<u64>,
    pub(super) generation: u64,
    progress: Arc<Mutex<Progress>>,
    pub(super) patience: Duration,
    pub(super) metrics: Option<MetricsLog>,
    /// Fault injection for tests (see [`PAUSE_BEFORE_STEP_LINE`], [`PAUSE_BEFORE_COMMIT`]).
    pause_before_step_line: Option<(u64, Duration)>,
    pause_before_commit: Option<(u64, Duration)>,
    /// How gradients are grouped for the all-reduce (fixed by the model's parameters).
    buckets: Buckets,
}

/// `STEP:MS`: as rank 0, wait MS milliseconds between step STEP's commit and its metrics line,
/// so a test can kill rank 0 in that window and check the next rank 0 writes the line.
pub const PAUSE_BEFORE_STEP_LINE: &str = "FERRY_FAULT_PAUSE_BEFORE_STEP_LINE";

/// `STEP:MS`: as rank 0, wait MS milliseconds after applying step STEP (its all-reduce done)
/// and before committing it, so a test can kill rank 0 in that window and check the step is
/// committed once, from the other ranks' offers.
pub const PAUSE_BEFORE_COMMIT: &str = "FERRY_FAULT_PAUSE_BEFORE_COMMIT";

fn fault_pause(var: &str) -> Result<Option<(u64, Duration)>> {
    let Ok(value) = std::env::var(var) else {
        return Ok(None);
    };
    let parsed = value
        .split_once(':')
        .and_then(|(step, ms)| Some((step.parse().ok()?, ms.parse().ok()?)));
    match parsed {
        Some((step, ms)) => Ok(Some((step, Duration::from_millis(ms)))),
        None => bail!("{var}={value:?}: expected STEP:MS, e.g. 5:2000"),
    }
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
    let mut engine = Engine::new(&cfg)?;
    engine.trained_log = TrainedSamplesLog::from_env()?;
    // Every rank plans its steps itself: its data must be the coordinator's.
    if engine.num_sequences() != joined.num_sequences {
        bail!(
            "data.shards = {}: this worker's copy holds {} training sequences of {} tokens, the \
             coordinator's {}: every worker needs the same prepared data",
            spec.data.shards.display(),
            engine.num_sequences(),
            spec.data.seq_len,
            joined.num_sequences
        );
    }
    let schedule = StepSchedule::for_job(&spec, joined.num_sequences);
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
        schedule,
        uncommitted: Uncommitted::default(),
        inflight: None,
        last_rank: None,
        member_id: None,
        nccl_device,
        nccl_id: None,
        watchdog: Mutex::new(None),
        state_step: None,
        generation: 0,
        progress,
        patience: opts.patience,
        metrics: None,
        pause_before_step_line: fault_pause(PAUSE_BEFORE_STEP_LINE)?,
        pause_before_commit: fault_pause(PAUSE_BEFORE_COMMIT)?,
        buckets,
    };
    let exit = loop {
        let reply = w.rendezvous()?;
        match reply.status() {
            rendezvous_reply::Status::Ready => {}
            rendezvous_reply::Status::Released => break WorkerExit::Released,
            rendezvous_reply::Status::Stopped => {
                w.finish()?;
                break WorkerExit::Stopped;
            }
            rendezvous_reply::Status::Finished => {
                // Every step is committed now, those this rank offered included.
                w.log_committed(u64::MAX)?;
                w.finish()?;
                break WorkerExit::Finished;
            }
            other => bail!("coordinator rendezvous: unexpected answer {other:?}"),
        }
        match w.run_generation(&reply)? {
            Regroup::Asked => {}
            Regroup::Failed(Failure { why, suspect }) => {
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

impl Worker {
    /// Whether this step reduces gradients while backward runs: asked for, with peers to
    /// sum with (the ring on the host, NCCL on a side stream).
    fn overlaps(&self, coll: &dyn Collective) -> bool {
        self.spec.cluster.overlap_backward && coll.world_size() > 1
    }

    pub(super) fn id(&self) -> String {
        self.id.lock().map(|id| id.clone()).unwrap_or_default()
    }

    fn run_generation(&mut self, reply: &proto::RendezvousReply) -> Result<Regroup> {
        self.generation = reply.generation;
        let rank = reply.rank;
        let mut coll = match self.connect(reply) {
            Ok(c) => c,
            Err(why) => return Ok(Regroup::Failed(why)),
        };
        if let Some(why) = self.take_group_state(reply, coll.as_mut())? {
            return Ok(Regroup::Failed(why));
        }
        let id = self.id();
        if let Some(log) = &mut self.engine.trained_log {
            log.enter(reply.generation, rank, reply.world_size, &id);
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
        // Rank 0 holding the group's start applied every step before it, and they are
        // committed now (by the old rank 0, or from offers at rendezvous); a step whose old
        // rank 0 died before its line gets its line here.
        if rank == 0 && reply.state_source() == proto::StateSource::Held {
            self.log_committed(reply.start_step)?;
        }
        self.uncommitted.clear();
        self.inflight = None;
        self.last_rank = Some(rank);
        self.member_id = Some(self.id());
        let tokens_per_step = self.spec.batch.global * self.spec.data.seq_len;
        let world = u64::from(reply.world_size);
        // Rank 0's word to the group, sent in the next step's all-reduce.
        let mut directive = Directive::Continue;
        loop {
            let step = self.state_step.expect("holds the group state");
            if step >= self.spec.job.steps {
                // Rendezvous answers FINISHED once the steps are committed.
                if rank == 0 {
                    self.commit_and_wait()?;
                }
                return Ok(Regroup::Asked);
            }
            telemetry::beat();
            // A step as the user waits for it, rank 0's commits included.
            let t_step = Instant::now();
            let plan = self.schedule.plan(step, u64::from(rank), world);
            let word = (rank == 0).then_some((directive, self.uncommitted.len() as u64));
            let control = control_scalars(plan.digest(), word);
            let dtype = self.spec.cluster.gradient_dtype;
            // allreduce_s: the communication the step waited for, after backward.
            let (reduced, allreduce_s) = if self.overlaps(coll.as_ref()) {
                match overlap::forward_backward_all_reduce(
                    &mut self.engine,
                    step,
                    plan.first_micro_batch,
                    &plan.sequence_ids,
                    &control,
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
                let scalars: Vec<f64> = std::iter::once(partial).chain(control).collect();
                let t_reduce = Instant::now();
                let r = all_reduce_grads(
                    &self.engine.ps,
                    &self.buckets,
                    &scalars,
                    dtype,
                    coll.as_mut(),
                );
                (r, t_reduce.elapsed().as_secs_f64())
            };
            let reduced = match reduced {
                Ok(r) => r,
                Err(e) => {
                    self.engine.ps.zero_grad();
                    return Ok(Regroup::Failed(Failure::of(
                        &format!("all-reduce of step {step} failed"),
                        &e,
                    )));
                }
            };
            let loss = reduced.first().copied().unwrap_or(f64::NAN);
            let (group_digest, word, behind) = read_control(&reduced[1..]);
            let lr = self.engine.schedule.at(step);
            let grad_norm = self.engine.apply_update(step, lr, loss)?;
            self.state_step = Some(step + 1);
            let every = self.spec.cluster.checksum_every;
            if every > 0 && (step + 1) % every == 0 {
                if let Some(why) = self.compare_checksums(step + 1, coll.as_mut())? {
                    return Ok(Regroup::Failed(why));
                }
            }
            let secs = t_step.elapsed().as_secs_f64();
            let tps = tokens_per_step as f64 / secs;
            if rank != 0 {
                // Rank 0 has seen the steps before `step - behind` committed.
                self.uncommitted.take_committed(step.saturating_sub(behind));
            }
            self.uncommitted.push(
                proto::TrainedStep {
                    step,
                    loss,
                    tokens: tokens_per_step,
                    step_time_s: secs,
                    allreduce_s,
                    group_digest,
                },
                StepRecord {
                    step: step + 1,
                    generation: self.generation,
                    loss,
                    lr,
                    grad_norm,
                    secs,
                    tokens_per_s: tps,
                    allreduce_s,
                    coordinator_s: 0.0,
                    world: reply.world_size,
                },
            );
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
                    1 + control_scalars(0, None).len(),
                    self.spec.cluster.gradient_dtype,
                    coll.world_size(),
                ),
                flops_per_token: self.engine.flops_per_token,
                peak_gflops: self.engine.peak_gflops,
                world_size: reply.world_size,
            });
            // Rank 0's word in this step's all-reduce ends the generation on every rank alike.
            if matches!(word, Directive::Regroup | Directive::Stop) {
                if rank == 0 {
                    self.commit_and_wait()?;
                }
                return Ok(Regroup::Asked);
            }
            let c = &self.spec.cluster;
            let interval = Duration::from_secs_f64(c.commit_interval_s);
            if rank == 0 && step + 1 < self.spec.job.steps {
                // A step with an evaluation or a checkpoint is committed before the weights
                // move on: both are of the weights at that step.
                let n = step + 1;
                let (ev, ck) = (self.spec.eval.every, self.spec.checkpoint.every);
                let answer = if (ev > 0 && n % ev == 0) || (ck > 0 && n % ck == 0) {
                    self.commit_and_wait()?
                } else {
                    let due = self.uncommitted.due(c.commit_every, interval);
                    self.commit_in_background(due)?
                };
                if let Some(d) = answer {
                    directive = d;
                }
            }
        }
    }

    /// Rank 0 between steps: takes the answer of the commit in flight, if it has come, and
    /// starts the next commit when one is due. Commits run on the async runtime while the
    /// group trains on, so no step waits for the coordinator; an answer's directive goes out
    /// in the next step's all-reduce. A coordinator that does not answer (restarting, cut off)
    /// leaves the steps held for the next commit, for at most the worker's patience.
    fn commit_in_background(&mut self, due: bool) -> Result<Option<Directive>> {
        if let (Some((at, pause)), Some(newest)) =
            (self.pause_before_commit, self.uncommitted.newest_mut())
        {
            if newest.record.step == at {
                eprintln!("{PAUSE_BEFORE_COMMIT}: pausing {pause:?} before committing step {at}");
                std::thread::sleep(pause);
            }
        }
        let mut directive = None;
        if self.inflight.as_ref().is_some_and(|h| h.is_finished()) {
            let handle = self.inflight.take().expect("checked above");
            let answer = self
                .rt
                .block_on(handle)
                .unwrap_or_else(|e| Err(Status::internal(format!("commit task: {e}"))));
            directive = self.take_answer(answer, false)?;
        }
        if directive.is_none() && due && self.inflight.is_none() && !self.uncommitted.is_empty() {
            let req = self.commit_request();
            let mut c = self.clients.coordinator.clone();
            self.inflight = Some(self.rt.spawn(async move {
                match tokio::time::timeout(ATTEMPT_DEADLINE, c.commit_steps(req)).await {
                    Ok(r) => r.map(|r| r.into_inner()),
                    Err(_) => Err(Status::unavailable(format!(
                        "no answer within {}s",
                        ATTEMPT_DEADLINE.as_secs()
                    ))),
                }
            }));
        }
        Ok(directive)
    }

    /// Every step this rank holds, in its generation's name.
    fn commit_request(&self) -> proto::CommitStepsRequest {
        proto::CommitStepsRequest {
            worker_id: self.id(),
            generation: self.generation,
            steps: self.uncommitted.offer(),
        }
    }

    /// Rank 0 at the end of a generation (a directive, the job's last step) and before an
    /// evaluation or checkpoint: the steps it holds are committed before it goes on, retried
    /// for the worker's patience.
    fn commit_and_wait(&mut self) -> Result<Option<Directive>> {
        let t = Instant::now();
        let mut directive = None;
        if let Some(handle) = self.inflight.take() {
            let answer = self
                .rt
                .block_on(handle)
                .unwrap_or_else(|e| Err(Status::internal(format!("commit task: {e}"))));
            directive = self.take_answer(answer, false)?;
        }
        if !self.uncommitted.is_empty() {
            let req = self.commit_request();
            let waited = t.elapsed().as_secs_f64();
            if let Some(newest) = self.uncommitted.newest_mut() {
                // The last step's wall time includes the commit it waited for.
                newest.record.coordinator_s += waited;
                newest.record.secs += waited;
            }
            let answer = self.call_status(|mut c| {
                let req = req.clone();
                async move { c.commit_steps(req).await }
            });
            directive = self.take_answer(answer, true)?;
        }
        Ok(directive)
    }

    /// What a commit's answer means for rank 0: the directive to pass on, or `None` when the
    /// coordinator did not answer and the steps stay held.
    fn take_answer(
        &mut self,
        answer: Result<proto::CommitStepsReply, Status>,
        wait: bool,
    ) -> Result<Option<Directive>> {
        match answer {
            Ok(reply) => {
                self.log_committed(reply.committed_steps)?;
                Ok(Some(match reply.directive() {
                    Directive::Unspecified => Directive::Continue,
                    d => d,
                }))
            }
            // The group changed meanwhile: the steps are offered at rendezvous. NotFound: this
            // worker was declared lost; it joins again there.
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                Ok(Some(Directive::Regroup))
            }
            Err(s)
                if !wait && is_transient(&s) && self.uncommitted.oldest_age() < self.patience =>
            {
                eprintln!(
                    "commit of {} steps: the coordinator did not answer ({}); training on, \
                     committing later",
                    self.uncommitted.len(),
                    s.message()
                );
                Ok(None)
            }
            Err(s) => Err(rpc(&self.coordinator, "commit_steps", s)),
        }
    }

    /// Rank 0: the metrics lines (and the evaluations and checkpoints due) of the held steps
    /// before `committed`, which the coordinator has recorded.
    pub(super) fn log_committed(&mut self, committed: u64) -> Result<()> {
        if self.metrics.is_none() {
            self.uncommitted.take_committed(committed);
            return Ok(());
        }
        for applied in self.uncommitted.take_committed(committed) {
            let record = applied.record;
            if self
                .metrics
                .as_ref()
                .is_some_and(|log| log.has_step_record(record.step))
            {
                continue;
            }
            if record.generation != self.generation {
                eprintln!(
                    "generation {}: logging step {}, which this worker applied in generation {} \
                     and which has no metrics line yet",
                    self.generation, record.step, record.generation
                );
            }
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
        Ok(())
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
}
