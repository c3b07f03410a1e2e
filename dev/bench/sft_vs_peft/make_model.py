#!/usr/bin/env python3
"""A random-weight Qwen2-style Hugging Face model folder and a prompt/completion JSONL, for the SFT
benchmark against transformers + peft (dev/bench/sft_vs_peft/run.sh).

The folder holds config.json (Qwen2ForCausalLM), model.safetensors (written here with json + struct, and
numpy when it is installed, so that no torch is needed) and the tokenizer files of
tests/fixtures/tokenizers/qwen2 (a small byte-level BPE with Qwen2's pre-tokenizer, special tokens and
chat template). The default shape is Qwen2.5-0.5B's: hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151936 (larger than the fixture tokenizer's; the extra rows are never
looked up but the LM head computes them, as in the real model), Q/K/V biases, tied embeddings.

Weights: normal(0, 0.02) for the matrices and the embedding, normal(0, 0.02) for the Q/K/V biases, ones
for the RMSNorm weights; numpy's PCG64 generator seeded with --seed. Stored as BF16 (round to nearest
even) unless --dtype f32. Without numpy the weights come from Python's `random` (same distribution,
other numbers), which is slow: without numpy a model over 20M parameters is refused unless
--slow-ok; use numpy, or a small shape (--hidden, --layers, --intermediate, --vocab).

The JSONL: --examples records {"prompt": ..., "completion": ...} of --prompt-words and
--completion-words words, drawn from the fixture vocabulary's whole-word tokens (a space and two or more
ASCII lowercase letters), so that one word is about one token. The chat template adds Qwen's default
system prompt, which the fixture's small BPE splits finely: an example is about prompt + completion + 68
tokens long, so the defaults (192 + 240 words) make examples of about 500 tokens, under the benchmark's
512 (none truncated, a little padding).

  python3 dev/bench/sft_vs_peft/make_model.py --out /tmp/qwen2_random --data /tmp/sft_bench.jsonl
"""
import argparse
import json
import os
import random
import shutil
import struct
import sys

try:
    import numpy as np
except ImportError:  # the slow path below
    np = None

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
TOKENIZER_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizers", "qwen2")


def tensor_specs(a):
    """(name, shape, kind) in the order transformers names them; kind: matrix | bias | norm."""
    head_dim = a.hidden // a.heads
    q, kv = a.heads * head_dim, a.kv_heads * head_dim
    specs = [("model.embed_tokens.weight", [a.vocab, a.hidden], "matrix")]
    for l in range(a.layers):
        p = f"model.layers.{l}."
        specs += [
            (p + "input_layernorm.weight", [a.hidden], "norm"),
            (p + "self_attn.q_proj.weight", [q, a.hidden], "matrix"),
            (p + "self_attn.q_proj.bias", [q], "bias"),
            (p + "self_attn.k_proj.weight", [kv, a.hidden], "matrix"),
            (p + "self_attn.k_proj.bias", [kv], "bias"),
            (p + "self_attn.v_proj.weight", [kv, a.hidden], "matrix"),
            (p + "self_attn.v_proj.bias", [kv], "bias"),
            (p + "self_attn.o_proj.weight", [a.hidden, q], "matrix"),
            (p + "post_attention_layernorm.weight", [a.hidden], "norm"),
            (p + "mlp.gate_proj.weight", [a.intermediate, a.hidden], "matrix"),
            (p + "mlp.up_proj.weight", [a.intermediate, a.hidden], "matrix"),
            (p + "mlp.down_proj.weight", [a.hidden, a.intermediate], "matrix"),
        ]
    specs.append(("model.norm.weight", [a.hidden], "norm"))
    return specs


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def values_bytes(kind, n, dtype, rng):
    """The n values of one tensor, encoded little-endian as F32 or BF16."""
    if np is not None:
        if kind == "norm":
            x = np.ones(n, dtype=np.float32)
        else:
            x = rng.standard_normal(n, dtype=np.float32)
            x *= np.float32(0.02)
        if dtype == "F32":
            return x.astype("<f4").tobytes()
        # Round to nearest even, in place in 32 bits (the 136M-value embedding would need several GB of
        # 64-bit temporaries otherwise); u + 0x8000 wraps only for NaN bit patterns, which never occur here.
        u = x.view(np.uint32)
        bias = (u >> 16) & 1
        bias += 0x7FFF
        u += bias
        u >>= 16
        return u.astype("<u2").tobytes()
    out = bytearray()
    for _ in range(n):
        v = 1.0 if kind == "norm" else rng.gauss(0.0, 0.02)
        f = struct.pack("<f", v)
        if dtype == "F32":
            out += f
        else:
            (u,) = struct.unpack("<I", f)
            out += struct.pack("<H", ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)
    return bytes(out)


