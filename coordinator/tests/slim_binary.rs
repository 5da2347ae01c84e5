//! The slim `ferry-coordinator` binary: it serves a real job, maps no libtorch, and idles in
//! under 50 MiB (`ferry coordinator`, in the one binary that links libtorch, idles near 400).

use ferry_dataset::prepare::{prepare, PrepareOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const IDLE_RSS_LIMIT_MIB: f64 = 50.0;

/// The shared corpora (`../shared/data`, or `FERRY_DATA_DIR`).
fn data_dir() -> PathBuf {
    std::env::var_os("FERRY_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

/// Kills the coordinator if the test ends early, so no process outlives a failed assertion.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_slim_coordinator_serves_a_job_without_libtorch_in_under_50_mib() {
    let poems = data_dir().join("books/blake-poems.txt");
    assert!(
        poems.is_file(),
        "{}: missing; the shared data must be beside the checkout (or set FERRY_DATA_DIR)",
        poems.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let shards = tmp.path().join("shards");
    prepare(&PrepareOptions {
        inputs: vec![poems.display().to_string()],
        output: shards.clone(),
        vocab_size: 400,
        val_fraction: 0.1,
        seed: 3,
        shard_tokens: 4096,
        ..Default::default()
    })
    .unwrap();
    let job = tmp.path().join("job.toml");
    std::fs::write(
        &job,
        format!(
            "[job]\nname = \"slim\"\nsteps = 10\nrun_dir = {:?}\n\n[model]\nfamily = \"gpt2\"\n\
             size = \"tiny\"\n\n[data]\nshards = {:?}\nseq_len = 32\n\n[batch]\nglobal = 4\n\
             micro = 2\n",
            tmp.path().join("run"),
            shards
        ),
    )
    .unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "slim-coordinator-test-token\n").unwrap();
    let state = tmp.path().join("state");
    let (grpc, http) = (free_port(), free_port());

    let mut coordinator = Running(
        Command::new(env!("CARGO_BIN_EXE_ferry-coordinator"))
            .arg("--job")
            .arg(&job)
            .args(["--listen", &format!("127.0.0.1:{grpc}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .arg("--state")
            .arg(&state)
            .arg("--token-file")
            .arg(&token)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = coordinator.0.id();
    // Serving once it has written where it listens (as `ferry launch` waits for it).
    if let Err(e) = ferry_coordinator::admin::wait_for_endpoint(&state, &mut coordinator.0) {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(coordinator.0.stderr.as_mut().unwrap(), &mut err);
        panic!("ferry-coordinator did not serve: {e:#}\n{err}");
    }
    // Its status page answers: it is the real server, not a process that wrote a file.
    let mut page = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    std::io::Write::write_all(
        &mut page,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut page, &mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "/healthz: {reply}");

    std::thread::sleep(Duration::from_secs(1));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(
        !maps.contains("libtorch") && !maps.contains("libc10"),
        "ferry-coordinator maps libtorch"
    );
    // As `ferry bench coordinator` measures it.
    let (_, rss, _) = ferry_coordinator::loadgen::proc_usage(pid).unwrap();
    assert!(
        rss < IDLE_RSS_LIMIT_MIB,
        "idle RSS {rss:.1} MiB, over {IDLE_RSS_LIMIT_MIB} MiB"
    );
    eprintln!("ferry-coordinator idle RSS: {rss:.1} MiB");

    // SIGTERM stops it cleanly, as it stops `ferry coordinator`.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = coordinator.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "SIGTERM did not stop it");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "after SIGTERM: {status}");
}
