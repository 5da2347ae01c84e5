//! `ferry launch --local`: a whole job on one machine, like `torchrun --standalone`.
//!
//! Starts a coordinator and N worker processes on loopback, splits the cores between the
//! workers, prefixes every line a process prints with its name, shows one progress bar, and
//! keeps the worker count at the job's target: workers that crash are restarted (up to
//! `--max-restarts`), and `ferry scale` from another terminal adds workers here. The first
//! Ctrl-C stops the job at a step boundary (rank 0 writes a checkpoint); a second one kills.
//! Run the same command again to resume: the coordinator's state lives in the run directory.

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_rpc::client::{ClientConfig, Clients, TOKEN_ENV};
use ferry_rpc::proto;
use ferry_spec::job::JobSpec;
use std::io::{BufRead, BufReader, IsTerminal};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LaunchArgs {
    /// Run the coordinator and all workers on this machine (loopback networking).
    #[arg(long)]
    local: bool,
    /// Worker processes to start.
    #[arg(long, default_value_t = 2)]
    workers: u32,
    /// The job spec (TOML).
    job: PathBuf,
    /// Coordinator state directory [default: <job.run_dir>/coordinator].
    #[arg(long)]
    state: Option<PathBuf>,
    /// libtorch threads per worker [default: cores / workers].
    #[arg(long)]
    threads: Option<usize>,
    /// Restarts of workers that exit with an error, over the whole run.
    #[arg(long, default_value_t = 3)]
    max_restarts: u32,
    /// Hide the progress bar.
    #[arg(long)]
    no_progress: bool,
}

static INTERRUPTS: AtomicUsize = AtomicUsize::new(0);

/// The longest the launcher waits for one call to its coordinator. A wedged coordinator must
/// not wedge the launcher: it goes on reaping and restarting workers, and Ctrl-C gets through.
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs one call to the coordinator, giving up after [`ADMIN_CALL_TIMEOUT`], as soon as
/// another Ctrl-C arrives, or at once after the second (its reason says which).
fn admin_call<T>(
    rt: &tokio::runtime::Runtime,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    let seen = INTERRUPTS.load(Ordering::SeqCst);
    rt.block_on(async move {
        let interrupted = async {
            while INTERRUPTS.load(Ordering::SeqCst) == seen && seen < 2 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            r = tokio::time::timeout(ADMIN_CALL_TIMEOUT, call) => match r {
                Ok(Ok(reply)) => Ok(reply.into_inner()),
                Ok(Err(status)) => Err(status.message().to_string()),
                Err(_) => Err(format!(
                    "the coordinator did not answer within {} s",
                    ADMIN_CALL_TIMEOUT.as_secs()
                )),
            },
            () = interrupted => Err("interrupted".into()),
        }
    })
}

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTS.fetch_add(1, Ordering::SeqCst);
}

fn catch_interrupts() {
    // SAFETY: the handler only touches an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as *const () as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_interrupt as *const () as libc::sighandler_t,
        );
    }
}

/// Prints through the progress bar when there is one, so lines and bar do not tear.
#[derive(Clone)]
struct Console {
    bar: indicatif::ProgressBar,
}

impl Console {
    fn line(&self, s: String) {
        if self.bar.is_hidden() {
            eprintln!("{s}");
        } else {
            self.bar.println(s);
        }
    }
}

struct Proc {
    name: String,
    child: Child,
    /// The GPU a worker was given, returned to [`DeviceSlots`] when it exits.
    device: Option<u32>,
}

/// Which local GPU each new worker gets: the one fewest live workers use, lowest index first,
/// so a worker started in place of one that died takes the GPU it freed, not one still in use.
struct DeviceSlots {
    /// Live workers per GPU; empty without GPUs.
    holders: Vec<u32>,
}

impl DeviceSlots {
    fn new(gpus: u32) -> Self {
        DeviceSlots {
            holders: vec![0; gpus as usize],
        }
    }

    /// The GPU for a new worker; None on a machine without GPUs.
    fn take(&mut self) -> Option<u32> {
        let (index, n) = self
            .holders
            .iter_mut()
            .enumerate()
            .min_by_key(|(i, n)| (**n, *i))?;
        *n += 1;
        Some(index as u32)
    }

    fn release(&mut self, device: Option<u32>) {
        if let Some(n) = device.and_then(|d| self.holders.get_mut(d as usize)) {
            *n = n.saturating_sub(1);
        }
    }
}

