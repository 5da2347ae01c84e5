//! Operating a running job from outside, as an operator would: the coordinator's status page
//! in a real browser (headless Chromium), and the Prometheus metrics and health probes of the
//! coordinator and of each worker, during `ferry launch --local --workers 2` of a tiny job.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use support::observe::{self, parse_prometheus, value, Sample};

/// A tiny job that runs until stopped: two workers, a step every fraction of a second.
fn job(run_dir: &Path) -> String {
    format!(
        r#"[job]
name = "observe-test"
steps = 100000
run_dir = "{run}"
seed = 5

[model]
family = "gpt2"
size = "tiny"

[data]
shards = "{shards}"
seq_len = 64

[batch]
global = 8
micro = 4

[eval]
every = 0

[checkpoint]
every = 0

[cluster]
min_workers = 2
max_workers = 2
settle_s = 0.0
"#,
        run = run_dir.display(),
        shards = support::prepared_shared_corpus().display(),
    )
}

/// `ferry launch --local --workers 2` of [`job`], shared by the tests of this binary that run
/// at the same time and stopped when the last of them is done with it.
struct LaunchedJob {
    launcher: Mutex<Child>,
    dir: PathBuf,
    state: PathBuf,
    /// The coordinator's HTTP address (status page, /metrics).
    http: String,
}

fn launched_job() -> Arc<LaunchedJob> {
    static SLOT: Mutex<Weak<LaunchedJob>> = Mutex::new(Weak::new());
    let mut slot = SLOT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(job) = slot.upgrade() {
        return job;
    }
    let job = Arc::new(LaunchedJob::start());
    *slot = Arc::downgrade(&job);
    job
}

