#!/usr/bin/env bash
# LoRA and QLoRA SFT throughput and memory: ./train_sft ("device": "cuda", bf16) against transformers +
# peft (+ bitsandbytes for QLoRA) on the same random-weight Qwen2-0.5B-shaped model, the same data, sequence
# length, batch, LoRA settings and optimizer, on the same GPU in the same run (DESIGN.md, "Performance
# method": a timing means nothing without its twin beside it).
#
#   1. make_model.py writes the model folder (Qwen2.5-0.5B's shape, random bf16 weights, the fixture Qwen2
#      tokenizer; about 1 GB, some 10 s) and a JSONL of prompt/completion examples (about 500 tokens each),
#      into SFT_BENCH_DIR (kept and reused while make_model.py and its arguments stay the same);
#   2. for each mode (lora, qlora): ./train_sft -c <generated config> (LoRA on all seven projections, r 16,
#      alpha 32, dropout 0, AdamW lr 1e-4 without decay or schedule, grad clip 1.0, completion-only loss,
#      no packing, batch SFT_BENCH_BATCH x up to SFT_BENCH_MAX_LENGTH tokens, no evaluation, checkpoints
#      only at the end; QLoRA: NF4 with double quantisation), then peft_bench.py with the same settings
#      (its header says how it matches ours: bf16 autocast, fused AdamW, the same masking);
#   3. prints a table and "summary:" lines (each under 100 characters) for dev/gpu/check.sh's table.
# Measured: real (non-padding) tokens/s over SFT_BENCH_STEPS steps after SFT_BENCH_WARMUP warm-up steps,
# as total tokens over total time (ours: from output_dir/metrics.jsonl, which logs tokens_seen and
# elapsed_s at every step; theirs: timed around the loop); memory three ways: ours from the memory plan
# line (every device buffer the trainer plans: parameters, NF4 base, gradients, optimizer state,
# activations, scratch), theirs from torch.cuda.max_memory_allocated (every tensor PyTorch allocated), and
# both as the peak of nvidia-smi's memory.used during the run minus its value before (this includes the
# CUDA context, cuBLAS workspaces and allocator caching, and is the column the memory ratio uses).
#
# The PyTorch side needs torch, transformers, peft and (for QLoRA) bitsandbytes on the GPU machine (a wheel
# that dev/gpu/stage.sh put in .gpu_deps/wheels/ is installed into the work folder when it is missing);
# without them it is reported as "skipped: no torch/transformers/peft" (or "no bitsandbytes") and only
# our numbers are printed. dev/gpu/check.sh runs it through dev/bench/sft_vs_peft.sh (fewer steps, a time
# budget); by hand, after building train_sft:
#   bash dev/bench/sft_vs_peft/run.sh
#   SFT_BENCH_MODES=qlora SFT_BENCH_BATCH=8 bash dev/bench/sft_vs_peft/run.sh
# Environment (all optional):
#   SFT_BENCH_MODES        lora and/or qlora (default "lora qlora")
#   SFT_BENCH_BATCH        rows per step (default 4)
#   SFT_BENCH_MAX_LENGTH   tokens per example at most (default 512; the examples are about 500 long)
#   SFT_BENCH_STEPS        timed steps (default 30)
#   SFT_BENCH_WARMUP       untimed steps before them (default 5)
#   SFT_BENCH_RECOMPUTE    1: activation recomputation on both sides ("recompute": true for ours,
#                          --gradient-checkpointing for peft); default 0, neither
#   SFT_BENCH_DIR          model, data, configs and logs (default ${TMPDIR:-/tmp}/sft_vs_peft)
#   SFT_BENCH_MODEL_ARGS   extra make_model.py arguments (e.g. "--layers 4" for a quick run)
#   SFT_BENCH_SET          extra "key=value" overrides for ./train_sft, space-separated
#   SFT_BENCH_PEFT_ARGS    extra peft_bench.py arguments (e.g. --no-autocast)
#   SFT_BENCH_DEVICE       both sides' device (default cuda; cpu only to try the harness without a GPU)
#   SFT_BENCH_BIN          our binary (default ./train_sft)
#   SFT_BENCH_TIMEOUT_S    time limit per run (default 900)
#   SFT_BENCH_BUDGET_S     time for the whole script (default 0: none); each run's limit is cut to what is
#                          left less a reserve for the table, and a run that no longer fits is skipped, so
#                          that the summary lines come out before an outer limit kills the script
#   PYTHON                 the Python with torch (default python3)
# Exit status: 0 when our runs measured and the PyTorch runs measured or were skipped (no torch, no
# bitsandbytes, no time left); 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root" || exit 1
here=dev/bench/sft_vs_peft

