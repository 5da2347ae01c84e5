#!/usr/bin/env python3
"""Writes the small valid inputs in fuzz/seeds/<target>/ that scripts/fuzz.sh starts each
target from (besides fuzz/regressions/<target>/). Run from the repository root; the output
is committed, so this only needs running again when an input format changes."""

import hashlib
import json
import pathlib
import shutil
import struct

ROOT = pathlib.Path(__file__).resolve().parent / "seeds"
SEP = b"\n%%%%\n"  # ferry_fuzz::PART_SEPARATOR


def write(target, name, data):
    d = ROOT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def job_spec():
    for toml in sorted((ROOT.parent.parent / "jobs").glob("*.toml")):
        write("job_spec", toml.name, toml.read_bytes())
    write("job_spec", "minimal.toml", b"""[job]
name = "x"
steps = 1
run_dir = "runs/x"

[model]
family = "bert"
size = "tiny"
overrides = { hidden_dropout_prob = 0.0, n_layer = 2 }

[data]
shards = "d"
seq_len = 5

[batch]
global = 4
micro = 2

[cluster]
max_workers = 2
gradient_dtype = "bf16"
""")


def textcls_csv():
    # One options byte (encoding + 3 * label mode: 0 labels found, 1 none, 2 known), the file.
    head = lambda enc, labels=0: bytes([enc + 3 * labels])
    utf8 = (b"id,text,label\n1,hello world,positive\n2,\"quoted, with comma\",negative\n"
            b"3,\"multi\nline \"\"quote\"\"\",neutral\n4,fish &amp; chips &#128512;,positive\n")
    write("textcls_csv", "utf8.csv", head(0) + utf8)
    write("textcls_csv", "utf8-no-labels.csv", head(0, 1) + utf8)
    write("textcls_csv", "utf8-known-labels.csv", head(0, 2) + utf8)
    write("textcls_csv", "bom-crlf.csv", head(0) +
          b"\xef\xbb\xbftext,label\r\ncaf\xc3\xa9,a\r\n\r\nsecond,b\r\n")
    write("textcls_csv", "cp1252.csv", head(2) +
          b"label,text\nx,\x93quoted\x94 \x80 caf\xe9\ny,plain\n")
    write("textcls_csv", "latin1.csv", head(1) + b"text,label\nni\xf1o,1\nse\xf1or,2\n")


def shard_manifest():
    def shard(tokens):
        return b"".join(struct.pack("<H", t) for t in tokens)

    def index(docs, sents):
        b = b"FERRYIDX" + struct.pack("<IIQQ", 1, 0, len(docs) - 1, len(sents) - 1)
        return b + b"".join(struct.pack("<Q", o) for o in docs + sents)

    train0, train1 = shard([5, 6, 7, 0, 8, 9]), shard([10, 11, 12, 0])
    train_idx = index([0, 4, 10], [0, 2, 4, 7, 10])
    val0 = shard([13, 14, 15, 16, 0])
    val_idx = index([0, 5], [0, 5])
    sha = lambda b: hashlib.sha256(b).hexdigest()
    manifest = {
        "format": "ferry-shards", "version": 1, "tokenizer_file": "tokenizer.json",
        "tokenizer_sha256": "0" * 64, "tokenizer_kind": "bpe", "vocab_size": 100,
        "token_bytes": 2, "eos_token_id": 0,
        "splits": {
            "train": {"tokens": 10, "documents": 2, "sentences": 4,
                      "shards": [
                          {"file": "train-00000.bin", "tokens": 6, "bytes": 12, "sha256": sha(train0)},
                          {"file": "train-00001.bin", "tokens": 4, "bytes": 8, "sha256": sha(train1)}],
                      "index_file": "train.idx", "index_sha256": sha(train_idx)},
            "val": {"tokens": 5, "documents": 1, "sentences": 1,
                    "shards": [{"file": "val-00000.bin", "tokens": 5, "bytes": 10, "sha256": sha(val0)}],
                    "index_file": "val.idx", "index_sha256": sha(val_idx)},
        },
        "sources": [{"path": "a.txt", "documents": 3, "bytes": 40}],
    }
    files = [json.dumps(manifest, indent=1).encode(), train_idx, train0, train1, val_idx, val0]
    write("shard_manifest", "two-splits", SEP.join(files))
    # A vocabulary over 65536 ids: 4-byte tokens.
    manifest["vocab_size"] = 70000
    manifest["token_bytes"] = 4
    wide = lambda b: b"".join(struct.pack("<I", t) for (t,) in struct.iter_unpack("<H", b))
    for split, files_ in [("train", [train0, train1]), ("val", [val0])]:
        for s, data in zip(manifest["splits"][split]["shards"], files_):
            s["bytes"] *= 2
            s["sha256"] = sha(wide(data))
    files = [json.dumps(manifest).encode(), train_idx, wide(train0), wide(train1), val_idx, wide(val0)]
    write("shard_manifest", "wide-tokens", SEP.join(files))


