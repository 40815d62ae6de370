#!/usr/bin/env bash
# One-shot GPU check for a session lent a device machine (its 15 minutes count every start and idle second).
#
# Prepare here (CPU), once; both paths are git-ignored and travel with the `run` tool's `carry`:
#   .venv/bin/pip download --no-deps dp-accounting==0.6.0 attrs -d wheels/   # the device image lacks them
#   .venv/bin/fedscope data prepare --format abxi --source ../shared/data/abxi-food-kitchen --out out/afk
# Then, on the device (repository root; carry ["wheels", "out/afk"]; timeout_s ~540):
#   bash benchmarks/device_check.sh
# It installs this package without dependencies (the image has jax/flax/optax/orbax), checks that the
# vectorized round equals the sequential reference on the device and runs the engine benchmark
# ($OUT/engine_benchmark.json), then times the privacy sweep against its configurations one by one
# ($OUT/sweep_benchmark.json); the two tables are printed last. SWEEP_DATA= (empty) skips the sweep;
# CLIENTS, SWEEP_ROUNDS, SWEEP_CLIENTS, DIM, MAX_LEN resize the workloads.
set -euo pipefail

OUT="${OUT:-.}"
CLIENTS="${CLIENTS:-8,32,128,512}"
DIM="${DIM:-64}"
MAX_LEN="${MAX_LEN:-50}"
SWEEP_DATA="${SWEEP_DATA-out/afk}"
SWEEP_ROUNDS="${SWEEP_ROUNDS:-5}"
SWEEP_CLIENTS="${SWEEP_CLIENTS:-20}"
PY="${PYTHON:-python3}"

if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps wheels/*.whl
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"

status=0
"$PY" benchmarks/engine_device.py --clients "$CLIENTS" --dim "$DIM" --max-len "$MAX_LEN" \
    > "$OUT/engine_benchmark.txt" || status=$?

if [ -n "$SWEEP_DATA" ]; then
    if [ ! -f "$SWEEP_DATA/dataset.json" ]; then
        echo "SWEEP_DATA=$SWEEP_DATA: no prepared dataset there (carry it, see the top of this file)" >&2
        status=1
    else
        # 12 configurations: {personalized, uniform} x eps {1, 2, 4, 8, 16, inf}, all vectorized at once
        "$PY" -m fedscope_jax benchmark --sweep --data "$SWEEP_DATA" --rounds "$SWEEP_ROUNDS" \
            --clients "$SWEEP_CLIENTS" --fraction 0.5 --dim "$DIM" --max-len "$MAX_LEN" --batch-size 64 \
            --config-chunk 0 --repeats 2 --out "$OUT/sweep_benchmark.json" > "$OUT/sweep_benchmark.txt" \
            || status=$?
    fi
fi
echo "== engine (vectorized vs sequential) =="
cat "$OUT/engine_benchmark.txt" 2>/dev/null || true
if [ -n "$SWEEP_DATA" ]; then
    echo "== sweep (one program vs one by one) =="
    cat "$OUT/sweep_benchmark.txt" 2>/dev/null || true
fi
exit "$status"
