//! Simulated hosts for multi-host tests: one Linux network namespace per host, each with its own
//! address on one link (a veth pair) to a bridge that lives in a namespace of its own.
//!
//! ```text
//!   host 0 (198.18.0.1)   host 1 (198.18.0.2)   ...      namespaces ferry-PID-K-hI
//!        eth0                  eth0
//!         |                     |                        veth pairs (the "cables")
//!        p0 ---- br0 (bridge) -- p1 ...                  namespace ferry-PID-K-br
//! ```
//!
//! Every ferry process of a host runs inside that host's namespace ([`SimulatedHosts::ferry`]),
//! so ranks on different hosts talk over a real network stack and never share memory-mapped
//! segments by address (each host has its own address; shared memory is offered only between
//! ranks that advertise the same host). A link's rate is shaped with `tc ... tbf` on both ends
//! ([`SimulatedHosts::shape`]); a partition is the bridge end of a host's link set down
//! ([`SimulatedHosts::cut`]), which drops its packets silently, as a pulled cable does, or
//! blackhole routes between two hosts only ([`SimulatedHosts::cut_between`]).
//! The addresses are from 198.18.0.0/15, the range set aside for network benchmarks (RFC
//! 2544), and exist only inside these namespaces.
//!
//! Cleanup: dropping the harness kills every process left in its namespaces and deletes them,
//! also when the test panics. A reaper process in its own session does the same if the test
//! binary dies without unwinding (Ctrl-C, SIGKILL), and every new harness removes namespaces
//! left by test processes that no longer exist.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Opting out where namespaces cannot be made (not root, no `ip`): the multi-host tests then
/// pass without running and say so on stderr. Without it they fail with the reason.
pub const SKIP_ENV: &str = "FERRY_SKIP_NETNS";

const PREFIX: &str = "ferry-";
const SUBNET: &str = "198.18.0";

pub struct Host {
    pub netns: String,
    pub addr: String,
    /// Kept open so that commands can `setns` into it after `fork`.
    ns_file: File,
}

pub struct SimulatedHosts {
    tag: String,
    bridge: String,
    hosts: Vec<Host>,
    reaper: Option<std::process::Child>,
}

/// `n` simulated hosts, or `None` when `FERRY_SKIP_NETNS=1` and they cannot be made. Panics
/// with one line naming the cause when they cannot be made otherwise.
pub fn hosts_or_skip(n: usize, test: &str) -> Option<SimulatedHosts> {
    match SimulatedHosts::new(n) {
        Ok(h) => Some(h),
        Err(why) if std::env::var(SKIP_ENV).as_deref() == Ok("1") => {
            eprintln!(
                "SKIPPED {test}: network namespaces cannot be made here ({why}); \
                 {SKIP_ENV}=1 opts out"
            );
            None
        }
        Err(why) => panic!(
            "{test}: cannot make simulated hosts: {why} (run as root with iproute2, \
             or set {SKIP_ENV}=1 to skip the multi-host tests)"
        ),
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// Kills whatever runs in `netns` and deletes it; best effort.
fn remove_netns(netns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a process inside our own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = ip(&["netns", "del", netns]);
}

/// Namespaces named by test processes that are gone (their reaper did not run or not yet).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) {
            remove_netns(name);
        }
    }
}

