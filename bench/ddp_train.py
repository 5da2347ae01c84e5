#!/usr/bin/env python3
"""ferry data-parallel training vs PyTorch DDP (gloo), GPT-2 "cpu-small", side by side in one run.

ferry runs its real product path: `ferry launch --local` with a coordinator and worker
processes on the prepared WikiText + books shards (sample plans, ring all-reduce, AdamW), while
shared/bench/torch_gpt2_bench.py trains on random tokens under torchrun. Same model (6 layers,
384 wide, 6 heads, context 256, vocabulary 8192, fp32), 8 sequences per rank per step, the same
total threads (2). Variants alternate for --rounds rounds:

  ferry 2x1      2 worker processes x 1 thread        pytorch DDP 2x1   torchrun, gloo, 2 x 1 thread
  ferry 1x2      1 worker process x 2 threads          pytorch 1x2       one process, 2 threads

ferry's tokens/s is the median over timed steps of rank 0's step time (from metrics.jsonl, the
first --warmup-steps skipped); PyTorch's is its tokens_per_s_from_median. Prints JSON lines,
then medians, ferry/pytorch ratios, and the 1 -> 2 process scaling efficiency
(tokens/s with 2 processes / tokens/s with 1, same total threads).

    .venv/bin/python bench/ddp_train.py --rounds 3 --data data-prepared/wikitext-books
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

JOB = """[job]
name = "bench-ddp"
steps = {steps}
run_dir = "{run}"

[model]
family = "gpt2"
size = "small"

[data]
shards = "{data}"
seq_len = 256

[batch]
global = {global_batch}
micro = 8

[optimizer]
lr = 3e-4
warmup_steps = 0

[eval]
every = 0

[checkpoint]
every = 0

[cluster]
min_workers = {workers}
max_workers = {workers}
settle_s = 0
"""


def ferry_run(a, workers, threads, scratch):
    run = os.path.join(scratch, f"ferry-{workers}x{threads}")
    shutil.rmtree(run, ignore_errors=True)
    os.makedirs(run)
    job = os.path.join(run, "job.toml")
    with open(job, "w") as f:
        f.write(JOB.format(steps=a.warmup_steps + a.steps, run=run, data=os.path.abspath(a.data),
                           global_batch=8 * workers, workers=workers))
    out = subprocess.run([a.ferry, "launch", "--local", "--no-progress", "--workers", str(workers),
                          "--threads", str(threads), job], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ferry {workers}x{threads} failed ({out.returncode}): {out.stderr[-3000:]}")
    steps = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if '"event":"step"' in l]
    timed = steps[a.warmup_steps:]
    step_ms = statistics.median(s["step_ms"] for s in timed)
    tokens_step = 8 * workers * 256
    return {"impl": "ferry", "world": workers, "threads_per_rank": threads,
            "tokens_per_s": round(tokens_step / (step_ms / 1e3), 2),
            "step_ms_median": round(step_ms, 2),
            "allreduce_ms_median": round(statistics.median(s.get("allreduce_ms", 0.0) for s in timed), 2),
            "loss_first": round(steps[0]["loss"], 4), "loss_last": round(steps[-1]["loss"], 4)}


def torch_run(a, workers, threads):
    shape = ["--layers", "6", "--d-model", "384", "--heads", "6", "--ctx", "256", "--batch", "8",
             "--vocab", "8192", "--steps", str(a.steps), "--warmup-steps", str(a.warmup_steps),
             "--threads", str(threads), "--peak-gflops", "140"]
    if workers == 1:
        cmd = [sys.executable, a.torch_bench] + shape
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--standalone", f"--nproc_per_node={workers}", a.torch_bench] + shape
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"pytorch {workers}x{threads} failed ({out.returncode}): {out.stderr[-3000:]}")
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    return {"impl": "pytorch", "world": workers, "threads_per_rank": threads,
            "tokens_per_s": rec["tokens_per_s_from_median"], "step_ms_median": rec["step_ms_median"],
            "loss_first": rec["loss_first"], "loss_last": rec["loss_last"]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--data", default=os.path.join(ROOT, "data-prepared/wikitext-books"))
    p.add_argument("--ferry", default=os.path.join(ROOT, "target/release/ferry"))
    p.add_argument("--torch-bench", default=os.path.join(ROOT, "../shared/bench/torch_gpt2_bench.py"))
    a = p.parse_args()
    variants = [
        ("ferry 2x1", lambda s: ferry_run(a, 2, 1, s)),
        ("pytorch DDP 2x1", lambda s: torch_run(a, 2, 1)),
        ("ferry 1x2", lambda s: ferry_run(a, 1, 2, s)),
        ("pytorch 1x2", lambda s: torch_run(a, 1, 2)),
    ]
    results = {name: [] for name, _ in variants}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(a.rounds):
            for name, run in variants:
                rec = run(scratch)
                rec.update(bench="ddp_train", variant=name, round=r)
                results[name].append(rec)
                print(json.dumps(rec), flush=True)

    def med(name):
        return statistics.median(x["tokens_per_s"] for x in results[name])

    print(f"\nGPT-2 cpu-small (L6 d384 h6 ctx256 vocab8192 fp32), 8 sequences per rank per step, "
          f"2 threads in all, {a.rounds} rounds x {a.steps} timed steps (medians)")
    print(f"{'variant':<18}{'tokens/s':>10}{'range':>15}{'step ms':>10}")
    for name, _ in variants:
        tps = [x["tokens_per_s"] for x in results[name]]
        steps = statistics.median(x["step_ms_median"] for x in results[name])
        print(f"{name:<18}{med(name):>10.0f}{f'{min(tps):.0f}-{max(tps):.0f}':>15}{steps:>10.1f}")
    print(f"ferry/pytorch, 2 processes: {med('ferry 2x1') / med('pytorch DDP 2x1'):.3f}; "
          f"1 process: {med('ferry 1x2') / med('pytorch 1x2'):.3f}")
    print(f"scaling efficiency 1 -> 2 processes (same 2 threads): ferry "
          f"{med('ferry 2x1') / med('ferry 1x2'):.3f}, pytorch "
          f"{med('pytorch DDP 2x1') / med('pytorch 1x2'):.3f}")


if __name__ == "__main__":
    main()
