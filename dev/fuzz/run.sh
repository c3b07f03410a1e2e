#!/usr/bin/env bash
# Builds the parser fuzz targets with clang's libFuzzer + AddressSanitizer + UBSan (outside CMake: the
# project build uses gcc) and runs each for SECONDS (default 60).
#
#   dev/fuzz/run.sh [SECONDS]          build into build-fuzz/ and run the three targets
#   FUZZ_JOBS=2 dev/fuzz/run.sh 300    more workers
#
# Seeds: the fixture config.json files and a few small hand-made safetensors files. Corpora grow in
# build-fuzz/corpus_*; logs go to build-fuzz/fuzz_*.log; crashes are written to build-fuzz/ as crash-*
# files (reproduce with: build-fuzz/fuzz_X build-fuzz/crash-...).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${FUZZ_OUT:-$ROOT/build-fuzz}
SECONDS_EACH=${1:-60}
JOBS=${FUZZ_JOBS:-1}
CXX=${CXX:-clang++}
FLAGS=(-std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined
       -fno-omit-frame-pointer -I"$ROOT")

mkdir -p "$OUT"
echo "building fuzz targets in $OUT with $CXX"
"$CXX" "${FLAGS[@]}" "$ROOT/dev/fuzz/fuzz_safetensors.cpp" "$ROOT/llm/safetensors.cpp" -o "$OUT/fuzz_safetensors"
"$CXX" "${FLAGS[@]}" "$ROOT/dev/fuzz/fuzz_hf_config.cpp" "$ROOT/llm/hf_config.cpp" "$ROOT/llm/config.cpp" \
  "$ROOT/llm/json_config.cpp" -o "$OUT/fuzz_hf_config"
"$CXX" "${FLAGS[@]}" "$ROOT/dev/fuzz/fuzz_tokenizer.cpp" "$ROOT/data/bpe_tokenizer.cpp" \
  "$ROOT/data/unicode_normalize.cpp" -lpcre2-8 -o "$OUT/fuzz_tokenizer"

# Seed corpora.
mkdir -p "$OUT/corpus_safetensors" "$OUT/corpus_hf_config" "$OUT/corpus_tokenizer"
for dir in "$ROOT"/tests/fixtures/tokenizers/*/; do
  cp -f "$dir/tokenizer.json" "$OUT/corpus_tokenizer/$(basename "$dir").json"
done
for dir in "$ROOT"/tests/fixtures/hf/*/; do
  cp -f "$dir/config.json" "$OUT/corpus_hf_config/$(basename "$dir").json"
done
# seed NAME HEADER DATA_BYTES: a safetensors file with that JSON header and DATA_BYTES bytes of data.
seed() {
  local n=${#2} le="" i
  for i in 0 1 2 3 4 5 6 7; do le+=$(printf '\\x%02x' $(( (n >> (8 * i)) & 255 ))); done
  { printf "$le"; printf '%s' "$2"; head -c "$3" /dev/urandom; } > "$OUT/corpus_safetensors/$1"
}
seed two '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[1,2],"data_offsets":[8,12]}}' 12
seed dtypes '{"x":{"dtype":"F16","shape":[3],"data_offsets":[0,6]},"y":{"dtype":"I64","shape":[1],"data_offsets":[6,14]},"z":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[14,16]}}' 16
seed empty '{}' 0

status=0
for target in safetensors hf_config tokenizer; do
  echo "fuzzing $target for ${SECONDS_EACH}s"
  log="$OUT/fuzz_$target.log"
  max_len=4096
  [ "$target" = tokenizer ] && max_len=262144  # tokenizer.json seeds are ~100 KB
  (cd "$OUT" && ./fuzz_$target -max_total_time="$SECONDS_EACH" -max_len="$max_len" -jobs="$JOBS" \
     -workers="$JOBS" $([ -f "$ROOT/dev/fuzz/$target.dict" ] && echo "-dict=$ROOT/dev/fuzz/$target.dict") \
     -print_final_stats=1 "corpus_$target" \
     > "$log" 2>&1) || status=1
  grep -E "^Done|stat::(number_of_executed_units|average_exec_per_sec|new_units_added|peak_rss_mb)|ERROR|SUMMARY" \
    "$log" || true
  echo "  corpus: $(ls "$OUT/corpus_$target" | wc -l) inputs; log: $log"
done
ls "$OUT"/crash-* "$OUT"/leak-* "$OUT"/timeout-* 2>/dev/null && status=1
exit $status
