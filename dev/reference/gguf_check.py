#!/usr/bin/env python3
"""Check GGUF files written by our exporter (llm/gguf.cpp) with llama.cpp's own Python package, gguf-py.

For each file it reads with gguf.GGUFReader and checks:
  - the alignment (32) of the data section and of every tensor;
  - every metadata key, its GGUF type and value, against the tiny model tests/model/test_gguf.cpp
    writes for that architecture (no key missing, none extra);
  - the tensor names, their order, dims (ggml order) and types (1-D tensors F32, 2-D the requested type);
  - the stored bytes of every tensor, against the same float32 values regenerated here, permuted as
    convert_hf_to_gguf.py permutes Llama's q_proj/k_proj, and encoded by gguf-py itself (numpy's float16,
    gguf.quants for BF16 and Q8_0): they must be identical byte for byte (rope_freqs, computed from the
    config, within 1e-6);
  - the dequantised values (gguf.quants.dequantize) against the float32 source, within each type's rounding.

With --llama-cpp it also runs each file in llama.cpp itself (pip install llama-cpp-python) and compares
the logits with those of our CPU model on the same stored weights (NAME.logits.json, written beside the
files by the test), which checks the meaning of what was exported: the Q/K permutation, RoPE and its scaling,
norms, biases and tied embeddings.

With --write-json it also records, beside each file as NAME.json, what gguf-py saw (metadata, tensor names,
types, dims, offsets, an FNV-1a 64 of the raw bytes, sums and first values of the dequantised data). The
C++ test GgufPython.OurReaderSeesWhatGgufPySaw compares our reader's view of the committed fixtures with
these files, so CI checks the agreement without Python.

Usage (needs `pip install gguf numpy`):
    LLM_GGUF_WRITE_DIR=/tmp/gguf ./build/tests/test_gguf --gtest_filter=GgufPython.WriteFilesForPython
    python3 dev/reference/gguf_check.py /tmp/gguf [--llama-cpp]
    # refresh the committed fixtures:
    LLM_GGUF_WRITE_FIXTURES=1 ./build/tests/test_gguf --gtest_filter=GgufPython.WriteFilesForPython
    python3 dev/reference/gguf_check.py tests/fixtures/gguf --write-json
"""

import argparse
import importlib.metadata
import json
import math
import pathlib
import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT

# ---- the tiny models and the value generator of tests/model/test_gguf.cpp (kept in step by hand) ----

BASE = dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=0, d_ff=64, n_layers=2, vocab_size=48, max_seq_len=128,
            norm_eps=1e-5, attention_bias=False, qk_norm=False, tie=True, rope_theta=10000.0, scaling="none",
            factor=1.0, original_len=0, low_freq=1.0, high_freq=4.0, beta_fast=32.0, beta_slow=1.0)
CONFIGS = {
    "llama": dict(BASE, tie=False, rope_theta=10000.0, scaling="llama3", factor=8.0, original_len=64),
    "qwen2": dict(BASE, attention_bias=True, tie=True, rope_theta=1e6, norm_eps=1e-6),
    "qwen3": dict(BASE, qk_norm=True, head_dim=16, tie=False, rope_theta=1e6, scaling="yarn", factor=4.0,
                  original_len=32, norm_eps=1e-6),
}


def tiny_tokenizer(arch):
    tokens = ["<pad>", "<s>", "</s>", "a", "b", "c", "ab", "Ġ", "Ġt", "he", "Ġthe", "é"]
    tokens += [f"tok{i}" for i in range(len(tokens), 40)]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return dict(tokens=tokens, types=types, merges=["a b", "Ġ t", "h e", "Ġt he"], bos=1, eos=2, pad=0,
                pre="llama-bpe" if arch == "llama" else "qwen2",
                template="{% for m in messages %}{{ m['content'] }}{% endfor %}", add_bos=(arch == "llama"))


def fnv1a32(s):
    h = 2166136261
    for b in s.encode():
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def fnv1a64(data):
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


