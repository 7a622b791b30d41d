#!/usr/bin/env bash
# The GPU speed table in one go: every line of the target table through benchmarks/bench.py, the main lines
# with the straightforward baseline of the same maths measured in the same process (the table's baseline
# column), option and variant lines with --no-baseline; the full-dataset projection last. Installs nothing
# (but GPU_SH_WHEELS, in a temporary folder); writes only OUTDIR (and temporary files under TMPDIR).
#
#   bash benchmarks/gpu.sh OUTDIR            # full sizes on the GPU (ViT-S/8, R = 320; under 6 min on an H100)
#   bash benchmarks/gpu.sh OUTDIR --quick    # tiny sizes on the CPU (dry run of the same script)
#
# OUTDIR/bench.jsonl: one JSON line per stage (bench.py's fields); OUTDIR/log: stderr and the per-stage
# times; OUTDIR/table.txt: the target table and the projection. A stage that errors fails the script with its
# name (after the table of the lines measured so far), and so does a rate that is not a finite positive
# number. Cheap and most important lines run first. A line skipped by the budget is named in the table, not
# failed, so that an outer `timeout` never has to kill the script before it writes its table.
#
# Environment (all optional):
#   GPU_SH_BUDGET=SECONDS  cap on the whole loop (default 330, none with --quick): later lines are skipped
#   GPU_SH_WHEELS=DIR      DIR's wheels on PYTHONPATH for this run only (faiss-cpu: the k-means line's baseline)
#   GPU_SH_ONLY="name ..." run only the named lines (tests)
#   GPU_SH_COMMIT=REV      the commit named in the log (a copied checkout's HEAD can be older than its files)
#   PYTHON=EXE             the interpreter (default python3)
#   TMPDIR=DIR             where the per-line files and the wheels' folder go (default /tmp)
#   (the faiss-cpu wheel to carry: pip download --no-deps --only-binary=:all: --python-version 3.12 \
#    --platform manylinux_2_28_x86_64 -d DIR faiss-cpu)
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
if [[ -n ${GPU_SH_WHEELS:-} ]]; then  # carried wheels (faiss-cpu for the k-means baseline), for this run only
    shopt -s nullglob
    wheels=("$GPU_SH_WHEELS"/*.whl)
    shopt -u nullglob
    if (( ! ${#wheels[@]} )); then
        echo "GPU_SH_WHEELS=$GPU_SH_WHEELS: no .whl file there" >&2
        exit 2
    fi
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$LINES_DIR/site" \
            "${wheels[@]}" >>"$LOG" 2>&1; then
        tail -n 5 "$LOG" >&2
        echo "FAILED: installing the wheels of GPU_SH_WHEELS=$GPU_SH_WHEELS (log: $LOG)" >&2
        exit 1
    fi
    export PYTHONPATH="$PYTHONPATH:$LINES_DIR/site"  # after the checkout and what was already there
    echo "# wheels: ${wheels[*]##*/}" >>"$LOG"
fi

if [[ -n $QUICK ]]; then
    COMMON=(--quick --repeats 1)
    BUDGET=${GPU_SH_BUDGET:-0}
    R_FAST=1; R_MID=1; R_SLOW=1; TRAIN_TARGET=8; PSEUDO_BATCH=4; TO_FAST=120; TO_SLOW=240; WORKERS_MORE=1
else
    COMMON=()
    BUDGET=${GPU_SH_BUDGET:-330}
    R_FAST=20; R_MID=10; R_SLOW=4; TRAIN_TARGET=256; PSEUDO_BATCH=32; TO_FAST=90; TO_SLOW=240
    WORKERS_MORE=$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))  # all CPUs but two (the stage's process, pinning)
fi

