#!/usr/bin/env bash
# The one-shot check on a borrowed GPU machine, run from the repository root: bash benchmarks/gpu_check.sh
#
# The machine has torch (CUDA), pytest, numpy, scipy, matplotlib, rich, tensorboard; the rest of what the package
# imports (hydra-core, omegaconf, antlr4-python3-runtime, ase, vesin) comes as wheels in .whl/ (carried along,
# git-ignored) and is installed into /tmp/site. Steps, each under a time limit taken from one deadline (DEADLINE_S,
# default 345 s), going on after a failure; logs and results in $OUT:
#   1. the machine: GPU, driver, torch, CUDA, NCCL, compilers                          -> env.log
#   2. tests/gpu, and beside it a CPU subset of the suite (tests/training, tests/models)
#      (the tests measure no time, so they share the machine; the default dataset is built meanwhile)
#                                                                                      -> gpu_tests.log, cpu_subset.log
#   3. benchmarks/gpu_training.py (eager vs compiled steps/s), then the Trainer/bare-loop overhead on cuda
#      (alone on the machine)                                                          -> gpu_training.json, gpu_bench.log
#   4. the default job (mlff-train) on cuda, with what time is left               -> default_job.log, *_metrics.json
#   5. each step's exit code and headline lines                                        -> summary.txt
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
DEADLINE_S=${DEADLINE_S:-345}
REPO=$PWD
PY=${PY:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=python3
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
# One dataset cache for the benchmarks and the default job (the tests keep their own, see tests/conftest.py).
export XDG_CACHE_HOME=$WORK/cache
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

# The smaller of $1 seconds and the time left before the deadline (at least 1 s).
limit() {
    local left=$((DEADLINE_S - SECONDS))
    ((left > $1)) && left=$1
    ((left < 1)) && left=1
    echo "$left"
}
step() { echo; echo "=== [${SECONDS} s] $*"; }
record() { echo "$1: exit $2 (at ${SECONDS} s)" | tee -a "$SUMMARY"; }

step "1. install .whl/ into /tmp/site; the machine"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
record "install" $?
export PYTHONPATH=/tmp/site:$REPO
# An installed package maps conf/ to mlff_distiller.conf (pyproject: package-dir); a bare checkout needs this link.
if [ ! -e mlff_distiller/conf ]; then
    ln -s ../conf mlff_distiller/conf && trap 'rm -f "$REPO/mlff_distiller/conf"' EXIT
fi
{
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
    "$PY" - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available(), "| devices", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| bf16", torch.cuda.is_bf16_supported(),
          "| NCCL", torch.cuda.nccl.version(), "| TF32 matmul", torch.backends.cuda.matmul.allow_tf32)
for name in ("triton", "hydra", "omegaconf", "antlr4", "ase", "vesin", "numpy", "scipy", "pytest", "xdist"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {module.__file__}")
    except Exception as error:  # noqa: BLE001 - a report line, not a failure
        print(f"{name}: {type(error).__name__}: {error}")
print("mlff_distiller.conf:", importlib.import_module("mlff_distiller.conf").__path__)
EOF
    echo "compilers: $(command -v gcc cc g++ | tr '\n' ' ')"
    echo "cpus: $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB memory"}')"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"

step "2. tests/gpu | tests/training tests/models on the CPU | the default dataset, all three in parallel"
# Built with 4 processes per phase; the same file (and cache key) as the default job's 2.
timeout -k 10 "$(limit 200)" "$PY" -c 'import time
from mlff_distiller.teachers.generate import build_default_dataset as build
start = time.perf_counter()
path = build(num_structures=1100, seed=0, progress=False, workers=4, label_workers=4)
print(f"default dataset: {path} in {time.perf_counter() - start:.0f} s")' >"$WORK/dataset.log" 2>&1 &
dataset_pid=$!
timeout -k 10 "$(limit 150)" "$PY" -m pytest -q -rfEs -p no:cacheprovider tests/gpu >"$OUT/gpu_tests.log" 2>&1 &
gpu_tests_pid=$!
timeout -k 10 "$(limit 100)" "$PY" -m pytest -q -n 8 -p no:cacheprovider tests/training tests/models \
    >"$OUT/cpu_subset.log" 2>&1 &
cpu_subset_pid=$!
wait "$gpu_tests_pid"
record "tests/gpu" $?
wait "$cpu_subset_pid"
record "cpu subset (tests/training tests/models, -n 8)" $?
tail -n 45 "$OUT/gpu_tests.log"
tail -n 12 "$OUT/cpu_subset.log"

step "3. benchmarks/gpu_training.py, then benchmarks/trainer_overhead.py --device cuda"
wait "$dataset_pid"
record "default dataset build" $?
tail -n 1 "$WORK/dataset.log"
bench_limit=$(limit 200)
(
    set -o pipefail
    timeout -k 10 "$bench_limit" "$PY" benchmarks/gpu_training.py --json "$OUT/gpu_training.json" \
        --budget $((bench_limit - 20)) 2>&1 | tee "$OUT/gpu_bench.log"
)
record "gpu_training.py" $?
(
    set -o pipefail
    timeout -k 10 "$(limit 60)" "$PY" benchmarks/trainer_overhead.py --device cuda --repeats 3 --epochs 2 2>&1 |
        tee -a "$OUT/gpu_bench.log"
)
record "trainer_overhead.py --device cuda" $?

step "4. the default job on cuda (mlff-train trainer.device=cuda)"
if ((DEADLINE_S - SECONDS >= 40)); then
    (
        set -o pipefail
        timeout -k 10 "$(limit 150)" "$PY" -m mlff_distiller.train trainer.device=cuda \
            hydra.run.dir="$WORK/default_job" 2>&1 | tee "$OUT/default_job.log"
    )
    record "default job" $?
    cp "$WORK/default_job/metrics.json" "$OUT/default_job_cuda_metrics.json" 2>/dev/null ||
        tail -n 30 "$WORK/default_job/train.log" >>"$OUT/default_job.log" 2>/dev/null
else
    record "default job: skipped, $((DEADLINE_S - SECONDS)) s left" 0
fi

step "5. summary"
{
    grep -E "^(FAILED|ERROR)|passed|failed|skipped in" "$OUT/gpu_tests.log" | tail -n 20
    grep -A 40 "figures ===" "$OUT/gpu_tests.log" | grep -v "short test summary" | head -n 20
    grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/cpu_subset.log" | tail -n 12
    grep "default dataset" "$WORK/dataset.log"
    grep -E "steps/s|/eager|stopped|failed|not run" "$OUT/gpu_bench.log"
    grep -E "^Trainer/bare|^bare |^Trainer " "$OUT/gpu_bench.log"
    grep -E "Best val/force_mae|error" "$OUT/default_job.log" 2>/dev/null
    "$PY" -c 'import json, sys
m = json.load(open(sys.argv[1]))
print("default job on cuda:", {k: round(v, 2) for k, v in m.items() if k in ("best/epoch", "global_step",
      "test/energy_mae_per_atom", "test/force_mae", "test/force_std", "epoch_time_s", "train/samples_per_s")})' \
        "$OUT/default_job_cuda_metrics.json" 2>/dev/null
    echo "total ${SECONDS} s"
} >>"$SUMMARY"
cat "$SUMMARY"
