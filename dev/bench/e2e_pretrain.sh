#!/usr/bin/env bash
# End-to-end pretraining throughput on the GPU: runs ./train_pretrain (bf16, AdamW, built-in data, no
# evaluation or samples) on a ~125M-parameter Llama-style config (dev/bench/e2e_llama_134m.json: GPT-2
# small's sizes with Llama layers, 134M parameters) and, when asked, a Qwen2-0.5B-like one
# (dev/bench/e2e_qwen2_0.5b.json, 494M), reads tokens/s from the progress lines, and prints tokens/s and
# MFU, with "summary:" lines for dev/gpu/check.sh's table.
#
# MFU convention (DESIGN.md, "Performance method"; the PaLM paper's appendix B):
#   FLOPs per token = 6 N + 12 L H Q T
#     N  the parameters that take part in matmuls: the Q/K/V/O and MLP weights (and Q/K/V biases) of
#        every layer and the LM head, counted once (a tied head is the embedding matrix itself). The
#        input embedding and learned positions are lookups and cost no FLOPs, so an untied model's
#        embedding is not in N; norm weights are left out (a few thousand). Both this N and the
#        trainer's total parameter count are printed.
#     L  layers, H query heads, Q head dimension, T the training sequence length: 12 L H Q T is QK^T and
#        AV over the full T x T square, forward and backward (not halved for the causal mask).
#   MFU = tokens/s x FLOPs per token / the GPU's peak dense bf16 tensor rate:
#     H100 SXM and H200 989 TFLOP/s; H100 NVL and H200 NVL 835; H100 PCIe 756; A100 312 (from the
#     nvidia-smi name); E2E_PEAK_TFLOPS overrides it. Which peak was used is printed.
# tokens/s: the progress lines' rates after E2E_WARMUP logged steps, combined as total tokens over total
# time (the harmonic mean of the per-step rates); the median per-step rate is printed too. The configs
# log every step. The trainer writes a final checkpoint after the last step (outside the measured
# steps); the output folder is a temporary one, removed at the end unless E2E_OUT is set.
#
# Usage, from the repository root, after building train_pretrain (make train_pretrain, or check.sh's build):
#   bash dev/bench/e2e_pretrain.sh
#   E2E_CONFIGS="dev/bench/e2e_llama_134m.json dev/bench/e2e_qwen2_0.5b.json" bash dev/bench/e2e_pretrain.sh
# Environment (all optional):
#   E2E_CONFIGS       configs to run (default dev/bench/e2e_llama_134m.json)
#   E2E_SET           extra "key=value" overrides, space-separated, passed as --set and used for the
#                     FLOP count too (e.g. "batch_size=8 max_steps=50")
#   E2E_WARMUP        logged steps left out of the average (default 5)
#   E2E_PEAK_TFLOPS   the peak dense bf16 rate in TFLOP/s, instead of the one looked up from the GPU name
#   E2E_BIN           the binary (default ./train_pretrain)
#   E2E_OUT           keep the runs' output folders and logs here (default: a temporary folder)
#   E2E_TIMEOUT_S     time limit per run (default 600)
# Exit status: 0 when every run produced a measurement, 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 1

configs=${E2E_CONFIGS:-dev/bench/e2e_llama_134m.json}
warmup=${E2E_WARMUP:-5}
bin=${E2E_BIN:-./train_pretrain}
timeout_s=${E2E_TIMEOUT_S:-600}
read -r -a overrides <<<"${E2E_SET:-}"

if [ ! -x "$bin" ]; then
  echo "e2e_pretrain.sh: $bin not found; build it first (make train_pretrain)" >&2
  echo "summary: e2e pretrain: FAILED ($bin not built)"
  exit 1
fi
if [ -n "${E2E_OUT:-}" ]; then
  out=$E2E_OUT
  mkdir -p "$out" || exit 1
else
  out=$(mktemp -d "${TMPDIR:-/tmp}/e2e_pretrain.XXXXXX") || exit 1
  trap 'rm -rf "$out"' EXIT
fi

gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "GPU: ${gpu:-none seen by nvidia-smi}"