def write_safetensors(path, specs, dtype, seed):
    size = 4 if dtype == "F32" else 2
    header, offset = {}, 0
    for name, shape, _ in specs:
        nbytes = numel(shape) * size
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)  # the data starts 8-byte aligned
    rng = np.random.default_rng(seed) if np is not None else random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for i, (name, shape, kind) in enumerate(specs):
            f.write(values_bytes(kind, numel(shape), dtype, rng))
            if i % 50 == 0:
                print(f"  {name} {shape}", file=sys.stderr)
    os.replace(tmp, path)
    return offset


def write_config(path, a, dtype):
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": a.max_position,
        "vocab_size": a.vocab,
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": a.layers,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": False,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "torch_dtype": "bfloat16" if dtype == "BF16" else "float32",
    }
    with open(path, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def words_of_vocab():
    vocab = json.load(open(os.path.join(TOKENIZER_DIR, "tokenizer.json")))["model"]["vocab"]
    words = sorted(k[1:] for k in vocab
                   if k.startswith("\u0120") and len(k) > 2 and k[1:].isascii() and k[1:].isalpha()
                   and k[1:].islower())
    return words or ["the", "model", "token", "batch", "matrix", "attention"]


def write_data(path, a):
    rng = random.Random(a.seed)
    words = words_of_vocab()
    with open(path + ".tmp", "w") as f:
        for _ in range(a.examples):
            prompt = " ".join(rng.choice(words) for _ in range(a.prompt_words))
            completion = " ".join(rng.choice(words) for _ in range(a.completion_words))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="model folder to write")
    ap.add_argument("--data", help="JSONL of prompt/completion examples to write")
    ap.add_argument("--hidden", type=int, default=896)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=14)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=4864)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--max-position", type=int, default=32768)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--prompt-words", type=int, default=192)
    ap.add_argument("--completion-words", type=int, default=240)
    ap.add_argument("--slow-ok", action="store_true", help="write a large model without numpy anyway")
    a = ap.parse_args()
    if not a.out and not a.data:
        ap.error("nothing to do: give --out and/or --data")
    if a.hidden % a.heads or a.heads % a.kv_heads or (a.hidden // a.heads) % 2:
        ap.error("hidden must split into heads of even size, and heads into kv-heads")

    if a.out:
        os.makedirs(a.out, exist_ok=True)
        dtype = "BF16" if a.dtype == "bf16" else "F32"
        specs = tensor_specs(a)
        params = sum(numel(s) for _, s, _ in specs)
        if np is None and params > 20_000_000 and not a.slow_ok:
            # Pure Python writes about a million values a second: a 0.5B model would take most of an hour
            # and eat any benchmark's time limit. Fail at once instead.
            print(f"make_model.py: numpy is not installed; writing {params / 1e6:.0f}M values in pure "
                  "Python would take far too long (install numpy, use a smaller shape, or --slow-ok)",
                  file=sys.stderr)
            sys.exit(2)
        write_config(os.path.join(a.out, "config.json"), a, dtype)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(a.out, name))
        nbytes = write_safetensors(os.path.join(a.out, "model.safetensors"), specs, dtype, a.seed)
        print(f"model: {a.out}: {params / 1e6:.1f}M parameters, {nbytes / 2**20:.0f} MB of {dtype}")
    if a.data:
        write_data(a.data, a)
        print(f"data: {a.data}: {a.examples} examples of {a.prompt_words} + {a.completion_words} words")


if __name__ == "__main__":
    main()
