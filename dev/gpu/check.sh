#!/usr/bin/env bash
# The one script for GPU runs (DESIGN.md, "GPU runs"). On a machine with an NVIDIA GPU, the CUDA toolkit
# and CMake, but no apt and no internet, it:
#   1. deps      builds GoogleTest from the sources staged in .gpu_deps/ (see dev/gpu/stage.sh) and points
#                CMake at the staged nlohmann_json and PCRE2 (and pkg-config, if the machine has none);
#   2. build     configures and builds everything for the local GPU (CMakeLists.txt picks 'native' when
#                nvidia-smi works);
#   3. cuda      runs every CUDA test binary (tests/cuda/test_*, tests/train/test_cuda_*,
#                tests/model/test_hf_equal): one row each, skips counted as warnings since a GPU machine
#                should skip nothing;
#   4. bench     builds every dev/bench/*.cu with the nvcc command documented in its header (with our -o
#                and -arch=native; a file without one is linked against the built libllm_cuda.a) and runs
#                it, then runs every dev/bench/*.sh (e.g. e2e_pretrain.sh, end-to-end tokens/s and MFU);
#                lines starting with "summary:" go into the table;
#   5. ctest     the whole ctest suite (CPU tests included; about 12 s on the CPU);
#   6. sanitize  compute-sanitizer memcheck and racecheck on each CUDA test binary, with a short filter, as
#                time allows (the slowest step, so it comes last).
# Every step runs even when an earlier one failed; the table at the end gives each step's status.
#
# Usage, from the repository root:   bash dev/gpu/check.sh
# Before sending the tree to the GPU machine, on the build machine:   bash dev/gpu/stage.sh
# With the device tool: carry [".gpu_deps"], and give the command a timeout above CHECK_BUDGET_S.
#
# Environment (all optional):
#   OUT                    full logs go here (default $CHECK_BUILD_DIR/check-logs): env.log, build.log,
#                          tests.log, bench.log, sanitize.log, ctest.log, summary.txt
#   CHECK_BUILD_DIR        build directory (default build-gpu; kept between runs on a warm machine)
#   CHECK_BUDGET_S         wall-clock budget in seconds, default 540; a step that no longer fits is cut
#                          short or skipped, and the table is still printed; 0 means no budget
#   CHECK_STEPS            which steps, comma-separated, in this fixed order: deps,build,cuda,bench,ctest,sanitize
#                          (default all). E.g. a second call: CHECK_STEPS=deps,build,ctest,sanitize
#   CHECK_TARGETS          space-separated CMake targets to build (default: all)
#   CHECK_TESTS            space-separated CUDA test binary names to run/sanitize (default: as in step 3)
#   CHECK_RUN_LIMIT_S      time limit of each test binary, .cu benchmark and ctest test (default 120; 2x for
#                          each .sh benchmark), so that one hung kernel cannot eat the whole budget
#   CHECK_SANITIZE_TOOLS   compute-sanitizer tools, space-separated (default "memcheck racecheck")
#   CHECK_SANITIZE_FILTER  gtest filter for the sanitizer runs (default '-*Large*:*DeterministicRuns*': the
#                          sweeps and repeat loops add nothing new under a sanitizer, and racecheck runs the
#                          attention tests alone for about 160 s on an H200 with them)
#   CHECK_SANITIZE_TESTS   space-separated CUDA test binaries for the sanitizer runs (default: CHECK_TESTS)
#   CHECK_CMAKE_ARGS       extra CMake configure arguments, space-separated (the build already keeps warnings
#                          as warnings, -DLLM_WARNINGS_AS_ERRORS=OFF, and counts them in its row)
#   CHECK_BENCHES          space-separated benchmark names to run in step 4, .cu and .sh alike (default: all),
#                          e.g. "bench_attention bench_memory_kernels"
#   CHECK_BENCH_ARGS_<name>  arguments for benchmark <name> (e.g. CHECK_BENCH_ARGS_bench_attention="4 16 2048")
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root" || exit 1

