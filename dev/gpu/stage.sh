#!/usr/bin/env bash
# Stages what the build needs but a bare GPU machine lacks (no apt, no internet there) into .gpu_deps/ at
# the repository root, a git-ignored folder that travels with the working tree. Run it HERE, on a machine
# with the Debian packages (dev/deps.sh installs them), before sending the tree to the GPU machine; then
# run `bash dev/gpu/check.sh` THERE.
#
# What it copies (about 6 MB):
#   .gpu_deps/googletest/            GoogleTest sources (/usr/src/googletest); check.sh builds and installs
#                                    them into its build folder, and CMake finds them with GTest_DIR
#   .gpu_deps/include/nlohmann/      nlohmann/json headers
#   .gpu_deps/share/cmake/nlohmann_json/
#                                    their CMake package files (from /usr/share/cmake/nlohmann_json); the
#                                    targets file locates the headers three folders up, i.e. .gpu_deps/include
#   .gpu_deps/include/pcre2.h, .gpu_deps/lib/libpcre2-8.so*, .gpu_deps/lib/pkgconfig/libpcre2-8.pc
#                                    PCRE2 for pkg_check_modules(libpcre2-8); the .pc file is relocatable
#                                    (prefix=${pcfiledir}/../..)
#   .gpu_deps/bin/pkg-config         pkgconf and its library, used only when the GPU machine has no pkg-config
#   .gpu_deps/wheels/bitsandbytes-*.whl
#                                    (about 43 MB, fetched with pip when this machine reaches PyPI) for the
#                                    peft QLoRA side of dev/bench/sft_vs_peft, which unpacks it on the GPU
#                                    machine; the image there has torch, numpy and packaging but no
#                                    bitsandbytes. Left out with a note when pip cannot fetch it; set
#                                    STAGE_BITSANDBYTES=0 to leave it out on purpose.
#
# The device tool carries at most 64 MiB; the total is checked at the end.
#
# Usage: bash dev/gpu/stage.sh        (from anywhere; it writes into this checkout)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
dest=$root/.gpu_deps

die() {
  echo "stage.sh: $*" >&2
  exit 1
}