modes=${SFT_BENCH_MODES:-lora qlora}
batch=${SFT_BENCH_BATCH:-4}
max_length=${SFT_BENCH_MAX_LENGTH:-512}
steps=${SFT_BENCH_STEPS:-30}
warmup=${SFT_BENCH_WARMUP:-5}
recompute=${SFT_BENCH_RECOMPUTE:-0}
work=${SFT_BENCH_DIR:-${TMPDIR:-/tmp}/sft_vs_peft}
device=${SFT_BENCH_DEVICE:-cuda}
bin=${SFT_BENCH_BIN:-./train_sft}
timeout_s=${SFT_BENCH_TIMEOUT_S:-900}
budget_s=${SFT_BENCH_BUDGET_S:-0}
python=${PYTHON:-python3}
read -r -a model_args <<<"${SFT_BENCH_MODEL_ARGS:-}"
read -r -a overrides <<<"${SFT_BENCH_SET:-}"
read -r -a peft_args <<<"${SFT_BENCH_PEFT_ARGS:-}"
lora_r=16
lora_alpha=32
# Seconds kept back from the budget for timeout's --kill-after, the parsing and the table.
reserve_s=20

if [ ! -x "$bin" ]; then
  echo "run.sh: $bin not found; build it first (make train_sft)" >&2
  echo "summary: sft vs peft: FAILED ($bin not built)"
  exit 1
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
if [ "$device" = cuda ] && [ -z "$gpu" ]; then
  echo "summary: sft vs peft: skipped (no GPU seen by nvidia-smi)"
  exit 0
fi
echo "GPU: ${gpu:-none}   device: $device"
mkdir -p "$work" || exit 1

# set_limit NAME: sets $limit to the time limit for the next run, or to "" (the run is then recorded as
# skipped) when the budget leaves under 15 s, too little for any run to start up and measure.
set_limit() {
  limit=$timeout_s
  [ "$budget_s" -gt 0 ] || return 0
  local left=$((budget_s - SECONDS - reserve_s))
  if [ "$left" -lt 15 ]; then
    echo "== $1: skipped: no time left (${SECONDS}s of a ${budget_s}s budget used)"
    limit=""
  elif [ "$left" -lt "$limit" ]; then
    limit=$left
  fi
}

# 1. The model and the data (regenerated when make_model.py or its arguments change).
model=$work/model
data=$work/data.jsonl
stamp="$(cksum <"$here/make_model.py") ${model_args[*]}"
if [ ! -f "$work/stamp" ] || [ "$(cat "$work/stamp")" != "$stamp" ] ||
  [ ! -f "$model/model.safetensors" ]; then
  rm -f "$work/stamp"
  echo "== writing the model and data into $work"
  if ! "$python" "$here/make_model.py" --out "$model" --data "$data" "${model_args[@]}"; then
    echo "summary: sft vs peft: FAILED (make_model.py)"
    exit 1
  fi
  echo "$stamp" >"$work/stamp"
  echo "   (${SECONDS}s)"
fi

# What the PyTorch side can run (checked here so that a missing package costs no torch import per mode).
torch_missing=""
if ! "$python" -c "import torch, transformers, peft" >/dev/null 2>&1; then
  torch_missing="no torch"
  "$python" -c "import torch" >/dev/null 2>&1 && torch_missing="no transformers/peft"
fi
bnb_missing=""
# A bitsandbytes wheel staged by dev/gpu/stage.sh is installed into the work folder when the Python has none.
bnb_wheel=$(find "$root/.gpu_deps/wheels" -name 'bitsandbytes-*.whl' 2>/dev/null | head -1)
if ! "$python" -c "import bitsandbytes" >/dev/null 2>&1 && [ -n "$bnb_wheel" ] && [ -z "$torch_missing" ]; then
  echo "== installing the staged $(basename "$bnb_wheel") into $work/site"
  if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$work/site" \
    "$bnb_wheel" >/dev/null 2>&1; then
    export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "   pip could not install it"
  fi
fi
"$python" -c "import bitsandbytes" >/dev/null 2>&1 || bnb_missing="no bitsandbytes"

