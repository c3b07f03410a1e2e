#!/usr/bin/env bash
# dev/gpu/check.sh's entry to the SFT benchmark against transformers + peft (dev/bench/sft_vs_peft/run.sh,
# whose header says what is measured and how): check.sh's bench step runs every dev/bench/*.sh but not the
# sub-folder, and gives each 2 x CHECK_RUN_LIMIT_S (240 s by default). This wrapper runs the full-size
# model (Qwen2-0.5B's shape, about 1 GB written in some 10 s, reused from /tmp on a warm machine) with
# fewer steps and a time budget below that limit, so that run.sh's table and "summary:" lines come out
# even when a run is slow; a run that no longer fits is reported as skipped, not left to be killed.
# Expected on an H200: our LoRA and QLoRA runs and peft's LoRA and QLoRA runs (bitsandbytes from the wheel
# that dev/gpu/stage.sh staged; without it peft's QLoRA is "skipped (no bitsandbytes)").
#
# Usage, from the repository root, after building train_sft:   bash dev/bench/sft_vs_peft.sh
# Environment: run.sh's SFT_BENCH_* and PYTHON variables, all passed through; this script only changes
# the defaults of
#   SFT_BENCH_STEPS      20 timed steps (run.sh's default 30): the steps are cheap, the start-up is not
#   SFT_BENCH_WARMUP     3 warm-up steps (run.sh's 5)
#   SFT_BENCH_TIMEOUT_S  90 s per run (one of ours takes some 15 s, peft's some 30 s with its imports)
#   SFT_BENCH_BUDGET_S   check.sh's limit for this script (CHECK_SCRIPT_LIMIT_S, else 2 x CHECK_RUN_LIMIT_S)
#                        minus 20 s (220 s by default): the margin lets check.sh's timeout find the script
#                        finished
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script_limit=${CHECK_SCRIPT_LIMIT_S:-$((2 * ${CHECK_RUN_LIMIT_S:-120}))}
export SFT_BENCH_STEPS=${SFT_BENCH_STEPS:-20}
export SFT_BENCH_WARMUP=${SFT_BENCH_WARMUP:-3}
export SFT_BENCH_TIMEOUT_S=${SFT_BENCH_TIMEOUT_S:-90}
export SFT_BENCH_BUDGET_S=${SFT_BENCH_BUDGET_S:-$((script_limit - 20))}
exec bash "$here/sft_vs_peft/run.sh"
