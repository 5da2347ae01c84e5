#!/usr/bin/env python3
"""ferry vs PyTorch gloo: all-reduce bandwidth of 2 processes on this host, side by side in one run.

Alternates, for --rounds rounds: gloo (shared/bench/allreduce_bench.py under torchrun) and
`ferry bench allreduce` with each transport in --transports (auto picks shared memory on one
host; tcp is the pure TCP ring), and each transport in --unauthenticated-transports once more
with the ring's per-message MAC off (variant `ferry-tcp-nomac`), to show what the MAC costs. Both measure the same way: per size, the median over
iterations of the max-over-ranks time of one in-place all-reduce after a barrier; busbw =
2(n-1)/n * bytes / time. Prints one JSON line per size and run, then a table of medians over
rounds and the ferry/gloo ratios.

The machines this runs on are often shared with builds and tests. Before each run the driver
waits (up to --quiet-wait-s) for the CPUs to be mostly idle, and each record carries
`foreign_cpu_pct`: the CPU time used by other processes during the run, in % of all CPUs.
Compare runs with similar figures; a tightly coupled 2-process all-reduce slows down a lot
when a third process takes a core.

    .venv/bin/python bench/allreduce.py --rounds 3
"""
import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cpu_jiffies():
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(a):
    """Waits until the CPUs are at least --quiet-idle-pct idle over 2 s, or --quiet-wait-s passed."""
    deadline = time.time() + a.quiet_wait_s
    while True:
        b0, t0 = cpu_jiffies()
        time.sleep(2)
        b1, t1 = cpu_jiffies()
        if 100 * (1 - (b1 - b0) / max(t1 - t0, 1)) >= a.quiet_idle_pct or time.time() > deadline:
            return


def measured(run):
    """Runs `run()` and returns its records, each with the share of CPU that other processes used."""
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count()
    b0, _ = cpu_jiffies()
    c0, w0 = children_cpu_s(), time.time()
    recs = run()
    b1, _ = cpu_jiffies()
    c1, w1 = children_cpu_s(), time.time()
    foreign = max(0.0, (b1 - b0) / hz - (c1 - c0))
    for rec in recs:
        rec["foreign_cpu_pct"] = round(100 * foreign / (w1 - w0) / ncpu, 1)
    return recs


def records(stdout):
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def run_gloo(a):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", a.gloo_bench, "--sizes-mib", a.sizes_mib,
           "--budget-s", str(a.budget_s), "--max-iters", str(a.max_iters)]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"gloo failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return records(out.stdout)


def run_ferry(a, transport, message_mac=True):
    peers = ",".join(f"127.0.0.1:{p}" for p in free_ports(2))
    def cmd(rank):
        return [a.ferry, "bench", "allreduce", "--rank", str(rank), "--world", "2", "--peers", peers,
                "--sizes-mib", a.sizes_mib, "--transport", transport,
                "--budget-s", str(a.budget_s), "--max-iters", str(a.max_iters),
                "--message-mac", "true" if message_mac else "false"]
    other = subprocess.Popen(cmd(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd(0), capture_output=True, text=True)
    _, other_err = other.communicate()
    if out.returncode != 0 or other.returncode != 0:
        sys.exit(f"ferry {transport} failed: {out.stderr.strip()[-1000:]} {other_err.strip()[-1000:]}")
    return records(out.stdout)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes-mib", default="1,4,16,64,256")
    p.add_argument("--transports", default="auto,tcp")
    p.add_argument("--unauthenticated-transports", default="tcp",
                   help="also run these with the ring's message MAC off ('' for none)")
    p.add_argument("--budget-s", type=float, default=20.0, help="approx. time budget per size and run")
    p.add_argument("--max-iters", type=int, default=50)
    p.add_argument("--ferry", default=os.path.join(ROOT, "target/release/ferry"))
    p.add_argument("--gloo-bench", default=os.path.join(ROOT, "../shared/bench/allreduce_bench.py"))
    p.add_argument("--quiet-idle-pct", type=float, default=90.0)
    p.add_argument("--quiet-wait-s", type=float, default=120.0, help="0: do not wait for idle CPUs")
    a = p.parse_args()

    busbw = {}  # (variant, mib) -> [GB/s per round]
    busy = {}  # variant -> [foreign CPU % per run]
    variants = []
    for r in range(a.rounds):
        runs = [("gloo", lambda: run_gloo(a))]
        runs += [(None, lambda t=t: run_ferry(a, t)) for t in a.transports.split(",")]
        runs += [(None, lambda t=t: run_ferry(a, t, message_mac=False))
                 for t in a.unauthenticated_transports.split(",") if t]
        for name, run in runs:
            if a.quiet_wait_s > 0:
                wait_quiet(a)
            for rec in measured(run):
                variant = name or f"ferry-{rec['transport']}" + ("" if rec.get("message_mac", True) else "-nomac")
                rec.update(variant=variant, round=r)
                print(json.dumps(rec), flush=True)
                if variant not in variants:
                    variants.append(variant)
                busbw.setdefault((variant, rec["mib"]), []).append(rec["busbw_GBps"])
                busy.setdefault(variant, []).append(rec["foreign_cpu_pct"])
                if not rec["correct"]:
                    sys.exit(f"{variant} {rec['mib']} MiB: wrong result")

    sizes = [int(s) for s in a.sizes_mib.split(",")]
    med = {k: statistics.median(v) for k, v in busbw.items()}
    ferries = [v for v in variants if v != "gloo"]
    foreign = statistics.median(r for v in busy.values() for r in v)
    print(f"\nall-reduce busbw (GB/s), 2 processes, float32, medians of {a.rounds} rounds "
          f"(CPU used by other processes during the runs: median {foreign:.0f}%, max {max(max(v) for v in busy.values()):.0f}%)")
    head = f"{'MiB':>5}{'gloo':>9}" + "".join(f"{v:>17}{'x gloo':>8}" for v in ferries)
    print(head)
    for mib in sizes:
        g = med[("gloo", mib)]
        row = f"{mib:>5}{g:>9.3f}"
        for v in ferries:
            f = med[(v, mib)]
            row += f"{f:>17.3f}{f / g:>8.2f}"
        print(row)
    lo = {v: min(med[(v, m)] / med[("gloo", m)] for m in sizes) for v in ferries}
    print("lowest ferry/gloo ratio over sizes: " + ", ".join(f"{v} {x:.2f}" for v, x in lo.items()))
    for v in ferries:
        if v.endswith("-nomac") and v[: -len("-nomac")] in ferries:
            with_mac = v[: -len("-nomac")]
            print(f"{with_mac} with the message MAC / without: " + ", ".join(
                f"{m} MiB {med[(with_mac, m)] / med[(v, m)]:.2f}" for m in sizes))


if __name__ == "__main__":
    main()
