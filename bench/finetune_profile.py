#!/usr/bin/env python3
"""Where a fine-tuning step's time goes, outside the model: padding and the AdamW update.

1. Padding: of the positions of one epoch's batches (32 training tweets in a shuffled order,
   each batch padded to its longest row, texts cut at 96 tokens), how many are real tokens.
2. AdamW: seconds per update of a model's parameters with torch.optim.AdamW single-tensor
   (PyTorch's default on CPU), foreach, and fused (the kernel ferry calls), plus
   clip_grad_norm_ and zeroing the gradients, on random gradients.

The model directory is one that bench/finetune_throughput.py makes (model-bert, model-gpt2)
or any transformers model directory with a tokenizer.json; the split is its split-*.json.

    .venv/bin/python bench/finetune_profile.py runs/bench-finetune/model-bert \\
        runs/bench-finetune/split-bert.json --threads 2
"""
import argparse
import csv
import html
import json
import random
import time

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForSequenceClassification


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir")
    p.add_argument("split")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    split = json.load(open(args.split))
    with open(split["source"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    tok = Tokenizer.from_file(f"{args.model_dir}/tokenizer.json")
    texts = [html.unescape(rows[i]["text"]) for i in split["train"]]
    lengths = [min(len(e.ids), 96) for e in tok.encode_batch(texts)]
    random.seed(0)
    random.shuffle(lengths)
    padded = sum(max(lengths[i : i + 32]) * len(lengths[i : i + 32]) for i in range(0, len(lengths), 32))
    real = sum(lengths)
    print(json.dumps({"what": "padding", "real_tokens": real, "padded_positions": padded,
                      "real_fraction": round(real / padded, 4)}))

    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=3)
    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q)

    def timed(f):
        for _ in range(3):
            f()
        start = time.perf_counter()
        for _ in range(args.repeats):
            f()
        return (time.perf_counter() - start) / args.repeats

    n = sum(q.numel() for q in params)
    for name, kw in [("single-tensor", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})]:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)
        print(json.dumps({"what": f"adamw {name}", "parameters": n, "seconds": round(timed(opt.step), 4)}))
    print(json.dumps({"what": "clip_grad_norm_", "seconds": round(timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)), 4)}))
    print(json.dumps({"what": "zero grads", "seconds": round(timed(lambda: [q.grad.zero_() for q in params]), 4)}))


if __name__ == "__main__":
    main()
