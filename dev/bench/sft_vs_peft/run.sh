#!/usr/bin/env bash
# LoRA and QLoRA SFT throughput and memory: ./train_sft ("device": "cuda", bf16) against transformers +
# peft (+ bitsandbytes for QLoRA) on the same random-weight Qwen2-0.5B-shaped model, the same data, sequence
# length, batch, LoRA settings and optimizer, on the same GPU in the same run (DESIGN.md, "Performance
# method": a timing means nothing without its twin beside it).
#
#   1. make_model.py writes the model folder (Qwen2.5-0.5B's shape, random bf16 weights, the fixture Qwen2
#      tokenizer; about 1 GB) and a JSONL of prompt/completion examples, into SFT_BENCH_DIR (kept and
#      reused while the arguments stay the same);
#   2. for each mode (lora, qlora): ./train_sft -c <generated config> (LoRA on all seven projections, r 16,
#      alpha 32, dropout 0, AdamW lr 1e-4 without decay or schedule, grad clip 1.0, completion-only loss,
#      no packing, batch SFT_BENCH_BATCH x up to SFT_BENCH_MAX_LENGTH tokens, no evaluation, checkpoints
#      only at the end; QLoRA: NF4 with double quantisation), then peft_bench.py with the same settings;
#   3. prints a table and "summary:" lines in dev/gpu/check.sh's style.
# Measured: real (non-padding) tokens/s over SFT_BENCH_STEPS steps after SFT_BENCH_WARMUP warm-up steps
# (ours: from the per-step progress lines, as total tokens over total time; theirs: timed around the
# loop); memory three ways: ours from the memory plan line (every device buffer the trainer plans:
# parameters, NF4 base, gradients, optimizer state, activations, scratch), theirs from
# torch.cuda.max_memory_allocated (every tensor PyTorch allocated), and both as the peak of nvidia-smi's
# memory.used during the run minus its value before (this includes the CUDA context, cuBLAS workspaces
# and allocator caching, and is the column the memory ratio uses).
#
# The PyTorch side needs torch, transformers, peft and (for QLoRA) bitsandbytes installed on the GPU
# machine; without them it is reported as "skipped: no torch" (or "no bitsandbytes") and only our numbers
# are printed. dev/gpu/check.sh does not run this script (its bench step runs dev/bench/*.sh only); run it
# by hand after building train_sft:
#   bash dev/bench/sft_vs_peft/run.sh
#   SFT_BENCH_MODES=qlora SFT_BENCH_BATCH=8 bash dev/bench/sft_vs_peft/run.sh
# Environment (all optional):
#   SFT_BENCH_MODES        lora and/or qlora (default "lora qlora")
#   SFT_BENCH_BATCH        rows per step (default 4)
#   SFT_BENCH_MAX_LENGTH   tokens per example at most (default 512; the examples are about 470 long)
#   SFT_BENCH_STEPS        timed steps (default 30)
#   SFT_BENCH_WARMUP       untimed steps before them (default 5)
#   SFT_BENCH_DIR          model, data, configs and logs (default ${TMPDIR:-/tmp}/sft_vs_peft)
#   SFT_BENCH_MODEL_ARGS   extra make_model.py arguments (e.g. "--layers 4" for a quick run)
#   SFT_BENCH_SET          extra "key=value" overrides for ./train_sft, space-separated (e.g. "recompute=true")
#   SFT_BENCH_PEFT_ARGS    extra peft_bench.py arguments (e.g. --gradient-checkpointing)
#   SFT_BENCH_DEVICE       our device (default cuda; cpu only to try the harness on a machine without a GPU)
#   SFT_BENCH_BIN          our binary (default ./train_sft)
#   SFT_BENCH_TIMEOUT_S    time limit per run (default 900)
#   PYTHON                 the Python with torch (default python3)
# Exit status: 0 when our runs measured and the PyTorch runs measured or were skipped for lack of torch;
# 1 otherwise.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
cd "$root" || exit 1
here=dev/bench/sft_vs_peft

