#!/usr/bin/env bash
# One-shot GPU check for a session lent a device machine (its 15 minutes count every start and idle second).
#
# Prepare here (CPU), once: `make device-inputs` (both paths git-ignored; they travel with the `run` tool's
# `carry`), i.e.
#   .venv/bin/pip download --no-deps dp-accounting==0.6.0 attrs -d wheels/   # the device image lacks them
#   .venv/bin/fedscope data prepare --format abxi --input ../shared/data/abxi-food-kitchen --output out/afk
# Then, on the device (repository root; carry ["wheels", "out/afk"]; timeout_s ~540):
#   bash benchmarks/device_check.sh
# It puts this package and the unpacked wheels on PYTHONPATH (the image has jax/flax/optax/orbax), times the
# privacy sweep against its configurations one by one ($OUT/sweep_benchmark.json), then checks that the
# vectorized round equals the sequential reference on the device and runs the engine benchmark
# ($OUT/engine_benchmark.json); the two tables are printed last. SWEEP_DATA= (empty) skips the sweep;
# CLIENTS, SWEEP_ROUNDS, SWEEP_CLIENTS, SWEEP_FRACTION, SWEEP_CHUNK (clients per chunk, 0 = tune), DIM, MAX_LEN
# resize the workloads; SWEEP_ARGS adds arguments to the sweep benchmark. Each part runs under a time limit
# (ENGINE_LIMIT, SWEEP_LIMIT seconds; together under the call's timeout_s) and rewrites its JSON as it goes
# (after each client count / each repeat), so a part cut short still reports what it finished.
# The sweep JSON also prices a slot step of each round program, a centralized step and a validation pass on the
# device; back here, `fedscope reproduce --profile full --inventory --calibrate <files_at>/sweep_benchmark.json
# --out out/reproduce-full` turns them into the full profile's hours on that device (docs/experiments.md).
set -euo pipefail

OUT="${OUT:-.}"
CLIENTS="${CLIENTS:-8,32,128,512}"
DIM="${DIM:-64}"
MAX_LEN="${MAX_LEN:-50}"
SWEEP_DATA="${SWEEP_DATA-out/afk}"
SWEEP_ROUNDS="${SWEEP_ROUNDS:-5}"
SWEEP_CLIENTS="${SWEEP_CLIENTS:-20}"
# 20 clients, all in every round, d 64, length 50, local batches of train.batch_size (256): the full profile's
# privacy-utility cells on abxi (less validation), so the sweep's seconds per round also size that study here
SWEEP_FRACTION="${SWEEP_FRACTION:-1.0}"
# clients per vmapped chunk on both sides of the sweep benchmark. Fixed, not tuned (0): tuning compiles each
# candidate (1, 2, 4 for these buckets of 13, 4, 2, 1 clients) once per privacy mode and once for the sweep,
# ~12 round programs, more than the device call can afford; 4 is the largest candidate
SWEEP_CHUNK="${SWEEP_CHUNK:-4}"
# the sweep first (issue 7's figure), then the engine; together under the call's timeout_s
SWEEP_LIMIT="${SWEEP_LIMIT:-300}"
ENGINE_LIMIT="${ENGINE_LIMIT:-200}"
read -r -a SWEEP_ARGS <<< "${SWEEP_ARGS:-}"   # extra `fedscope benchmark --sweep` arguments, e.g. --set k=v
PY="${PYTHON:-python3}"
# no progress bars: stderr (the run tool returns the last 12,000 characters of stdout + stderr) keeps the errors
export FEDSCOPE_NO_PROGRESS="${FEDSCOPE_NO_PROGRESS:-1}"

# The carried wheels (pure Python: py3-none-any) are unpacked into a folder on PYTHONPATH rather than
# pip-installed: the image's python may be a distribution's, marked externally managed (PEP 668), where a
# plain `pip install` is refused, and nothing is left behind in the image.
DEPS="$(mktemp -d)"
for wheel in wheels/*.whl; do
    [ -f "$wheel" ] && "$PY" -m zipfile -e "$wheel" "$DEPS"
done
# this package from the working tree, without installing it (an editable install needs setuptools' wheel
# support in the image's python; the package needs no installed metadata)
export PYTHONPATH="$PWD:$DEPS${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import jax, dp_accounting as dpa
print('jax', jax.__version__, jax.devices(), '| dp_accounting:', dpa.__file__)"

status=0
limited() {   # limited SECONDS NAME CMD...: run CMD, stopped after SECONDS (its JSON keeps what it finished)
    local seconds="$1" name="$2" rc=0
    shift 2
    timeout -k 15 "$seconds" "$@" || rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "$name: stopped at its ${seconds} s limit; what it finished is in its JSON" | tee -a "$OUT/limits.txt" >&2
    fi
    return "$rc"
}

if [ -n "$SWEEP_DATA" ]; then
    if [ ! -f "$SWEEP_DATA/dataset.json" ]; then
        echo "SWEEP_DATA=$SWEEP_DATA: no prepared dataset there (carry it, see the top of this file)" >&2
        status=1
    else
        # 12 configurations: {personalized, uniform} x eps {1, 2, 4, 8, 16, inf}, all vectorized at once
        limited "$SWEEP_LIMIT" sweep "$PY" -m fedscope_jax benchmark --sweep --data "$SWEEP_DATA" \
            --rounds "$SWEEP_ROUNDS" --clients "$SWEEP_CLIENTS" --fraction "$SWEEP_FRACTION" \
            --chunk-size "$SWEEP_CHUNK" \
            --dim "$DIM" --max-len "$MAX_LEN" --config-chunk 0 --repeats 2 \
            "${SWEEP_ARGS[@]}" --out "$OUT/sweep_benchmark.json" > "$OUT/sweep_benchmark.txt" || status=$?
    fi
fi
# then the engine (vectorized == sequential on the device, and its benchmark; one JSON row per client count)
limited "$ENGINE_LIMIT" engine "$PY" benchmarks/engine_device.py --clients "$CLIENTS" --dim "$DIM" \
    --max-len "$MAX_LEN" > "$OUT/engine_benchmark.txt" || status=$?

# the tables, from the JSON files: a part stopped at its limit has the rows / repeats it finished
"$PY" - "$OUT" "${SWEEP_DATA:+sweep}" <<'PY' || status=1
import json, sys
from pathlib import Path
from fedscope_jax.bench.engine import format_table
from fedscope_jax.bench.sweep import format_sweep_table
out = Path(sys.argv[1])
parts = [("sweep (one program vs one by one)", "sweep_benchmark.json", format_sweep_table)] if sys.argv[2] else []
parts.append(("engine (vectorized vs sequential)", "engine_benchmark.json", format_table))
for title, name, fmt in parts:
    print(f"== {title} ==")
    path = out / name
    if not path.is_file():
        print(f"no {name}: the part failed before its first result (see its .txt and stderr)")
        continue
    report = json.loads(path.read_text())
    if "repeats_done" in report:
        print(f"repeats done: {report['repeats_done']} of {report['repeats']}")
    elif not report.get("complete", True):
        print("stopped early: the client counts below only")
    print(fmt(report))
PY
cat "$OUT/limits.txt" 2>/dev/null || true
exit "$status"
