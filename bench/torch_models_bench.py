#!/usr/bin/env python3
"""PyTorch reference: GPT and BERT pretraining throughput on random tokens (the peer baseline).

The same approach as ../shared/bench/torch_gpt2_bench.py (uniform random tokens, AdamW lr 3e-4,
betas 0.9/0.95, weight decay 0.1 on >=2-D weights only, global grad-norm clip 1.0, warm-up steps,
then timed steps; one JSON line) for the two other families ferry pretrains, each the
architecture ferry builds:

  gpt   Radford et al. 2018: learned token + position embeddings, post-LayerNorm blocks
        (LN(x + attn(x)), LN(x + mlp(x))), no final LayerNorm, causal SDPA attention, 4x GELU
        (tanh) MLP, output projection tied to the token embedding; next-token loss.
  bert  Devlin et al. 2019: token + segment + position embeddings -> LayerNorm, post-LN
        encoder blocks with exact-erf GELU, SDPA attention with a padding mask; the masked-LM
        head (dense, GELU, LayerNorm, tied decoder + bias) runs on the masked positions only
        (15% of tokens, all [MASK] = id 4) and the NSP head on the tanh-pooled first token,
        with random labels; loss = mean MLM CE + mean NSP CE.

    python bench/torch_models_bench.py --model bert --threads 2

FLOPs per token: 6 * N_nonembedding + 12 * L * d * T (N without the token/position/segment
embeddings), the convention of ferry's `bench train` and of the GPT-2 reference.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["gpt", "bert"], required=True)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--ctx", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = default)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seed", type=int, default=1234)
    return p.parse_args()


class GptBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln_1 = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, 4 * d)
        self.mlp_out = nn.Linear(4 * d, d)
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        n = self.ln_1(x + self.attn_out(a))
        return self.ln_2(n + self.mlp_out(F.gelu(self.mlp_in(n), approximate="tanh")))


class Gpt(nn.Module):
    def __init__(self, vocab, ctx, d, layers, heads):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(GptBlock(d, heads) for _ in range(layers))
        self.register_buffer("positions", torch.arange(ctx), persistent=False)

    def embedding_params(self):
        return self.tok_emb.weight.numel() + self.pos_emb.weight.numel()

    def forward(self, tokens, targets):
        x = self.tok_emb(tokens) + self.pos_emb(self.positions[: tokens.shape[1]])
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(x, self.tok_emb.weight)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class BertLayer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_ln = nn.LayerNorm(d, eps=1e-12)
        self.inter = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)
        self.out_ln = nn.LayerNorm(d, eps=1e-12)

    def forward(self, x, keep):
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)),
                                           split(self.value(x)), attn_mask=keep)
        x1 = self.attn_ln(self.attn_out(a.transpose(1, 2).reshape(b, t, d)) + x)
        return self.out_ln(self.out(F.gelu(self.inter(x1))) + x1)


class Bert(nn.Module):
    def __init__(self, vocab, ctx, d, layers, heads):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(ctx, d)
        self.seg = nn.Embedding(2, d)
        self.emb_ln = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(BertLayer(d, heads) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_ln = nn.LayerNorm(d, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        self.nsp = nn.Linear(d, 2)
        self.register_buffer("positions", torch.arange(ctx), persistent=False)

    def embedding_params(self):
        return self.word.weight.numel() + self.pos.weight.numel() + self.seg.weight.numel()

    def forward(self, ids, types, mask, mlm_labels, nsp_labels):
        b, t = ids.shape
        x = self.emb_ln(self.word(ids) + self.seg(types) + self.pos(self.positions[:t]))
        keep = mask.ne(0).reshape(b, 1, 1, t)
        for layer in self.layers:
            x = layer(x, keep)
        labels = mlm_labels.reshape(-1)
        chosen = labels.ne(-100).nonzero().squeeze(1)
        h = x.reshape(-1, x.shape[-1]).index_select(0, chosen)
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        mlm = F.linear(h, self.word.weight) + self.mlm_bias
        nsp = self.nsp(torch.tanh(self.pooler(x[:, 0])))
        return F.cross_entropy(mlm, labels.index_select(0, chosen)) + F.cross_entropy(nsp, nsp_labels)


def matmul_gflops(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def main():
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cls = Gpt if args.model == "gpt" else Bert
    model = cls(args.vocab, args.ctx, args.d_model, args.layers, args.heads)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            nn.init.normal_(p, std=0.02)
    n_total = sum(p.numel() for p in model.parameters())
    n_nonemb = n_total - model.embedding_params()
    flops_tok = 6 * n_nonemb + 12 * args.layers * args.d_model * args.ctx
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed + 1)
    b, t = args.batch, args.ctx
    types = (torch.arange(t) >= t // 2).long().expand(b, t)
    mask = torch.ones(b, t, dtype=torch.long)

    def train_step():
        if args.model == "gpt":
            data = torch.randint(args.vocab, (b, t + 1), generator=gen)
            loss = model(data[:, :-1], data[:, 1:])
        else:
            ids = torch.randint(5, args.vocab, (b, t), generator=gen)
            chosen = torch.rand(b, t, generator=gen) < 0.15
            labels = ids.masked_fill(~chosen, -100)
            nsp = torch.randint(2, (b,), generator=gen)
            loss = model(ids.masked_fill(chosen, 4), types, mask, labels, nsp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    peak = matmul_gflops()
    losses = [train_step() for _ in range(args.warmup_steps)]
    step_times = []
    start = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step())
        step_times.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    tokens = b * t
    tps = tokens * args.steps / elapsed
    med = statistics.median(step_times)
    print(json.dumps({
        "impl": "pytorch", "model": args.model, "torch": torch.__version__, "world": 1,
        "threads_per_rank": torch.get_num_threads(), "layers": args.layers,
        "d_model": args.d_model, "heads": args.heads, "ctx": t, "batch_per_rank": b,
        "vocab": args.vocab, "dtype": "float32", "steps": args.steps,
        "tokens_per_s": round(tps, 2), "tokens_per_s_from_median": round(tokens / med, 2),
        "step_ms_median": round(1e3 * med, 2), "step_ms_min": round(1e3 * min(step_times), 2),
        "step_ms_max": round(1e3 * max(step_times), 2), "params": n_total,
        "params_nonembedding": n_nonemb, "model_flops_per_token": flops_tok,
        "peak_gflops": round(peak, 1), "mfu_vs_peak": round(flops_tok * tps / 1e9 / peak, 4),
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_finite": all(math.isfinite(x) for x in losses),
    }))


if __name__ == "__main__":
    sys.exit(main())