modes=${SFT_BENCH_MODES:-lora qlora}
batch=${SFT_BENCH_BATCH:-4}
max_length=${SFT_BENCH_MAX_LENGTH:-512}
steps=${SFT_BENCH_STEPS:-30}
warmup=${SFT_BENCH_WARMUP:-5}
work=${SFT_BENCH_DIR:-${TMPDIR:-/tmp}/sft_vs_peft}
device=${SFT_BENCH_DEVICE:-cuda}
bin=${SFT_BENCH_BIN:-./train_sft}
timeout_s=${SFT_BENCH_TIMEOUT_S:-900}
python=${PYTHON:-python3}
read -r -a model_args <<<"${SFT_BENCH_MODEL_ARGS:-}"
read -r -a overrides <<<"${SFT_BENCH_SET:-}"
read -r -a peft_args <<<"${SFT_BENCH_PEFT_ARGS:-}"
lora_r=16
lora_alpha=32

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
echo "GPU: ${gpu:-none}"
mkdir -p "$work" || exit 1

# 1. The model and the data (regenerated only when the arguments change).
model=$work/model
data=$work/data.jsonl
stamp="make_model.py ${model_args[*]}"
if [ ! -f "$work/stamp" ] || [ "$(cat "$work/stamp")" != "$stamp" ] || [ ! -f "$model/model.safetensors" ]; then
  rm -f "$work/stamp"
  echo "== writing the model and data into $work"
  if ! "$python" "$here/make_model.py" --out "$model" --data "$data" "${model_args[@]}"; then
    echo "summary: sft vs peft: FAILED (make_model.py)"
    exit 1
  fi
  echo "$stamp" >"$work/stamp"
fi

# What the PyTorch side can run.
torch_missing=""
if ! "$python" -c "import torch, transformers, peft" >/dev/null 2>&1; then
  torch_missing="no torch"
  "$python" -c "import torch" >/dev/null 2>&1 && torch_missing="no transformers/peft"
fi
bnb_missing=""
"$python" -c "import bitsandbytes" >/dev/null 2>&1 || bnb_missing="no bitsandbytes"

# Peak of memory.used (MiB) on GPU 0 while a command runs, sampled every 0.2 s into a file.
start_sampler() { # file
  [ -z "$gpu" ] && return
  (while :; do
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1
    sleep 0.2
  done) >"$1" &
  sampler=$!
}
stop_sampler() {
  [ -n "${sampler:-}" ] && kill "$sampler" 2>/dev/null && wait "$sampler" 2>/dev/null
  sampler=""
}
idle_memory() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 2>/dev/null | head -1; }

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
    $((warmup + steps)) "$device" "$lora_r" "$lora_alpha" <<'EOF'
import json, sys
cfg, model, data, out, mode, batch, max_length, max_steps, device, r, alpha = sys.argv[1:12]
c = {"base_model": model, "train_file": data, "val_fraction": 0, "max_length": int(max_length),
     "batch_size": int(batch), "gradient_accumulation_steps": 1, "max_steps": int(max_steps), "lr": 1e-4,
     "warmup_steps": 0, "scheduler": "none", "weight_decay": 0.0, "grad_clip": 1.0, "optimizer": "adamw",
     "use_lora": True, "lora_preset": "all", "lora_r": int(r), "lora_alpha": float(alpha), "lora_dropout": 0.0,
     "completion_only_loss": True, "packing": False, "eval_every": 0, "save_every": 0, "log_every": 1,
     "sample_prompts": [], "seed": 42, "recompute": False, "output_dir": out, "device": device}
if mode == "qlora":
    c["load_in_4bit"] = True
    c["bnb_4bit_use_double_quant"] = True