start_s=$(date +%s)
budget_s=${CHECK_BUDGET_S:-540}
reserve_s=10 # kept back for the summary
build=${CHECK_BUILD_DIR:-build-gpu}
case "$build" in /*) ;; *) build=$root/$build ;; esac
deps=$root/.gpu_deps
logs=${OUT:-$build/check-logs}
steps=",${CHECK_STEPS:-deps,build,cuda,bench,ctest,sanitize},"
jobs=$(nproc 2>/dev/null || echo 8)
sanitize_filter=${CHECK_SANITIZE_FILTER:--*Large*:*DeterministicRuns*}
read -r -a sanitize_tools <<<"${CHECK_SANITIZE_TOOLS:-memcheck racecheck}"
run_limit=${CHECK_RUN_LIMIT_S:-120}
mkdir -p "$logs" "$build/check-tmp" || exit 1
for f in env build tests bench sanitize ctest; do : >"$logs/$f.log"; done

rows=()
failures=0
add_row() { # name status seconds note
  rows+=("$1"$'\x1f'"$2"$'\x1f'"$3"$'\x1f'"$4")
  case "$2" in FAIL* | TIMEOUT* | MISSING*) failures=$((failures + 1)) ;; esac
}
want() { [[ "$steps" == *",$1,"* ]]; }
elapsed() { echo $(($(date +%s) - start_s)); }
remaining() {
  if [ "$budget_s" -le 0 ]; then echo 1000000; else echo $((budget_s - $(elapsed) - reserve_s)); fi
}
status_of() { # rc -> status word
  case "$1" in
  0) echo ok ;;
  124 | 137) echo TIMEOUT ;;
  200) echo skipped ;;
  *) echo "FAIL($1)" ;;
  esac
}
# run LOG LIMIT_S CMD...: appends the output to LOG; rc 124 on timeout, 200 when no budget is left.
run() {
  local log=$1 limit=$2
  shift 2
  local rem
  rem=$(remaining)
  if [ "$rem" -lt 5 ]; then
    echo "+ (skipped, budget spent) $*" >>"$log"
    return 200
  fi
  [ "$limit" -gt "$rem" ] && limit=$rem
  echo "+ $* (limit ${limit}s)" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
}
short() { tr '\n' ' ' | sed -e 's/[[:space:]]\+/ /g' -e 's/^ //' | cut -c1-"${1:-90}"; }

# --- environment --------------------------------------------------------------------------------------
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then export PATH=/usr/local/cuda/bin:$PATH; fi
nvcc_bin=$(command -v nvcc || true)
sanitizer=$(command -v compute-sanitizer || true)
[ -z "$sanitizer" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && sanitizer=/usr/local/cuda/bin/compute-sanitizer
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)   root: $root   build: $build"
  uname -a
  nvidia-smi 2>&1 | head -20
  echo "nvcc: ${nvcc_bin:-missing}"; [ -n "$nvcc_bin" ] && nvcc --version | tail -2
  echo "cmake: $(command -v cmake || echo missing)"; cmake --version 2>&1 | head -1
  echo "c++: $(command -v c++ || echo missing)"; c++ --version 2>&1 | head -1
  echo "ninja: $(command -v ninja || echo missing)   make: $(command -v make || echo missing)"
  echo "pkg-config: $(command -v pkg-config || echo missing)"
  echo "compute-sanitizer: ${sanitizer:-missing}"
  echo "python3: $(command -v python3 || echo missing)"
  [ -f "$deps/MANIFEST" ] && cat "$deps/MANIFEST"
} >>"$logs/env.log" 2>&1
gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
if [ -n "$gpu" ]; then add_row gpu ok 0 "$gpu"; else add_row gpu "FAIL" 0 "nvidia-smi sees no GPU"; fi
[ -z "$nvcc_bin" ] && add_row nvcc "FAIL" 0 "nvcc not found (PATH, /usr/local/cuda/bin)"

# The generator: keep the one an existing build folder was made with.
generator=""
if [ -f "$build/CMakeCache.txt" ]; then
  generator=$(sed -n 's/^CMAKE_GENERATOR:INTERNAL=//p' "$build/CMakeCache.txt")
elif command -v ninja >/dev/null; then
  generator=Ninja
else
  generator="Unix Makefiles"
fi
keep_going=(-k)
[ "$generator" = Ninja ] && keep_going=(-k 0)

# --- 1. deps ------------------------------------------------------------------------------------------
# Warnings stay warnings here (CI, which compiles every file too, keeps them errors): a newer compiler's new
# warning must not cost the scarce GPU time. The build row counts them.
cmake_args=(-DCMAKE_BUILD_TYPE=Release -DLLM_WARNINGS_AS_ERRORS=OFF)
[ -n "$nvcc_bin" ] && cmake_args+=(-DCMAKE_CUDA_COMPILER="$nvcc_bin")
read -r -a extra_cmake_args <<<"${CHECK_CMAKE_ARGS:-}"
cmake_args+=("${extra_cmake_args[@]}")
prefixes=()
gtest_prefix=$build/_gtest/install
if want deps || want build; then
  t0=$(date +%s)
  note=""
  st=ok
  if [ ! -d "$deps" ]; then
    st=WARN
    note="no .gpu_deps (run dev/gpu/stage.sh and carry it); relying on system packages"
  else
    if [ -f "$gtest_prefix/lib/cmake/GTest/GTestConfig.cmake" ]; then
      note="GTest already built;"
    elif [ -f "$deps/googletest/CMakeLists.txt" ]; then
      # CMAKE_POLICY_VERSION_MINIMUM lets CMake >= 4 configure googletest's old cmake_minimum_required.
      run "$logs/env.log" 300 cmake -S "$deps/googletest" -B "$build/_gtest/build" -G "$generator" \
        -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$gtest_prefix" -DCMAKE_INSTALL_LIBDIR=lib \
        -DBUILD_GMOCK=ON -DCMAKE_POLICY_VERSION_MINIMUM=3.5 &&
        run "$logs/env.log" 300 cmake --build "$build/_gtest/build" -j "$jobs" &&
        run "$logs/env.log" 120 cmake --install "$build/_gtest/build"
      rc=$?
      if [ $rc -eq 0 ]; then note="GTest built from .gpu_deps;"; else st=$(status_of $rc); note="GTest build failed (env.log);"; fi
    fi
    [ -f "$gtest_prefix/lib/cmake/GTest/GTestConfig.cmake" ] && prefixes+=("$gtest_prefix") &&
      cmake_args+=(-DGTest_DIR="$gtest_prefix/lib/cmake/GTest")
    if [ -f "$deps/share/cmake/nlohmann_json/nlohmann_jsonConfig.cmake" ]; then
      prefixes+=("$deps")
      cmake_args+=(-Dnlohmann_json_DIR="$deps/share/cmake/nlohmann_json")
      note="$note nlohmann staged;"
    fi
    if [ -f "$deps/lib/pkgconfig/libpcre2-8.pc" ]; then
      export PKG_CONFIG_PATH="$deps/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
      note="$note pcre2 staged;"
    fi
    if ! command -v pkg-config >/dev/null && [ -x "$deps/bin/pkg-config" ]; then
      cmake_args+=(-DPKG_CONFIG_EXECUTABLE="$deps/bin/pkg-config")
      note="$note staged pkg-config;"
    fi
  fi
  add_row deps "$st" $(($(date +%s) - t0)) "$note"
fi
if [ ${#prefixes[@]} -gt 0 ]; then
  prefix_path=$(IFS=';'; echo "${prefixes[*]}")
  cmake_args+=(-DCMAKE_PREFIX_PATH="$prefix_path")
fi

# --- 2. build -----------------------------------------------------------------------------------------
if want build; then
  t0=$(date +%s)
  run "$logs/build.log" 300 cmake -S "$root" -B "$build" -G "$generator" "${cmake_args[@]}"
  rc=$?
  if [ $rc -ne 0 ]; then
    add_row configure "$(status_of $rc)" $(($(date +%s) - t0)) "$(grep -m3 -i 'error' "$logs/build.log" | short)"
  else
    cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1)
    arch="80;90 (no GPU seen)"
    [ -n "$cc" ] && arch="native (sm_${cc/./})"
    add_row configure ok $(($(date +%s) - t0)) "$generator; CUDA arch $arch"
    t0=$(date +%s)
    targets=()
    for t in ${CHECK_TARGETS:-}; do targets+=(--target "$t"); done
    run "$logs/build.log" 1200 cmake --build "$build" -j "$jobs" "${targets[@]}" -- "${keep_going[@]}"
    rc=$?
    note=""
    [ $rc -ne 0 ] && note=$(grep -E -m3 'FAILED:|error:|Error [0-9]' "$logs/build.log" | short)
    warnings=$(grep -c -E 'warning( #[0-9A-Z-]+-D)?:' "$logs/build.log")
    st=$(status_of $rc)
    [ "$st" = ok ] && [ "$warnings" -gt 0 ] && st=WARN
    [ "$warnings" -gt 0 ] && note="$warnings compiler warning(s), see build.log; $note"
    add_row build "$st" $(($(date +%s) - t0)) "$note"
  fi
fi

# --- 3. cuda tests ------------------------------------------------------------------------------------
cuda_tests=()
if [ -n "${CHECK_TESTS:-}" ]; then
  read -r -a cuda_tests <<<"$CHECK_TESTS"
else
  # The kernel tests, and the backend and optimizer tests that need a GPU (they live in tests/train).
  # test_hf_equal: its HfEqualCuda tests check the whole CUDA model against transformers.
  for src in tests/cuda/test_*.cu tests/cuda/test_*.cpp tests/train/test_cuda_*.cpp tests/model/test_hf_equal.cpp; do
    [ -e "$src" ] || continue
    name=$(basename "$src")
    cuda_tests+=("${name%.*}")
  done
fi
# gtest's closing lines -> "P passed, F failed, S skipped"
gtest_counts() {
  local f=$1 p fl s
  p=$(sed -n 's/^\[  PASSED  \] \([0-9]*\) tests\{0,1\}\..*/\1/p' "$f" | tail -1)
  fl=$(sed -n 's/^\[  FAILED  \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$f" | tail -1)
  s=$(sed -n 's/^\[  SKIPPED \] \([0-9]*\) tests\{0,1\}, listed below.*/\1/p' "$f" | tail -1)
  echo "${p:-0} ${fl:-0} ${s:-0}"
}
if want cuda; then
  for name in "${cuda_tests[@]}"; do
    bin=$build/tests/$name
    if [ ! -x "$bin" ]; then
      add_row "test $name" MISSING 0 "not built (build.log)"
      continue
    fi
    t0=$(date +%s)
    tmp=$build/check-tmp/$name.log
    : >"$tmp"
    run "$tmp" "$run_limit" "$bin" --gtest_color=no
    rc=$?
    cat "$tmp" >>"$logs/tests.log"
    read -r np nf ns <<<"$(gtest_counts "$tmp")"
    st=$(status_of $rc)
    note="$np passed, $nf failed, $ns skipped"
    if [ $rc -eq 0 ] && [ "$ns" != 0 ]; then st=WARN; fi
    if [ $rc -ne 0 ] && [ $rc -ne 200 ]; then
      note="$note: $(sed -n 's/^\[  FAILED  \] \([^ ]*\).*/\1/p' "$tmp" | grep -v '^[0-9]' | sort -u | short 70)"
    fi
    add_row "test $name" "$st" $(($(date +%s) - t0)) "$note"
  done
