#!/usr/bin/env python3
"""ferry against torchrun + DDP (gloo) on simulated hosts, GPT-2 cpu-small, side by side.

Three hosts are Linux network namespaces joined through a bridge (the layout of
tests/support/netns.rs): host 0 runs ferry's coordinator, hosts 1 and 2 one worker process
each (1 thread, 8 sequences per step). PyTorch runs shared/bench/torch_gpt2_bench.py under
torchrun with one node on host 1 and one on host 2 (c10d rendezvous on host 1, gloo over the
bridge). Each worker host's link is shaped with tc tbf in both directions: unlimited,
1 Gbit/s and 200 Mbit/s. For every rate and round the variants alternate:

  ferry fp32    cluster.gradient_dtype = "fp32"
  ferry bf16    cluster.gradient_dtype = "bf16" (bfloat16 on the wire, sums in float32)
  DDP           torchrun, gloo, float32 gradients, DDP's default 25 MiB buckets

Seconds per step are wall clock of whole steps: ferry's step_ms (NextStep to CommitStep's
answer, coordinator calls included; rank 0's metrics.jsonl), PyTorch's step_ms_median (its
timed loop, all-reduce included). The first --warmup-steps are skipped in both. ferry trains on
the prepared WikiText + books shards, PyTorch on random tokens: the same model and shapes.

With --loss-steps N (default 200; 0 skips it) it also trains GPT-2 tiny for N steps on two
hosts with fp32 and with bf16 gradients and compares the held-out loss at the end.

Needs root (ip netns, tc). Prints JSON lines, then a table of medians and ratios.

    sudo .venv/bin/python bench/multihost.py --rounds 3
"""
import argparse
import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBNET = "198.18.0"  # RFC 2544's benchmark range, only inside our namespaces
RATES = ["unlimited", "1gbit", "200mbit"]
TOKEN = "bench-multihost-token"

JOB = """[job]
name = "bench-multihost-{tag}"
steps = {steps}
run_dir = "{run}"
seed = 5

[model]
family = "gpt2"
size = "{size}"

[data]
shards = "{data}"
seq_len = {seq_len}

[batch]
global = {global_batch}
micro = {micro}

[optimizer]
lr = {lr}
warmup_steps = {warmup}

[eval]
every = {eval_every}
sequences = 64

[checkpoint]
every = 0

[cluster]
min_workers = 2
max_workers = 2
settle_s = 0
heartbeat_timeout_s = 30
collective_timeout_s = 120
checksum_every = 0
gradient_dtype = "{dtype}"
bucket_mib = {bucket_mib}
"""


