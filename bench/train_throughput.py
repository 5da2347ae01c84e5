#!/usr/bin/env python3
"""ferry vs PyTorch: single-process training throughput, side by side in one run.

Runs `ferry bench train --model M` and the PyTorch reference of the same architecture
(GPT-2: shared/bench/torch_gpt2_bench.py; GPT and BERT: bench/torch_models_bench.py) on the
same config, alternating A/B/A/B for --rounds rounds (these machines drift by several % over
minutes), and prints one JSON line per run plus a table of medians and the ferry/PyTorch ratio.

The allocator is a lever (see shared/bench/README.md): ferry by default keeps freed memory in
the process (mallopt), PyTorch by default lets glibc unmap it. Both are also run the other way
(--default-allocator for ferry; GLIBC_TUNABLES for PyTorch), so the comparison under equal
allocator settings is in the same table.

    .venv/bin/python bench/train_throughput.py --rounds 3                      # GPT-2 cpu-small
    .venv/bin/python bench/train_throughput.py --model gpt --rounds 3          # GPT small
    .venv/bin/python bench/train_throughput.py --model bert --layers 4 --d-model 512 \
        --heads 8 --ctx 128 --batch 16 --rounds 3                              # BERT small
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP_MEMORY = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647:glibc.malloc.top_pad=67108864"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["gpt2", "gpt", "bert"], default="gpt2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--peak-gflops", type=float, default=140.0, help="fixed ceiling for the MFU column")
    p.add_argument("--ferry", default=os.path.join(ROOT, "target/release/ferry"))
    p.add_argument("--torch-bench", default=None,
                   help="the PyTorch script [default: the model's reference]")
    p.add_argument("--no-allocator-variants", action="store_true",
                   help="run only ferry and PyTorch as shipped")
    a = p.parse_args()
    if a.torch_bench is None:
        a.torch_bench = (os.path.join(ROOT, "../shared/bench/torch_gpt2_bench.py") if a.model == "gpt2"
                         else os.path.join(ROOT, "bench/torch_models_bench.py"))

    shape = ["--layers", a.layers, "--d-model", a.d_model, "--heads", a.heads, "--ctx", a.ctx,
             "--batch", a.batch, "--vocab", a.vocab, "--steps", a.steps, "--warmup-steps", a.warmup_steps,
             "--threads", a.threads]
    shape = [str(x) for x in shape]
    ferry = [a.ferry, "bench", "train", "--model", a.model, "--device", "cpu"] + shape
    torch = [sys.executable, a.torch_bench] + shape + ([] if a.model == "gpt2" else ["--model", a.model])
    variants = [
        ("ferry", ferry, {}),
        ("pytorch", torch, {}),
        ("ferry (default malloc)", ferry + ["--default-allocator"], {}),
        ("pytorch (ferry's malloc)", torch, {"GLIBC_TUNABLES": KEEP_MEMORY}),
    ]
    if a.no_allocator_variants:
        variants = variants[:2]
    results = {name: [] for name, _, _ in variants}
    for r in range(a.rounds):
        for name, cmd, env in variants:
            out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(f"{name} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec.update(variant=name, round=r)
            results[name].append(rec)
            print(json.dumps(rec), flush=True)

    def med(name, key):
        return statistics.median(x[key] for x in results[name])

    flops = results["ferry"][0]["model_flops_per_token"]
    print(f"\n{a.model} L{a.layers} d{a.d_model} h{a.heads} ctx{a.ctx} batch{a.batch} vocab{a.vocab} fp32, "
          f"{a.threads} threads, {a.rounds} rounds x {a.steps} steps (medians)")
    print(f"{'variant':<26}{'tokens/s':>10}{'range':>17}{'step ms':>10}{'MFU@' + str(int(a.peak_gflops)):>9}{'vs pytorch':>12}")
    base = med("pytorch", "tokens_per_s")
    for name, _, _ in variants:
        tps = [x["tokens_per_s"] for x in results[name]]
        m = statistics.median(tps)
        mfu = flops * m / 1e9 / a.peak_gflops
        print(f"{name:<26}{m:>10.0f}{f'{min(tps):.0f}-{max(tps):.0f}':>17}{med(name, 'step_ms_median'):>10.1f}"
              f"{mfu:>9.3f}{m / base:>12.3f}")
    shipped = med("ferry", "tokens_per_s") / base
    if a.no_allocator_variants:
        print(f"ratio ferry/pytorch: {shipped:.3f}")
        return
    same = med("ferry", "tokens_per_s") / med("pytorch (ferry's malloc)", "tokens_per_s")
    dflt = med("ferry (default malloc)", "tokens_per_s") / base
    print(f"ratio ferry/pytorch: as shipped {shipped:.3f}; "
          f"both keeping freed memory {same:.3f}; both glibc default {dflt:.3f}")


if __name__ == "__main__":
    main()
