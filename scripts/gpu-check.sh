#!/usr/bin/env bash
# The GPU checks in one prepared run, for a machine with an NVIDIA GPU and its driver but
# possibly no network and no Rust toolchain: build the binaries where nvcc and cargo are, carry
# one folder, run them there.
#
#   scripts/gpu-check.sh build [DIR]     # here (nvcc on PATH or NVCC=...): release test and
#                                        # bench binaries, stripped, into DIR (default
#                                        # target/gpu-check) and DIR.tar.xz (~6 MB) to carry
#   scripts/gpu-check.sh run [DIR] [OUT] # on the GPU machine (unpacks DIR.tar.xz if DIR is
#                                        # absent): nvidia-smi, every kernel property test on the
#                                        # GPU (CDCL_TEST_DEVICE=cuda), then the benches with short
#                                        # Criterion times; logs into OUT (default $OUT, else
#                                        # DIR/out)
#
# The build compiles for sm_90 only unless CDCL_CUDA_ARCHS says otherwise (an H100/H200: the
# fatbin for four architectures makes every binary twice the size).
# Figures from a run go to docs/performance.md with the date, device, driver and this command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every test binary whose kernels run on `common::test_device()`.
TESTS=(conv dab dsbn cross_entropy pool ppm maxpool elementwise dropout sgd usss backend_device)
BENCHES=(dab dab_cudnn dsbn)

mode="${1:-}"
dir="${2:-target/gpu-check}"

case "$mode" in
build)
    export CDCL_REQUIRE_NVCC=1 CDCL_CUDA_ARCHS="${CDCL_CUDA_ARCHS:-90}"
    rm -rf "$dir"
    mkdir -p "$dir"
    args=()
    for t in "${TESTS[@]}"; do args+=(--test "$t"); done
    for b in "${BENCHES[@]}"; do args+=(--bench "$b"); done
    # One build, the JSON messages naming each executable.
    cargo test --release --no-run --message-format=json "${args[@]}" >"$dir/build.json"
    python3 - "$dir" "${TESTS[*]}" "${BENCHES[*]}" <<'EOF'
import json, os, shutil, subprocess, sys
out, tests, benches = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
for line in open(os.path.join(out, "build.json")):
    msg = json.loads(line)
    exe = msg.get("executable") if msg.get("reason") == "compiler-artifact" else None
    if not exe:
        continue
    kind, target = msg["target"]["kind"][0], msg["target"]["name"]
    if (kind, target in (benches if kind == "bench" else tests)) != (kind, True):
        continue
    name = ("bench-" if kind == "bench" else "test-") + target
    dst = os.path.join(out, name)
    shutil.copy2(exe, dst)
    subprocess.run(["strip", dst], check=False)
EOF
    rm -f "$dir/build.json"
    tar -C "$(dirname "$dir")" -cJf "$dir.tar.xz" "$(basename "$dir")"
    du -sh "$dir" "$dir.tar.xz"
    ;;
run)
    if [ ! -d "$dir" ] && [ -f "$dir.tar.xz" ]; then tar -C "$(dirname "$dir")" -xJf "$dir.tar.xz"; fi
    out="${3:-${OUT:-$dir/out}}"
    mkdir -p "$out"
    if ! nvidia-smi -L >/dev/null 2>&1; then
        echo "no NVIDIA GPU here (nvidia-smi -L failed): nothing to check" >&2
        exit 3
    fi
    { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } >"$out/device.txt" 2>&1
    # The CI seed; failures are reported, not persisted next to sources that are not there.
    export CDCL_TEST_DEVICE=cuda PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261121}" PROPTEST_DISABLE_FAILURE_PERSISTENCE=1
    status=0
    for t in "${TESTS[@]}"; do
        echo "==== test $t" >>"$out/tests.txt"
        "$dir/test-$t" >>"$out/tests.txt" 2>&1 || status=1
    done
    for b in "${BENCHES[@]}"; do
        echo "==== bench $b" >>"$out/benches.txt"
        "$dir/bench-$b" --bench --warm-up-time 1 --measurement-time 2 >>"$out/benches.txt" 2>&1 || status=1
    done
    grep -E "^==== |^test result" "$out/tests.txt" || true
    exit "$status"
    ;;
*)
    echo "usage: $0 build [DIR] | run [DIR] [OUT]" >&2
    exit 2
    ;;
esac