status=0
for cfg in $configs; do
  name=$(basename "$cfg" .json)
  name=${name#e2e_}
  log=$out/$name.log
  set_args=(--set "output_dir=$out/$name")
  for o in "${overrides[@]}"; do set_args+=(--set "$o"); done
  echo "== $name: $bin -c $cfg ${set_args[*]}"
  timeout --kill-after=10 "$timeout_s" "$bin" -c "$cfg" "${set_args[@]}" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  # The measurement: parse the progress lines, count N from the config (with the same overrides).
  python3 - "$cfg" "$log" "$rc" "$warmup" "$name" "${gpu:-}" "${E2E_PEAK_TFLOPS:-}" "${overrides[@]}" <<'EOF'
import json, os, re, statistics, sys

cfg_path, log_path, rc, warmup, name, gpu, peak_env = sys.argv[1:8]
rc, warmup = int(rc), int(warmup)
overrides = sys.argv[8:]

def fail(why):
    print(f"summary: e2e {name}: FAILED ({why})")
    sys.exit(1)

# The config as the trainer sees it: --set key=value (dotted keys reach into objects; the value is
# JSON when it parses, else a string), as llm/json_config.cpp applies it.
config = json.load(open(cfg_path))
for assignment in overrides:
    key, _, text = assignment.partition("=")
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    target = config
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value
if "model" in config:
    model = config["model"]
elif "model_config" in config:
    model = json.load(open(os.path.join(os.path.dirname(cfg_path) or ".", config["model_config"])))
else:
    model = {}
# Defaults of llm/config.h (a Qwen2.5-0.5B shape) for keys a config leaves out.
C = model.get("d_model", 896)
H = model.get("n_heads", 14)
attention = model.get("attention_type", "gqa")
Hkv = H if attention == "mha" else 1 if attention == "mqa" else model.get("n_kv_heads", 2)
F = model.get("d_ff", 4864)
L = model.get("n_layers", 24)
V = model.get("vocab_size", 151936)
D = model.get("head_dim", 0) or C // H
gated = model.get("activation", "swiglu") == "swiglu"
bias = model.get("attention_bias", False)
seq = config.get("seq_len", 0) or model.get("max_seq_len", 1024)
tokens_per_step = config.get("batch_size", 1) * seq * config.get("gradient_accumulation_steps", 64)

per_layer = C * H * D + 2 * C * Hkv * D + H * D * C + (3 if gated else 2) * C * F
if bias:
    per_layer += H * D + 2 * Hkv * D
N = L * per_layer + V * C  # the LM head once; the input embedding is a lookup
flops_per_token = 6 * N + 12 * L * H * D * seq

text = open(log_path, errors="replace").read()
total = re.search(r"model: ([0-9.]+)M parameters", text)
rates = []
for m in re.finditer(r"step\s+(\d+)/(\d+)\s*\|.*?\|\s*([0-9.]+) tok/s", text):
    rates.append((int(m.group(1)), float(m.group(3))))
if not rates:  # the progress format changed: fall back to metrics.jsonl
    metrics = os.path.join(os.path.dirname(log_path), name, "metrics.jsonl")
    if os.path.exists(metrics):
        for line in open(metrics):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if "step" in entry and "tokens_per_s" in entry:
                rates.append((int(entry["step"]), float(entry["tokens_per_s"])))
measured = [r for s, r in rates[warmup:] if r > 0]
if rc != 0:
    last = [l for l in text.splitlines() if l.strip()]
    fail(f"exit status {rc}: {last[-1][:80] if last else 'no output'}")
if not measured:
    fail(f"no progress lines after the {warmup} warm-up steps")

tokens_per_s = len(measured) / sum(1.0 / r for r in measured)  # total tokens / total time
median = statistics.median(measured)

peaks = [("H200 NVL", 835.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H200", 989.4),
         ("H100", 989.4), ("A100", 312.0)]
if peak_env:
    peak, peak_note = float(peak_env), f"E2E_PEAK_TFLOPS={peak_env}"
else:
    peak, peak_note = None, None
    for key, value in peaks:
        if key in gpu:
            peak, peak_note = value, f"{key} bf16 dense, from the GPU name \"{gpu}\""
            break
tflops = tokens_per_s * flops_per_token / 1e12

total_text = f"{total.group(1)}M total" if total else "total unknown"
print(f"{name}: N = {N / 1e6:.1f}M in matmuls ({total_text}), L={L} H={H} Q={D} T={seq}, "
      f"{flops_per_token / 1e9:.3f} GFLOP/token (6N + 12LHQT), {tokens_per_step} tokens/step")
print(f"{name}: {len(measured)} steps measured after {warmup} warm-up: {tokens_per_s:,.0f} tok/s "
      f"(median step {median:,.0f}), {tflops:.1f} TFLOP/s achieved")
if peak is None:
    print(f"{name}: MFU not computed: no known peak for GPU \"{gpu}\"; set E2E_PEAK_TFLOPS")
    print(f"summary: e2e {name} bf16 adamw: {tokens_per_s:,.0f} tok/s, {tflops:.0f} TFLOP/s (MFU: set E2E_PEAK_TFLOPS)")
else:
    mfu = 100.0 * tflops / peak
    print(f"{name}: MFU {mfu:.1f}% of {peak:g} TFLOP/s ({peak_note})")
    print(f"summary: e2e {name} bf16 adamw T={seq}: {tokens_per_s:,.0f} tok/s, MFU {mfu:.1f}% "
          f"(6N+12LHQT, peak {peak:g} TFLOP/s)")
EOF
  [ $? -eq 0 ] || status=1
done
exit $status