def sh(*args, check=True):
    out = subprocess.run(args, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {out.stderr.strip()}")
    return out


class Hosts:
    """n namespaces on one bridge; removed on exit, also on Ctrl-C."""

    def __init__(self, n):
        self.tag = f"ferry-bench-{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.names = [f"{self.tag}-h{i}" for i in range(n)]
        atexit.register(self.close)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: sys.exit(130))
        sh("ip", "netns", "add", self.bridge)
        sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", self.bridge, "link", "add", f"p{i}", "type", "veth", "peer", "name",
               "eth0", "netns", ns)
            sh("ip", "-n", self.bridge, "link", "set", f"p{i}", "master", "br0")
            sh("ip", "-n", self.bridge, "link", "set", f"p{i}", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")

    def addr(self, i):
        return f"{SUBNET}.{i + 1}"

    def cmd(self, i, argv):
        return ["ip", "netns", "exec", self.names[i]] + argv

    def shape(self, i, rate):
        for ns, dev in ((self.names[i], "eth0"), (self.bridge, f"p{i}")):
            sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if rate != "unlimited":
                bits = int(rate[:-4]) * {"m": 10**6, "g": 10**9}[rate[-4]]
                burst = max(bits // 8 // 100, 64 * 1024)
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                   "burst", str(burst), "latency", "100ms")

    def close(self):
        if self.bridge is None:
            return
        for ns in self.names + [self.bridge]:
            pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                try:
                    os.kill(int(p), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.names, self.bridge = [], None


def ferry_run(a, hosts, scratch, tag, size, seq_len, micro, steps, dtype, eval_every=0, lr=3e-4,
              warmup=0):
    run = os.path.join(scratch, tag)
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    job = os.path.join(run, "job.toml")
    with open(job, "w") as f:
        f.write(JOB.format(tag=tag, steps=steps, run=os.path.join(run, "run"), size=size,
                           data=os.path.abspath(a.data), seq_len=seq_len, global_batch=2 * micro,
                           micro=micro, lr=lr, warmup=warmup, eval_every=eval_every, dtype=dtype,
                           bucket_mib=a.bucket_mib))
    token = os.path.join(run, "token")
    with open(token, "w") as f:
        f.write(TOKEN + "\n")
    grpc = f"{hosts.addr(0)}:29400"
    logs = []

    def log(name):
        f = open(os.path.join(run, name + ".log"), "w")
        logs.append(f)
        return f

    coord = subprocess.Popen(hosts.cmd(0, [a.ferry, "coordinator", "--job", job, "--state",
                                          os.path.join(run, "state"), "--listen", grpc,
                                          "--token-file", token]),
                             stdout=subprocess.DEVNULL, stderr=log("coordinator"))
    workers = []
    try:
        for h in (1, 2):
            workers.append(subprocess.Popen(
                hosts.cmd(h, [a.ferry, "worker", "--coordinator", grpc, "--token-file", token,
                              "--threads", "1", "--advertise", hosts.addr(h), "--data-listen",
                              f"{hosts.addr(h)}:0", "--metrics-listen", "127.0.0.1:0"]),
                stdout=subprocess.DEVNULL, stderr=log(f"worker{h}")))
        for w in workers:
            if w.wait(timeout=a.run_timeout) != 0:
                sys.exit(f"ferry {tag}: a worker failed; see {run}/worker*.log")
    finally:
        for p in workers + [coord]:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in logs:
            f.close()
    return [json.loads(l) for l in open(os.path.join(run, "run", "metrics.jsonl"))]


def ferry_speed(a, hosts, scratch, rate, dtype, r):
    recs = ferry_run(a, hosts, scratch, f"{dtype}-{rate}-{r}", "small", 256, 8,
                     a.warmup_steps + a.steps, dtype)
    steps = [x for x in recs if x.get("event") == "step"][a.warmup_steps:]
    med = lambda k: statistics.median(x[k] for x in steps)
    return {"step_s": med("step_ms") / 1e3, "allreduce_s": med("allreduce_ms") / 1e3,
            "coordinator_s": med("coordinator_ms") / 1e3,
            "loss_last": steps[-1]["loss"]}


def ddp_speed(a, hosts):
    torchrun = os.path.join(os.path.dirname(a.python), "torchrun")
    shape = ["--layers", "6", "--d-model", "384", "--heads", "6", "--ctx", "256", "--batch", "8",
             "--vocab", "8192", "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
             "--threads", "1", "--peak-gflops", "140"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "eth0"}
    procs = []
    for node, h in enumerate((1, 2)):
        cmd = hosts.cmd(h, [torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
                            str(node), "--master_addr", hosts.addr(1), "--master_port", "29600",
                            a.torch_bench] + shape)
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=a.run_timeout) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(f"torchrun failed ({p.returncode}): {err[-3000:]}")
    rec = json.loads(outs[0][0].strip().splitlines()[-1])
    return {"step_s": rec["step_ms_median"] / 1e3, "loss_last": rec["loss_last"]}


def loss_check(a, hosts, scratch):
    """Held-out loss of GPT-2 tiny after --loss-steps, fp32 against bf16 gradients."""
    out = {}
    for dtype in ("fp32", "bf16"):
        recs = ferry_run(a, hosts, scratch, f"loss-{dtype}", "tiny", 128, 16, a.loss_steps, dtype,
                         eval_every=a.loss_steps, lr=2e-3, warmup=20)
        evals = [x for x in recs if x.get("event") == "eval" and x["step"] == a.loss_steps]
        if not evals:
            sys.exit(f"no held-out evaluation at step {a.loss_steps} in {dtype} run")
        out[dtype] = evals[-1]["val_loss"]
        print(json.dumps({"bench": "multihost", "check": "bf16_loss", "dtype": dtype,
                          "steps": a.loss_steps, "heldout_loss": out[dtype]}), flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--rates", default=",".join(RATES), help="comma-separated: unlimited, 1gbit, ...")
    p.add_argument("--loss-steps", type=int, default=200,
                   help="GPT-2 tiny steps for the bf16 loss check (0 skips it)")
    p.add_argument("--data", default=os.path.join(ROOT, "data-prepared/wikitext-books"),
                   help="ferry-prepared shards (made from ../shared/data when missing)")
    p.add_argument("--ferry", default=os.path.join(ROOT, "target/release/ferry"))
    p.add_argument("--python", default=os.path.join(ROOT, ".venv/bin/python"))
    p.add_argument("--torch-bench",
                   default=os.path.join(ROOT, "../shared/bench/torch_gpt2_bench.py"))
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--bucket-mib", type=float, default=4.0,
                   help="ferry's cluster.bucket_mib (DDP keeps its default 25 MiB)")
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/multihost.py makes network namespaces: run it as root")
    if not os.path.isdir(a.data):
        shared = os.path.join(ROOT, "../shared/data")
        print(f"preparing {a.data} from {shared}", file=sys.stderr)
        sh(a.ferry, "prepare", "--no-progress", "--output", a.data, "--input",
           os.path.join(shared, "wikitext"), os.path.join(shared, "books"))
    hosts = Hosts(3)
    rates = a.rates.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(a.rounds):
            for rate in rates:
                for h in (1, 2):
                    hosts.shape(h, rate)
                for name, run in (("ferry fp32", lambda: ferry_speed(a, hosts, scratch, rate, "fp32", r)),
                                  ("ferry bf16", lambda: ferry_speed(a, hosts, scratch, rate, "bf16", r)),
                                  ("DDP", lambda: ddp_speed(a, hosts))):
                    rec = run()
                    rec.update(bench="multihost", variant=name, rate=rate, round=r)
                    results.setdefault((rate, name), []).append(rec)
                    print(json.dumps(rec), flush=True)
        for h in (1, 2):
            hosts.shape(h, "unlimited")
        losses = loss_check(a, hosts, scratch) if a.loss_steps > 0 else None
    hosts.close()

    med = lambda rate, name, k="step_s": statistics.median(x[k] for x in results[(rate, name)])
    # Bytes each rank sends per step in a 2-rank ring all-reduce: the whole gradient once.
    grad_mb = 13.9e6 * 4 / 1e6
    print(f"\nGPT-2 cpu-small (L6 d384 ctx256 vocab8192), 2 worker hosts x 1 thread, 8 sequences "
          f"per rank; {a.rounds} rounds x {a.steps} timed steps; medians of seconds per step")
    print(f"{'link':<10}{'ferry fp32':>11}{'ferry bf16':>11}{'DDP':>8}{'fp32/DDP':>10}{'bf16/DDP':>10}"
          f"{'allreduce fp32':>16}{'coord':>7}{'link floor fp32':>17}")
    for rate in rates:
        fp, bf, ddp = med(rate, "ferry fp32"), med(rate, "ferry bf16"), med(rate, "DDP")
        floor = "-" if rate == "unlimited" else \
            f"{grad_mb * 8 / (int(rate[:-4]) * {'m': 1, 'g': 1000}[rate[-4]]):.2f}"
        print(f"{rate:<10}{fp:>11.3f}{bf:>11.3f}{ddp:>8.3f}{ddp / fp:>10.3f}{ddp / bf:>10.3f}"
              f"{med(rate, 'ferry fp32', 'allreduce_s'):>16.3f}"
              f"{med(rate, 'ferry fp32', 'coordinator_s'):>7.3f}{floor:>17}")
    print("fp32/DDP and bf16/DDP are speed ratios (DDP s/step over ferry s/step; above 1 is faster).")
    if losses:
        rel = abs(losses["bf16"] - losses["fp32"]) / losses["fp32"]
        print(f"GPT-2 tiny, {a.loss_steps} steps on 2 hosts: held-out loss fp32 {losses['fp32']:.5f}, "
              f"bf16 {losses['bf16']:.5f} ({100 * rel:.3f}% apart)")


if __name__ == "__main__":
    main()
