#!/usr/bin/env python3
"""The side-by-side peer for convoy's GPU benchmarks: Hugging Face transformers on the same card.

Random (dummy) weights in Llama-3-8B shape, bf16, with 8 KV heads (GQA) and 1 KV head (MQA).
Decode tokens/s at batch 1, 32, 128 and 256 with 1,024 tokens of context, and prefill tokens/s.
Prints one JSON object per measurement. Needs torch with CUDA and transformers (present on the
device machines); no network.
"""
import json
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache


def model(kv_heads):
    cfg = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=kv_heads, max_position_embeddings=8192,
                      rope_theta=500000.0, torch_dtype=torch.bfloat16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    return m


@torch.inference_mode()
def decode_tps(m, batch, context, steps=32):
    ids = torch.randint(0, 128000, (batch, context), device="cuda")
    cache = DynamicCache()
    out = m(input_ids=ids, past_key_values=cache, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        out = m(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


@torch.inference_mode()
def prefill_tps(m, tokens=4096, batch=1):
    ids = torch.randint(0, 128000, (batch, tokens), device="cuda")
    m(input_ids=ids[:, :128])
    torch.cuda.synchronize()
    t = time.perf_counter()
    m(input_ids=ids, logits_to_keep=1)
    torch.cuda.synchronize()
    return batch * tokens / (time.perf_counter() - t)


def main():
    card = torch.cuda.get_device_name(0)
    for kv in (8, 1):
        m = model(kv)
        name = f"llama3-8b-shape kv_heads={kv}"
        print(json.dumps({"engine": "transformers", "card": card, "model": name, "prefill_tok_s": round(prefill_tps(m), 1)}), flush=True)
        for b in (1, 32, 128, 256):
            try:
                tps = decode_tps(m, b, 1024)
            except torch.cuda.OutOfMemoryError:
                tps = None
                torch.cuda.empty_cache()
            print(json.dumps({"engine": "transformers", "card": card, "model": name, "batch": b, "context": 1024,
                              "decode_tok_s": None if tps is None else round(tps, 1)}), flush=True)
        del m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