impl LaunchedJob {
    fn start() -> LaunchedJob {
        // A directory of its own each time: the previous job may still be stopping (its Drop
        // runs after the slot's last Arc is gone) and write its final checkpoint into it.
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = support::scratch(&format!("observe-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let run = dir.join("run");
        std::fs::write(dir.join("job.toml"), job(&run)).unwrap();
        let launcher = support::ferry()
            .args([
                "launch",
                "--local",
                "--workers",
                "2",
                "--threads",
                "1",
                "--no-progress",
            ])
            .arg(dir.join("job.toml"))
            .stdout(std::fs::File::create(dir.join("launch.out")).unwrap())
            .stderr(std::fs::File::create(dir.join("launch.log")).unwrap())
            .spawn()
            .expect("spawn ferry launch");
        let state = run.join("coordinator");
        let mut job = LaunchedJob {
            launcher: Mutex::new(launcher),
            dir,
            state,
            http: String::new(),
        };
        job.http = job.wait_for("the coordinator's endpoint", Duration::from_secs(60), |j| {
            let text = std::fs::read_to_string(j.state.join("endpoint.json")).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["http"].as_str().map(str::to_string)
        });
        job
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("launch.log")).unwrap_or_default()
    }

    /// Polls `probe` until it gives a value; panics with the launcher's log after `within`.
    fn wait_for<T>(&self, what: &str, within: Duration, probe: impl Fn(&Self) -> Option<T>) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = probe(self) {
                return v;
            }
            if let Some(status) = self.launcher.lock().unwrap().try_wait().unwrap() {
                panic!(
                    "ferry launch exited ({status}) while waiting for {what}:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < within,
                "no {what} within {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `ferry status --json`, as an operator would run it.
    fn status(&self) -> Option<serde_json::Value> {
        let out = support::ferry()
            .args(["status", "--json", "--state"])
            .arg(&self.state)
            .arg("--token-file")
            .arg(self.state.join("token"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    /// Waits until both workers train in one group, `steps` steps are committed, and both
    /// workers have reported a step with their metrics address.
    fn training(&self, steps: u64) -> serde_json::Value {
        self.wait_for(
            &format!("two workers past step {steps}"),
            Duration::from_secs(240),
            |j| {
                let st = j.status()?;
                let workers = st["workers"].as_array()?;
                let ok = st["world_size"] == 2
                    && st["committed_steps"].as_u64()? >= steps
                    && workers.len() == 2
                    && workers.iter().all(|w| {
                        w["metrics_addr"].as_str().is_some_and(|a| !a.is_empty())
                            && w["step"].as_u64().is_some_and(|s| s >= 1)
                    });
                ok.then_some(st)
            },
        )
    }
}

impl Drop for LaunchedJob {
    fn drop(&mut self) {
        let mut launcher = self.launcher.lock().unwrap_or_else(|p| p.into_inner());
        // Ctrl-C: stop at a step boundary; the launcher then ends its children. Should it
        // hang, SIGKILL it: its children die with it (PR_SET_PDEATHSIG).
        unsafe { libc::kill(launcher.id() as libc::pid_t, libc::SIGINT) };
        let start = Instant::now();
        while launcher.try_wait().ok().flatten().is_none() {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = launcher.kill();
                let _ = launcher.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn artifacts() -> PathBuf {
    // target/tmp -> target/test-artifacts
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const CHROMIUM: &str = "/usr/bin/chromium";

/// Runs headless Chromium on `url` with `args`, with a fresh profile and a deadline.
fn chromium(url: &str, args: &[&str], scratch: &Path) -> std::process::Output {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: scripts/test.sh installs Debian's chromium package"
    );
    let profile = scratch.join(format!("chromium-profile-{}", args.len()));
    let _ = std::fs::remove_dir_all(&profile);
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-breakpad",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .env("HOME", scratch)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Drain the pipes on threads so a chatty browser cannot block on a full pipe.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium {args:?} {url}: no result within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

#[test]
fn status_page_in_headless_chromium_shows_workers_generation_step_and_loss_chart() {
    let job = launched_job();
    let st = job.training(3);
    let url = format!("http://{}/", job.http);

    let dom = chromium(&url, &["--dump-dom"], &job.dir);
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.status.success() && html.contains("</html>"),
        "chromium --dump-dom {url}: {}\n{}",
        dom.status,
        String::from_utf8_lossy(&dom.stderr)
    );
    // The browser's DOM, not our text: the table and the chart were parsed as elements.
    let table_at = html
        .find("<table id=\"workers\"")
        .unwrap_or_else(|| panic!("no workers table:\n{html}"));
    let table = &html[table_at
        ..html[table_at..]
            .find("</table>")
            .map_or(html.len(), |e| table_at + e)];
    let rows = table.matches("<tr class=\"worker\">").count();
    assert_eq!(rows, 2, "one row per worker:\n{table}");
    for w in st["workers"].as_array().unwrap() {
        let id = w["worker_id"].as_str().unwrap();
        assert!(table.contains(id), "{id} not in the table:\n{table}");
        let metrics = w["metrics_addr"].as_str().unwrap();
        assert!(
            table.contains(&format!("href=\"http://{metrics}/metrics\"")),
            "{metrics}:\n{table}"
        );
    }
    let chart_at = html
        .find("<svg id=\"loss-chart\"")
        .unwrap_or_else(|| panic!("no loss chart:\n{html}"));
    let chart = &html[chart_at
        ..html[chart_at..]
            .find("</svg>")
            .map_or(html.len(), |e| chart_at + e)];
    assert!(
        chart.contains("<path d=\"M"),
        "the curve is drawn:\n{chart}"
    );
    let number = |id: &str| -> f64 {
        let at = html
            .find(&format!("id=\"{id}\">"))
            .unwrap_or_else(|| panic!("no #{id}"));
        let rest = &html[at + id.len() + 6..];
        rest[..rest.find('<').unwrap()]
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("#{id}: {rest:.40}"))
    };
    assert!(number("generation") >= 1.0);
    assert!(number("step") >= 3.0);
    assert_eq!(number("world-size"), 2.0);
    assert!(number("throughput") > 0.0, "tokens/s on the page");

    let png = artifacts().join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        &url,
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,900",
        ],
        &job.dir,
    );
    let bytes = std::fs::read(&png).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n{}",
            png.display(),
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
    // A blank page compresses to almost nothing; text, table and chart do not.
    assert!(
        bytes.len() > 20_000,
        "{} bytes: is the page blank?",
        bytes.len()
    );
    eprintln!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}

fn scrape(addr: &str) -> Vec<Sample> {
    let (code, body) = observe::get(addr, "/metrics").unwrap();
    assert_eq!(code, 200, "{addr}/metrics: {body}");
    parse_prometheus(&body).unwrap_or_else(|e| panic!("{addr}/metrics: {e}\n{body}"))
}

fn must(samples: &[Sample], name: &str, addr: &str) -> f64 {
    value(samples, name).unwrap_or_else(|| {
        let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        panic!("{addr}: no {name} in {names:?}")
    })
}

#[test]
fn coordinator_and_worker_metrics_have_the_named_series_with_plausible_values() {
    let job = launched_job();
    let st = job.training(3);

    let c = scrape(&job.http);
    let get = |n: &str| must(&c, n, &job.http);
    assert_eq!(get("ferry_world_size"), 2.0);
    assert_eq!(get("ferry_workers"), 2.0);
    assert!(get("ferry_generation") >= 1.0);
    assert!(get("ferry_committed_steps") >= 3.0);
    assert!(get("ferry_tokens_per_second") > 0.0);
    let loss = get("ferry_loss");
    assert!(
        loss.is_finite() && loss > 0.0 && loss < 12.0,
        "coordinator loss {loss}"
    );
    assert!(
        get("ferry_allreduce_seconds_count") >= 3.0,
        "a histogram of all-reduce times"
    );

    let mut ranks = Vec::new();
    for w in st["workers"].as_array().unwrap() {
        let addr = w["metrics_addr"].as_str().unwrap().to_string();
        for (path, expect) in [("/healthz", "ok"), ("/readyz", "ready")] {
            let (code, body) = observe::get(&addr, path).unwrap();
            assert_eq!(code, 200, "{addr}{path}: {body}");
            assert!(body.starts_with(expect), "{addr}{path}: {body}");
        }
        let m = scrape(&addr);
        let get = |n: &str| must(&m, n, &addr);
        assert_eq!(get("ferry_worker_ready"), 1.0);
        assert_eq!(get("ferry_worker_world_size"), 2.0);
        assert!(get("ferry_worker_generation") >= 1.0);
        ranks.push(get("ferry_worker_rank"));
        assert!(get("ferry_worker_committed_step") >= 1.0);
        let tps = get("ferry_worker_tokens_per_second");
        assert!(tps > 0.0 && tps < 1e7, "tokens/s {tps}");
        let step_s = get("ferry_worker_last_step_seconds");
        let reduce_s = get("ferry_worker_last_allreduce_seconds");
        assert!(
            step_s > 0.0 && reduce_s > 0.0 && reduce_s < step_s,
            "step {step_s} s, all-reduce {reduce_s} s"
        );
        let loss = get("ferry_worker_loss");
        assert!(
            loss.is_finite() && loss > 0.0 && loss < 12.0,
            "worker loss {loss}"
        );
        let mfu = get("ferry_worker_mfu");
        assert!(mfu > 0.0 && mfu <= 1.0, "MFU {mfu}");
        // Bandwidth is the bytes each step reduces over the time it took: the tiny model's
        // gradients are hundreds of kilobytes, and the figures agree with each other.
        let bandwidth = get("ferry_worker_allreduce_bandwidth_bytes_per_second");
        let steps = get("ferry_worker_steps_total");
        let bytes_per_step = get("ferry_worker_allreduce_bytes_total") / steps;
        assert!(bandwidth > 0.0, "bandwidth {bandwidth}");
        assert!(
            bytes_per_step > 1e5,
            "{bytes_per_step} bytes reduced per step"
        );
        let implied = bandwidth * reduce_s;
        assert!(
            (implied - bytes_per_step).abs() <= 1e-6 * bytes_per_step,
            "bandwidth x time = {implied} bytes, but a step reduces {bytes_per_step}"
        );
        assert_eq!(
            get("ferry_worker_step_seconds_count"),
            steps,
            "one histogram sample per step"
        );
        assert!(m.iter().any(|s| s.name == "ferry_worker_info"
            && s.labels.contains(w["worker_id"].as_str().unwrap())));
    }
    ranks.sort_by(f64::total_cmp);
    assert_eq!(ranks, [0.0, 1.0], "the two workers are ranks 0 and 1");
}

/// Reads lines of a child's stderr on a thread until one contains `marker`.
fn wait_for_line(child: &mut Child, marker: &str, within: Duration) -> String {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => return line,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no line with {marker:?} within {within:?}: {seen:?}"),
        }
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_worker_that_has_not_joined_is_live_but_not_ready_and_a_stalled_one_is_not_live() {
    // A coordinator address where nothing listens: the worker keeps trying to join.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut child = support::ferry()
        .args([
            "worker",
            "--coordinator",
            &nobody.to_string(),
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--stall-timeout-s",
            "3",
            "--patience-s",
            "60",
            "--device",
            "cpu",
        ])
        .env("FERRY_JOB_TOKEN", "observe-test-token")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let line = wait_for_line(&mut child, "metrics on http://", Duration::from_secs(30));
    let worker = KillOnDrop(child);
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap()
        .to_string();
    let started = Instant::now();

    let (code, body) = observe::get(&addr, "/readyz").unwrap();
    assert_eq!(code, 503, "not joined, so not ready: {body}");
    let (code, body) = observe::get(&addr, "/healthz").unwrap();
    assert_eq!(
        code, 200,
        "alive while it has not been stuck for long: {body}"
    );
    let m = parse_prometheus(&observe::get(&addr, "/metrics").unwrap().1).unwrap();
    assert_eq!(value(&m, "ferry_worker_ready"), Some(0.0));

    // Its loop makes no progress past the stall timeout (3 s): liveness fails, so a
    // Kubernetes liveness probe would restart it.
    let (code, body) = loop {
        let (code, body) = observe::get(&addr, "/healthz").unwrap();
        if code != 200 || started.elapsed() > Duration::from_secs(20) {
            break (code, body);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("stalled"), "{body}");
    drop(worker);
}

/// A coordinator for the leave tests: one worker is enough, generous timeouts.
fn leave_test_coordinator(name: &str) -> support::cluster::CoordinatorProc {
    let dir = support::scratch(name);
    support::cluster::CoordinatorProc::start(
        &format!("{name}-coord"),
        &support::cluster::job_toml(
            &dir.join("run"),
            8,
            4,
            64,
            "min_workers = 1\nsettle_s = 0.0\nheartbeat_timeout_s = 30.0\ncollective_timeout_s = 30.0",
        ),
        &[],
    )
}

/// Polls the coordinator's status until `ok`; fails after 180 s naming `what`.
fn wait_status(
    rt: &tokio::runtime::Runtime,
    c: &support::cluster::CoordinatorProc,
    what: &str,
    ok: &dyn Fn(&ferry_rpc::proto::StatusReply) -> bool,
) -> ferry_rpc::proto::StatusReply {
    let start = Instant::now();
    loop {
        let st = rt.block_on(c.status());
        if ok(&st) {
            return st;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "no {what}: {st:?}\n{}",
            c.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to `w`, then waits (at most `within`) for it to exit, with success.
fn terminate_and_wait(w: &mut support::cluster::WorkerProc, within: Duration) {
    w.signal(libc::SIGTERM);
    let start = Instant::now();
    let exit = loop {
        if let Some(s) = w.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < within,
            "still running after SIGTERM:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit}: {}", w.log_text());
}

#[test]
fn sigterm_makes_a_worker_leave_at_a_step_boundary_so_no_step_fails() {
    // What `kubectl scale statefulset ferry-worker --replicas 1` does to the second pod.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = leave_test_coordinator("observe-leave");
    let a = support::cluster::WorkerProc::start(&c, "a");
    let mut b = support::cluster::WorkerProc::start(&c, "b");
    let st = wait_status(&rt, &c, "two workers training", &|s| {
        s.world_size == 2 && s.committed_steps >= 3
    });
    let generation = st.generation;

    terminate_and_wait(&mut b, Duration::from_secs(60));
    assert!(
        b.log_text().contains("SIGTERM: leaving the job"),
        "{}",
        b.log_text()
    );

    // The survivor trains on alone; it never saw a failed all-reduce.
    let left_at = rt.block_on(c.status()).committed_steps;
    let st = wait_status(&rt, &c, "the survivor training alone", &|s| {
        s.world_size == 1 && s.generation > generation && s.committed_steps >= left_at + 2
    });
    assert_eq!(st.workers.len(), 1, "{st:?}");
    let survivor = a.log_text();
    assert!(
        !survivor.contains("back to rendezvous"),
        "a step failed:\n{survivor}"
    );
    assert!(
        !c.log_text().contains("data-plane failure"),
        "{}",
        c.log_text()
    );
}

#[test]
fn sigterm_of_the_only_worker_holding_the_state_hands_it_to_a_newcomer_first() {
    // A one-worker job, no checkpoint yet; a replacement starts and the old worker gets
    // SIGTERM (a rolling update). Released at once, the old worker took every step with it
    // and the newcomer started over from the seed.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = leave_test_coordinator("observe-handover");
    let mut a = support::cluster::WorkerProc::start(&c, "a");
    wait_status(&rt, &c, "the first worker training", &|s| {
        s.committed_steps >= 3
    });
    let b = support::cluster::WorkerProc::start(&c, "b");
    wait_status(&rt, &c, "the newcomer joined", &|s| s.workers.len() == 2);
    let left_at = rt.block_on(c.status()).committed_steps;
    terminate_and_wait(&mut a, Duration::from_secs(120));
    let st = wait_status(&rt, &c, "the newcomer training alone", &|s| {
        s.world_size == 1 && s.workers.len() == 1 && s.committed_steps >= left_at + 2
    });
    assert_eq!(
        (st.rollbacks, st.redone_steps),
        (0, 0),
        "the job went back: {st:?}\n{}\n{}",
        c.log_text(),
        b.log_text()
    );
    assert!(
        c.log_text().contains("hand"),
        "no handover in the coordinator's log:\n{}",
        c.log_text()
    );
}
