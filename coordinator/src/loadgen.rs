//! `ferry bench coordinator`: load-tests a real coordinator process with many simulated workers.
//!
//! Every simulated worker joins, heartbeats every `--heartbeat-s`, comes to rendezvous, and then
//! the group runs steps at `--step-interval-s` as ferry's ranks do: each plans its step itself
//! and only rank 0 calls the coordinator, `CommitSteps` with the group's digest (summed, as
//! the all-reduce would, from every simulated rank's schedule). Latency is measured
//! per RPC on the client; the coordinator's CPU time and resident memory are read from /proc.
//! Workers share `--connections` HTTP/2 connections (10,000 sockets from one process would
//! measure this machine's loopback, not the coordinator).

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_rpc::client::{ClientConfig, Clients};
use ferry_rpc::proto::{self, commit_steps_reply, rendezvous_reply};
use ferry_spec::schedule::StepSchedule;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct BenchCoordinatorArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000)]
    workers: u32,
    /// A prepared data directory (only its manifest is read).
    #[arg(long)]
    data: PathBuf,
    /// The job's `cluster.heartbeat_timeout_s`: workers heartbeat every quarter of it, as the
    /// coordinator tells them at join.
    #[arg(long, default_value_t = 30.0)]
    heartbeat_timeout_s: f64,
    /// Heartbeat this often instead of the interval the join answers (earlier figures in
    /// BENCHMARKS.md used 1 s).
    #[arg(long)]
    heartbeat_s: Option<f64>,
    /// Time between steps (the simulated compute time of one step).
    #[arg(long, default_value_t = 1.0)]
    step_interval_s: f64,
    /// Measured steps, after the group has formed.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// HTTP/2 connections the simulated workers share.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// The coordinator to measure: a `ferry-coordinator` binary (the slim one, without
    /// libtorch) [default: this binary's `coordinator` subcommand].
    #[arg(long)]
    coordinator_bin: Option<PathBuf>,
}

#[derive(Default)]
struct Latencies {
    by_method: std::collections::BTreeMap<&'static str, Vec<f64>>,
}

