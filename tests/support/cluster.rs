//! A real `ferry coordinator` process and simulated workers that speak its gRPC protocol: they
//! join, heartbeat, rendezvous, plan their steps from the shared schedule, and rank 0 commits
//! them, recording what each "trained".
#![allow(dead_code)]

use super::{ferry, prepared_shared_corpus, scratch};
use ferry_rpc::client::{ClientConfig, Clients};
use ferry_rpc::proto::{self, commit_steps_reply::Directive, rendezvous_reply};
use ferry_spec::schedule::StepSchedule;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Status;

pub const TOKEN: &str = "test-token-7d1f";

/// A job spec on the shared corpus; `extra` is appended (more sections or keys).
pub fn job_toml(run_dir: &Path, global: u64, micro: u64, seq_len: u64, cluster: &str) -> String {
    format!(
        r#"[job]
name = "coordinator-test"
steps = 100000
run_dir = "{run}"
seed = 7

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "{shards}"
seq_len = {seq_len}

[batch]
global = {global}
micro = {micro}

[cluster]
{cluster}
"#,
        run = run_dir.display(),
        shards = prepared_shared_corpus().display(),
    )
}

pub struct CoordinatorProc {
    pub child: Option<Child>,
    pub dir: PathBuf,
    pub state: PathBuf,
    pub grpc: String,
    pub http: String,
    pub log: PathBuf,
    pub token_file: PathBuf,
    pub extra_args: Vec<String>,
    /// Makes the `ferry` command to run: on this machine, or on a simulated host.
    ferry: Box<dyn Fn() -> Command + Send + Sync>,
}

impl CoordinatorProc {
    /// Starts a coordinator for `job` in a fresh scratch directory named `name`.
    pub fn start(name: &str, job: &str, extra_args: &[&str]) -> CoordinatorProc {
        Self::start_with(name, job, extra_args, Box::new(ferry), "127.0.0.1:0")
    }

    /// [`start`](Self::start), run by the commands `ferry` makes and listening on `listen`.
    pub fn start_with(
        name: &str,
        job: &str,
        extra_args: &[&str],
        ferry: Box<dyn Fn() -> Command + Send + Sync>,
        listen: &str,
    ) -> CoordinatorProc {
        let dir = scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        let job_path = dir.join("job.toml");
        std::fs::write(&job_path, job).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        let mut c = CoordinatorProc {
            child: None,
            state: dir.join("state"),
            log: dir.join("coordinator.log"),
            dir,
            grpc: String::new(),
            http: String::new(),
            token_file,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            ferry,
        };
        c.spawn(Some(&job_path), listen, None);
        c
    }

