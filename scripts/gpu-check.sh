#!/usr/bin/env bash
# The first GPU run, prepared: one command on a machine with an NVIDIA GPU and its driver but
# possibly no network and no Rust toolchain. Build the binaries where nvcc and cargo are, carry
# one folder, run them there; everything the run writes goes under $OUT. It fits 10 minutes:
# every step runs under its own time limit and the log says which one ran out.
#
#   scripts/gpu-check.sh build [DIR]     # here (nvcc on PATH or NVCC=...): release test and
#                                        # bench binaries and the cdcl command, stripped, plus
#                                        # compute-sanitizer (PyPI, the CUDA 13.0 release, as
#                                        # .ci/run installs nvcc), into DIR (default
#                                        # target/gpu-check) and DIR.tar.xz to carry
#   scripts/gpu-check.sh run [DIR] [OUT] # on the GPU machine (unpacks DIR.tar.xz if DIR is
#                                        # absent), writing into OUT (default $OUT, else DIR/out):
#                                        #  1. nvidia-smi                       -> device.txt
#                                        #  2. every kernel test binary on the GPU
#                                        #     (CDCL_TEST_DEVICE=cuda)          -> tests.txt
#                                        #  3. compute-sanitizer memcheck, racecheck and
#                                        #     synccheck on the DSBN and conv tests -> sanitizer-*.txt
#                                        #  4. cdcl train --device cuda --profile, 3 iterations
#                                        #     at 512x512, CDCL_SYNC_LAUNCHES=1 -> train.txt
#                                        #  4b. with two GPUs: cdcl train --nproc-per-node 2
#                                        #     (NCCL, SyncBN), 2 iterations  -> train-2gpu.txt
#                                        #  5. the benches, short Criterion times -> benches.txt
#   scripts/gpu-check.sh --dry-run [OUT] # the same steps rehearsed here on the emulator with the
#                                        # debug binaries `cargo test` built (CI runs this so the
#                                        # script cannot rot): nvidia-smi and the sanitizer are
#                                        # only looked for, the tests and training run on the
#                                        # emulator at tiny sizes, the benches are only listed
#
# The build compiles for sm_90 only unless CDCL_CUDA_ARCHS says otherwise (an H100/H200: the
# fatbin for four architectures makes every binary twice the size).
# Figures from a run go to docs/performance.md with the date, device, driver and this command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every test binary whose kernels run on `common::test_device()`.
TESTS=(conv dab dsbn cross_entropy pool ppm maxpool elementwise dropout sgd usss backend)
# The tests compute-sanitizer runs: the DSBN kernels and the convolution.
SANITIZED=(dsbn conv)
SANITIZER_TOOLS=(memcheck racecheck synccheck)
BENCHES=(dab dab_cudnn dsbn)
SANITIZER_PKG=nvidia-cuda-sanitizer-api==13.0.85
CACHE="${CDCL_CI_CACHE:-$HOME/.cache/cdcl-ci}"

# Time limits (seconds) that keep a GPU run within 10 minutes.
T_TEST=40 T_SANITIZE=30 T_TRAIN=90 T_BENCH=60

mode="${1:-}"

# runs NAME LIMIT LOG CMD...: one step under a time limit, its output appended to LOG.
status=0
runs() {
    local name="$1" limit="$2" log="$3"
    shift 3
    echo "==== $name" >>"$log"
    local rc=0
    timeout "$limit" "$@" >>"$log" 2>&1 || rc=$?
    if [ "$rc" = 124 ]; then
        echo "==== $name: stopped after the ${limit}s limit" >>"$log"
    elif [ "$rc" != 0 ]; then
        echo "==== $name: FAILED (exit $rc)" >>"$log"
        status=1
    fi
    echo "$name: exit $rc"
}