fi

# --- 4. benchmarks ------------------------------------------------------------------------------------
# The nvcc command documented in a benchmark's header comment, with -o and -arch replaced. Without a GPU
# (a dry run), -arch=native would fall back to nvcc's default sm_75, which lacks bf16 tensor-core code.
bench_arch=native
[ -z "$gpu" ] && bench_arch=sm_90
bench_command() { # file output
  python3 - "$1" "$2" "$build/libllm_cuda.a" "$bench_arch" <<'EOF'
import re, shlex, sys
path, out, lib, arch = sys.argv[1:5]
cmd = None
for line in open(path, encoding="utf-8", errors="replace").read().splitlines()[:80]:
    s = line.strip()
    if s.startswith("//") and "nvcc " in s:
        cmd = s[s.index("nvcc "):]
        break
if cmd is None:  # no documented command: link against the CMake-built kernels
    cmd = f"nvcc -O3 -std=c++17 -I. {path} {lib} -lcublasLt -lcublas -Xcompiler -fopenmp"
tokens = []
for t in shlex.split(cmd):
    if t in ("&&", "||", ";", "|", "\\") or t.startswith("#"):  # the build command ends there
        break
    tokens.append(t)
result, skip = [], False
for i, t in enumerate(tokens):
    if skip:
        skip = False
        continue
    if t == "-o":
        skip = True
        continue
    if t.startswith("-o") and len(t) > 2 and not t.startswith("-opt"):
        continue
    if re.match(r"^(-arch|--gpu-architecture)(=|$)", t) or re.match(r"^-gencode", t):
        if "=" not in t:
            skip = True
        continue
    result.append(t)
result += [f"-arch={arch}", "-o", out]
print(shlex.join(result))
EOF
}
# bench_rows NAME RC T0 LOG: the table rows of one benchmark run, one per "summary:" line of its log (or
# its last line when it printed none).
bench_rows() {
  local name=$1 rc=$2 t0=$3 log=$4 summary first line
  summary=$(grep '^summary:' "$log" | sed 's/^summary: *//')
  if [ -n "$summary" ]; then
    first=1
    while IFS= read -r line; do
      if [ $first -eq 1 ]; then
        add_row "bench $name" "$(status_of "$rc")" $(($(date +%s) - t0)) "$(echo "$line" | short 100)"
        first=0
      else
        rows+=("  "$'\x1f'""$'\x1f'""$'\x1f'"$(echo "$line" | short 100)")
      fi
    done <<<"$summary"
  else
    add_row "bench $name" "$(status_of "$rc")" $(($(date +%s) - t0)) "$(grep -v '^[[:space:]]*$' "$log" | tail -1 | short 100)"
  fi
}
bench_wanted() { [ -z "${CHECK_BENCHES:-}" ] || [[ " $CHECK_BENCHES " == *" $1 "* ]]; }
if want bench; then
  mkdir -p "$build/bench"
  benches=()
  for src in dev/bench/*.cu; do
    [ -e "$src" ] && bench_wanted "$(basename "$src" .cu)" && benches+=("$src")
  done
  # Compile them all at once (nvcc is single-threaded), then run one at a time.
  declare -A bench_pid bench_t0
  for src in "${benches[@]}"; do
    name=$(basename "$src" .cu)
    cmd=$(bench_command "$src" "$build/bench/$name")
    echo "$cmd" >"$build/check-tmp/$name.cmd"
    : >"$build/check-tmp/$name.build.log"
    bench_t0[$name]=$(date +%s)
    (run "$build/check-tmp/$name.build.log" 420 bash -c "$cmd") &
    bench_pid[$name]=$!
  done
  for src in "${benches[@]}"; do
    name=$(basename "$src" .cu)
    wait "${bench_pid[$name]}"
    rc=$?
    { echo "=== $name: build"; cat "$build/check-tmp/$name.build.log"; } >>"$logs/bench.log"
    if [ $rc -ne 0 ]; then
      add_row "bench $name" "$(status_of $rc)" $(($(date +%s) - ${bench_t0[$name]})) \
        "build: $(grep -m2 -i 'error' "$build/check-tmp/$name.build.log" | short 70)"
      continue
    fi
    t0=$(date +%s)
    var="CHECK_BENCH_ARGS_$name"
    read -r -a args <<<"${!var:-}"
    tmp=$build/check-tmp/$name.run.log
    : >"$tmp"
    run "$tmp" "$run_limit" "$build/bench/$name" "${args[@]}"
    rc=$?
    { echo "=== $name: run"; cat "$tmp"; } >>"$logs/bench.log"
    bench_rows "$name" "$rc" "$t0" "$tmp"
  done
  # Shell benchmarks (added for dev/bench/e2e_pretrain.sh, the end-to-end tokens/s and MFU of
  # ./train_pretrain, which the build step above put at the repository root): each dev/bench/*.sh runs
  # with bash from the repository root, one at a time, configured by its own environment variables
  # (see its header, e.g. E2E_CONFIGS); its "summary:" lines join the table like the .cu benchmarks'.
  for src in dev/bench/*.sh; do
    [ -e "$src" ] || continue
    name=$(basename "$src" .sh)
    bench_wanted "$name" || continue
    t0=$(date +%s)
    tmp=$build/check-tmp/$name.run.log
    : >"$tmp"
    # The script learns its real limit (the budget may have cut it), to size its own runs to it.
    script_limit=$((2 * run_limit))
    rem=$(remaining)
    [ "$script_limit" -gt "$rem" ] && script_limit=$rem
    CHECK_SCRIPT_LIMIT_S=$script_limit run "$tmp" "$script_limit" bash "$src"
    rc=$?
    { echo "=== $name: run"; cat "$tmp"; } >>"$logs/bench.log"
    bench_rows "$name" "$rc" "$t0" "$tmp"
  done
fi

# --- 5. ctest -----------------------------------------------------------------------------------------
if want ctest; then
  t0=$(date +%s)
  if [ -f "$build/CTestTestfile.cmake" ]; then
    run "$logs/ctest.log" 900 ctest --test-dir "$build" -j "$jobs" --timeout "$run_limit" --output-on-failure
    rc=$?
    note=$(grep -E -m1 'tests passed, [0-9]+ tests? failed out of' "$logs/ctest.log" | short)
    if [ $rc -ne 0 ] && [ $rc -ne 200 ]; then
      failed=$(awk '/The following tests FAILED:/ {f = 1; next}
                    f && /^[[:space:]]*[0-9]+ - / {sub(/^[[:space:]]*[0-9]+ - /, ""); sub(/ \(.*/, ""); print}' \
        "$logs/ctest.log" | head -5 | short 60)
      note="$note: $failed"
    fi
    add_row "ctest (all)" "$(status_of $rc)" $(($(date +%s) - t0)) "$note"
  else
    add_row "ctest (all)" MISSING 0 "no build folder"
  fi
