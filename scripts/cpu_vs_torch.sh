#!/usr/bin/env bash
# cdcl's CPU backend beside PyTorch on the CPU, run alternately on the same machine: per round,
# for each shape, `scripts/torch_cpu_step.py` then the `cpu_step` bench in its plain timing mode
# (both print `<who> <shape> train|eval <median seconds> [times]`), 2 threads each, with the
# load average before each round. PyTorch is not a dependency: point TORCH_PYTHON at a Python
# that has it (e.g. a private virtual environment).
#
#   cargo bench --bench cpu_step --no-run
#   TORCH_PYTHON=/path/to/venv/bin/python scripts/cpu_vs_torch.sh
#
# ROUNDS (default 4), ITERS timed iterations per measurement (default 5), SHAPES (default
# "defaults full"), THREADS (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${TORCH_PYTHON:-python3}
ROUNDS=${ROUNDS:-4}
ITERS=${ITERS:-5}
SHAPES=${SHAPES:-defaults full}
THREADS=${THREADS:-2}
BENCH=$(ls -t target/release/deps/cpu_step-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
if [ -z "$BENCH" ]; then
    echo "build the bench first: cargo bench --bench cpu_step --no-run" >&2
    exit 1
fi
for round in $(seq "$ROUNDS"); do
    echo "round $round: $(uptime)"
    for shape in $SHAPES; do
        OMP_NUM_THREADS=$THREADS "$PY" scripts/torch_cpu_step.py --shape "$shape" --iters "$ITERS" --threads "$THREADS"
        RAYON_NUM_THREADS=$THREADS CDCL_STEP_TIMES=$ITERS CDCL_STEP_SHAPE=$shape "$BENCH"
    done
done
