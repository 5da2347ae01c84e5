"""Is fine-tuned model A better than model B on the same held-out tweets? Exact McNemar.

Both models are scored on the very same held-out records, so the fair comparison is paired: of the
tweets exactly one of the two gets right, how many does each get? Under "no difference" those
split 50/50, and the two-sided binomial tail gives the p-value. Per fine-tuning seed, and pooled
over seeds (indicative only: the seeds share the tweets, so they are not independent).

The test (or `--part dev`) records are those of a ferry `split.json`, written out as a CSV
that `ferry predict` classifies; the accuracy computed here must equal the `report.json` one, which is checked.
Standard library only. From the repository root:

    python3 bench/paired_test.py --csv ../shared/data/airline/Tweets.csv \\
        --split runs/gpt2-mini/finetune-airline/split.json \\
        --a runs/g-ulm-concat-s --b runs/g-scr-concat-s --seeds 0,1,2

`--a PREFIX` names fine-tuning outputs PREFIX0, PREFIX1, ... (one per seed). One JSON line per
seed and one pooled, then a short table.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile


def exact_mcnemar(only_a, only_b):
    """Two-sided exact p-value of `only_a` against `only_b` discordant pairs at p = 0.5."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def write_part_csv(csv_path, split_path, part, label_column, out):
    with open(split_path, encoding="utf-8") as f:
        split = json.load(f)
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) != split["num_records"]:
        sys.exit(f"{split_path}: made for {split['num_records']} records, {csv_path} has {len(rows)}")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", label_column])
        for i in split[part]:
            w.writerow([rows[i]["text"], rows[i][label_column].strip()])
    return [rows[i][label_column].strip() for i in split[part]]


def predictions(ferry, model, test_csv, out):
    subprocess.run(
        [ferry, "predict", "--model", model, "--input", test_csv, "--output", out, "--overwrite"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with open(out, newline="", encoding="utf-8") as f:
        return [r["predicted"] for r in csv.DictReader(f)]


def reported_accuracy(model, part):
    with open(os.path.join(model, "report.json"), encoding="utf-8") as f:
        return json.load(f)[part]["accuracy"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--csv", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--label-column", default="airline_sentiment")
    p.add_argument("--a", required=True, help="fine-tuning output prefix of model A")
    p.add_argument("--b", required=True, help="fine-tuning output prefix of model B")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--part", default="test", choices=["test", "dev"],
                   help="dev is fair only when it did not pick the checkpoint (best step = last)")
    p.add_argument("--ferry", default="target/release/ferry")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        test_csv = os.path.join(tmp, "test.csv")
        gold = write_part_csv(args.csv, args.split, args.part, args.label_column, test_csv)
        results = []
        for seed in args.seeds.split(","):
            a_dir, b_dir = args.a + seed, args.b + seed
            a = predictions(args.ferry, a_dir, test_csv, os.path.join(tmp, "a.csv"))
            b = predictions(args.ferry, b_dir, test_csv, os.path.join(tmp, "b.csv"))
            acc_a = sum(x == g for x, g in zip(a, gold)) / len(gold)
            acc_b = sum(y == g for y, g in zip(b, gold)) / len(gold)
            for name, acc, d in (("a", acc_a, a_dir), ("b", acc_b, b_dir)):
                if abs(acc - reported_accuracy(d, args.part)) > 1e-9:
                    sys.exit(f"{d}: predict gives {args.part} accuracy {acc}, report.json another")
            only_a = sum(x == g != y for x, y, g in zip(a, b, gold))
            only_b = sum(y == g != x for x, y, g in zip(a, b, gold))
            r = {"seed": seed, "part": args.part, "a": a_dir, "b": b_dir, "accuracy_a": acc_a,
                 "accuracy_b": acc_b, "only_a_right": only_a, "only_b_right": only_b,
                 "p_value": exact_mcnemar(only_a, only_b)}
            print(json.dumps(r), flush=True)
            results.append(r)
        only_a = sum(r["only_a_right"] for r in results)
        only_b = sum(r["only_b_right"] for r in results)
        pooled = {"seed": "pooled", "only_a_right": only_a, "only_b_right": only_b,
                  "p_value": exact_mcnemar(only_a, only_b)}
        print(json.dumps(pooled))
        print(f"\n| seed | {args.part} acc A | {args.part} acc B | only A right | only B right | exact McNemar p |")
        print("|---|---|---|---|---|---|")
        for r in results:
            print(f"| {r['seed']} | {r['accuracy_a']:.4f} | {r['accuracy_b']:.4f} | "
                  f"{r['only_a_right']} | {r['only_b_right']} | {r['p_value']:.3f} |")
        print(f"| pooled | | | {only_a} | {only_b} | {pooled['p_value']:.3f} |")


if __name__ == "__main__":
    main()