impl SimulatedHosts {
    pub fn new(n: usize) -> Result<SimulatedHosts, String> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root".into());
        }
        sweep_stale();
        let tag = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let bridge = format!("{tag}-br");
        let mut hosts = SimulatedHosts {
            tag: tag.clone(),
            bridge: bridge.clone(),
            hosts: Vec::new(),
            reaper: None,
        };
        let names: Vec<String> = std::iter::once(bridge.clone())
            .chain((0..n).map(|i| format!("{tag}-h{i}")))
            .collect();
        hosts.reaper = Some(spawn_reaper(&names)?);
        ip(&["netns", "add", &bridge])?;
        ip(&["-n", &bridge, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &bridge, "link", "set", "br0", "up"])?;
        for (i, netns) in names[1..].iter().enumerate() {
            ip(&["netns", "add", netns])?;
            let ns_file = File::open(format!("/run/netns/{netns}"))
                .map_err(|e| format!("/run/netns/{netns}: {e}"))?;
            let addr = format!("{SUBNET}.{}", i + 1);
            hosts.hosts.push(Host {
                netns: netns.clone(),
                addr: addr.clone(),
                ns_file,
            });
            let port = format!("p{i}");
            ip(&[
                "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", netns,
            ])?;
            ip(&["-n", &bridge, "link", "set", &port, "master", "br0"])?;
            ip(&["-n", &bridge, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                netns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", netns, "link", "set", "lo", "up"])?;
        }
        Ok(hosts)
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// Host `i`'s address.
    pub fn addr(&self, i: usize) -> &str {
        &self.hosts[i].addr
    }

    /// `program` to be run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: impl AsRef<OsStr>) -> Command {
        command_in(self.hosts[i].ns_file.as_raw_fd(), program)
    }

    /// The `ferry` binary, run on host `i`.
    pub fn ferry(&self, i: usize) -> Command {
        self.ferry_maker(i)()
    }

    /// Makes `ferry` commands for host `i`, for helpers that start processes again (a
    /// coordinator restarted on its state). Use it only while the harness lives.
    pub fn ferry_maker(&self, i: usize) -> Box<dyn Fn() -> Command + Send + Sync> {
        let fd = self.hosts[i].ns_file.as_raw_fd();
        Box::new(move || {
            let mut c = command_in(fd, env!("CARGO_BIN_EXE_ferry"));
            c.env("RUST_BACKTRACE", "0");
            c
        })
    }

    /// Runs `f` on a thread inside host `i`'s namespace: sockets it opens are that host's.
    pub fn run_in<T: Send>(&self, i: usize, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.hosts[i].ns_file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(fd).unwrap_or_else(|e| panic!("setns into host {i}: {e}"));
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Shapes host `i`'s link to `rate` (tc syntax: "1gbit", "200mbit") in both directions.
    pub fn shape(&self, i: usize, rate: &str) -> Result<(), String> {
        let bits = parse_rate(rate)?;
        // 10 ms worth of bytes per burst (at least 64 KiB), queueing at most 100 ms.
        let burst = format!("{}", (bits / 8 / 100).max(64 * 1024));
        let port = format!("p{i}");
        for (netns, dev) in [
            (&self.hosts[i].netns, "eth0"),
            (&self.bridge, port.as_str()),
        ] {
            run(
                "tc",
                &[
                    "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                    "burst", &burst, "latency", "100ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Pulls host `i`'s cable: its packets are dropped until [`restore`](Self::restore).
    pub fn cut(&self, i: usize) {
        ip(&["-n", &self.bridge, "link", "set", &format!("p{i}"), "down"])
            .unwrap_or_else(|e| panic!("cut host {i}: {e}"));
    }

    pub fn restore(&self, i: usize) {
        ip(&["-n", &self.bridge, "link", "set", &format!("p{i}"), "up"])
            .unwrap_or_else(|e| panic!("restore host {i}: {e}"));
    }

    /// Cuts only the link between hosts `a` and `b`: each drops what it sends the other
    /// (a blackhole route), so their open connections stall silently and new ones are refused,
    /// while both still reach every other host.
    pub fn cut_between(&self, a: usize, b: usize) {
        self.blackholes("add", a, b);
    }

    pub fn restore_between(&self, a: usize, b: usize) {
        self.blackholes("del", a, b);
    }

    fn blackholes(&self, action: &str, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            let target = format!("{}/32", self.hosts[to].addr);
            let netns = &self.hosts[from].netns;
            ip(&["-n", netns, "route", action, "blackhole", &target])
                .unwrap_or_else(|e| panic!("route {action} between hosts {a} and {b}: {e}"));
        }
    }

    fn names(&self) -> Vec<String> {
        self.hosts
            .iter()
            .map(|h| h.netns.clone())
            .chain(std::iter::once(self.bridge.clone()))
            .collect()
    }
}

impl Drop for SimulatedHosts {
    fn drop(&mut self) {
        for netns in self.names() {
            remove_netns(&netns);
        }
        if let Some(mut reaper) = self.reaper.take() {
            let _ = reaper.kill();
            let _ = reaper.wait();
        }
    }
}

fn command_in(fd: RawFd, program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    // SAFETY: setns(2) is async-signal-safe; the caller keeps `fd` open while it spawns.
    unsafe {
        c.pre_exec(move || enter(fd));
    }
    c
}

fn enter(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fd is an open /run/netns file; CLONE_NEWNET checks that it is a network namespace.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A shell in its own session that outlives this process: once the test binary is gone, it
/// kills what runs in `names` and deletes them.
fn spawn_reaper(names: &[String]) -> Result<std::process::Child, String> {
    let list = names.join(" ");
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         for ns in {list}; do for p in $(ip netns pids $ns 2>/dev/null); do kill -9 $p; done; \
         ip netns del $ns 2>/dev/null; done",
        pid = std::process::id()
    );
    let mut c = Command::new("sh");
    c.args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe; a new session keeps Ctrl-C's SIGINT away.
    unsafe {
        c.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    c.spawn()
        .map_err(|e| format!("cannot start the cleanup reaper: {e}"))
}

/// Bits per second of a tc rate such as "200mbit" or "1gbit".
fn parse_rate(rate: &str) -> Result<u64, String> {
    let lower = rate.to_ascii_lowercase();
    let (num, unit) = lower
        .find(|c: char| !c.is_ascii_digit())
        .map_or((lower.as_str(), ""), |k| lower.split_at(k));
    let n: u64 = num.parse().map_err(|_| format!("rate {rate:?}"))?;
    let scale = match unit {
        "kbit" => 1_000,
        "mbit" => 1_000_000,
        "gbit" => 1_000_000_000,
        "bit" | "" => 1,
        _ => return Err(format!("rate {rate:?}: use kbit, mbit or gbit")),
    };
    Ok(n * scale)
}