fi

# --- 6. compute-sanitizer -----------------------------------------------------------------------------
if want sanitize; then
  sanitize_tests=("${cuda_tests[@]}")
  [ -n "${CHECK_SANITIZE_TESTS:-}" ] && read -r -a sanitize_tests <<<"$CHECK_SANITIZE_TESTS"
  if [ -z "$sanitizer" ]; then
    add_row sanitize FAIL 0 "compute-sanitizer not found"
  else
    for tool in "${sanitize_tools[@]}"; do
      for name in "${sanitize_tests[@]}"; do
        bin=$build/tests/$name
        [ -x "$bin" ] || continue
        t0=$(date +%s)
        tmp=$build/check-tmp/$name.$tool.log
        : >"$tmp"
        run "$tmp" 180 "$sanitizer" --tool "$tool" --error-exitcode 86 --print-limit 20 "$bin" \
          --gtest_color=no --gtest_filter="$sanitize_filter"
        rc=$?
        { echo "=== $tool $name"; cat "$tmp"; } >>"$logs/sanitize.log"
        # memcheck ends with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: N hazards
        # displayed (E errors, W warnings)".
        errors=$(grep -m1 -o -E 'ERROR SUMMARY: [0-9]+ error|\([0-9]+ errors' "$tmp" | grep -o '[0-9]*')
        read -r np nf ns <<<"$(gtest_counts "$tmp")"
        st=$(status_of $rc)
        [ $rc -eq 86 ] && st="FAIL(errors)"
        add_row "$tool $name" "$st" $(($(date +%s) - t0)) "${errors:-?} sanitizer errors; $np passed, $nf failed"
      done
    done
  fi
fi

# --- summary ------------------------------------------------------------------------------------------
{
  echo
  echo "== dev/gpu/check.sh: $(elapsed) s, ${gpu:-no GPU}; logs in $logs =="
  printf '%-34s %-12s %6s  %s\n' step status secs note
  for r in "${rows[@]}"; do
    IFS=$'\x1f' read -r a b c d <<<"$r"
    printf '%-34s %-12s %6s  %s\n' "$a" "$b" "$c" "$d"
  done
  if [ $failures -eq 0 ]; then echo "RESULT: ok"; else echo "RESULT: $failures step(s) failed"; fi
} | tee "$logs/summary.txt"
[ $failures -eq 0 ]