# line name | per-line timeout (s) | bench.py arguments; the order is the run order. A line that names several
# stages runs them in one process (one torch import and CUDA start-up, about 10 s on the GPU machine, instead
# of one each). The lines without --no-baseline measure the table's baseline column (the bf16 pseudo lines
# share the fp32 lines' baseline, the original per-concept loop; a variant line's baseline is its main line's).
NB=--no-baseline
LINES=(
    "pseudo_bf16|$TO_FAST|--stages pseudo171_bf16 pseudo27_bf16 --repeats $R_FAST $NB"
    "pseudo_fp32|$TO_FAST|--stages pseudo171 pseudo27 --repeats $R_MID"
    "evaluate|$TO_FAST|--stages evaluate --repeats $R_FAST"
    "train_target|$TO_FAST|--stages train --train-batch $TRAIN_TARGET --repeats $R_MID"
    "extract|$TO_FAST|--stages extract --repeats $R_SLOW"
    "load_host|$TO_FAST|--stages load_pseudo load_extract load_train"
    "cluster|$TO_SLOW|--stages cluster --cluster-backend auto"
    "train_pipeline|$TO_FAST|--stages train --train-batch 32 --repeats $R_FAST $NB"
    "pseudo171_b32|$TO_FAST|--stages pseudo171 --batch $PSEUDO_BATCH --repeats $R_MID $NB"
    "load_train_device_more_workers|$TO_FAST|--stages load_train_device --workers $WORKERS_MORE $NB"
    "load_device|$TO_FAST|--stages load_train_device load_extract_device load_device_decode $NB"
    "extract_tf32|$TO_FAST|--stages extract --repeats $R_SLOW --tf32 on $NB"
    "pseudo171_tf32|$TO_FAST|--stages pseudo171 --repeats $R_MID --tf32 on $NB"
)

{
    echo "# gpu.sh $(date -u +%FT%TZ) quick=${QUICK:-no} budget=${BUDGET}s commit=${GPU_SH_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo ?)}"
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
} >>"$LOG" 2>&1

SKIPPED=()
table() {  # the target table and the projection of the lines measured, and the lines the budget skipped
    echo
    {
        "$PY" benchmarks/projection.py "$JSONL"
        if (( ${#SKIPPED[@]} )); then
            echo
            echo "not measured (GPU_SH_BUDGET=${BUDGET} s spent): ${SKIPPED[*]}"
        fi
    } | tee "$OUT/table.txt"
}

fail() {  # the lines measured so far, then the failure (exit 1)
    if [[ -s $JSONL ]]; then
        table || true
    fi
    echo "FAILED: $1" >&2
    exit 1
}

START=$(date +%s)
printf '%-32s %8s %8s\n' line seconds total
for entry in "${LINES[@]}"; do
    IFS='|' read -r name limit args <<<"$entry"
    if [[ -n ${GPU_SH_ONLY:-} && " $GPU_SH_ONLY " != *" $name "* ]]; then
        continue
    fi
    read -ra words <<<"$args"
    stages=()  # the words after --stages, up to the next option
    in_stages=0
    for w in "${words[@]}"; do
        if [[ $w == --* ]]; then
            in_stages=$([[ $w == --stages ]] && echo 1 || echo 0)
        elif (( in_stages )); then
            stages+=("$w")
        fi
    done
    budget_cut=0
    if (( BUDGET > 0 )); then
        left=$(( BUDGET - ($(date +%s) - START) ))
        if (( left < 5 )); then  # not worth starting: the rest is skipped
            SKIPPED+=("$name")
            echo "## $name: skipped, budget spent" >>"$LOG"
            continue
        fi
        if (( left < limit )); then
            limit=$left
            budget_cut=1
        fi
    fi
    t0=$(date +%s.%N)
    echo "## $name: bench.py ${COMMON[*]} $args" >>"$LOG"
    rc=0
    # shellcheck disable=SC2086
    timeout "$limit" "$PY" benchmarks/bench.py "${COMMON[@]}" $args >"$LINES_DIR/$name.json" 2>>"$LOG" || rc=$?
    grep -E '^\{.*\}$' "$LINES_DIR/$name.json" >>"$JSONL" || true  # every stage that finished, even if a later one did not
    if (( rc == 124 && budget_cut )); then  # stopped by the budget, not by its own limit
        SKIPPED+=("$name")
        echo "## $name: stopped after ${limit} s, budget spent" >>"$LOG"
        continue
    fi
    if (( rc != 0 )); then
        tail -n 20 "$LOG" >&2
        fail "$name (bench.py --stages ${stages[*]} exited non-zero or ran past ${limit} s; log: $LOG)"
    fi
    for stage in "${stages[@]}"; do
        if ! why=$("$PY" benchmarks/projection.py "$LINES_DIR/$name.json" --check "$stage" 2>&1); then
            cat "$LINES_DIR/$name.json" >&2
            echo "$why" | tee -a "$LOG" >&2
            fail "$name (stage $stage: no finite positive rate)"
        fi
    done
    t1=$(date +%s.%N)
    line=$(awk -v n="$name" -v a="$t0" -v b="$t1" -v t="$(($(date +%s) - START))" \
        'BEGIN { printf "%-32s %8.1f %8d", n, b - a, t }')
    echo "$line"
    echo "## $line" >>"$LOG"
done

if [[ ! -s $JSONL ]]; then
    fail "no line measured (GPU_SH_BUDGET=${BUDGET} s)"
fi
table