impl Latencies {
    fn record(&mut self, method: &'static str, since: Instant) {
        self.by_method
            .entry(method)
            .or_default()
            .push(since.elapsed().as_secs_f64() * 1e3);
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

/// (CPU seconds, resident MiB, peak resident MiB) of a process.
pub fn proc_usage(pid: u32) -> Result<(f64, f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("malformed /proc stat")?
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the command name.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Ok((ticks / hz, kib("VmRSS:") / 1024.0, kib("VmHWM:") / 1024.0))
}

struct CoordinatorChild {
    child: Child,
}

impl Drop for CoordinatorChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_coordinator(
    a: &BenchCoordinatorArgs,
    dir: &std::path::Path,
) -> Result<(CoordinatorChild, String, String)> {
    let job = format!(
        r#"[job]
name = "bench-coordinator-{w}"
steps = 1000000
run_dir = "{dir}/run"

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "{data}"
seq_len = 128

[batch]
global = {w}
micro = 1

[cluster]
min_workers = {w}
settle_s = 0.0
heartbeat_timeout_s = {hb_timeout}
"#,
        w = a.workers,
        dir = dir.display(),
        data = a.data.display(),
        hb_timeout = a.heartbeat_timeout_s,
    );
    std::fs::write(dir.join("job.toml"), job)?;
    let token = crate::state::new_id();
    std::fs::write(dir.join("token"), &token)?;
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let mut cmd = match &a.coordinator_bin {
        Some(bin) => std::process::Command::new(bin),
        None => {
            let mut c = std::process::Command::new(std::env::current_exe()?);
            c.arg("coordinator");
            c
        }
    };
    let child = cmd
        .args(["--listen", "127.0.0.1:0", "--job"])
        .arg(dir.join("job.toml"))
        .arg("--state")
        .arg(dir.join("state"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start the coordinator {:?}", cmd.get_program()))?;
    let mut child = CoordinatorChild { child };
    let addr = crate::admin::wait_for_endpoint(&dir.join("state"), &mut child.child).with_context(
        || std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default(),
    )?;
    Ok((child, addr, token))
}

/// One simulated worker's protocol state.
struct Sim {
    id: String,
    generation: u64,
    rank: u32,
}

pub fn run(a: BenchCoordinatorArgs) -> Result<()> {
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let dir = tempfile::tempdir().context("cannot make a scratch directory")?;
    let (coordinator, addr, token) = start_coordinator(&a, dir.path())?;
    let pid = coordinator.child.id();
    // What the process holds before any worker: mostly the mapped libraries of the one binary.
    let (_, idle_rss, _) = proc_usage(pid)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let _in_runtime = rt.enter();
    let pool: Vec<Clients> = (0..a.connections.max(1))
        .map(|_| {
            Clients::connect_lazy(&ClientConfig {
                address: addr.clone(),
                token: token.clone(),
                tls_ca: None,
                tls_domain: None,
            })
        })
        .collect::<Result<_, _>>()?;
    let lat = Arc::new(Mutex::new(Latencies::default()));
    let n = a.workers as usize;

    let outcome = rt.block_on(async {
        // Join everyone; each starts heartbeating, at the interval the join answers, as soon as
        // it has joined.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Heartbeats while the group joins and forms are counted apart from those while it
        // steps: the first queue behind 2W joins and rendezvous, the second is the steady state.
        let stepping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let heartbeat_s = Arc::new(Mutex::new(f64::NAN));
        let t_join = Instant::now();
        let mut joins = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut c = pool[i % pool.len()].coordinator.clone();
            let lat = lat.clone();
            let stop = stop.clone();
            let stepping = stepping.clone();
            let heartbeat_s = heartbeat_s.clone();
            let forced = a.heartbeat_s;
            joins.spawn(async move {
                let t = Instant::now();
                let r = c
                    .join(proto::JoinRequest {
                        host: format!("sim-{i}"),
                        data_addr: format!("10.0.{}.{}:29500", i / 250, i % 250 + 1),
                        devices: vec!["cuda:0".into()],
                        pid: i as u32,
                        metrics_addr: String::new(),
                    })
                    .await;
                lat.lock().unwrap().record("join", t);
                let reply = r?.into_inner();
                let (id, num_sequences) = (reply.worker_id, reply.num_sequences);
                let interval = forced.unwrap_or(reply.heartbeat_interval_s);
                *heartbeat_s.lock().unwrap() = interval;
                let every = Duration::from_secs_f64(interval.max(0.05));
                let mut hb = c.clone();
                let hb_id = id.clone();
                tokio::spawn(async move {
                    // Spread over the interval, as workers that joined at different times are.
                    let first = every.mul_f64((i % 1000) as f64 / 1000.0);
                    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, every);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tick.tick().await;
                        let t = Instant::now();
                        let ok = hb
                            .heartbeat(proto::HeartbeatRequest {
                                worker_id: hb_id.clone(),
                                generation: 1,
                                step: 0,
                                loss: 3.0,
                                tokens_per_s: 1000.0,
                            })
                            .await
                            .is_ok();
                        if ok {
                            let method = if stepping.load(std::sync::atomic::Ordering::Relaxed) {
                                "heartbeat"
                            } else {
                                "heartbeat_forming"
                            };
                            lat.lock().unwrap().record(method, t);
                        }
                    }
                });
                Ok::<_, tonic::Status>((i, id, num_sequences))
            });
        }
        let mut sims: Vec<Option<Sim>> = (0..n).map(|_| None).collect();
        let mut num_sequences = 0;
        while let Some(r) = joins.join_next().await {
            let (i, id, sequences) = r??;
            num_sequences = sequences;
            sims[i] = Some(Sim {
                id,
                generation: 0,
                rank: 0,
            });
        }
        let sims: Vec<Sim> = sims.into_iter().map(|s| s.expect("joined")).collect();
        let join_s = t_join.elapsed().as_secs_f64();

        // Rendezvous: all at once, as a real group does.
        let t_rdzv = Instant::now();
        let mut rdzv = tokio::task::JoinSet::new();
        for (i, s) in sims.into_iter().enumerate() {
            let mut c = pool[i % pool.len()].coordinator.clone();
            let lat = lat.clone();
            rdzv.spawn(async move {
                loop {
                    let t = Instant::now();
                    let r = c
                        .rendezvous(proto::RendezvousRequest {
                            worker_id: s.id.clone(),
                            known_generation: 0,
                            has_state: false,
                            state_step: 0,
                            blob: Vec::new(),
                            collective: proto::Collective::Ring as i32,
                            uncommitted: Vec::new(),
                            trained_as: String::new(),
                        })
                        .await?
                        .into_inner();
                    lat.lock().unwrap().record("rendezvous", t);
                    if r.status() == rendezvous_reply::Status::Ready {
                        return Ok::<_, tonic::Status>((
                            i,
                            Sim {
                                generation: r.generation,
                                rank: r.rank,
                                ..s
                            },
                        ));
                    }
                }
            });
        }
        let mut sims: Vec<Option<Sim>> = (0..n).map(|_| None).collect();
        while let Some(r) = rdzv.join_next().await {
            let (i, s) = r??;
            sims[i] = Some(s);
        }
        let sims: Vec<Sim> = sims.into_iter().map(|s| s.expect("formed")).collect();
        let rendezvous_s = t_rdzv.elapsed().as_secs_f64();

        // Steps: the ranks plan and all-reduce among themselves; rank 0 commits each step
        // with the group digest the all-reduce would have summed.
        let rank0 = sims.iter().find(|s| s.rank == 0).context("no rank 0 in the group")?;
        let mut schedule = StepSchedule::new(1234, num_sequences.max(1), u64::from(a.workers), 1);
        let mut c = pool[0].coordinator.clone();
        stepping.store(true, std::sync::atomic::Ordering::Relaxed);
        let (cpu0, _, _) = proc_usage(pid)?;
        let (own0, _, _) = proc_usage(std::process::id())?;
        let t_steps = Instant::now();
        let interval = Duration::from_secs_f64(a.step_interval_s);
        for step in 0..a.steps {
            let step_started = Instant::now();
            let req = proto::CommitStepsRequest {
                worker_id: rank0.id.clone(),
                generation: rank0.generation,
                steps: vec![proto::TrainedStep {
                    step,
                    loss: 3.0,
                    tokens: 128 * u64::from(a.workers),
                    step_time_s: a.step_interval_s,
                    allreduce_s: 0.1,
                    group_digest: schedule.group_digest(step, u64::from(a.workers)),
                }],
            };
            let t = Instant::now();
            let r = c.commit_steps(req).await?.into_inner();
            lat.lock().unwrap().record("commit_steps", t);
            if r.directive() != commit_steps_reply::Directive::Continue {
                bail!("step {step}: expected to continue, the coordinator said {:?}", r.directive());
            }
            tokio::time::sleep(interval.saturating_sub(step_started.elapsed())).await;
        }
        let wall = t_steps.elapsed().as_secs_f64();
        let (cpu1, rss, peak) = proc_usage(pid)?;
        let (own1, _, _) = proc_usage(std::process::id())?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);

        let lat = lat.lock().unwrap();
        let mut rows = Vec::new();
        for (method, samples) in &lat.by_method {
            let mut v = samples.clone();
            v.sort_by(|x, y| x.total_cmp(y));
            let row = serde_json::json!({
                "bench": "coordinator", "workers": a.workers, "method": method,
                "calls": v.len(),
                "p50_ms": (percentile(&v, 0.5) * 1000.0).round() / 1000.0,
                "p99_ms": (percentile(&v, 0.99) * 1000.0).round() / 1000.0,
                "max_ms": (v.last().copied().unwrap_or(f64::NAN) * 1000.0).round() / 1000.0,
            });
            println!("{row}");
            rows.push(row);
        }
        let summary = serde_json::json!({
            "bench": "coordinator", "workers": a.workers, "summary": true,
            "steps": a.steps, "step_interval_s": a.step_interval_s, "heartbeat_s": *heartbeat_s.lock().unwrap(),
            "connections": a.connections,
            "coordinator_bin": a.coordinator_bin.as_ref().map_or("ferry coordinator".into(), |b| b.display().to_string()),
            "join_all_s": (join_s * 1000.0).round() / 1000.0,
            "rendezvous_all_s": (rendezvous_s * 1000.0).round() / 1000.0,
            "coordinator_cpu_cores": ((cpu1 - cpu0) / wall * 1000.0).round() / 1000.0,
            // The simulated workers' own cost, on the same cores.
            "loadgen_cpu_cores": ((own1 - own0) / wall * 1000.0).round() / 1000.0,
            "coordinator_idle_rss_mib": idle_rss.round(),
            "coordinator_rss_mib": rss.round(),
            "coordinator_peak_rss_mib": peak.round(),
            "steps_per_s": (a.steps as f64 / wall * 1000.0).round() / 1000.0,
        });
        println!("{summary}");
        eprintln!(
            "\n{} workers, {} steps at one per {:.1} s, heartbeats every {:.1} s",
            a.workers, a.steps, a.step_interval_s, *heartbeat_s.lock().unwrap()
        );
        eprintln!(
            "{:<17} {:>8} {:>9} {:>9} {:>9}",
            "rpc", "calls", "p50 ms", "p99 ms", "max ms"
        );
        for r in &rows {
            eprintln!(
                "{:<17} {:>8} {:>9.3} {:>9.3} {:>9.3}",
                r["method"].as_str().unwrap_or(""),
                r["calls"],
                r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                r["max_ms"].as_f64().unwrap_or(f64::NAN)
            );
        }
        eprintln!(
            "join all {:.2} s, rendezvous all {:.2} s; coordinator CPU {:.3} cores during steps \
             (the simulated workers {:.3}), RSS {} MiB (peak {} MiB, {} MiB before any worker)",
            join_s,
            rendezvous_s,
            summary["coordinator_cpu_cores"]
                .as_f64()
                .unwrap_or(f64::NAN),
            summary["loadgen_cpu_cores"].as_f64().unwrap_or(f64::NAN),
            rss.round(),
            peak.round(),
            idle_rss.round()
        );
        Ok::<_, anyhow::Error>(())
    });
    if let Err(e) = outcome {
        let log = std::fs::read_to_string(dir.path().join("coordinator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(e.context(format!("the coordinator's log ends:\n{}", tail.join("\n"))));
    }
    drop(coordinator);
    Ok(())
}
