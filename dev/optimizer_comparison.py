#!/usr/bin/env python3
"""Pretrains the demo model (train/configs/demo.json) once per optimizer and prints a Markdown table:
final validation loss, time per step and optimizer-state memory.

Usage (from the repository root, after `make train_pretrain`):
    python3 dev/optimizer_comparison.py [--steps 100] [--out /tmp/optimizer_comparison]

Every run uses the demo config with the same seed, data, batch, schedule shape and number of steps;
only the optimizer, its learning rate (and, for Lion, the weight decay) change. See LEARNING_RATES.

Columns:
  val loss       the last "val_loss" record of the run's metrics.jsonl (evaluated at the final step)
  ms/step        (elapsed_s at the last logged step - elapsed_s at the first) / steps between them,
                 from metrics.jsonl: start-up and the first log interval are left out; Sophia's
                 Hessian-estimate passes (every sophia_k steps) are included
  state MB       the "optimizer" figure of the "memory plan:" line the trainer prints (MiB, 1 decimal)
  B/param        that figure in bytes divided by the trainable parameter count (from the plan, so only
                 as precise as its one decimal; the exact per-optimizer value is in the notes)
Only the Python standard library is used.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

# optimizer -> (--set overrides). Why these values: see dev/optimizer_comparison.md.
LEARNING_RATES = {
    "adamw": ["lr=3e-3"],
    "adamw_8bit": ["lr=3e-3"],
    # Lion moves every coordinate by lr: 10x below AdamW, and 10x the weight decay so lr*wd is unchanged.
    "lion": ["lr=3e-4", "weight_decay=1.0"],
    # Muon's orthogonalised update has unit spectral norm; 0.02 is the reference value. Its AdamW side
    # (embeddings, norms) runs at muon_adamw_lr_scale 0.1 x lr = 2e-3. fp32 NS is 4-5x cheaper than fp64.
    "muon": ["lr=0.02", "muon_ns_precision=fp32"],
    # Sophia's clipped step is at most lr per coordinate (sign-like): between Lion's and AdamW's lr.
    "sophia": ["lr=1e-3"],
    # With adafactor_scale_parameter (default true) lr is relative to RMS(P); 1e-2 is transformers'
    # relative-step value.
    "adafactor": ["lr=1e-2"],
}


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--out", default="/tmp/optimizer_comparison")
    ap.add_argument("--binary", default="./train_pretrain")
    ap.add_argument("--config", default="train/configs/demo.json")
    ap.add_argument("--optimizers", default=",".join(LEARNING_RATES))
    return ap.parse_args()


def run_one(args, name):
    out_dir = os.path.join(args.out, name)
    os.makedirs(out_dir, exist_ok=True)
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    sets = [
        f"optimizer={name}",
        f"max_steps={args.steps}",
        f"warmup_steps={args.warmup}",
        f"eval_every={args.steps}",
        f"save_every={args.steps}",
        "log_every=10",
        f"output_dir={out_dir}",
    ] + LEARNING_RATES[name]
    cmd = [args.binary, "-c", args.config]
    for s in sets:
        cmd += ["--set", s]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    with open(os.path.join(out_dir, "stdout.txt"), "w") as f:
        f.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: train_pretrain exited with {proc.returncode}; see {out_dir}/stdout.txt")

    plan = re.search(r"memory plan: params ([\d.]+) MB .*optimizer ([\d.]+) MB", proc.stdout)
    params_line = re.search(r"model: ([\d.]+)M parameters", proc.stdout)
    train, val = [], None
    with open(metrics) as f:
        for line in f:
            rec = json.loads(line)
            if "val_loss" in rec:
                val = rec["val_loss"]
            elif "elapsed_s" in rec:
                train.append(rec)
    ms = float("nan")
    if len(train) >= 2:
        ms = 1e3 * (train[-1]["elapsed_s"] - train[0]["elapsed_s"]) / (train[-1]["step"] - train[0]["step"])
    params_mb = float(plan.group(1)) if plan else float("nan")
    state_mb = float(plan.group(2)) if plan else float("nan")
    # fp32 parameters on the CPU backend: 4 bytes each, so the trainable count is params MB / 4.
    bytes_per_param = 4.0 * state_mb / params_mb if plan and params_mb > 0 else float("nan")
    return {
        "optimizer": name,
        "settings": ", ".join(LEARNING_RATES[name]),
        "val_loss": val,
        "final_train_loss": train[-1]["loss"] if train else None,
        "ms_per_step": ms,
        "state_mb": state_mb,
        "bytes_per_param": bytes_per_param,
        "params_m": float(params_line.group(1)) if params_line else None,
        "wall_s": wall,
    }


def main():
    args = parse_args()
    names = [n for n in args.optimizers.split(",") if n]
    rows = [run_one(args, n) for n in names]
    print(f"Demo model ({rows[0]['params_m']}M parameters), {args.steps} steps, warmup {args.warmup}, "
          f"same seed and data for every optimizer.\n")
    print("| optimizer | settings | final val loss | final train loss | ms/step | optimizer state (plan) "
          "| bytes/param (plan) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "n/a"
        tr = f"{r['final_train_loss']:.4f}" if r["final_train_loss"] is not None else "n/a"
        print(f"| {r['optimizer']} | {r['settings']} | {val} | {tr} | {r['ms_per_step']:.0f} | "
              f"{r['state_mb']:.1f} MB | {r['bytes_per_param']:.2f} |")


if __name__ == "__main__":
    main()