first_existing() {
  for p in "$@"; do
    if [ -e "$p" ]; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

gtest_src=$(first_existing /usr/src/googletest /usr/src/gtest) ||
  die "GoogleTest sources not found in /usr/src/googletest (apt-get install libgtest-dev googletest)"
[ -f "$gtest_src/CMakeLists.txt" ] || die "$gtest_src has no CMakeLists.txt"
json_inc=$(first_existing /usr/include/nlohmann) || die "/usr/include/nlohmann not found (apt-get install nlohmann-json3-dev)"
json_cmake=$(first_existing /usr/share/cmake/nlohmann_json /usr/lib/cmake/nlohmann_json \
  /usr/lib/x86_64-linux-gnu/cmake/nlohmann_json) || die "nlohmann_json CMake package files not found"
pcre_h=$(first_existing /usr/include/pcre2.h) || die "/usr/include/pcre2.h not found (apt-get install libpcre2-dev)"
# Two steps: in $(dirname "$(...)") the inner failure would be lost and libdir would be ".".
pcre_so=$(first_existing /usr/lib/x86_64-linux-gnu/libpcre2-8.so.0 /lib/x86_64-linux-gnu/libpcre2-8.so.0 \
  /usr/lib64/libpcre2-8.so.0 /usr/lib/libpcre2-8.so.0) || die "libpcre2-8.so.0 not found"
libdir=$(dirname "$pcre_so")
pcre_pc=$(first_existing "$libdir/pkgconfig/libpcre2-8.pc" /usr/lib/x86_64-linux-gnu/pkgconfig/libpcre2-8.pc \
  /usr/lib/pkgconfig/libpcre2-8.pc /usr/share/pkgconfig/libpcre2-8.pc) || die "libpcre2-8.pc not found"

rm -rf "$dest"
mkdir -p "$dest/include" "$dest/lib/pkgconfig" "$dest/share/cmake" "$dest/bin"

cp -r "$gtest_src" "$dest/googletest"
cp -r "$json_inc" "$dest/include/nlohmann"
cp -r "$json_cmake" "$dest/share/cmake/nlohmann_json"

cp "$pcre_h" "$dest/include/pcre2.h"
real=$(readlink -f "$libdir/libpcre2-8.so.0")
cp "$real" "$dest/lib/$(basename "$real")"
for link in libpcre2-8.so.0 libpcre2-8.so; do
  [ "$link" = "$(basename "$real")" ] || ln -sf "$(basename "$real")" "$dest/lib/$link"
done
# shellcheck disable=SC2016 # the ${...} are pkg-config variables, written literally
sed -e 's|^prefix=.*|prefix=${pcfiledir}/../..|' \
  -e 's|^exec_prefix=.*|exec_prefix=${prefix}|' \
  -e 's|^libdir=.*|libdir=${prefix}/lib|' \
  -e 's|^includedir=.*|includedir=${prefix}/include|' "$pcre_pc" >"$dest/lib/pkgconfig/libpcre2-8.pc"

# pkg-config for a machine without one: pkgconf plus its library, behind a wrapper that finds them.
if pkgconf_bin=$(command -v pkgconf 2>/dev/null) && [ -n "$pkgconf_bin" ]; then
  cp -L "$pkgconf_bin" "$dest/bin/pkgconf.real"
  for lib in $(ldd "$pkgconf_bin" | awk '/libpkgconf/ {print $3}'); do cp -L "$lib" "$dest/lib/"; done
  cat >"$dest/bin/pkg-config" <<'EOF'
#!/bin/sh
# pkgconf staged by dev/gpu/stage.sh, with its library beside it.
here=$(cd "$(dirname "$0")" && pwd)
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/pkgconf.real" "$@"
EOF
  chmod +x "$dest/bin/pkg-config"
fi

# bitsandbytes for peft's QLoRA run: optional, so a failure is a note, not an error.
bnb_wheel="not staged"
if [ "${STAGE_BITSANDBYTES:-1}" != 0 ]; then
  python=${PYTHON:-python3}
  mkdir -p "$dest/wheels"
  if timeout 300 "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest/wheels" \
    bitsandbytes >/dev/null 2>&1; then
    bnb_wheel=$(find "$dest/wheels" -name 'bitsandbytes-*.whl' -printf '%f\n' | head -1)
  else
    echo "stage.sh: note: could not fetch the bitsandbytes wheel with pip; peft's QLoRA run will be skipped" >&2
    rm -rf "$dest/wheels"
  fi
fi

{
  echo "staged $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m) from:"
  echo "  googletest   $gtest_src ($(grep -m1 -o 'GOOGLETEST_VERSION [0-9.]*' "$gtest_src/CMakeLists.txt" || true))"
  echo "  nlohmann     $json_inc, $json_cmake"
  echo "  pcre2        $pcre_h, $libdir/libpcre2-8.so*, $pcre_pc"
  echo "  pkgconf      ${pkgconf_bin:-none}"
  echo "  wheels       $bnb_wheel"
} >"$dest/MANIFEST"

# Sanity: the staged pkg-config file resolves into .gpu_deps.
if command -v pkg-config >/dev/null; then
  flags=$(PKG_CONFIG_PATH="$dest/lib/pkgconfig" PKG_CONFIG_LIBDIR="$dest/lib/pkgconfig" pkg-config --cflags --libs libpcre2-8) ||
    die "the staged libpcre2-8.pc does not resolve"
  case "$flags" in
  *"$dest"*) ;;
  *) die "the staged libpcre2-8.pc resolves outside .gpu_deps: $flags" ;;
  esac
fi

cat "$dest/MANIFEST"
echo "stage.sh: $(du -sh "$dest" | cut -f1) in $dest"
staged_kib=$(du -sk "$dest" | cut -f1)
if [ "$staged_kib" -gt $((60 * 1024)) ]; then
  die "$dest holds ${staged_kib} KiB, too close to the device tool's 64 MiB carry limit (STAGE_BITSANDBYTES=0 leaves the wheel out)"
fi
if ! git -C "$root" check-ignore -q "$dest" 2>/dev/null; then
  echo "stage.sh: note: .gpu_deps/ is not git-ignored yet; add the line '/.gpu_deps/' to .gitignore" >&2
fi
echo "stage.sh: on the device machine, carry [\".gpu_deps\"] and run: bash dev/gpu/check.sh"