# Peak of memory.used (MiB) on GPU 0 while a command runs, sampled every 0.2 s into a file.
sampler=""
start_sampler() { # file
  [ -z "$gpu" ] && return 0
  (while :; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1
    sleep 0.2
  done) >"$1" &
  sampler=$!
}
stop_sampler() {
  if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
  fi
  sampler=""
}
idle_memory() {
  [ -n "$gpu" ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1
}

recompute_json=false
if [ "$recompute" = 1 ]; then
  recompute_json=true
  peft_args+=(--gradient-checkpointing)
fi
status=0
results=$work/results.jsonl
: >"$results"
for mode in $modes; do
  case "$mode" in lora | qlora) ;; *)
    echo "run.sh: unknown mode \"$mode\" (lora, qlora)" >&2
    status=1
    continue
    ;;
  esac
  # 2a. Ours.
  cfg=$work/ours_$mode.json
  "$python" - "$cfg" "$model" "$data" "$work/ours_$mode" "$mode" "$batch" "$max_length" \
    $((warmup + steps)) "$device" "$lora_r" "$lora_alpha" "$recompute_json" <<'EOF'
import json, sys
cfg, model, data, out, mode, batch, max_length, max_steps, device, r, alpha, recompute = sys.argv[1:13]
c = {"base_model": model, "train_file": data, "val_fraction": 0, "max_length": int(max_length),
     "batch_size": int(batch), "gradient_accumulation_steps": 1, "max_steps": int(max_steps), "lr": 1e-4,
     "warmup_steps": 0, "scheduler": "none", "weight_decay": 0.0, "grad_clip": 1.0, "optimizer": "adamw",
     "use_lora": True, "lora_preset": "all", "lora_r": int(r), "lora_alpha": float(alpha),
     "lora_dropout": 0.0,
     "completion_only_loss": True, "packing": False, "eval_every": 0, "save_every": 0, "log_every": 1,
     "sample_prompts": [], "seed": 42, "recompute": recompute == "true", "output_dir": out, "device": device}
if mode == "qlora":
    c["load_in_4bit"] = True
    c["bnb_4bit_use_double_quant"] = True
json.dump(c, open(cfg, "w"), indent=2)
EOF
  set_args=()
  for o in "${overrides[@]}"; do set_args+=(--set "$o"); done
  log=$work/ours_$mode.log
  set_limit "ours $mode"
  if [ -z "$limit" ]; then
    echo "{\"impl\": \"ours\", \"mode\": \"$mode\", \"skipped\": \"no time left\"}" >>"$results"
  else
    echo "== ours $mode: $bin -c $cfg --fresh ${set_args[*]} (limit ${limit}s)"
    # A stale metrics.jsonl must not be read as this run's.
    rm -f "$work/ours_$mode/metrics.jsonl"
    idle=$(idle_memory)
    start_sampler "$work/ours_$mode.mem"
    timeout --kill-after=10 "$limit" "$bin" -c "$cfg" --fresh "${set_args[@]}" >"$log" 2>&1
    rc=$?
    stop_sampler
    grep -E "^(model|lora|memory plan|data|batches):" "$log"
    grep -E "^step " "$log" | tail -2
    "$python" - "$log" "$rc" "$warmup" "$mode" "$work/ours_$mode.mem" "${idle:-}" \
      "$work/ours_$mode/metrics.jsonl" "$limit" >>"$results" <<'EOF'
import json, re, sys
log, rc, warmup, mode, mem, idle, metrics, limit = sys.argv[1:9]
rc, warmup = int(rc), int(warmup)
text = open(log, errors="replace").read()
r = {"impl": "ours", "mode": mode}
plan = re.search(r"^memory plan:.*\| total ([0-9.]+) MB", text, re.M)
if plan:
    r["plan_total_mb"] = float(plan.group(1))
nf4 = re.search(r"nf4 base ([0-9.]+) MB \(([0-9.]+) bytes per base parameter\)", text)
if nf4:
    r["nf4_bytes_per_param"] = float(nf4.group(2))
trainable = re.search(r"^lora:.*\| (\d+) trainable parameters", text, re.M)
if trainable:
    r["trainable_parameters"] = int(trainable.group(1))
try:
    samples = [float(x) for x in open(mem).read().split() if x.strip()]
    if samples and idle:
        r["device_peak_mb"] = max(samples) - float(idle)
except (OSError, ValueError):
    pass
