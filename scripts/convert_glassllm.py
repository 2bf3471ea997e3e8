#!/usr/bin/env python3
"""Convert the glassllm package's `en` model to a Hugging Face Llama directory.

Writes config.json, model.safetensors (float16, as stored in the package) and tokenizer.json.
glassllm multiplies activations by (in, out) matrices and rotates adjacent coordinate pairs;
Hugging Face Llama stores (out, in) matrices and rotates the two halves of each head. The
conversion transposes every matrix and reorders the rows of the query and key projections so
that the half-split rotation computes exactly what the pairwise rotation did.

Usage: convert_glassllm.py PACKAGE_DIR OUT_DIR
"""
import json
import os
import struct
import sys

import numpy as np


def pairs_to_halves(w_out_in, n_heads, head_dim):
    """Row order (2i, 2i+1) per head -> (i, i + head_dim/2), the layout of rotate_half."""
    w = w_out_in.reshape(n_heads, head_dim // 2, 2, -1)
    return w.transpose(0, 2, 1, 3).reshape(n_heads * head_dim, -1)


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": "F16", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path + ".partial", "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    os.replace(path + ".partial", path)


def tokenizer_json(package_tokenizer):
    spec = json.load(open(package_tokenizer, encoding="utf-8"))
    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = specials + spec["alphabet"] + [a + b for a, b in spec["merges"]]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(specials)
        ],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ]},
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\n|\u2581*[^\u2581\n]+|\u2581+"},
                          "behavior": "Isolated", "invert": False},
        "post_processor": None,
        "decoder": {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(vocab)},
                  "merges": [[a, b] for a, b in spec["merges"]]},
    }


def main(package_dir, out_dir):
    data = np.load(os.path.join(package_dir, "weights", "en.npz"))
    cfg = json.loads(str(data["__config__"]))
    d, n_heads, n_kv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
    head_dim = d // n_heads
    hidden = data["blocks.0.ffn.W1"].shape[1]
    t = {"model.embed_tokens.weight": data["E"], "model.norm.weight": data["norm_f.gamma"]}
    for i in range(cfg["n_layers"]):
        b, p = f"blocks.{i}.", f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = data[b + "norm1.gamma"]
        t[p + "post_attention_layernorm.weight"] = data[b + "norm2.gamma"]
        t[p + "self_attn.q_proj.weight"] = pairs_to_halves(data[b + "attn.W_Q"].T, n_heads, head_dim)
        t[p + "self_attn.k_proj.weight"] = pairs_to_halves(data[b + "attn.W_K"].T, n_kv, head_dim)
        t[p + "self_attn.v_proj.weight"] = data[b + "attn.W_V"].T
        t[p + "self_attn.o_proj.weight"] = data[b + "attn.W_O"].T
        t[p + "mlp.gate_proj.weight"] = data[b + "ffn.W1"].T
        t[p + "mlp.up_proj.weight"] = data[b + "ffn.W3"].T
        t[p + "mlp.down_proj.weight"] = data[b + "ffn.W2"].T
    t = {k: v.astype(np.float16) for k, v in t.items()}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg["vocab_size"], "hidden_size": d, "intermediate_size": int(hidden),
        "num_hidden_layers": cfg["n_layers"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": head_dim, "max_position_embeddings": cfg["max_len"],
        "rope_theta": cfg["rope_base"], "rms_norm_eps": cfg["eps"], "tie_word_embeddings": True,
        "bos_token_id": 2, "eos_token_id": 3, "torch_dtype": "float16", "hidden_act": "silu",
    }
    os.makedirs(out_dir + ".partial", exist_ok=True)
    write_safetensors(os.path.join(out_dir + ".partial", "model.safetensors"), t)
    with open(os.path.join(out_dir + ".partial", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir + ".partial", "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_json(os.path.join(package_dir, "weights", "en.tokenizer.json")), f, ensure_ascii=False)
    if os.path.exists(out_dir):
        import shutil
        shutil.rmtree(out_dir)
    os.replace(out_dir + ".partial", out_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