def test_values(name, n):
    """float32 element i of tensor `name` (our HF name); see test_value in tests/model/test_gguf.cpp."""
    i = np.arange(n, dtype=np.uint64)
    u = (np.uint64(fnv1a32(name)) + i * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    u ^= u >> np.uint64(15)
    u = (u * np.uint64(2246822519)) & np.uint64(0xFFFFFFFF)
    u ^= u >> np.uint64(13)
    x = (u >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24) - np.float32(0.5)
    if "norm" in name:
        return (np.float32(1.0) + x * np.float32(0.25)).astype(np.float32)
    block = (i // np.uint64(32)).astype(np.int64)
    out = (x * np.exp2((block % 5 - 2).astype(np.float32))).astype(np.float32)
    out[block % 7 == 3] = 0
    return out


def hf_layout(c):
    """(HF name, PyTorch shape) in the order of llm::ParameterLayout."""
    C, F, V = c["d_model"], c["d_ff"], c["vocab_size"]
    D = c["head_dim"] or C // c["n_heads"]
    q, kv = c["n_heads"] * D, c["n_kv_heads"] * D
    out = [("model.embed_tokens.weight", (V, C))]
    for l in range(c["n_layers"]):
        p = f"model.layers.{l}."
        out.append((p + "input_layernorm.weight", (C,)))
        for proj, rows in (("q", q), ("k", kv), ("v", kv)):
            out.append((p + f"self_attn.{proj}_proj.weight", (rows, C)))
            if c["attention_bias"]:
                out.append((p + f"self_attn.{proj}_proj.bias", (rows,)))
        out.append((p + "self_attn.o_proj.weight", (C, q)))
        if c["qk_norm"]:
            out += [(p + "self_attn.q_norm.weight", (D,)), (p + "self_attn.k_norm.weight", (D,))]
        out.append((p + "post_attention_layernorm.weight", (C,)))
        out += [(p + "mlp.gate_proj.weight", (F, C)), (p + "mlp.up_proj.weight", (F, C)),
                (p + "mlp.down_proj.weight", (C, F))]
    out.append(("model.norm.weight", (C,)))
    if not c["tie"]:
        out.append(("lm_head.weight", (V, C)))
    return out


LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf):
    if hf in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def llama_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute: rotate-half rows to interleaved pairs, per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(c):
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3."""
    dim = c["head_dim"] or c["d_model"] // c["n_heads"]
    freqs = 1.0 / (np.float32(c["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    old = c["original_len"] or c["max_seq_len"]
    low_wl, high_wl = old / c["low_freq"], old / c["high_freq"]
    out = []
    for f in freqs.astype(np.float32):
        wl = 2 * math.pi / float(f)
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(c["factor"])
        else:
            s = (old / wl - c["low_freq"]) / (c["high_freq"] - c["low_freq"])
            out.append(1 / ((1 - s) / c["factor"] + s))
    return np.array(out, dtype=np.float32)


FILE_TYPES = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}


def expected_metadata(arch, ftype):
    c, t = CONFIGS[arch], tiny_tokenizer(arch)
    D = c["head_dim"] or c["d_model"] // c["n_heads"]
    a = arch + "."
    m = {
        "general.architecture": (VT.STRING, arch), "general.name": (VT.STRING, "tiny-" + arch),
        "general.alignment": (VT.UINT32, 32), "general.file_type": (VT.UINT32, FILE_TYPES[ftype]),
        "general.quantization_version": (VT.UINT32, 2),
        a + "vocab_size": (VT.UINT32, c["vocab_size"]), a + "context_length": (VT.UINT32, c["max_seq_len"]),
        a + "embedding_length": (VT.UINT32, c["d_model"]), a + "block_count": (VT.UINT32, c["n_layers"]),
        a + "feed_forward_length": (VT.UINT32, c["d_ff"]),
        a + "attention.head_count": (VT.UINT32, c["n_heads"]),
        a + "attention.head_count_kv": (VT.UINT32, c["n_kv_heads"]),
        a + "attention.key_length": (VT.UINT32, D), a + "attention.value_length": (VT.UINT32, D),
        a + "attention.layer_norm_rms_epsilon": (VT.FLOAT32, c["norm_eps"]),
        a + "rope.dimension_count": (VT.UINT32, D), a + "rope.freq_base": (VT.FLOAT32, c["rope_theta"]),
    }
    if c["scaling"] == "yarn":
        m[a + "rope.scaling.type"] = (VT.STRING, "yarn")
        m[a + "rope.scaling.factor"] = (VT.FLOAT32, c["factor"])
        m[a + "rope.scaling.original_context_length"] = (VT.UINT32, c["original_len"])
        m[a + "rope.scaling.yarn_beta_fast"] = (VT.FLOAT32, c["beta_fast"])
        m[a + "rope.scaling.yarn_beta_slow"] = (VT.FLOAT32, c["beta_slow"])
    tokens = t["tokens"] + [f"[PAD{i}]" for i in range(len(t["tokens"]), c["vocab_size"])]
    types = t["types"] + [5] * (c["vocab_size"] - len(t["types"]))
    m.update({
        "tokenizer.ggml.model": (VT.STRING, "gpt2"), "tokenizer.ggml.pre": (VT.STRING, t["pre"]),
        "tokenizer.ggml.tokens": ((VT.ARRAY, VT.STRING), tokens),
        "tokenizer.ggml.token_type": ((VT.ARRAY, VT.INT32), types),
        "tokenizer.ggml.merges": ((VT.ARRAY, VT.STRING), t["merges"]),
        "tokenizer.ggml.bos_token_id": (VT.UINT32, t["bos"]), "tokenizer.ggml.eos_token_id": (VT.UINT32, t["eos"]),
        "tokenizer.ggml.padding_token_id": (VT.UINT32, t["pad"]),
        "tokenizer.chat_template": (VT.STRING, t["template"]),
    })
    if t["add_bos"]:
        m["tokenizer.ggml.add_bos_token"] = (VT.BOOL, True)
    return m


def field_type(field):
    return (VT.ARRAY, field.types[-1]) if field.types[0] == VT.ARRAY else field.types[0]


def encode(values, qtype):
    """The bytes gguf-py (and convert_hf_to_gguf.py) would store for float32 `values` in `qtype`."""
    if qtype == QT.F32:
        return values.astype(np.float32).tobytes()
    if qtype == QT.F16:
        return values.astype(np.float16).tobytes()
    return gguf.quants.quantize(values, qtype).tobytes()


def dequantized(t):
    if t.tensor_type in (QT.F32, QT.F16):
        return t.data.astype(np.float32).reshape(-1)
    return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)


def check_file(path, problems):
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()
    c = CONFIGS[arch]
    ftype = {v: k for k, v in FILE_TYPES.items()}[r.fields["general.file_type"].contents()]
    want_type = QT[ftype]
    fail = lambda msg: problems.append(f"{path.name}: {msg}")  # noqa: E731

    if r.alignment != 32:
        fail(f"alignment {r.alignment}")
    if r.data_offset % 32:
        fail(f"data section at {r.data_offset}, not aligned")

    # Metadata: exact keys, types and values.
    expected = expected_metadata(arch, ftype)
    keys = [k for k in r.fields if not k.startswith("GGUF.")]
    if set(keys) != set(expected):
        fail(f"metadata keys differ: extra {sorted(set(keys) - set(expected))}, "
             f"missing {sorted(set(expected) - set(keys))}")
    for key, (typ, value) in expected.items():
        if key not in r.fields:
            continue
        f = r.fields[key]
        got = f.contents()
        if field_type(f) != typ:
            fail(f"{key}: type {field_type(f)}, expected {typ}")
        if typ == VT.FLOAT32:
            ok = got == float(np.float32(value))
        else:
            ok = got == value
        if not ok:
            fail(f"{key}: {str(got)[:80]} != {str(value)[:80]}")

    # Tensors: names in order, dims, types, bytes.
    layout = hf_layout(c)
    names = (["rope_freqs.weight"] if c["scaling"] == "llama3" else []) + [gguf_name(n) for n, _ in layout]
    got_names = [t.name for t in r.tensors]
    if got_names != names:
        fail(f"tensor names {got_names} != {names}")
    by_name = {t.name: t for t in r.tensors}
    D = c["head_dim"] or c["d_model"] // c["n_heads"]
    sources = []
    if c["scaling"] == "llama3":
        sources.append(("rope_freqs.weight", llama3_rope_factors(c), None))
    for hf, shape in layout:
        w = test_values(hf, int(np.prod(shape))).reshape(shape)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            w = llama_permute(w, c["n_kv_heads"] if ".k_proj." in hf else c["n_heads"])
        sources.append((gguf_name(hf), w, hf))
    counts = {}
    for name, w, hf in sources:
        t = by_name.get(name)
        if t is None:
            continue
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
        if t.data_offset % 32:
            fail(f"{name} at {t.data_offset}, not aligned")
        if list(t.shape) != list(reversed(w.shape)):
            fail(f"{name}: dims {list(t.shape)}, expected {list(reversed(w.shape))}")
            continue
        want = QT.F32 if w.ndim == 1 else (QT.F16 if want_type == QT.Q8_0 and w.shape[-1] % 32 else want_type)
        if t.tensor_type != want:
            fail(f"{name}: type {t.tensor_type.name}, expected {want.name}")
            continue
        raw = np.asarray(t.data).tobytes()
        deq = dequantized(t)
        flat = w.reshape(-1).astype(np.float32)
        if hf is None:  # rope_freqs: computed from the config on both sides
            if not np.allclose(deq, flat, rtol=1e-6, atol=0):
                fail(f"{name}: {deq} != {flat}")
            continue
        if raw != encode(w, t.tensor_type):
            fail(f"{name}: stored bytes differ from gguf-py's {t.tensor_type.name} encoding of the same values")
        err = np.abs(deq - flat)
        if t.tensor_type == QT.F32:
            bound = np.zeros_like(flat)
        elif t.tensor_type == QT.F16:
            bound = np.abs(flat) * 2.0**-11 + 2.0**-25
        elif t.tensor_type == QT.BF16:
            bound = np.abs(flat) * 2.0**-8
        else:  # Q8_0: d/2 per element, plus what rounding d to fp16 adds
            blocks = flat.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
            d16 = d.astype(np.float16).astype(np.float32)
            bound = np.broadcast_to(d / 2 + 127 * np.abs(d - d16) + 1e-9, blocks.shape).reshape(-1)
        if np.any(err > bound):
            fail(f"{name}: dequantised values off by up to {err.max()}")
    return r, counts


def record(r):
    """What gguf-py saw, for the C++ fixture test."""
    meta = {}
    for key, f in r.fields.items():
        if key.startswith("GGUF."):
            continue
        typ = field_type(f)
        if isinstance(typ, tuple):
            meta[key] = {"type": "array", "element_type": SHORT[typ[1]], "value": f.contents()}
        else:
            value = f.contents()
            meta[key] = {"type": SHORT[typ], "value": float(value) if typ in (VT.FLOAT32, VT.FLOAT64) else value}
    tensors = []
    for t in r.tensors:
        deq = dequantized(t).astype(np.float64)
        tensors.append({
            "name": t.name, "type": t.tensor_type.name, "dims": [int(d) for d in t.shape],
            "n_elements": int(t.n_elements), "n_bytes": int(t.n_bytes), "data_offset": int(t.data_offset),
            "raw_fnv1a64": f"{fnv1a64(np.asarray(t.data).tobytes()):016x}",
            "sum": float(deq.sum()), "abs_sum": float(np.abs(deq).sum()),
            "first": [float(v) for v in deq[:8]],
        })
    return {"alignment": int(r.alignment), "data_offset": int(r.data_offset), "metadata": meta, "tensors": tensors}


SHORT = {VT.UINT8: "u8", VT.INT8: "i8", VT.UINT16: "u16", VT.INT16: "i16", VT.UINT32: "u32", VT.INT32: "i32",
         VT.FLOAT32: "f32", VT.BOOL: "bool", VT.STRING: "string", VT.ARRAY: "array", VT.UINT64: "u64",
         VT.INT64: "i64", VT.FLOAT64: "f64"}


# Max |llama.cpp - ours| over the logits, relative to max |ours|. Both run on the same stored weights, so
# the F32 files check what the export means (permutation, RoPE scaling, norms, biases, tying) to ~1e-6.
# For the other types llama.cpp's CPU matmuls also round the activations to the weights' "vec dot" type
# (F16, BF16, Q8_0 blocks) where ours stay fp32, and these toy weights (block scales up to 4, sharp
# attention) amplify that: Q8_0 is ~2% at position 0 and up to ~13% later, where softmax mixes.
LOGIT_TOLERANCE = {"F32": 1e-4, "F16": 1e-2, "BF16": 1e-1, "Q8_0": 2e-1}


def check_llama_cpp(path, problems):
    """Loads the file with llama.cpp (pip llama-cpp-python) and compares its logits with our CPU model's
    logits on the weights as stored (dequantised by our reader), which the test writes as NAME.logits.json."""
    import llama_cpp

    ftype = path.stem.split("_", 1)[1]
    ref_path = path.with_suffix(".logits.json")
    if not ref_path.exists():
        problems.append(f"{path.name}: no {ref_path.name} to compare llama.cpp's logits with")
        return None
    ref = json.loads(ref_path.read_text())
    tokens, want = ref["tokens"], np.array(ref["logits"], dtype=np.float64)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False,
                          n_threads=2, type_k=0, type_v=0)  # fp32 KV cache
    llm.eval(tokens)
    got = np.array(llm.scores[: len(tokens)], dtype=np.float64)
    rel = float(np.abs(got - want).max() / np.abs(want).max())
    if not rel <= LOGIT_TOLERANCE[ftype.upper()]:
        problems.append(f"{path.name}: llama.cpp's logits differ from ours by {rel:.2e} of max |logit|")
    return rel


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="GGUF files, or folders of them")
    ap.add_argument("--write-json", action="store_true", help="write NAME.json beside each NAME.gguf")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also run each file in llama.cpp (pip install llama-cpp-python) and compare its logits "
                         "with NAME.logits.json, our CPU model's")
    args = ap.parse_args()
    files = []
    for p in map(pathlib.Path, args.paths):
        files += sorted(p.glob("*.gguf")) if p.is_dir() else [p]
    if not files:
        sys.exit("no GGUF files given")
    version = importlib.metadata.version("gguf")
    failed = 0
    for path in files:
        problems = []
        try:
            r, counts = check_file(path, problems)
        except Exception as e:  # gguf-py refusing the file is a failure too
            problems.append(f"{path.name}: gguf-py could not read it: {e!r}")
            r, counts = None, {}
        rel = None
        if args.llama_cpp and r is not None:
            try:
                rel = check_llama_cpp(path, problems)
            except Exception as e:
                problems.append(f"{path.name}: llama.cpp could not run it: {e!r}")
        if problems:
            failed += 1
            print(f"FAIL {path.name}")
            for p in problems[:20]:
                print("  " + p)
        else:
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            print(f"OK   {path.name}: {len(r.tensors)} tensors ({kinds}), "
                  f"{sum(1 for k in r.fields if not k.startswith('GGUF.'))} keys; bytes identical to gguf-py's encoding"
                  + (f"; llama.cpp logits within {rel:.1e} of ours" if rel is not None else ""))
        if args.write_json and r is not None:
            out = {"generated_by": f"dev/reference/gguf_check.py with gguf-py {version}", "file": path.name,
                   "checks_passed": not problems, **record(r)}
            path.with_suffix(".json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(files) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