# Total tokens over total time of the steps after the warm-up, from the per-step metrics.
rows = []
try:
    for line in open(metrics):
        m = json.loads(line)
        if "tokens_seen" in m and "elapsed_s" in m:
            rows.append(m)
except (OSError, ValueError):
    pass
base = [m for m in rows if m["step"] == warmup] if warmup > 0 else [{"tokens_seen": 0, "elapsed_s": 0.0}]
timed = [m for m in rows if m["step"] > warmup]
if rc != 0:
    last = [l for l in text.splitlines() if l.strip()]
    r["failed"] = (f"timed out after {limit} s" if rc in (124, 137) else
                   f"exit status {rc}: {last[-1][:80] if last else 'no output'}")
elif not base or not timed:
    r["failed"] = f"no per-step metrics after {warmup} warm-up steps"
else:
    tokens = timed[-1]["tokens_seen"] - base[0]["tokens_seen"]
    seconds = timed[-1]["elapsed_s"] - base[0]["elapsed_s"]
    r.update(tokens_per_s=tokens / seconds, timed_steps=len(timed), tokens=tokens, seconds=seconds,
             tokens_per_step=tokens / len(timed), first_loss=rows[0].get("loss"),
             last_loss=rows[-1].get("loss"))
print(json.dumps(r))
EOF
  fi

  # 2b. Theirs.
  missing=$torch_missing
  [ -z "$missing" ] && [ "$mode" = qlora ] && missing=$bnb_missing
  if [ -n "$missing" ]; then
    echo "== peft $mode: skipped: $missing"
    echo "{\"impl\": \"peft\", \"mode\": \"$mode\", \"skipped\": \"$missing\"}" >>"$results"
    continue
  fi
  set_limit "peft $mode"
  if [ -z "$limit" ]; then
    echo "{\"impl\": \"peft\", \"mode\": \"$mode\", \"skipped\": \"no time left\"}" >>"$results"
    continue
  fi
  log=$work/peft_$mode.log
  echo "== peft $mode: $python $here/peft_bench.py --mode $mode --device $device ${peft_args[*]}" \
    "(limit ${limit}s)"
  idle=$(idle_memory)
  start_sampler "$work/peft_$mode.mem"
  timeout --kill-after=10 "$limit" "$python" "$here/peft_bench.py" --model "$model" --data "$data" \
    --mode "$mode" --device "$device" --max-length "$max_length" --batch-size "$batch" --steps "$steps" \
    --warmup "$warmup" --r "$lora_r" --alpha "$lora_alpha" --dropout 0 "${peft_args[@]}" >"$log" 2>&1
  rc=$?
  stop_sampler
  grep -E "^peft_bench: (step|model|[0-9]+ examples|warning)" "$log" | tail -4
  "$python" - "$log" "$rc" "$mode" "$work/peft_$mode.mem" "${idle:-}" "$limit" >>"$results" <<'EOF'
import json, sys
log, rc, mode, mem, idle, limit = sys.argv[1:7]
rc = int(rc)
lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
r = None
for line in reversed(lines):
    if line.startswith("{"):
        try:
            r = json.loads(line)
            break
        except ValueError:
            pass
if r is None or rc not in (0, 3):  # 3: peft_bench's "skipped"
    why = (f"timed out after {limit} s" if rc in (124, 137) else
           f"exit status {rc}: {lines[-1][:80] if lines else 'no output'}")
    r = {"impl": "peft", "mode": mode, "failed": why}
try:
    samples = [float(x) for x in open(mem).read().split() if x.strip()]
    if samples and idle:
        r["device_peak_mb"] = max(samples) - float(idle)
except (OSError, ValueError):
    pass
print(json.dumps(r))
EOF
done

# 3. The table and the summary lines.
"$python" - "$results" "$batch" "$max_length" "$lora_r" "$lora_alpha" "${gpu:-cpu}" "$work" \
  "${model_args[*]}" "$steps" "$warmup" "$recompute" <<'EOF'
import json, sys
path, batch, max_length, r, alpha, gpu, work, model_args, steps, warmup, recompute = sys.argv[1:12]
rows = [json.loads(l) for l in open(path) if l.strip()]
by = {(x["impl"], x["mode"]): x for x in rows}
modes = [m for m in ("lora", "qlora") if any(k[1] == m for k in by)]
def mb(x, key):
    return f"{x[key]:,.0f}" if key in x else "-"