/// Children die with the launcher, whatever happens to it.
struct Procs(Vec<Proc>);

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.0 {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

fn spawn(console: &Console, name: &str, mut cmd: Command, token: &str) -> Result<Proc> {
    cmd.env(TOKEN_ENV, token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group: the terminal's Ctrl-C reaches only the launcher, which stops
        // the job gracefully.
        .process_group(0);
    // A launcher killed outright (SIGKILL, OOM) cannot run `Procs`' Drop; the kernel then
    // kills the children, so no worker trains on for a job nobody watches.
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died before prctl took effect.
            if libc::getppid() != launcher {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let console = console.clone();
        let prefix = format!("[{name}]");
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                console.line(format!("{prefix} {line}"));
            }
        });
    }
    Ok(Proc {
        name: name.to_string(),
        child,
        device: None,
    })
}

/// The coordinator to start: the slim `ferry-coordinator` beside this binary when it is of
/// the same build (it idles in a few MiB, where `ferry` maps libtorch), else `ferry
/// coordinator`, which is always this build. A `ferry-coordinator` left from an older build
/// might speak another protocol or store its state in another form: it is never used.
fn coordinator_command(exe: &Path, console: &Console) -> Command {
    let slim = exe.with_file_name("ferry-coordinator");
    let mut in_binary = Command::new(exe);
    in_binary.arg("coordinator");
    if !slim.is_file() {
        return in_binary;
    }
    match slim_build_id(&slim) {
        Ok(id) if id == ferry_coordinator::BUILD_ID => Command::new(slim),
        found => {
            let found = match found {
                Ok(id) => format!("is of build {id}"),
                Err(e) => format!("did not say its build ({e:#})"),
            };
            console.line(format!(
                "[launch] {} {found}, this ferry is of build {}: running `ferry coordinator` \
                 instead (rebuild both: cargo build --release -p ferry -p ferry-coordinator)",
                slim.display(),
                ferry_coordinator::BUILD_ID
            ));
            in_binary
        }
    }
}

