#!/usr/bin/env bash
# The project's set-up and run commands on Debian 12 (see README.md):
#   bash scripts/dev.sh examples   build and run the examples (extra arguments go
#                                  to moe-train-lm, e.g. --quick)
#   bash scripts/dev.sh tests      build and run the whole test suite (ctest)
#   bash scripts/dev.sh sanitize   the test suite under -fsanitize=address,undefined,
#                                  and the concurrency test under ThreadSanitizer
#   bash scripts/dev.sh bench      build and run the CPU benchmarks
#   bash scripts/dev.sh bench-cuda build and run the GPU benchmark (needs nvcc and a GPU)
#   bash scripts/dev.sh fuzz       libFuzzer on the safetensors reader, then on the layer's
#                                  entry points, MOE_FUZZ_SECONDS (60) seconds each, built
#                                  with clang++ and libFuzzer (clang, libclang-rt-dev); with a
#                                  MOE_FUZZ_CXX that cannot build them it is skipped, except
#                                  when CI is set, where it fails
# Each mode installs the Debian packages it needs, and no others, when run as
# root; otherwise it prints the exact apt-get line and stops. The configure
# lines are the CMake presets of CMakePresets.json.
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

base_packages=(cmake make g++ libeigen3-dev libopenblas-dev)
# moe::io (safetensors checkpoints) and its tests need nlohmann-json; the
# moe-train-lm smoke test trains on Debian's fortunes (its default corpus);
# the expert-parallel tests run under OpenMPI's mpiexec; the oneDNN engines'
# tests (and benchmark rows) need oneDNN.
test_packages=(doctest-dev nlohmann-json3-dev fortunes libopenmpi-dev openmpi-bin libdnnl-dev)

# nvcc, where the CUDA toolkit has one: moe::cuda, its tests and its benchmark
# are built when CMake finds it (no GPU is needed to compile).
cuda_args=()
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  cuda_args=(-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc)
fi

configure() {  # configure <preset> <cmake args...>
  local preset=$1
  shift
  (cd "$root" && cmake --preset "$preset" "$@" >/dev/null)
}

