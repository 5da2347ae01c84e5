#!/usr/bin/env python3
"""The Hugging Face side of ferry's parity tests (driven by tests/hf_parity.rs).

  make-gpt2 DIR          save a randomly initialised GPT2LMHeadModel to DIR, plus the input ids
                         and its logits in DIR/reference.safetensors
  make-gpt DIR           the same for OpenAIGPTLMHeadModel
  make-bert DIR          the same for BertForPreTraining, with token_type_ids and an
                         attention_mask with padding; MLM and NSP logits
  logits DIR IDS_FILE    load DIR with the class its config.json names (from_pretrained) and
                         write its logits for the inputs in IDS_FILE to DIR/hf_logits.safetensors
  encode TOKENIZER TEXTS print the ids Python `tokenizers` gives each line of TEXTS as JSON
  classify DIR TEXTS     load a fine-tuned model directory with its config's
                         ...ForSequenceClassification class and print, as JSON, the class
                         probabilities of each line of TEXTS (framed as ferry frames them:
                         [CLS] text [SEP] for BERT, the bare text for GPT/GPT-2)
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
    perturb(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out_dir}/reference.safetensors")


def perturb(model):
    """Random init leaves biases at zero and LayerNorms at identity; perturb them so the
    test checks every tensor's name and layout, not just the matrices."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))


def make_gpt(out_dir):
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(0)
    config = OpenAIGPTConfig(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = OpenAIGPTLMHeadModel(config).eval()
    perturb(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids, "logits": logits.contiguous()}, f"{out_dir}/reference.safetensors")


def bert_inputs(vocab_size, generator):
    """Two rows of 17: the second padded after 12 tokens; segments 0 then 1."""
    ids = torch.randint(5, vocab_size, (2, 17), generator=generator)
    types = torch.zeros_like(ids)
    types[0, 9:] = 1
    types[1, 6:12] = 1
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    ids[1, 12:] = 0
    return ids, types, mask


def make_bert(out_dir):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = BertForPreTraining(config).eval()
    perturb(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    ids, types, mask = bert_inputs(config.vocab_size, torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
    save_file({"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
               "mlm_logits": out.prediction_logits.contiguous(),
               "nsp_logits": out.seq_relationship_logits.contiguous()},
              f"{out_dir}/reference.safetensors")


def logits(model_dir, ids_file):
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    cls = getattr(transformers, config.architectures[0])
    model = cls.from_pretrained(model_dir).eval()
    inputs = load_file(ids_file)
    with torch.no_grad():
        if config.model_type == "bert":
            out = model(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"],
                        attention_mask=inputs["attention_mask"])
            result = {"mlm_logits": out.prediction_logits.contiguous(),
                      "nsp_logits": out.seq_relationship_logits.contiguous()}
        else:
            result = {"logits": model(inputs["input_ids"]).logits.contiguous()}
    save_file(result, f"{model_dir}/hf_logits.safetensors")


def encode(tokenizer_file, texts_file):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_file)
    with open(texts_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    print(json.dumps([tok.encode(line).ids for line in lines]))


def classify(model_dir, texts_file):
    import transformers
    from tokenizers import Tokenizer
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    model = getattr(transformers, config.architectures[0]).from_pretrained(model_dir).eval()
    tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
    with open(f"{model_dir}/finetune.json", encoding="utf-8") as f:
        max_len = json.load(f)["max_len"]
    with open(texts_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for line in lines:
        ids = tok.encode(line, add_special_tokens=False).ids
        if config.model_type == "bert":
            ids = [tok.token_to_id("[CLS]")] + ids[: max_len - 2] + [tok.token_to_id("[SEP]")]
        else:
            ids = ids[:max_len]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        out.append(torch.softmax(logits[0], -1).tolist())
    print(json.dumps(out))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"make-gpt2": make_gpt2, "make-gpt": make_gpt, "make-bert": make_bert, "logits": logits,
     "encode": encode, "classify": classify}[cmd](*args)
