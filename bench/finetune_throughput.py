#!/usr/bin/env python3
"""`ferry finetune` against transformers + torch: one epoch on the airline split, same recipe.

Both fine-tune the same model directory on the same train/dev/test split (ferry's
split.json, stratified 80/10/10, seed 0) with the same recipe: AdamW (lr 1e-4, betas
0.9/0.999, eps 1e-8, weight decay 0.01 on matrices and embeddings only), warm-up over 10% of
the steps then linear decay, gradient-norm clip 1.0, batches of 32 padded to their longest
row, texts cut at 96 tokens, dropout as the model's config.json says (transformers reads it
there; ferry's body does too, and its head gets the value transformers' head uses: BERT's
classifier_dropout, else hidden_dropout_prob; none for GPT-2's score), dev
evaluated at the end of each epoch with the best dev weights kept, test evaluated once.
The transformers side is the loop a user writes: AutoModelForSequenceClassification,
torch.optim.AdamW with its defaults, get_linear_schedule_with_warmup, clip_grad_norm_.
Texts are encoded as ferry encodes them ([CLS] text [SEP] for BERT, the bare text for GPT-2,
from the model's tokenizer.json), with HTML entities decoded as ferry's CSV reader does.

Models (made once in --work):
  bert  6 layers, 384 wide, 12 heads, intermediate 1536, vocabulary 30,522: a BertModel made
        by transformers from a config (random weights), with a WordPiece tokenizer trained on
        the WikiText files.
  gpt2  ferry's GPT-2 mini (4 layers, 256 wide, 4 heads, vocabulary 8192) made by
        transformers from a config (random weights), with the byte-level BPE tokenizer that
        `ferry prepare` trains on WikiText + books.
  --from DIR  any model directory instead (e.g. ferry's own pretrained BERT mini), for the
        accuracy comparison over --seeds.

Each run is a separate process, timed from outside: what a user waits for, model loading,
encoding, evaluation and saving included. Rounds alternate which side goes first. Both use
--threads intra-op threads. Prints one JSON line per run, then medians and ratios.

    .venv/bin/python bench/finetune_throughput.py --models bert,gpt2 --rounds 2
    .venv/bin/python bench/finetune_throughput.py --from runs/bert-mini --seeds 0,1,2
"""
import argparse
import csv
import html
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LEN = 96
BATCH = 32


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(os.environ.get("FERRY_DATA_DIR", os.path.join(ROOT, "../shared/data")), "airline/Tweets.csv"))
    p.add_argument("--models", default="bert,gpt2", help="comma-separated: bert, gpt2")
    p.add_argument("--from", dest="from_dir", help="fine-tune this model directory instead of --models")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seeds", default="0", help="comma-separated fine-tuning seeds (each round runs every seed)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: whole epochs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=os.path.join(ROOT, "runs/bench-finetune"))
    p.add_argument("--ferry", default=os.path.join(ROOT, "target/release/ferry"))
    p.add_argument("--only", choices=["ferry", "transformers"], help="run one side only")
    # Internal: the transformers side, run as its own process.
    p.add_argument("--transformers-run", help=argparse.SUPPRESS)
    return p.parse_args()


# ---- the transformers + torch side ---------------------------------------------------------