case "$mode" in
  examples)
    # gnuplot draws the plots; without it the run still writes the CSVs. The
    # preset hides doctest and Google Benchmark: the examples need neither.
    need_packages "${base_packages[@]}" nlohmann-json3-dev gnuplot-nox fortunes
    configure examples
    cmake --build "$root/build-examples" -j"$jobs" --target moe-train-lm moe-fit-teacher
    shift
    # Every recipe, compared; extra arguments go to moe-train-lm (e.g. --quick).
    "$root/build-examples/examples/moe-train-lm" --recipes all --out "$root/build-examples/train_lm" "$@"
    ;;
  tests)
    # The benchmarks are built too (not run): with nvcc this compiles the
    # GPU benchmark's CUDA sources as well, so every .cu file is type-checked.
    need_packages "${base_packages[@]}" "${test_packages[@]}" libbenchmark-dev
    configure tests "${cuda_args[@]}"
    cmake --build "$root/build" -j"$jobs"
    ctest --test-dir "$root/build" --output-on-failure -j"$jobs"
    ;;
  sanitize)
    need_packages "${base_packages[@]}" "${test_packages[@]}"
    # Built without BLAS: this run also covers the Eigen-only build (the
    # plain run covers the BLAS engine; the tests run both engines there).
    # CUDA is off here: nvcc's objects are not instrumented, and the plain run
    # compiles them.
    configure sanitize
    cmake --build "$root/build-sanitize" -j"$jobs"
    # Packaging tests (not built by this preset), bitwise resume (18 runs of
    # moe-train-lm) and the reproductions' quick run (16): the plain run
    # covers them.
    # allocator_may_return_null: a test asks for more memory than exists and
    # expects moe::Error (std::bad_alloc), not ASan's abort.
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:allocator_may_return_null=1 \
      UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir "$root/build-sanitize" --output-on-failure -j"$jobs" \
      -E "train_lm_resume|train_lm_reproduce" -LE mpi
    # OpenMPI keeps its own allocations to the end (LeakSanitizer reports them
    # in libmpi and its plugins): the MPI tests run without leak detection.
    ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      ctest --test-dir "$root/build-sanitize" --output-on-failure -j"$jobs" -L mpi
    ASAN_OPTIONS=detect_leaks=1 "$root/build-sanitize/examples/moe-fit-teacher" 200
    # ThreadSanitizer on one layer serving several threads. Without OpenMP and
    # BLAS (neither is instrumented): the only threads are the test's own.
    configure tsan
    cmake --build "$root/build-tsan" -j"$jobs" --target test_concurrency
    # Without address-space randomisation where setarch can: ThreadSanitizer's
    # fixed memory map fails on kernels with many random mmap bits.
    no_aslr=()
    if command -v setarch >/dev/null && setarch "$(uname -m)" -R true 2>/dev/null; then
      no_aslr=(setarch "$(uname -m)" -R)
    fi
    TSAN_OPTIONS=halt_on_error=1 "${no_aslr[@]}" "$root/build-tsan/tests/test_concurrency"
    ;;
  bench)
    need_packages "${base_packages[@]}" libbenchmark-dev
    configure bench
    cmake --build "$root/build-bench" -j"$jobs" --target moe_bench
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS="$jobs" \
      "$root/build-bench/bench/moe_bench" --benchmark_counters_tabular=true
    ;;
  bench-cuda)
    need_packages "${base_packages[@]}" libbenchmark-dev
    configure bench-cuda "${cuda_args[@]}"
    if ! cmake --build "$root/build-bench-cuda" -j"$jobs" --target moe_bench_cuda; then
      echo "moe: bench-cuda needs nvcc (the CUDA toolkit); CMake found none" >&2
      exit 1
    fi
    "$root/build-bench-cuda/bench/moe_bench_cuda" --benchmark_counters_tabular=true
    ;;
  fuzz)
    # Debian's clang; libFuzzer and the sanitizers' runtimes are in
    # libclang-rt-dev, only a recommendation of clang's (which
    # --no-install-recommends leaves out). A compiler of one's own
    # (MOE_FUZZ_CXX) is one's own to set up.
    fuzz_packages=()
    if [ -z "${MOE_FUZZ_CXX:-}" ]; then
      fuzz_packages=(clang libclang-rt-dev)
    fi
    need_packages "${base_packages[@]}" "${test_packages[@]}" "${fuzz_packages[@]}"
    cxx=${MOE_FUZZ_CXX:-clang++}
    # In CI a skipped fuzz run would pass unnoticed: there it fails instead.
    skip_fuzz() {
      if [ -n "${CI:-}" ]; then
        echo "moe: fuzz failed: $1 (CI is set, so fuzzing may not be skipped)" >&2
        exit 1
      fi
      echo "moe: fuzz skipped: $1"
      exit 0
    }
    if ! command -v "$cxx" >/dev/null; then
      skip_fuzz "$cxx not found (install clang to fuzz)"
    fi
    probe_dir=$(mktemp -d)
    trap 'rm -rf "$probe_dir"' EXIT
    echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' \
      >"$probe_dir/probe.cpp"
    if ! "$cxx" -fsanitize=fuzzer,address,undefined "$probe_dir/probe.cpp" -o "$probe_dir/probe" \
      >/dev/null 2>&1; then
      skip_fuzz "$cxx cannot link -fsanitize=fuzzer,address,undefined (no libFuzzer: libclang-rt-dev)"
    fi
    build="$root/build-fuzz"
    configure fuzz -DCMAKE_CXX_COMPILER="$cxx"
    cmake --build "$build" -j"$jobs" --target fuzz_safetensors fuzz_safetensors_driver fuzz_layer
    # The corpus grows across runs in the build tree; the seeds are regenerated each time.
    "$build/tests/fuzz/fuzz_safetensors_driver" --write-seeds "$build/fuzz-corpus"
    mkdir -p "$build/fuzz-layer-corpus"
    seconds=${MOE_FUZZ_SECONDS:-60}
    run_fuzzer() {  # run_fuzzer <target> <corpus> <libFuzzer flags...>
      local target=$1 corpus=$2
      shift 2
      echo "moe: fuzzing $target for $seconds s (log: $build/$target.log)"
      if ! "$build/tests/fuzz/$target" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$build/$target-" "$@" "$corpus" \
        >"$build/$target.log" 2>&1; then
        tail -n 60 "$build/$target.log" >&2
        echo "moe: fuzzing $target found a crash; the input is in $build/ ($target-crash-*, ...)" >&2
        exit 1
      fi
      grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb)|Done [0-9]+ runs" \
        "$build/$target.log" || true
    }
    run_fuzzer fuzz_safetensors "$build/fuzz-corpus" -dict="$root/tests/fuzz/safetensors.dict"
    run_fuzzer fuzz_layer "$build/fuzz-layer-corpus"
    ;;
  *)
    echo "usage: bash scripts/dev.sh examples|tests|sanitize|bench|bench-cuda|fuzz" >&2
    exit 2
    ;;
esac