def safetensors(tensors):
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, (dtype, shape, values) in tensors.items():
        fmt = {"F32": "<f", "I64": "<q", "F64": "<d"}[dtype]
        raw = b"".join(struct.pack(fmt, v) for v in values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def checkpoint_load():
    shapes = {"transformer.wte.weight": [4, 3], "transformer.h.0.attn.c_attn.weight": [3, 2],
              "transformer.ln_f.bias": [3]}
    n = lambda s: s[0] * (s[1] if len(s) > 1 else 1)
    model = safetensors({k: ("F32", s, [0.5 * i for i in range(n(s))]) for k, s in shapes.items()})
    # transformers' base-model names: without the "transformer." prefix.
    bare = safetensors({k.split(".", 1)[1]: ("F32", s, [1.0] * n(s)) for k, s in shapes.items()})
    opt = safetensors({f"{m}.{k}": ("F32", s, [0.25] * n(s))
                       for k, s in shapes.items() for m in ("exp_avg", "exp_avg_sq")})
    state = json.dumps({"step": 3, "samples_seen": 48, "tokens_seen": 6144, "seed": 1234,
                        "rng_derivation": "splitmix64", "optimizer_steps": 3,
                        "last_loss": 2.5}).encode()
    for name, m in [("prefixed", model), ("bare-names", bare)]:
        sums = json.dumps({"trainer_state.json": hashlib.sha256(state).hexdigest(),
                           "model.safetensors": hashlib.sha256(m).hexdigest(),
                           "optimizer.safetensors": hashlib.sha256(opt).hexdigest()}).encode()
        # The mode byte: 3 * the step the checkpoint must be of (3) + how checksums.json comes.
        write("checkpoint_load", f"{name}-given-checksums", b"\x09" + SEP.join([state, m, opt, sums]))
        write("checkpoint_load", f"{name}-no-checksums", b"\x0a" + SEP.join([state, m, opt]))
        write("checkpoint_load", f"{name}-computed-checksums", b"\x0b" + SEP.join([state, m, opt]))


# coordinator_requests takes `arbitrary`'s encoding (arbitrary 1.5): integers little-endian,
# a bool is a byte's low bit, an Option a bool then the value, an enum variant a u32 scaled to
# the variant count, and the op list each element after a "keep going" bool.
OPS = ["Join", "JoinRaw", "Heartbeat", "Leave", "Tick", "Rendezvous", "RendezvousOffer", "Commit",
       "Checkpoint", "Failure", "Scale", "Stop", "Resume", "Ledger", "Restart", "RendezvousAll",
       "StepAll", "Proto", "Fallback"]  # the order of `enum Op` in fuzz_targets/coordinator_requests.rs


def variant(k, n):
    return struct.pack("<I", -(-(k << 32) // n))


def op(name, *fields):
    return b"\x01" + variant(OPS.index(name), len(OPS)) + b"".join(fields)


u8 = lambda v: struct.pack("<B", v)
u16 = lambda v: struct.pack("<H", v)
f64 = lambda v: struct.pack("<d", v)
NONE = b"\x00"
some = lambda v: b"\x01" + v
joined = lambda i: variant(0, 2) + u8(i)  # Who::Joined
assigned = variant(1, 3)  # Gen::Assigned
near = lambda d: variant(0, 2) + struct.pack("<b", d)  # StepSel::Near
RIGHT = variant(0, 4)  # DigestSel::Right
corrupt = lambda at, flip: variant(1, 4) + u8(at) + struct.pack("<Q", flip)  # DigestSel::Corrupt
steps = lambda d, count, digest=RIGHT: near(d) + u8(count) + digest  # struct Steps

join = lambda host: op("Join", u8(host), u16(29500 + host), u8(1))
rendezvous_all = lambda holds=NONE: op("RendezvousAll", holds)
step_all = lambda: op("StepAll", f64(2.5))
tick = lambda ms: op("Tick", u16(ms))
checkpoint = lambda who: op("Checkpoint", joined(who), assigned, near(0), NONE)
commit = lambda who, s: op("Commit", joined(who), assigned, s, f64(2.5), f64(0.5))
offer = lambda who, s, holds=NONE: op("RendezvousOffer", joined(who), assigned, holds, s)
heartbeat = lambda who: op("Heartbeat", joined(who), assigned, struct.pack("<Q", 0), f64(2.5))


def coordinator_requests():
    scenarios = {
        # One worker trains, checkpoints, the coordinator restarts, the worker times out and a
        # new one rolls back to the checkpoint.
        "train-restart-timeout": (0, [
            join(0), join(1), rendezvous_all(), step_all(), step_all(), checkpoint(0),
            step_all(), op("Restart"), rendezvous_all(some(near(0))), step_all(),
            tick(30000), join(2), rendezvous_all(), step_all()]),
        # A quorum of two with a settle time; a graceful leave, a reported failure, scale and
        # stop orders.
        "leave-failure-scale-stop": (1, [
            join(0), join(1), join(2), tick(1500), rendezvous_all(), step_all(), step_all(),
            op("Leave", joined(0)), step_all(), rendezvous_all(some(near(0))), step_all(),
            op("Failure", joined(1), assigned, some(u8(0))), rendezvous_all(some(near(0))),
            step_all(), op("Scale", u8(2)), step_all(), rendezvous_all(), op("Stop"),
            op("Resume"), op("Restart"), rendezvous_all(), step_all()]),
        # A checkpoint, a coordinator restart, a restore whose checkpoint does not verify on
        # rank 0: the job falls back to the start.
        "fallback-to-start": (0, [
            join(0), join(1), rendezvous_all(), step_all(), step_all(), checkpoint(0),
            step_all(), op("Restart"), join(0), join(1), rendezvous_all(),
            op("Fallback", joined(0), assigned, NONE, variant(1, 2) + struct.pack("<Q", 0), NONE),
            rendezvous_all(), step_all()]),
        # A one-worker job to the end.
        "to-the-end": (2, [join(0), rendezvous_all(), step_all(), step_all(), step_all(),
                           step_all(), rendezvous_all()]),
        # A group of four; after a coordinator restart its rank 0 is lost with a step
        # trained but not committed, which the survivors offer (holding its state) at
        # rendezvous: committed late, and the group of three goes on from there.
        "late-commit": (3, [
            join(0), join(1), join(2), join(3), tick(600), rendezvous_all(), step_all(),
            op("Restart"), step_all(), tick(6000), heartbeat(1), heartbeat(2), heartbeat(3),
            tick(6000), offer(1, steps(0, 1), some(near(1))), offer(2, steps(-1, 1), some(near(0))),
            offer(3, steps(-1, 1), some(near(0))), step_all(), op("Ledger", u8(0), u8(0))]),
        # A graceful leave of the only holder with the job at max_workers: it is kept one more
        # generation to hand the state over, and the group does not grow for it.
        "handover-at-max-workers": (2, [
            join(0), join(1), join(2), rendezvous_all(), step_all(), op("Leave", joined(0)),
            step_all(), rendezvous_all(some(near(0))), step_all(), rendezvous_all()]),
        # Commits of several steps by any member, a retried one, one with a wrong digest; the
        # group breaks and its members offer the steps they applied at rendezvous, holding
        # their state; a commit after a stop order.
        "commits-and-offers": (0, [
            join(0), join(1), rendezvous_all(), step_all(), commit(1, steps(0, 2)),
            commit(0, steps(-1, 2)), commit(0, steps(0, 2, corrupt(1, 8))),
            op("Failure", joined(0), assigned, some(u8(1))),
            offer(1, steps(0, 1), some(near(1))), offer(0, steps(-1, 2), some(near(1))),
            step_all(), op("Stop"), commit(0, steps(0, 1)), rendezvous_all(some(near(0))),
            op("Resume"), rendezvous_all(some(near(0))), step_all()]),
    }
    for name, (job, ops) in scenarios.items():
        write("coordinator_requests", name, u8(job) + b"".join(ops))


if __name__ == "__main__":
    for target in ["job_spec", "textcls_csv", "shard_manifest", "checkpoint_load",
                   "coordinator_requests"]:
        shutil.rmtree(ROOT / target, ignore_errors=True)
    job_spec()
    textcls_csv()
    shard_manifest()
    checkpoint_load()
    coordinator_requests()