# check_steps DIR OUT DEVICE: the five steps, with binaries from DIR; DEVICE is cuda or emulator.
check_steps() {
    local dir="$1" out="$2" device="$3"
    mkdir -p "$out"
    # 1. the device
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        { date -u; nvidia-smi; nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv; } >"$out/device.txt" 2>&1
    elif [ "$device" = cuda ]; then
        echo "no NVIDIA GPU here (nvidia-smi -L failed): nothing to check" >&2
        exit 3
    else
        { date -u; echo "dry run: no nvidia-smi here; the emulator stands in for the GPU"; } >"$out/device.txt"
    fi
    # The CI seed; failures are reported, not persisted next to sources that are not there.
    export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261121}" PROPTEST_DISABLE_FAILURE_PERSISTENCE=1
    if [ "$device" = cuda ]; then export CDCL_TEST_DEVICE=cuda; fi
    # 2. the kernel tests (the dry run lists them and runs the step accounting for real)
    for t in "${TESTS[@]}"; do
        if [ "$device" = cuda ]; then
            runs "test $t" "$T_TEST" "$out/tests.txt" "$dir/test-$t"
        else
            runs "test $t (listed)" "$T_TEST" "$out/tests.txt" "$dir/test-$t" --list
        fi
    done
    if [ "$device" != cuda ]; then
        runs "test device_counters" "$T_TEST" "$out/tests.txt" "$dir/test-device_counters"
    fi
    # 3. compute-sanitizer (needs a GPU: the dry run only checks that it was carried)
    local sanitizer
    sanitizer=$(find "$dir/sanitizer" -name compute-sanitizer -type f 2>/dev/null | head -n 1 || true)
    for t in "${SANITIZED[@]}"; do
        for tool in "${SANITIZER_TOOLS[@]}"; do
            local log="$out/sanitizer-$tool-$t.txt"
            if [ "$device" = cuda ] && [ -n "$sanitizer" ]; then
                runs "compute-sanitizer --tool $tool test-$t" "$T_SANITIZE" "$log" \
                    "$sanitizer" --tool "$tool" --error-exitcode 9 "$dir/test-$t"
            else
                echo "would run: ${sanitizer:-<compute-sanitizer not carried>} --tool $tool --error-exitcode 9 $dir/test-$t" >"$log"
                if [ "$device" = cuda ]; then status=1; fi
            fi
        done
    done
    # 4. three training iterations with the step's accounting; if they fail, one more with
    #    every launch synchronised, so that the log names the kernel that faulted.
    local base=(train --device cuda --profile --size 512 --eval-images 0)
    if [ "$device" != cuda ]; then
        base=(train --device emulator --profile --size 32 --width 0.0625 --batch 2 --eval-images 0)
    fi
    local train=("${base[@]}" --checkpoint "$out/checkpoint.safetensors")
    local before=$status
    runs "cdcl ${train[*]} --iters 3" "$T_TRAIN" "$out/train.txt" "$dir/cdcl" "${train[@]}" --iters 3
    if [ "$status" != "$before" ] || [ "$device" != cuda ]; then
        runs "CDCL_SYNC_LAUNCHES=1 cdcl ${train[*]} --iters 1" "$T_TRAIN" "$out/train.txt" \
            env CDCL_SYNC_LAUNCHES=1 "$dir/cdcl" "${train[@]}" --iters 1
    fi
    # 4b. a data-parallel run on two GPUs (one process each, NCCL, per-dataset SyncBN) when
    #     the machine has two; the dry run rehearses it with two emulator ranks (threads).
    local gpus=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [ "$device" != cuda ] || [ "$gpus" -ge 2 ]; then
        runs "cdcl ${base[*]} --nproc-per-node 2 --iters 2" "$T_TRAIN" "$out/train-2gpu.txt" "$dir/cdcl" \
            "${base[@]}" --nproc-per-node 2 --iters 2 --checkpoint "$out/checkpoint-2gpu.safetensors"
    else
        echo "$gpus GPU(s) here: the two-GPU step needs two" >"$out/train-2gpu.txt"
    fi
    # 5. the benches
    for b in "${BENCHES[@]}"; do
        if [ "$device" = cuda ]; then
            runs "bench $b" "$T_BENCH" "$out/benches.txt" "$dir/bench-$b" --bench --warm-up-time 1 --measurement-time 2
        else
            [ -f "benches/$b.rs" ] || { echo "bench $b: benches/$b.rs is missing" >>"$out/benches.txt"; status=1; }
            echo "would run: $dir/bench-$b --bench --warm-up-time 1 --measurement-time 2" >>"$out/benches.txt"
        fi
    done
    grep -hE "^==== |^test result" "$out"/tests.txt "$out"/train.txt "$out"/train-2gpu.txt || true
    grep -h "profile: iteration" "$out/train.txt" || true
}

