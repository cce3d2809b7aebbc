#!/usr/bin/env bash
# The project's set-up and run commands on Debian 12 (see README.md):
#   bash cmake/dev.sh examples   build and run the examples
#   bash cmake/dev.sh tests      build and run the whole test suite (ctest)
#   bash cmake/dev.sh sanitize   the test suite under -fsanitize=address,undefined
#   bash cmake/dev.sh bench      build and run the benchmarks
# Missing Debian packages are installed when run as root; otherwise the exact
# apt-get line is printed and the script stops.
set -euo pipefail

mode=${1:-}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
jobs=$(nproc 2>/dev/null || echo 2)

need_packages() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v dpkg-query >/dev/null; then
    echo "moe: not a Debian system; make sure these are installed: $*" >&2
    return 0
  fi
  if [ "$(id -u)" -eq 0 ]; then
    echo "moe: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "moe: missing packages; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
}

base_packages=(cmake make g++ libeigen3-dev)
# moe::io (safetensors checkpoints) and its tests need nlohmann-json.
test_packages=(doctest-dev nlohmann-json3-dev)

configure() {  # configure <build dir> <cmake args...>
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -DCMAKE_BUILD_TYPE=Release "$@" >/dev/null
}

case "$mode" in
  examples)
    # gnuplot draws the plots; without it the run still writes the CSVs.
    need_packages "${base_packages[@]}" nlohmann-json3-dev gnuplot-nox
    configure "$root/build" -DMOE_BUILD_EXAMPLES=ON
    cmake --build "$root/build" -j"$jobs" --target moe-train-lm moe-fit-teacher
    shift
    # Every recipe, compared; extra arguments go to moe-train-lm (e.g. --quick).
    "$root/build/examples/moe-train-lm" --recipes all --out "$root/build/train_lm" "$@"
    ;;
  tests)
    need_packages "${base_packages[@]}" "${test_packages[@]}"
    configure "$root/build" -DMOE_BUILD_TESTS=ON -DMOE_BUILD_EXAMPLES=ON
    cmake --build "$root/build" -j"$jobs"
    ctest --test-dir "$root/build" --output-on-failure -j"$jobs"
    ;;
  sanitize)
    need_packages "${base_packages[@]}" "${test_packages[@]}"
    configure "$root/build-sanitize" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DMOE_SANITIZE=address,undefined -DMOE_BUILD_TESTS=ON -DMOE_BUILD_EXAMPLES=ON
    cmake --build "$root/build-sanitize" -j"$jobs"
    # Packaging tests rebuild the library without sanitizers: the plain run covers them.
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir "$root/build-sanitize" --output-on-failure -j"$jobs" \
      -E "consumer_|compile_fail|headers_self_contained"
    ASAN_OPTIONS=detect_leaks=1 "$root/build-sanitize/examples/moe-fit-teacher" 200
    ;;
  bench)
    need_packages "${base_packages[@]}" libbenchmark-dev
    configure "$root/build-bench" -DMOE_BUILD_BENCHMARKS=ON -DMOE_BUILD_TESTS=OFF \
      -DMOE_BUILD_EXAMPLES=OFF -DCMAKE_CXX_FLAGS=-march=native
    cmake --build "$root/build-bench" -j"$jobs" --target moe_bench
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS="$jobs" \
      "$root/build-bench/bench/moe_bench" --benchmark_counters_tabular=true
    ;;
  *)
    echo "usage: bash cmake/dev.sh examples|tests|sanitize|bench" >&2
    exit 2
    ;;
esac