def num(x, key):
    return f"{x[key]:,.0f}" if key in x else "-"
print()
shape = f"make_model.py {model_args}" if model_args.strip() else "Qwen2-0.5B shape"
rc_note = ", recompute" if recompute == "1" else ""
print(f"SFT on {gpu}: {shape} (random weights), batch {batch} x up to {max_length} tokens, LoRA r {r} "
      f"alpha {alpha} on all projections{rc_note}, AdamW, {steps} timed steps after {warmup}; logs in {work}")
print(f"{'mode':6} {'impl':5} {'tokens/s':>10} {'tok/step':>8} {'alloc MB':>9} {'device MB':>10} "
      f"{'trainable':>10}  note")
bad = False
for m in modes:
    for impl in ("ours", "peft"):
        x = by.get((impl, m))
        if x is None:
            continue
        alloc = mb(x, "plan_total_mb") if impl == "ours" else mb(x, "max_memory_allocated_mb")
        note = x.get("failed") or (f"skipped: {x['skipped']}" if "skipped" in x else "")
        if not note and impl == "ours":
            note = "alloc = memory plan"
            if "nf4_bytes_per_param" in x:
                note += f"; NF4 {x['nf4_bytes_per_param']:.3f} bytes/base param"
        elif not note:
            versions = " ".join(f"{k} {v}" for k, v in x.get("versions", {}).items())
            note = "alloc = max_memory_allocated; " + versions
        if "first_loss" in x and "last_loss" in x and x["first_loss"] is not None:
            note += f"; loss {x['first_loss']:.3f} -> {x['last_loss']:.3f}"
        print(f"{m:6} {impl:5} {num(x, 'tokens_per_s'):>10} {num(x, 'tokens_per_step'):>8} {alloc:>9} "
              f"{mb(x, 'device_peak_mb'):>10} {num(x, 'trainable_parameters'):>10}  {note}")
        if "failed" in x or (impl == "ours" and "tokens_per_s" not in x):
            bad = True  # peft may be skipped; ours must measure
    ours, peft = by.get(("ours", m), {}), by.get(("peft", m), {})
    if "tokens_per_s" in ours and "tokens_per_s" in peft:
        mem = ""
        if ours.get("device_peak_mb") and peft.get("device_peak_mb"):
            mem = f", {ours['device_peak_mb'] / peft['device_peak_mb']:.2f}x device memory"
        print(f"{m:6} ratio {ours['tokens_per_s'] / peft['tokens_per_s']:>9.2f}x  ours / peft tokens/s{mem}")
    if ours.get("trainable_parameters") and peft.get("trainable_parameters") and \
            ours["trainable_parameters"] != peft["trainable_parameters"]:
        print(f"{m:6} warning: the two sides train different parameter counts")
print()

# One short line each (dev/gpu/check.sh keeps 100 characters of a summary line).
def summary(text):
    print(("summary: " + text)[:99])
dev = gpu.replace("NVIDIA ", "")
summary(f"sft vs peft on {dev}: {'0.5B' if not model_args.strip() else 'small'} Qwen2, B={batch} "
        f"L<={max_length} r{r}{rc_note}, {steps} steps after {warmup}")
for m in modes:
    ours, peft = by.get(("ours", m), {}), by.get(("peft", m), {})
    for impl, x in (("ours", ours), ("peft", peft)):
        if "tokens_per_s" in x:
            alloc = (f"{mb(x, 'plan_total_mb')} MB plan" if impl == "ours"
                     else f"{mb(x, 'max_memory_allocated_mb')} MB alloc")
            summary(f"sft {m} {impl}: {x['tokens_per_s']:,.0f} tok/s, {mb(x, 'device_peak_mb')} MB device, "
                    f"{alloc}")
        elif "skipped" in x:
            summary(f"sft {m} {impl}: skipped ({x['skipped']})")
        else:
            summary(f"sft {m} {impl}: FAILED ({x.get('failed', 'no result')})")
    if "tokens_per_s" in ours and "tokens_per_s" in peft:
        line = f"sft {m} ours/peft: {ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x tok/s"
        if ours.get("device_peak_mb") and peft.get("device_peak_mb"):
            line += f", {ours['device_peak_mb'] / peft['device_peak_mb']:.2f}x device memory"
        summary(line)
sys.exit(1 if bad else 0)
EOF
rc=$?
[ "$rc" -eq 0 ] || status=1
exit $status