def transformers_run(spec):
    """Fine-tunes as spec says; returns the result. Runs in its own process."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoConfig, AutoModelForSequenceClassification, get_linear_schedule_with_warmup

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    split = json.load(open(spec["split"]))
    labels = split["labels"]
    with open(spec["data"], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    model_dir = spec["model_dir"]
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    config = AutoConfig.from_pretrained(model_dir, num_labels=len(labels))
    bert = config.model_type == "bert"
    if bert:
        cls, sep, pad = (tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]"))
    else:
        pad = config.eos_token_id
        config.pad_token_id = pad

    def encode(part):
        texts = [html.unescape(rows[i]["text"]) for i in split[part]]
        out = []
        for e in tok.encode_batch(texts, add_special_tokens=False):
            ids = e.ids
            if bert:
                ids = [cls] + ids[: MAX_LEN - 2] + [sep]
            else:
                ids = ids[:MAX_LEN] or [pad]
            out.append(ids)
        gold = [labels.index(rows[i]["airline_sentiment"]) for i in split[part]]
        return out, gold

    train, dev, test = encode("train"), encode("dev"), encode("test")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)

    def batch(ids):
        width = max(len(r) for r in ids)
        x = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, r in enumerate(ids):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return x, mask

    def accuracy(part):
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(part[0]), BATCH):
                x, mask = batch(part[0][i : i + BATCH])
                pred = model(input_ids=x, attention_mask=mask).logits.argmax(-1)
                correct += (pred == torch.tensor(part[1][i : i + BATCH])).sum().item()
        model.train()
        return correct / len(part[0])

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
    )
    per_epoch = (len(train[0]) + BATCH - 1) // BATCH
    total = per_epoch * spec["epochs"]
    if spec["max_steps"]:
        total = min(total, spec["max_steps"])
    sched = get_linear_schedule_with_warmup(opt, round(0.1 * total), total)
    gen = torch.Generator().manual_seed(spec["seed"])
    model.train()
    step, best, best_state = 0, -1.0, None
    while step < total:
        order = torch.randperm(len(train[0]), generator=gen).tolist()
        for start in range(0, len(order), BATCH):
            if step >= total:
                break
            idx = order[start : start + BATCH]
            x, mask = batch([train[0][i] for i in idx])
            y = torch.tensor([train[1][i] for i in idx])
            model(input_ids=x, attention_mask=mask, labels=y).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % per_epoch == 0 or step == total:
                acc = accuracy(dev)
                if acc > best:
                    best = acc
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {"steps": step, "dev_accuracy": best, "test_accuracy": accuracy(test)}


# ---- running both sides ------------------------------------------------------------------

def head_dropout(model_dir):
    """The dropout transformers puts before the classification head for this model."""
    config = json.load(open(os.path.join(model_dir, "config.json")))
    if config.get("model_type") != "bert":
        return 0.0  # GPT2ForSequenceClassification's score reads the hidden state as it is
    p = config.get("classifier_dropout")
    return float(p if p is not None else config.get("hidden_dropout_prob", 0.1))


def run(cmd, **kw):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def make_bert(path, data_dir):
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(path, safe_serialization=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    wiki = os.path.join(data_dir, "wikitext")
    tok.train([os.path.join(wiki, f) for f in sorted(os.listdir(wiki)) if f.endswith(".tokens")], vocab_size=30522)
    tok.save(os.path.join(path, "tokenizer.json"))


def make_gpt2(path, data_dir, ferry, work):
    import torch
    from tokenizers import Tokenizer
    from transformers import GPT2Config, GPT2Model

    prepared = os.path.join(work, "prepared-gpt2")
    if not os.path.exists(os.path.join(prepared, "tokenizer.json")):
        run([ferry, "prepare", "--no-progress", "--input", os.path.join(data_dir, "wikitext"),
             os.path.join(data_dir, "books"), "--output", prepared])
    tok = Tokenizer.from_file(os.path.join(prepared, "tokenizer.json"))
    eos = 0  # ferry's byte-level tokenizer: end-of-text is id 0
    assert tok.id_to_token(eos) is not None
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=256, n_embd=256, n_layer=4, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos)
    GPT2Model(config).save_pretrained(path, safe_serialization=True)
    shutil.copy(os.path.join(prepared, "tokenizer.json"), os.path.join(path, "tokenizer.json"))


def main():
    args = parse_args()
    if args.transformers_run:
        print(json.dumps(transformers_run(json.loads(args.transformers_run))))
        return
    os.makedirs(args.work, exist_ok=True)
    data_dir = os.path.dirname(os.path.dirname(os.path.abspath(args.data)))
    if args.from_dir:
        models = {os.path.basename(os.path.normpath(args.from_dir)): args.from_dir}
    else:
        models = {}
        for name in args.models.split(","):
            path = os.path.join(args.work, f"model-{name}")
            if not os.path.exists(os.path.join(path, "tokenizer.json")):
                {"bert": lambda: make_bert(path, data_dir),
                 "gpt2": lambda: make_gpt2(path, data_dir, args.ferry, args.work)}[name]()
            models[name] = path
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for name, model_dir in models.items():
        # The split every run uses: ferry writes it (stratified, seed 0) in a one-step run.
        split = os.path.join(args.work, f"split-{name}.json")
        if not os.path.exists(split):
            probe = os.path.join(args.work, f"probe-{name}")
            run([args.ferry, "finetune", "--from", model_dir, "--data", args.data, "--output", probe,
                 "--max-steps", "1", "--overwrite"], env=env)
            shutil.copy(os.path.join(probe, "split.json"), split)
        for r in range(args.rounds):
            for seed in seeds:
                sides = ["ferry", "transformers"] if r % 2 == 0 else ["transformers", "ferry"]
                for side in sides:
                    if args.only and side != args.only:
                        continue
                    started = time.perf_counter()
                    if side == "ferry":
                        out = os.path.join(args.work, f"ferry-{name}")
                        run([args.ferry, "finetune", "--from", model_dir, "--data", args.data,
                             "--split", split, "--output", out, "--overwrite", "--epochs", str(args.epochs),
                             "--max-steps", str(args.max_steps), "--threads", str(args.threads),
                             "--seed", str(seed), "--dropout", str(head_dropout(model_dir))], env=env)
                        report = json.load(open(os.path.join(out, "report.json")))
                        got = {"steps": report["steps"], "dev_accuracy": report["dev"]["accuracy"],
                               "test_accuracy": report["test"]["accuracy"]}
                    else:
                        spec = {"model_dir": model_dir, "split": split, "data": args.data, "seed": seed,
                                "epochs": args.epochs, "max_steps": args.max_steps, "threads": args.threads}
                        proc = run([sys.executable, os.path.abspath(__file__), "--transformers-run", json.dumps(spec)], env=env)
                        got = json.loads(proc.stdout.strip().splitlines()[-1])
                    seconds = time.perf_counter() - started
                    line = {"bench": "finetune", "impl": side, "model": name, "round": r, "seed": seed,
                            "threads": args.threads, "seconds": round(seconds, 2), "steps": got["steps"],
                            "seconds_per_step": round(seconds / got["steps"], 4),
                            "seconds_per_epoch": round(seconds / args.epochs, 2) if not args.max_steps else None,
                            "dev_accuracy": got["dev_accuracy"], "test_accuracy": got["test_accuracy"]}
                    print(json.dumps(line), flush=True)
                    results.append(line)
    summarize(results)


def summarize(results):
    print()
    print(f"{'model':<12} {'impl':<13} {'runs':>4} {'s/run':>8} {'s/step':>7} {'dev acc':>8} {'test acc':>8}")
    for name in dict.fromkeys(r["model"] for r in results):
        med = {}
        for side in ["ferry", "transformers"]:
            rs = [r for r in results if r["model"] == name and r["impl"] == side]
            if not rs:
                continue
            med[side] = statistics.median(r["seconds"] for r in rs)
            print(f"{name:<12} {side:<13} {len(rs):>4} {med[side]:>8.1f} "
                  f"{statistics.median(r['seconds_per_step'] for r in rs):>7.3f} "
                  f"{statistics.mean(r['dev_accuracy'] for r in rs):>8.4f} {statistics.mean(r['test_accuracy'] for r in rs):>8.4f}")
        if len(med) == 2:
            print(f"{name:<12} transformers ÷ ferry (median seconds): {med['transformers'] / med['ferry']:.2f}")


if __name__ == "__main__":
    main()