json.dump(c, open(cfg, "w"), indent=2)
EOF
  set_args=()
  for o in "${overrides[@]}"; do set_args+=(--set "$o"); done
  log=$work/ours_$mode.log
  echo "== ours $mode: $bin -c $cfg --fresh ${set_args[*]}"
  idle=$(idle_memory)
  start_sampler "$work/ours_$mode.mem"
  timeout --kill-after=10 "$timeout_s" "$bin" -c "$cfg" --fresh "${set_args[@]}" >"$log" 2>&1
  rc=$?
  stop_sampler
  grep -E "^(model|lora|memory plan|data|batches):" "$log"
  grep -E "^step " "$log" | tail -3
  "$python" - "$log" "$rc" "$warmup" "$mode" "$work/ours_$mode.mem" "${idle:-}" >>"$results" <<'EOF'
import json, re, sys
log, rc, warmup, mode, mem, idle = sys.argv[1:7]
text = open(log, errors="replace").read()
r = {"impl": "ours", "mode": mode}
rates = [float(m.group(1)) for m in re.finditer(r"^step\s+\d+/\d+ \|.*?\|\s*([0-9.]+) tok/s", text, re.M)]
measured = [x for x in rates[int(warmup):] if x > 0]
plan = re.search(r"^memory plan:.*\| total ([0-9.]+) MB", text, re.M)
if plan:
    r["plan_total_mb"] = float(plan.group(1))
nf4 = re.search(r"nf4 base ([0-9.]+) MB \(([0-9.]+) bytes per base parameter\)", text)
if nf4:
    r["nf4_bytes_per_param"] = float(nf4.group(2))
try:
    samples = [float(x) for x in open(mem).read().split() if x.strip()]
    if samples and idle:
        r["device_peak_mb"] = max(samples) - float(idle)
except (OSError, ValueError):
    pass
if int(rc) != 0 or not measured:
    last = [l for l in text.splitlines() if l.strip()]
    r["failed"] = f"exit status {rc}: {last[-1][:100] if last else 'no output'}" if int(rc) else \
        f"no progress lines after {warmup} warm-up steps"
else:
    r["tokens_per_s"] = len(measured) / sum(1.0 / x for x in measured)
    r["timed_steps"] = len(measured)
print(json.dumps(r))
EOF

  # 2b. Theirs.
  missing=$torch_missing
  [ -z "$missing" ] && [ "$mode" = qlora ] && missing=$bnb_missing
  if [ -n "$missing" ]; then
    echo "== peft $mode: skipped: $missing"
    echo "{\"impl\": \"peft\", \"mode\": \"$mode\", \"skipped\": \"$missing\"}" >>"$results"
    continue
  fi
  log=$work/peft_$mode.log
  echo "== peft $mode: $python $here/peft_bench.py --mode $mode ..."
  idle=$(idle_memory)
  start_sampler "$work/peft_$mode.mem"
  timeout --kill-after=10 "$timeout_s" "$python" "$here/peft_bench.py" --model "$model" --data "$data" \
    --mode "$mode" --max-length "$max_length" --batch-size "$batch" --steps "$steps" --warmup "$warmup" \
    --r "$lora_r" --alpha "$lora_alpha" --dropout 0 "${peft_args[@]}" >"$log" 2>&1
  rc=$?
  stop_sampler
  grep -E "^peft_bench: step" "$log" | tail -2
  "$python" - "$log" "$rc" "$mode" "$work/peft_$mode.mem" "${idle:-}" >>"$results" <<'EOF'
import json, sys
log, rc, mode, mem, idle = sys.argv[1:6]
lines = [l for l in open(log, errors="replace").read().splitlines() if l.strip()]
r = None
for line in reversed(lines):
    if line.startswith("{"):
        try:
            r = json.loads(line)
            break
        except ValueError:
            pass
