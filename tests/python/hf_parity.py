#!/usr/bin/env python3
"""The Hugging Face side of ferry's parity tests (driven by tests/hf_parity.rs).

  make-gpt2 DIR          save a randomly initialised GPT2LMHeadModel to DIR, plus the input ids
                         and its logits in DIR/reference.safetensors
  logits DIR IDS_FILE    load DIR with GPT2LMHeadModel.from_pretrained and write its logits for
                         the ids in IDS_FILE to DIR/hf_logits.safetensors
  encode TOKENIZER TEXTS print the ids Python `tokenizers` gives each line of TEXTS as JSON
"""
import json
import sys

import torch
from safetensors.torch import load_file, save_file


def make_gpt2(out_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    # Random init leaves biases at zero and LayerNorms at identity; perturb them so the
    # test checks every tensor's name and layout, not just the matrices.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out_dir}/reference.safetensors")


def logits(model_dir, ids_file):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    ids = load_file(ids_file)["input_ids"]
    with torch.no_grad():
        out = model(ids).logits
    save_file({"logits": out.contiguous()}, f"{model_dir}/hf_logits.safetensors")


def encode(tokenizer_file, texts_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    with open(texts_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    print(json.dumps([tok.encode(line).ids for line in lines]))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-gpt2": make_gpt2, "logits": logits, "encode": encode}[cmd](*args)
