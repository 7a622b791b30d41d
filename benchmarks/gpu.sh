#!/usr/bin/env bash
# The GPU speed table in one go: every line of the target table through benchmarks/bench.py (this project's
# path only, --no-baseline), the full-dataset projection last. Installs nothing; writes only OUTDIR (and
# temporary files under /tmp).
#
#   bash benchmarks/gpu.sh OUTDIR            # full sizes on the GPU (ViT-S/8, R = 320; under 6 min on an H100)
#   bash benchmarks/gpu.sh OUTDIR --quick    # tiny sizes on the CPU (dry run of the same script)
#
# OUTDIR/bench.jsonl: one JSON line per stage (bench.py's fields); OUTDIR/log: stderr and the per-stage
# times; OUTDIR/table.txt: the target table and the projection. A stage that errors fails the script with its
# name (after the table of the lines measured so far), and so does a rate that is not a finite positive number. Cheap and most important lines run first, so
# a timeout still leaves results. GPU_SH_ONLY="name ..." runs only the named lines (tests). PYTHON overrides
# python3.
set -euo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bash benchmarks/gpu.sh OUTDIR [--quick]" >&2
    exit 2
fi
OUT=$1
QUICK=${2:-}
if [[ -n $QUICK && $QUICK != --quick ]]; then
    echo "unknown option: $QUICK (expected --quick)" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
mkdir -p "$OUT"
JSONL="$OUT/bench.jsonl"
LOG="$OUT/log"
LINES_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gpu_sh.XXXXXX")  # one JSON file per line; OUTDIR keeps only its 3 files
trap 'rm -rf "$LINES_DIR"' EXIT
: >"$JSONL"
: >"$LOG"

if [[ -n $QUICK ]]; then
    COMMON=(--quick --no-baseline --repeats 1)
    R_FAST=1; R_MID=1; R_SLOW=1; TRAIN_TARGET=8; PSEUDO_BATCH=4; TO_FAST=120; TO_SLOW=240; WORKERS_MORE=1
else
    COMMON=(--no-baseline)
    R_FAST=20; R_MID=10; R_SLOW=4; TRAIN_TARGET=256; PSEUDO_BATCH=32; TO_FAST=90; TO_SLOW=240
    WORKERS_MORE=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # all CPUs but two (the stage's process, pinning)
fi

# line name | per-line timeout (s) | bench.py arguments; the order is the run order
LINES=(
    "pseudo171_bf16|$TO_FAST|--stages pseudo171_bf16 --repeats $R_FAST"
    "pseudo27_bf16|$TO_FAST|--stages pseudo27_bf16 --repeats $R_FAST"
    "pseudo171|$TO_FAST|--stages pseudo171 --repeats $R_MID"
    "pseudo27|$TO_FAST|--stages pseudo27 --repeats $R_MID"
    "evaluate|$TO_FAST|--stages evaluate --repeats $R_FAST"
    "train_target|$TO_FAST|--stages train --train-batch $TRAIN_TARGET --repeats $R_MID"
    "extract|$TO_FAST|--stages extract --repeats $R_SLOW"
    "extract_tf32|$TO_FAST|--stages extract --repeats $R_SLOW --tf32 on"
    "train_pipeline|$TO_FAST|--stages train --train-batch 32 --repeats $R_FAST"
    "pseudo171_tf32|$TO_FAST|--stages pseudo171 --repeats $R_MID --tf32 on"
    "load_pseudo|$TO_FAST|--stages load_pseudo"
    "load_extract|$TO_FAST|--stages load_extract"
    "load_train|$TO_FAST|--stages load_train"
    "load_train_device_more_workers|$TO_FAST|--stages load_train_device --workers $WORKERS_MORE"
    "load_train_device|$TO_FAST|--stages load_train_device"
    "cluster|$TO_SLOW|--stages cluster --cluster-backend auto"
    "pseudo171_b32|$TO_FAST|--stages pseudo171 --batch $PSEUDO_BATCH --repeats $R_MID"
    "load_device_decode|$TO_FAST|--stages load_device_decode"
    "load_extract_device|$TO_FAST|--stages load_extract_device"
)

{
    echo "# gpu.sh $(date -u +%FT%TZ) quick=${QUICK:-no} commit=$(git rev-parse --short HEAD 2>/dev/null || echo ?)"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} >>"$LOG" 2>&1

fail() {  # the lines measured so far, then the failure (exit 1)
    if [[ -s $JSONL ]]; then
        echo
        "$PY" benchmarks/projection.py "$JSONL" | tee "$OUT/table.txt" || true
    fi
    echo "FAILED: $1" >&2
    exit 1
}

START=$(date +%s)
printf '%-20s %8s %8s\n' line seconds total
for entry in "${LINES[@]}"; do
    IFS='|' read -r name limit args <<<"$entry"
    if [[ -n ${GPU_SH_ONLY:-} && " $GPU_SH_ONLY " != *" $name "* ]]; then
        continue
    fi
    stage=$(sed -E 's/.*--stages ([a-z0-9_]+).*/\1/' <<<"$args")
    t0=$(date +%s.%N)
    echo "## $name: bench.py ${COMMON[*]} $args" >>"$LOG"
    # shellcheck disable=SC2086
    if ! timeout "$limit" "$PY" benchmarks/bench.py "${COMMON[@]}" $args >"$LINES_DIR/$name.json" 2>>"$LOG"; then
        tail -n 20 "$LOG" >&2
        fail "$name (bench.py stage $stage exited non-zero or ran past ${limit} s; log: $LOG)"
    fi
    cat "$LINES_DIR/$name.json" >>"$JSONL"
    if ! why=$("$PY" benchmarks/projection.py "$LINES_DIR/$name.json" --check "$stage" 2>&1); then
        cat "$LINES_DIR/$name.json" >&2
        echo "$why" | tee -a "$LOG" >&2
        fail "$name (stage $stage: no finite positive rate)"
    fi
    t1=$(date +%s.%N)
    line=$(awk -v n="$name" -v a="$t0" -v b="$t1" -v t="$(($(date +%s) - START))" \
        'BEGIN { printf "%-20s %8.1f %8d", n, b - a, t }')
    echo "$line"
    echo "## $line" >>"$LOG"
done

echo
"$PY" benchmarks/projection.py "$JSONL" | tee "$OUT/table.txt"