if r is None or (int(rc) not in (0, 3)):
    r = {"impl": "peft", "mode": mode,
         "failed": f"exit status {rc}: {lines[-1][:100] if lines else 'no output'}"}
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
"$python" - "$results" "$batch" "$max_length" "$lora_r" "$lora_alpha" "${gpu:-cpu}" "$work" "${model_args[*]}" <<'EOF'
import json, sys
path, batch, max_length, r, alpha, gpu, work, model_args = sys.argv[1:9]
rows = [json.loads(l) for l in open(path) if l.strip()]
by = {(x["impl"], x["mode"]): x for x in rows}
modes = [m for m in ("lora", "qlora") if any(k[1] == m for k in by)]
def mb(x, key):
    return f"{x[key]:,.0f}" if key in x else "-"
print()
shape = f"make_model.py {model_args}" if model_args.strip() else "Qwen2-0.5B shape"
print(f"SFT on {gpu}: {shape} (random weights), batch {batch} x up to {max_length} tokens, "
      f"LoRA r {r} alpha {alpha} on all projections, bf16, AdamW; logs in {work}")
print(f"{'mode':6} {'impl':5} {'tokens/s':>10} {'alloc MB':>9} {'device MB':>10}  note")
bad = False
for m in modes:
    for impl in ("ours", "peft"):
        x = by.get((impl, m))
        if x is None:
            continue
        alloc = mb(x, "plan_total_mb") if impl == "ours" else mb(x, "max_memory_allocated_mb")
        note = x.get("failed") or (f"skipped: {x['skipped']}" if "skipped" in x else "")
        if impl == "ours" and "nf4_bytes_per_param" in x:
            note = note or f"NF4 {x['nf4_bytes_per_param']:.3f} bytes/base param; alloc = memory plan"
        elif impl == "ours":
            note = note or "alloc = memory plan"
        elif "versions" in x:
            note = note or "alloc = max_memory_allocated; " + " ".join(f"{k} {v}" for k, v in x["versions"].items())
        tps = f"{x['tokens_per_s']:,.0f}" if "tokens_per_s" in x else "-"
        print(f"{m:6} {impl:5} {tps:>10} {alloc:>9} {mb(x, 'device_peak_mb'):>10}  {note}")
        if "failed" in x:
            bad = True
    ours, peft = by.get(("ours", m), {}), by.get(("peft", m), {})
    if "tokens_per_s" in ours and "tokens_per_s" in peft:
        speed = ours["tokens_per_s"] / peft["tokens_per_s"]
        mem = ""
        if ours.get("device_peak_mb") and peft.get("device_peak_mb"):
            mem = f", {ours['device_peak_mb'] / peft['device_peak_mb']:.2f}x device memory"
        print(f"{m:6} ratio {speed:>9.2f}x{'':>21}  ours / peft tokens/s{mem}")
print()
for m in modes:
    ours, peft = by.get(("ours", m), {}), by.get(("peft", m), {})
    head = f"summary: sft {m} r{r} B={batch} L<={max_length}:"
    if "tokens_per_s" in ours:
        o = f"ours {ours['tokens_per_s']:,.0f} tok/s, {mb(ours, 'device_peak_mb')} MB device ({mb(ours, 'plan_total_mb')} MB plan)"
    else:
        o = f"ours FAILED ({ours.get('failed', 'no result')})"
    if "tokens_per_s" in peft:
        p = f"peft {peft['tokens_per_s']:,.0f} tok/s, {mb(peft, 'device_peak_mb')} MB device ({mb(peft, 'max_memory_allocated_mb')} MB allocated)"
        if "tokens_per_s" in ours:
            p += f" | {ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x tok/s"
            if ours.get("device_peak_mb") and peft.get("device_peak_mb"):
                p += f", {ours['device_peak_mb'] / peft['device_peak_mb']:.2f}x memory"
    elif "skipped" in peft:
        p = f"peft skipped: {peft['skipped']}"
    else:
        p = f"peft FAILED ({peft.get('failed', 'no result')})"
    print(f"{head} {o} | {p}")
sys.exit(1 if bad else 0)
EOF
[ $? -eq 0 ] || status=1
exit $status