# collect DIR PROFILE_ARGS...: copies the test and bench executables cargo names into DIR.
collect() {
    local dir="$1"
    shift
    local args=()
    for t in "${TESTS[@]}" device_counters; do args+=(--test "$t"); done
    cargo test "$@" --no-run --message-format=json "${args[@]}" >"$dir/build.json"
    python3 - "$dir" "${TESTS[*]} device_counters" <<'EOF'
import json, os, shutil, sys
out, tests = sys.argv[1], sys.argv[2].split()
for line in open(os.path.join(out, "build.json")):
    msg = json.loads(line)
    exe = msg.get("executable") if msg.get("reason") == "compiler-artifact" else None
    if exe and msg["target"]["kind"][0] == "test" and msg["target"]["name"] in tests:
        shutil.copy2(exe, os.path.join(out, "test-" + msg["target"]["name"]))
EOF
    rm -f "$dir/build.json"
}

case "$mode" in
build)
    dir="${2:-target/gpu-check}"
    export CDCL_REQUIRE_NVCC=1 CDCL_CUDA_ARCHS="${CDCL_CUDA_ARCHS:-90}"
    rm -rf "$dir"
    mkdir -p "$dir"
    args=()
    for t in "${TESTS[@]}"; do args+=(--test "$t"); done
    for b in "${BENCHES[@]}"; do args+=(--bench "$b"); done
    # One build, the JSON messages naming each executable.
    cargo test --release --no-run --message-format=json "${args[@]}" >"$dir/build.json"
    cargo build --release --bin cdcl
    cp target/release/cdcl "$dir/cdcl"
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
    strip "$dir/cdcl" || true
    # compute-sanitizer from PyPI, the release of the runtime the kernels link (13.0), carried
    # with the binaries (the GPU machine may have no network).
    venv="$CACHE/sanitizer-13.0"
    if [ ! -x "$venv/ok" ]; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "$SANITIZER_PKG"
        printf '#!/bin/sh\n' >"$venv/ok" && chmod +x "$venv/ok"
    fi
    # The wheel's files keep their layout (bin/ and lib/ side by side: the tool finds its
    # libraries relative to itself).
    site=$("$venv/bin/pip" show nvidia-cuda-sanitizer-api | sed -n 's/^Location: //p')
    "$venv/bin/pip" show -f nvidia-cuda-sanitizer-api | sed -n 's|^ *nvidia/cu13/||p' | while read -r f; do
        mkdir -p "$dir/sanitizer/$(dirname "$f")"
        cp "$site/nvidia/cu13/$f" "$dir/sanitizer/$f"
    done
    [ -x "$dir/sanitizer/bin/compute-sanitizer" ] || { echo "compute-sanitizer not found in $venv" >&2; exit 1; }
    tar -C "$(dirname "$dir")" -cJf "$dir.tar.xz" "$(basename "$dir")"
    du -sh "$dir" "$dir.tar.xz"
    ;;
run)
    dir="${2:-target/gpu-check}"
    if [ ! -d "$dir" ] && [ -f "$dir.tar.xz" ]; then tar -C "$(dirname "$dir")" -xJf "$dir.tar.xz"; fi
    check_steps "$dir" "${3:-${OUT:-$dir/out}}" cuda
    exit "$status"
    ;;
--dry-run)
    # The debug binaries of the current build (CI: the ones `cargo test` just built).
    dir=target/gpu-check-dry
    rm -rf "$dir"
    mkdir -p "$dir"
    collect "$dir"
    cargo build --quiet --bin cdcl
    cp "${CARGO_TARGET_DIR:-target}/debug/cdcl" "$dir/cdcl"
    out="${2:-${OUT:-$dir/out}}"
    unset CDCL_TEST_DEVICE
    check_steps "$dir" "$out" emulator
    echo "dry run: logs in $out"
    exit "$status"
    ;;
*)
    echo "usage: $0 build [DIR] | run [DIR] [OUT] | --dry-run [OUT]" >&2
    exit 2
    ;;
esac