    fn spawn(&mut self, job: Option<&Path>, listen: &str, http: Option<&str>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = (self.ferry)();
        cmd.arg("coordinator");
        if let Some(job) = job {
            cmd.arg("--job").arg(job);
        }
        if let Some(http) = http {
            cmd.args(["--http", http]);
        }
        cmd.args(["--listen", listen, "--state"])
            .arg(&self.state)
            .arg("--token-file")
            .arg(&self.token_file)
            .args(&self.extra_args)
            .env("FERRY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd.spawn().expect("spawn ferry coordinator");
        let pid = child.id();
        self.child = Some(child);
        let endpoint = self.state.join("endpoint.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&endpoint) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if v["pid"].as_u64() == Some(u64::from(pid)) {
                        self.grpc = v["grpc"].as_str().unwrap().to_string();
                        self.http = v["http"].as_str().unwrap().to_string();
                        return;
                    }
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("coordinator exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "coordinator did not start: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// Starts again on the same state directory and port, without the job file.
    /// Starts the coordinator again on its state, on the same gRPC and HTTP addresses. The
    /// HTTP one is given: its default, the gRPC port + 1, may be any process's ephemeral port.
    pub fn restart(&mut self) {
        let (listen, http) = (self.grpc.clone(), self.http.clone());
        self.spawn(None, &listen, Some(&http));
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn clients(&self) -> Clients {
        self.clients_with_token(TOKEN)
    }

    pub fn clients_with_token(&self, token: &str) -> Clients {
        Clients::connect_lazy(&ClientConfig {
            address: self.grpc.clone(),
            token: token.to_string(),
            tls_ca: None,
            tls_domain: None,
        })
        .unwrap()
    }

    pub async fn status(&self) -> proto::StatusReply {
        self.clients()
            .admin
            .status(proto::StatusRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn ledger(&self) -> proto::LedgerReply {
        self.clients()
            .admin
            .ledger(proto::LedgerRequest::default())
            .await
            .unwrap()
            .into_inner()
    }
}

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A `ferry worker` process of the coordinator `c`'s job, on loopback ports of its own, its
/// stderr in `<name>.log` beside the coordinator's files. Killed when dropped.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
}

impl WorkerProc {
    pub fn start(c: &CoordinatorProc, name: &str) -> WorkerProc {
        Self::start_with_env(c, name, &[])
    }

    pub fn start_with_env(c: &CoordinatorProc, name: &str, env: &[(&str, &str)]) -> WorkerProc {
        let log = c.dir.join(format!("{name}.log"));
        let child = super::ferry()
            .envs(env.iter().copied())
            .args(["worker", "--threads", "1", "--data-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0", "--state"])
            .arg(&c.state)
            .arg("--token-file")
            .arg(&c.token_file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        WorkerProc { child, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one simulated worker trained in one committed step.
#[derive(Clone, Debug)]
pub struct Trained {
    pub step: u64,
    pub generation: u64,
    pub rank: u32,
    pub stream_start: u64,
    pub ids: Vec<u64>,
}

pub struct SimWorker {
    pub c: Clients,
    pub id: String,
    pub generation: u64,
    pub rank: u32,
    pub world: u32,
    /// Steps applied to the "weights" this worker holds, if it holds any.
    pub state_step: Option<u64>,
    pub trained: Vec<Trained>,
    /// Steps applied in this generation that it does not know committed (offered at
    /// rendezvous; rank 0 commits them).
    pub uncommitted: Vec<proto::TrainedStep>,
    /// The group's blob from the last rendezvous (rank 0's offer).
    pub blob: Vec<u8>,
    schedule: StepSchedule,
}

impl SimWorker {
    pub async fn join(c: &Clients, host: &str) -> SimWorker {
        let mut c = c.clone();
        let reply = c
            .coordinator
            .join(proto::JoinRequest {
                host: host.into(),
                data_addr: format!("{host}:9"),
                devices: vec!["cpu".into()],
                pid: 1,
                metrics_addr: String::new(),
            })
            .await
            .expect("join")
            .into_inner();
        let spec = ferry_spec::job::JobSpec::from_toml(&reply.job_toml, "the coordinator's job")
            .expect("the coordinator's job spec reads back");
        SimWorker {
            c,
            id: reply.worker_id,
            generation: 0,
            rank: 0,
            world: 0,
            state_step: None,
            trained: Vec::new(),
            uncommitted: Vec::new(),
            blob: Vec::new(),
            schedule: StepSchedule::for_job(&spec, reply.num_sequences),
        }
    }

    pub async fn heartbeat(&self) -> Result<proto::HeartbeatReply, Status> {
        self.c
            .coordinator
            .clone()
            .heartbeat(proto::HeartbeatRequest {
                worker_id: self.id.clone(),
                generation: self.generation,
                step: self.state_step.unwrap_or(0),
                loss: 1.0,
                tokens_per_s: 100.0,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Calls Rendezvous, offering its uncommitted steps, until the answer is not WAIT (or
    /// `patience` runs out).
    pub async fn rendezvous(&mut self, patience: Duration) -> rendezvous_reply::Status {
        let deadline = Instant::now() + patience;
        loop {
            let reply = self
                .c
                .coordinator
                .rendezvous(proto::RendezvousRequest {
                    worker_id: self.id.clone(),
                    known_generation: self.generation,
                    has_state: self.state_step.is_some(),
                    state_step: self.state_step.unwrap_or(0),
                    blob: self.id.as_bytes().to_vec(),
                    collective: proto::Collective::Ring as i32,
                    uncommitted: self.uncommitted.clone(),
                    trained_as: String::new(),
                })
                .await
                .expect("rendezvous")
                .into_inner();
            let status = reply.status();
            if status == rendezvous_reply::Status::Wait {
                assert!(
                    Instant::now() < deadline,
                    "{}: still waiting: {}",
                    self.id,
                    reply.message
                );
                continue;
            }
            if status == rendezvous_reply::Status::Ready {
                self.generation = reply.generation;
                self.rank = reply.rank;
                self.world = reply.world_size;
                assert_eq!(reply.peers.len(), reply.world_size as usize);
                // Everyone ends up with rank 0's state (the broadcast).
                self.state_step = Some(reply.start_step);
                self.blob = reply.blob;
                self.uncommitted.clear();
            }
            return status;
        }
    }

    /// What the group of `world` knows of `step` after its all-reduce.
    pub fn trained_step(&mut self, step: u64) -> proto::TrainedStep {
        proto::TrainedStep {
            step,
            loss: 10.0 / (1.0 + step as f64),
            tokens: 64,
            step_time_s: 0.01,
            allreduce_s: 0.001,
            group_digest: self.schedule.group_digest(step, self.world.into()),
        }
    }

    /// Trains the next step of its own plan and applies it (its all-reduce completed),
    /// without telling the coordinator.
    pub fn train(&mut self) {
        let step = self.state_step.expect("holds the group's state");
        let plan = self
            .schedule
            .plan(step, self.rank.into(), self.world.into());
        self.trained.push(Trained {
            step,
            generation: self.generation,
            rank: self.rank,
            stream_start: plan.stream_start,
            ids: plan.sequence_ids,
        });
        let trained = self.trained_step(step);
        self.uncommitted.push(trained);
        self.state_step = Some(step + 1);
    }

    /// Rank 0 commits the steps it holds; returns the committed count and the directive.
    pub async fn commit(&mut self) -> Result<(u64, Directive), Status> {
        let reply = self
            .c
            .coordinator
            .commit_steps(proto::CommitStepsRequest {
                worker_id: self.id.clone(),
                generation: self.generation,
                steps: self.uncommitted.clone(),
            })
            .await?
            .into_inner();
        self.heard_committed(reply.committed_steps);
        Ok((reply.committed_steps, reply.directive()))
    }

    /// Rank 0's word in the next all-reduce: the steps before `committed` are committed.
    pub fn heard_committed(&mut self, committed: u64) {
        self.uncommitted.retain(|s| s.step >= committed);
    }
}

/// All workers come to rendezvous at once (it blocks until the group is complete).
pub async fn rendezvous_all(workers: &mut [SimWorker]) -> Vec<rendezvous_reply::Status> {
    futures::future::join_all(
        workers
            .iter_mut()
            .map(|w| w.rendezvous(Duration::from_secs(60))),
    )
    .await
}

/// The members of the newest generation among `workers`, as indices; rank 0's first.
fn members(workers: &[SimWorker]) -> Vec<usize> {
    let newest = workers.iter().map(|w| w.generation).max().unwrap_or(0);
    let mut m: Vec<usize> = (0..workers.len())
        .filter(|&i| workers[i].generation == newest && workers[i].state_step.is_some())
        .collect();
    m.sort_by_key(|&i| workers[i].rank);
    m
}

/// One step of the group as ferry's ranks run it: each trains its plan, the all-reduce
/// completes, rank 0 commits; returns rank 0's directive.
async fn group_step(workers: &mut [SimWorker]) -> Directive {
    let m = members(workers);
    for &i in &m {
        workers[i].train();
    }
    let (committed, directive) = workers[m[0]].commit().await.expect("commit");
    for &i in &m {
        workers[i].heard_committed(committed);
    }
    directive
}

/// Runs `steps` steps with `workers` as ferry's ranks do. When rank 0's commit says to
/// regroup, the group trains one more step (the word travels in its all-reduce; not when
/// `steps` are done) and everyone, newcomers included, comes to rendezvous. Workers told to go
/// (RELEASED) are taken out of `workers` and returned.
pub async fn run_steps(workers: &mut Vec<SimWorker>, steps: u64) -> Vec<SimWorker> {
    let mut gone = Vec::new();
    let mut done = 0;
    while done < steps {
        let directive = group_step(workers).await;
        done += 1;
        if directive == Directive::Continue {
            continue;
        }
        assert_eq!(directive, Directive::Regroup);
        if done < steps {
            group_step(workers).await;
            done += 1;
        }
        let statuses = rendezvous_all(workers).await;
        let mut i = 0;
        for status in statuses {
            match status {
                rendezvous_reply::Status::Ready => i += 1,
                rendezvous_reply::Status::Released => gone.push(workers.remove(i)),
                other => panic!("unexpected rendezvous answer {other:?}"),
            }
        }
    }
    gone
}

/// Checks the coordinator's ledger and what the workers trained against each other and against
/// the promise: stream positions `0 .. steps*G` each trained exactly once, by the ranks the
/// ledger names; every complete epoch a permutation of all sequences. Returns epochs completed.
/// What the ledger says each rank trained: its slices, mapped to sequence ids through the
/// job's sample order.
pub fn trained_by_ledger(ledger: &proto::LedgerReply) -> Vec<Trained> {
    let mut order = ferry_spec::sampler::SampleOrder::new(ledger.seed, ledger.num_sequences);
    let mut trained = Vec::new();
    for e in &ledger.entries {
        for s in &e.slices {
            trained.push(Trained {
                step: e.step,
                generation: e.generation,
                rank: s.rank,
                stream_start: s.stream_start,
                ids: (s.stream_start..s.stream_start + s.count)
                    .map(|p| order.at(p).1)
                    .collect(),
            });
        }
    }
    trained
}

pub fn verify_exactly_once(ledger: &proto::LedgerReply, trained: &[Trained]) -> u64 {
    let g = ledger.global_batch;
    let n = ledger.num_sequences;
    let steps = ledger.entries.len() as u64;
    for (i, e) in ledger.entries.iter().enumerate() {
        assert_eq!(e.step, i as u64, "ledger steps are contiguous from 0");
        assert_eq!(e.slices.len() as u32, e.world_size);
        let mut next = e.step * g;
        for (r, s) in e.slices.iter().enumerate() {
            assert_eq!(s.rank as usize, r);
            assert_eq!(
                s.stream_start, next,
                "step {}: slices are contiguous",
                e.step
            );
            assert!(s.count > 0);
            next += s.count;
        }
        assert_eq!(
            next,
            (e.step + 1) * g,
            "step {}: slices cover the global batch",
            e.step
        );
    }
    // Stream position -> sequence id, from what workers were told and trained.
    let mut by_position = vec![None; (steps * g) as usize];
    for t in trained.iter().filter(|t| t.step < steps) {
        let e = &ledger.entries[t.step as usize];
        assert_eq!(
            e.generation, t.generation,
            "step {} trained by its ledger generation",
            t.step
        );
        let slice = &e.slices[t.rank as usize];
        assert_eq!(slice.stream_start, t.stream_start);
        assert_eq!(slice.count, t.ids.len() as u64);
        for (k, id) in t.ids.iter().enumerate() {
            let slot = &mut by_position[(t.stream_start + k as u64) as usize];
            assert!(
                slot.is_none() || *slot == Some(*id),
                "position trained twice differently"
            );
            *slot = Some(*id);
        }
    }
    let ids: Vec<u64> = by_position
        .iter()
        .enumerate()
        .map(|(p, id)| id.unwrap_or_else(|| panic!("stream position {p} was never trained")))
        .collect();
    let epochs = steps * g / n;
    for e in 0..epochs {
        let mut epoch: Vec<u64> = ids[(e * n) as usize..((e + 1) * n) as usize].to_vec();
        epoch.sort_unstable();
        assert!(
            epoch.iter().enumerate().all(|(i, &id)| id == i as u64),
            "epoch {e} is not a permutation of all {n} sequences"
        );
    }
    // The partial epoch: no repeats.
    let mut tail: Vec<u64> = ids[(epochs * n) as usize..].to_vec();
    tail.sort_unstable();
    assert!(
        tail.windows(2).all(|w| w[0] != w[1]),
        "a sequence repeats within an epoch"
    );
    epochs
}

/// One line of a worker process's own record of what it trained (the worker's
/// `FERRY_TRAINED_SAMPLES_DIR` log): the sequences it fed through forward and backward at one
/// step, micro-batch by micro-batch, in the generation and rank it held then.
#[derive(Clone, Debug)]
pub struct WorkerTrained {
    /// The file it came from (one per worker process).
    pub file: String,
    pub step: u64,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    pub first_micro_batch: u64,
    pub micro_batches: Vec<Vec<u64>>,
}

impl WorkerTrained {
    pub fn ids(&self) -> Vec<u64> {
        self.micro_batches.concat()
    }
}

/// Every record the worker processes wrote under `dir` (`worker-<pid>.jsonl`). A last line
/// without its newline is a write cut short by a SIGKILL: that rank's gradients never left
/// the process (the line is written before they do), so it is left out.
pub fn read_worker_records(dir: &Path) -> Vec<WorkerTrained> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: no worker wrote a trained-samples log",
                dir.display()
            )
        })
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let whole = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        if whole.len() < text.len() {
            eprintln!(
                "{}: ignoring a last line cut short: {:?}",
                path.display(),
                &text[whole.len()..]
            );
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        for line in whole.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display()));
            let num = |k: &str| {
                v[k].as_u64()
                    .unwrap_or_else(|| panic!("{}: no {k} in {line}", path.display()))
            };
            out.push(WorkerTrained {
                file: file.clone(),
                step: num("step"),
                generation: num("generation"),
                rank: num("rank") as u32,
                world_size: num("world_size") as u32,
                first_micro_batch: num("first_micro_batch"),
                micro_batches: serde_json::from_value(v["micro_batches"].clone())
                    .unwrap_or_else(|e| panic!("{}: {e}: {line}", path.display())),
            });
        }
    }
    out
}

/// Exactly-once from what the worker processes say they trained, not from the ledger's own
/// slices: the ledger only says which attempt of each step counts, (step, generation) and its
/// world size. For each committed step, the records of that generation's ranks 0..W are one
/// each, and what they trained, in rank order, is the step's planned sequences: positions
/// `s*G .. (s+1)*G` of the job's sample order, built here from the job's seed and the data's
/// sequence count. Records of other attempts (trained, then rolled back or abandoned) are
/// allowed and count for nothing. Over the committed steps every complete epoch is a
/// permutation of all sequences and the partial one repeats none. Returns the number of
/// records that did not count.
pub fn verify_exactly_once_by_workers(
    ledger: &proto::LedgerReply,
    records: &[WorkerTrained],
    seed: u64,
    num_sequences: u64,
    global_batch: u64,
) -> usize {
    assert_eq!(ledger.seed, seed, "the coordinator's seed");
    assert_eq!(
        ledger.num_sequences, num_sequences,
        "the coordinator's sequence count is the data's"
    );
    assert_eq!(
        ledger.global_batch, global_batch,
        "the coordinator's global batch"
    );
    let mut order = ferry_spec::sampler::SampleOrder::new(seed, num_sequences);
    let mut by_attempt: std::collections::BTreeMap<(u64, u64), Vec<&WorkerTrained>> =
        Default::default();
    for r in records {
        by_attempt
            .entry((r.step, r.generation))
            .or_default()
            .push(r);
    }
    let mut stream = Vec::new();
    let mut counted = 0;
    for (i, e) in ledger.entries.iter().enumerate() {
        assert_eq!(e.step, i as u64, "ledger steps are contiguous from 0");
        let mut recs = by_attempt
            .get(&(e.step, e.generation))
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "step {} committed in generation {}, but no worker recorded training it",
                    e.step, e.generation
                )
            });
        recs.sort_by_key(|r| r.rank);
        let ranks: Vec<u32> = recs.iter().map(|r| r.rank).collect();
        assert_eq!(
            ranks,
            (0..e.world_size).collect::<Vec<_>>(),
            "step {} (generation {}): one record per rank of the committed group: {recs:?}",
            e.step,
            e.generation
        );
        for r in &recs {
            assert_eq!(r.world_size, e.world_size, "step {}: {r:?}", e.step);
        }
        let trained: Vec<u64> = recs.iter().flat_map(|r| r.ids()).collect();
        let planned = order.step_sequences(e.step, global_batch);
        if trained != planned {
            let missing: Vec<&u64> = planned.iter().filter(|p| !trained.contains(p)).collect();
            let extra: Vec<&u64> = trained.iter().filter(|t| !planned.contains(t)).collect();
            panic!(
                "step {} (generation {}): the ranks trained {} sequences, not the step's {} \
                 planned ones in order; never trained: {missing:?}; not planned: {extra:?}\n\
                 records: {recs:?}",
                e.step,
                e.generation,
                trained.len(),
                planned.len()
            );
        }
        counted += recs.len();
        stream.extend(trained);
    }
    let n = num_sequences as usize;
    let epochs = stream.len() / n;
    for e in 0..epochs {
        let mut epoch = stream[e * n..(e + 1) * n].to_vec();
        epoch.sort_unstable();
        assert!(
            epoch.iter().enumerate().all(|(i, &id)| id == i as u64),
            "epoch {e}: the committed steps did not train every sequence exactly once"
        );
    }
    let mut tail = stream[epochs * n..].to_vec();
    tail.sort_unstable();
    if let Some(w) = tail.windows(2).find(|w| w[0] == w[1]) {
        panic!("sequence {} trained twice in one epoch", w[0]);
    }
    records.len() - counted
}

/// The training split's sequence count for `seq_len`, from the prepared data itself.
pub fn num_sequences(prepared: &Path, seq_len: usize) -> u64 {
    ferry_dataset::shards::TokenSplit::open(prepared, "train", false)
        .unwrap()
        .num_sequences(seq_len)
}

/// One HTTP/1.1 GET on loopback; returns (status line, body).
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let (head, body) = buf.split_once("\r\n\r\n").unwrap_or((&buf, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}