/// The build id in `ferry-coordinator --version` ("ferry-coordinator 0.1.0 (build <id>)").
fn slim_build_id(slim: &Path) -> Result<String> {
    let mut child = Command::new(slim)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("--version did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("piped"), &mut out)?;
    out.split("(build ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("--version printed {:?}", out.trim()))
}

fn load_or_create_token(state: &Path) -> Result<String> {
    let path = state.join("token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let token = ferry_coordinator::state::new_id() + &ferry_coordinator::state::new_id();
    std::fs::write(&path, &token).with_context(|| format!("{}: cannot write", path.display()))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(token)
}

pub fn run(a: LaunchArgs) -> Result<()> {
    if !a.local {
        bail!("only --local is supported here; on a cluster run `ferry coordinator` once and `ferry worker` per GPU (see deploy/)");
    }
    if a.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let spec = JobSpec::from_file(&a.job)?;
    // A new job that starts from other weights: check them once here, or every worker would
    // fail on them in turn and be restarted before the job gives up.
    if spec.model.init_from.is_some()
        && ferry_engine::checkpoint::latest(&spec.job.run_dir)?.is_none()
    {
        ferry_engine::train::TrainConfig::from_job(&spec, 1, "cpu")
            .check_init_from()
            .with_context(|| format!("{}: [model] init_from", a.job.display()))?;
    }
    let state = a
        .state
        .clone()
        .unwrap_or_else(|| spec.job.run_dir.join("coordinator"));
    std::fs::create_dir_all(&state)
        .with_context(|| format!("{}: cannot create", state.display()))?;
    let token = load_or_create_token(&state)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads.unwrap_or((cores / a.workers as usize).max(1));
    let exe = std::env::current_exe()?;
    catch_interrupts();

    let bar = if a.no_progress || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(spec.job.steps);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        b
    };
    let console = Console { bar: bar.clone() };

    let mut cmd = coordinator_command(&exe, &console);
    cmd.args(["--listen", "127.0.0.1:0", "--job"])
        .arg(&a.job)
        .arg("--state")
        .arg(&state)
        .env(
            ferry_coordinator::admin::LOG_ENV,
            std::env::var(ferry_coordinator::admin::LOG_ENV).unwrap_or_else(|_| "warn".into()),
        );
    let mut coordinator = spawn(&console, "coordinator", cmd, &token)?;
    let address = ferry_coordinator::admin::wait_for_endpoint(&state, &mut coordinator.child)
        .context("starting the coordinator (its messages are above)")?;
    let mut procs = Procs(vec![coordinator]);
    console.line(format!(
        "[launch] job {:?}: coordinator on {address}, {} workers x {threads} threads, state in {}",
        spec.job.name,
        a.workers,
        state.display()
    ));

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _in_runtime = rt.enter();
    let clients = Clients::connect_lazy(&ClientConfig {
        address,
        token: token.clone(),
        tls_ca: None,
        tls_domain: None,
    })?;
    // The target is what this command asked for (also when resuming a job).
    let mut admin = clients.admin.clone();
    let scaled = admin_call(&rt, admin.scale(proto::ScaleRequest { workers: a.workers }));
    if let Err(reason) = scaled {
        bail!("--workers {}: {reason}", a.workers);
    }
    // One process per GPU when there are GPUs (see `DeviceSlots`); the CPU otherwise.
    let mut slots = DeviceSlots::new(tch::Cuda::device_count().max(0) as u32);
    let worker_cmd = |exe: &Path, device: Option<u32>| {
        let mut c = Command::new(exe);
        // Every local worker serves its own metrics on a free port; `ferry status --json`
        // and the status page list them.
        c.args([
            "worker",
            "--data-listen",
            "127.0.0.1:0",
            "--advertise",
            "127.0.0.1",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--state")
        .arg(&state)
        .args(["--threads", &threads.to_string()]);
        if let Some(d) = device {
            c.args(["--device", &format!("cuda:{d}")]);
        }
        c
    };
    // Starts worker `name` on the GPU `slots` gives it.
    let start_worker = |slots: &mut DeviceSlots, name: &str| -> Result<Proc> {
        let device = slots.take();
        let mut p = spawn(&console, name, worker_cmd(&exe, device), &token)?;
        p.device = device;
        Ok(p)
    };
    let mut next_index = 0u32;
    for _ in 0..a.workers {
        procs
            .0
            .push(start_worker(&mut slots, &format!("w{next_index}"))?);
        next_index += 1;
    }

    let mut restarts = 0;
    let mut stop_sent = false;
    let mut last: Option<proto::StatusReply> = None;
    let outcome: Result<()> = loop {
        std::thread::sleep(Duration::from_millis(250));
        let interrupts = INTERRUPTS.load(Ordering::SeqCst);
        if interrupts >= 2 {
            break Err(anyhow::anyhow!("interrupted twice: killed all processes"));
        }
        if interrupts == 1 && !stop_sent {
            console
                .line("[launch] stopping at the next step boundary (Ctrl-C again to kill)".into());
            if let Err(reason) = admin_call(&rt, admin.stop(proto::StopRequest {})) {
                console.line(format!("[launch] stop: {reason}"));
            }
            stop_sent = true;
        }
        let status = admin_call(&rt, admin.status(proto::StatusRequest {})).ok();
        // Reap exited workers; restart failed ones while the job still runs.
        let mut i = 1;
        let mut live = 0u32;
        let done = status
            .as_ref()
            .is_some_and(|s| s.phase == "finished" || s.phase == "stopped");
        while i < procs.0.len() {
            match procs.0[i].child.try_wait()? {
                None => {
                    live += 1;
                    i += 1;
                }
                Some(exit) => {
                    let p = procs.0.remove(i);
                    slots.release(p.device);
                    if !exit.success() && !done && !stop_sent {
                        if restarts >= a.max_restarts {
                            break;
                        }
                        restarts += 1;
                        let name = format!("w{next_index}");
                        next_index += 1;
                        console.line(format!(
                            "[launch] {} exited ({exit}); starting {name} in its place ({restarts}/{})",
                            p.name, a.max_restarts
                        ));
                        procs.0.push(start_worker(&mut slots, &name)?);
                        live += 1;
                    }
                }
            }
        }
        if restarts >= a.max_restarts && live == 0 && !done {
            break Err(anyhow::anyhow!(
                "workers kept failing ({restarts} restarts); see their messages above"
            ));
        }
        if let Some(s) = &status {
            bar.set_position(s.committed_steps);
            let loss = s
                .recent_loss
                .last()
                .map_or("-".into(), |p| format!("{:.4}", p.loss));
            bar.set_message(format!(
                "loss {loss} | {:.0} tok/s | world {} | gen {}",
                s.tokens_per_s, s.world_size, s.generation
            ));
            // Scale up: `ferry scale` raised the target above the workers running here.
            if !done && !stop_sent && s.target_workers > live {
                for _ in live..s.target_workers {
                    let name = format!("w{next_index}");
                    next_index += 1;
                    console.line(format!("[launch] scaling up: starting {name}"));
                    procs.0.push(start_worker(&mut slots, &name)?);
                }
            }
            last = status.clone();
        }
        if (done || stop_sent) && live == 0 {
            break Ok(());
        }
        if procs.0[0].child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!(
                "the coordinator exited; its messages are above"
            ));
        }
    };
    bar.finish_and_clear();
    let killing = INTERRUPTS.load(Ordering::SeqCst) >= 2;
    if !killing {
        if let Ok(r) = admin_call(&rt, admin.status(proto::StatusRequest {})) {
            last = Some(r);
        }
    }
    drop((admin, clients));
    // The coordinator shuts down gracefully on SIGTERM.
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(procs.0[0].child.id() as libc::pid_t, libc::SIGTERM);
    }
    // Killing (a second Ctrl-C): `Procs` kills every child at once, a frozen coordinator too.
    let deadline = Instant::now() + Duration::from_secs(if killing { 0 } else { 10 });
    while procs.0[0].child.try_wait()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    outcome?;
    if let Some(s) = last {
        let loss = s
            .recent_loss
            .last()
            .map_or("-".into(), |p| format!("{:.4}", p.loss));
        println!(
            "{}: {}/{} steps, loss {loss}, generation {}, checkpoint {}",
            s.phase,
            s.committed_steps,
            s.total_steps,
            s.generation,
            if s.latest_checkpoint_path.is_empty() {
                "-".into()
            } else {
                s.latest_checkpoint_path.clone()
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{coordinator_command, Console, DeviceSlots};
    use std::path::Path;

    /// A stand-in `ferry-coordinator` beside a stand-in `ferry` in `dir` whose `--version`
    /// prints `version`; returns the program and arguments launch would start.
    fn chosen_with_slim(dir: &Path, version: Option<&str>) -> (String, Vec<String>) {
        let slim = dir.join("ferry-coordinator");
        if let Some(v) = version {
            std::fs::write(&slim, format!("#!/bin/sh\necho '{v}'\n")).unwrap();
            let perms = std::os::unix::fs::PermissionsExt::from_mode(0o755);
            std::fs::set_permissions(&slim, perms).unwrap();
        }
        let console = Console {
            bar: indicatif::ProgressBar::hidden(),
        };
        let cmd = coordinator_command(&dir.join("ferry"), &console);
        let program = Path::new(cmd.get_program())
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let args = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        (program, args)
    }

    #[test]
    fn launch_runs_the_slim_coordinator_only_when_it_is_of_the_same_build() {
        let (ferry, coordinator) = ("ferry".to_string(), vec!["coordinator".to_string()]);
        let same = format!(
            "ferry-coordinator 0.1.0 (build {})",
            ferry_coordinator::BUILD_ID
        );
        let d = tempfile_dir("same");
        assert_eq!(
            chosen_with_slim(&d, Some(&same)),
            ("ferry-coordinator".to_string(), vec![])
        );
        let d = tempfile_dir("stale");
        let stale = "ferry-coordinator 0.1.0 (build 0123456789abcdef)";
        assert_eq!(
            chosen_with_slim(&d, Some(stale)),
            (ferry.clone(), coordinator.clone())
        );
        // One from before build ids: its --version names no build.
        let d = tempfile_dir("old");
        let old = "ferry-coordinator 0.1.0";
        assert_eq!(
            chosen_with_slim(&d, Some(old)),
            (ferry.clone(), coordinator.clone())
        );
        let d = tempfile_dir("none");
        assert_eq!(chosen_with_slim(&d, None), (ferry, coordinator));
        let _ = std::fs::remove_dir_all(tempfile_dir(""));
    }

    fn tempfile_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir()
            .join(format!("ferry-launch-{}", std::process::id()))
            .join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A worker started in place of one that exited takes the GPU it freed. Before, worker
    /// number `i` took GPU `i % gpus`: on two GPUs, w1 exiting left GPU 1 free and its
    /// replacement w2 went to GPU 0, still in use by w0.
    #[test]
    fn a_replacement_worker_takes_the_freed_gpu() {
        let mut slots = DeviceSlots::new(2);
        let (w0, w1) = (slots.take(), slots.take());
        assert_eq!((w0, w1), (Some(0), Some(1)));
        slots.release(w1);
        assert_eq!(slots.take(), Some(1), "w1's replacement");
        // More workers than GPUs: spread evenly, lowest index first.
        assert_eq!(slots.take(), Some(0));
        assert_eq!(slots.take(), Some(1));
        slots.release(Some(0));
        slots.release(Some(0));
        assert_eq!(slots.take(), Some(0));
    }

    #[test]
    fn without_gpus_workers_get_none() {
        let mut slots = DeviceSlots::new(0);
        assert_eq!(slots.take(), None);
        slots.release(None);
        slots.release(Some(3));
    }
}
