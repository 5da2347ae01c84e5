#!/usr/bin/env python3
"""PyTorch GPT-2 training throughput on one GPU, bf16 autocast: the peer of `ferry bench train
--device cuda` and `ferry train --device cuda` (scripts/gpu-check.sh runs them side by side).

The model is shared/bench/torch_gpt2_bench.py's, copied so that this file stands alone (the
shared folder does not travel with the checkout): learned token + position embeddings,
pre-LayerNorm blocks, causal self-attention through F.scaled_dot_product_attention, 4x GELU
(tanh) MLP, final LayerNorm, output projection tied to the token embedding, GPT-2's
initialisation. Data: uniform random tokens (no dataset). Optimiser: AdamW (lr 3e-4, betas
0.9/0.95, eps 1e-8, weight decay 0.1 on >=2-D weights only), global grad-norm clip 1.0.

Precision: `--precision bf16` runs forward and loss under
torch.autocast(device_type="cuda", dtype=torch.bfloat16), with float32 master weights,
gradients and optimizer state (what ferry's runtime::Precision::Bf16Autocast does);
`--precision float32` runs without autocast (TF32 left at PyTorch's default, off for
matmuls), the like-for-like peer of a float32 run. `auto` is bf16 on CUDA, float32 on the CPU.

    python bench/torch_gpt2_gpu.py                                   # GPT-2 small, cuda, bf16
    python bench/torch_gpt2_gpu.py --precision float32               # the same in float32
    python bench/torch_gpt2_gpu.py --device cpu --tiny               # smoke test without a GPU

Timing: every step ends with torch.cuda.synchronize() (the loss's .item() syncs too), after
--warmup-steps untimed steps (cuBLAS/cuDNN heuristics, allocator growth).

stdout: exactly one JSON line. FLOP accounting is the reference's (per token,
forward + backward, "model FLOPs"):
    flops_per_token              = 6*N_nonemb + 12*L*d*ctx    (Kaplan et al. 2020: N_nonemb
        leaves out the token and position embeddings, hence the tied d x V output matmul)
    flops_per_token_incl_lmhead  = 6*(N_nonemb + V*d) + 12*L*d*ctx   (PaLM / nanoGPT)
mfu = flops_per_token * tokens_per_s / (peak_tflops * 1e12); the peak is given, not measured
(default 989: H100 SXM dense bf16, which the H200 shares).
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

H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--ctx", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warm-up)")
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "float32"],
                   help="bf16 = torch.autocast bf16 (CUDA only); auto = bf16 on CUDA, else float32")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test shape: 2 layers, d_model 64, 2 heads, ctx 32, vocab 256, "
                        "batch 2, 2 timed steps after 1 warm-up (overrides the shape flags)")
    p.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                   help="peak for MFU in TFLOP/s [default: 989, H100 SXM dense bf16]")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0 = torch default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--verbose", action="store_true", help="per-step progress on stderr")
    a = p.parse_args(argv)
    if a.tiny:
        a.layers, a.d_model, a.heads, a.ctx, a.vocab, a.batch = 2, 64, 2, 32, 256, 2
        a.steps, a.warmup_steps = 2, 1
    return a


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        assert d % heads == 0
        self.heads = heads
        self.ln_attn = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.attn_out = nn.Linear(d, d)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp_in = nn.Linear(d, 4 * d)
        self.mlp_out = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln_attn(x)).chunk(3, dim=-1)
        # (b, t, d) -> (b, heads, t, hd)
        q = q.reshape(b, t, self.heads, hd).transpose(1, 2)
        k = k.reshape(b, t, self.heads, hd).transpose(1, 2)
        v = v.reshape(b, t, self.heads, hd).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        a = a.transpose(1, 2).reshape(b, t, d)
        x = x + self.attn_out(a)
        h = F.gelu(self.mlp_in(self.ln_mlp(x)), approximate="tanh")
        return x + self.mlp_out(h)


class GPT2(nn.Module):
    def __init__(self, vocab, ctx, d, layers, heads):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.pos_emb = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_final = nn.LayerNorm(d)
        self.register_buffer("positions", torch.arange(ctx), persistent=False)
        # GPT-2 initialisation: N(0, 0.02); residual-branch output projections
        # scaled by 1/sqrt(2*layers); biases zero; LayerNorm gain 1 / bias 0.
        for name, prm in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(prm)
            elif "ln_" in name:
                nn.init.ones_(prm)
            else:
                std = 0.02
                if name.endswith("attn_out.weight") or name.endswith("mlp_out.weight"):
                    std = 0.02 / math.sqrt(2 * layers)
                nn.init.normal_(prm, mean=0.0, std=std)

    def forward(self, tokens, targets):
        t = tokens.shape[1]
        x = self.tok_emb(tokens) + self.pos_emb(self.positions[:t])
        for blk in self.blocks:
            x = blk(x)
        x = self.ln_final(x)
        logits = F.linear(x, self.tok_emb.weight)  # tied output projection
        # Under autocast cross_entropy runs in float32 (its autocast policy), as ferry's does.
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            sys.exit(f"error: --device {args.device}: torch sees no CUDA GPU")
        if (device.index or 0) >= torch.cuda.device_count():
            sys.exit(f"error: --device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
        # An explicit index: torch.cuda.set_device refuses a bare "cuda".
        device = torch.device("cuda", device.index or 0)
    precision = args.precision
    if precision == "auto":
        precision = "bf16" if cuda else "float32"
    if precision == "bf16" and not cuda:
        sys.exit("error: --precision bf16 is CUDA autocast; use --precision float32 on the CPU")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.cuda.set_device(device)

    def log(msg):
        if args.verbose:
            print(msg, file=sys.stderr, flush=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    torch.manual_seed(args.seed)
    model = GPT2(args.vocab, args.ctx, args.d_model, args.layers, args.heads).to(device)

    n_total = sum(p.numel() for p in model.parameters())  # tied weight counted once
    n_emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    n_nonemb = n_total - n_emb
    attn_flops = 12 * args.layers * args.d_model * args.ctx
    flops_tok = 6 * n_nonemb + attn_flops
    flops_tok_lm = 6 * (n_nonemb + args.vocab * args.d_model) + attn_flops

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    gen = torch.Generator(device=device).manual_seed(args.seed * 1000 + 1)
    b, t = args.batch, args.ctx

    def train_step():
        data = torch.randint(args.vocab, (b, t + 1), generator=gen, device=device)
        inputs, targets = data[:, :-1].contiguous(), data[:, 1:].contiguous()
        if precision == "bf16":
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                loss = model(inputs, targets)
        else:
            loss = model(inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # outside autocast, as PyTorch's AMP recipe has it
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return loss.item()

    losses = []
    for i in range(args.warmup_steps):
        t0 = time.perf_counter()
        losses.append(train_step())
        sync()
        log(f"warmup {i}: loss {losses[-1]:.4f} {1e3 * (time.perf_counter() - t0):.1f} ms")

    sync()
    step_times = []
    start = time.perf_counter()
    for i in range(args.steps):
        t0 = time.perf_counter()
        losses.append(train_step())
        sync()
        step_times.append(time.perf_counter() - t0)
        log(f"step {i}: loss {losses[-1]:.4f} {1e3 * step_times[-1]:.1f} ms")
    elapsed = time.perf_counter() - start

    tokens_step = b * t
    tokens_per_s = tokens_step * args.steps / elapsed
    med = statistics.median(step_times)
    peak = args.peak_tflops * 1e12
    result = {
        "impl": "pytorch",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "precision": precision,
        "autocast": "torch.autocast(device_type='cuda', dtype=torch.bfloat16)" if precision == "bf16" else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if cuda else None,
        "world": 1,
        "layers": args.layers, "d_model": args.d_model, "heads": args.heads, "ctx": t,
        "batch_per_rank": b, "vocab": args.vocab, "gelu": "tanh", "bias": True,
        "attention": "F.scaled_dot_product_attention(is_causal=True)",
        "warmup_steps": args.warmup_steps, "steps": args.steps,
        "tokens_per_step": tokens_step,
        "tokens_per_s": round(tokens_per_s, 2),
        "tokens_per_s_from_median": round(tokens_step / med, 2),
        "step_ms_median": round(1e3 * med, 3),
        "step_ms_min": round(1e3 * min(step_times), 3),
        "step_ms_max": round(1e3 * max(step_times), 3),
        "params": n_total,
        "params_nonembedding": n_nonemb,
        "flops_formula": "6*params_nonembedding + 12*layers*d_model*ctx (Kaplan; no LM head)",
        "flops_per_token": flops_tok,
        "flops_per_token_incl_lmhead": flops_tok_lm,
        "achieved_tflops": float(f"{flops_tok * tokens_per_s / 1e12:.4g}"),
        "peak_tflops": args.peak_tflops,
        "peak_source": ("given: H100 SXM dense bf16 (989), the default"
                        if args.peak_tflops == H100_BF16_DENSE_TFLOPS else "given: --peak-tflops"),
        "mfu": float(f"{flops_tok * tokens_per_s / peak:.4g}"),
        "mfu_incl_lmhead": float(f"{flops_tok_lm * tokens_per_s / peak:.4g}"),
        "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None,
        "loss_first": round(losses[0], 4),
        "loss_last": round(losses[-1], 4),
        "loss_finite": all(math.isfinite(x) for x in losses),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
