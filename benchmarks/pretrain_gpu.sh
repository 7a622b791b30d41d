#!/usr/bin/env bash
# Pretrain a small DINO ViT on synthetic scenes, run the default pipeline with it, collect what to ship.
#
#   bash benchmarks/pretrain_gpu.sh OUTDIR [--quick]
#
# Run from anywhere (it finds the repository from its own path); needs python3 (or $PYTHON) with torch, timm,
# h5py, pyyaml, pillow, scipy, scikit-learn; no dvc, dvclive, faiss, network or install. On one H100 or H200:
# about 6.5 minutes, estimated; --quick: tiny sizes, 2-3 minutes on a 2-core CPU.
# Run one recipe at a time: two pretraining processes on one GPU each ran at under a third of the speed of one
# alone (H200, docs/experiments.md).
#   1. generates the pretraining scenes with the synthetic generator under seeds 101.. (the pipeline's own set
#      is seed 0): 16 x 1,000 = 16,000 scenes of 128 px (--quick: 2 x 24 of 64 px), in parallel;
#   2. measures the pretraining throughput in a 30-step probe and sizes the run in steps to fill
#      PRETRAIN_SECONDS (default 200 s; at least 300 and at most 20,000 steps, so that the lr / momentum
#      schedules, planned over the steps, run to their end); `--minutes` is only the safety stop;
#   3. `transfgu pretrain` (vit_mini, patch 8, 64 px global / 32 px local crops, batch 1,024 at lr 2e-3 (DINO's
#      0.0005 x batch / 256), bf16, images kept on the GPU), writing the checkpoint and the teacher-backbone-only
#      file to ship;
#   3b. benchmarks/backbone_probe.py on the teacher and the random backbone (the quick signals, probe.jsonl);
#   4. the default pipeline (python stages/<stage>.py, prepare ... evaluate, no dvc) with backbone.checkpoint =
#      the new teacher, at granularity 6 and 12, in a scratch copy of the code (the repository's outputs/ and
#      data/ are not touched);
#   5. copies into OUTDIR: the checkpoint and the teacher file, the loss curve and pretraining summary, each
#      granularity's metrics.json, pseudo_metrics.json, per_class_iou.csv and train_log.csv, the params files,
#      summary.json (one JSON line, also printed last) and pretrain_gpu.log (everything printed).
#
# Environment (all optional):
#   PYTHON=EXE              the interpreter (default python3)
#   PRETRAIN_LAYOUT=scenes  the pretraining images: scenes (as the pipeline's sets) or objects (one large thing each)
#   PRETRAIN_SECONDS=S      pretraining time the run is sized to (default 200; --quick: 20)
#   PRETRAIN_BATCH=N        pretraining batch (default 1024; not with --quick)
#   PRETRAIN_LR=LR          pretraining learning rate (default 0.0005 x batch / 256; not with --quick)
#   PRETRAIN_EXTRA="..."    more `transfgu pretrain` options (later ones win), e.g. "--compile" or "--local-scale 0.05 0.25"
#   PIPELINE=0              stop after step 3b (pretrain only; the teacher file tried in the pipeline elsewhere)
#   WORK=DIR                the scratch folder (default a new one under TMPDIR or /tmp, removed at the end)
#   KEEP_WORK=1             keep the scratch folder
set -euo pipefail

usage() { echo "usage: bash benchmarks/pretrain_gpu.sh OUTDIR [--quick]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
QUICK=0
if [[ $# -eq 2 ]]; then [[ $2 == --quick ]] || usage; QUICK=1; fi
LAYOUT=${PRETRAIN_LAYOUT:-scenes}
case $LAYOUT in scenes|objects) ;; *) echo "PRETRAIN_LAYOUT=$LAYOUT: expected scenes or objects" >&2; exit 2;; esac
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
LOG=$OUTDIR/pretrain_gpu.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
T0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*"; }
trap 'rc=$?; if [[ $rc -ne 0 ]]; then echo "=== FAILED (exit $rc) at line $LINENO after $(( $(date +%s) - T0 )) s: see $LOG"; fi' EXIT

WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/pretrain_gpu.XXXXXX")}
mkdir -p "$WORK"
if [[ ${KEEP_WORK:-0} != 1 ]]; then trap 'rc=$?; rm -rf "$WORK"; if [[ $rc -ne 0 ]]; then echo "=== FAILED (exit $rc) after $(( $(date +%s) - T0 )) s: see $LOG"; fi' EXIT; fi
cp -r "$REPO/stages" "$REPO/transfgu" "$REPO/dvc.yaml" "$WORK/"
cp "$REPO/params.yaml" "$WORK/params.base.yaml"
rm -rf "$WORK"/stages/__pycache__ "$WORK"/transfgu/__pycache__
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRANSFGU_PROGRESS=lines
cd "$WORK"

if [[ $QUICK == 1 ]]; then
    SETS=2; PER_SET=24; SCENE=64
    PRE=(--image-size 64 --global-size 32 --local-size 16 --n-local 2 --batch-size 16 --out-dim 64
         --hidden-dim 64 --bottleneck-dim 32)
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-20}; MIN_STEPS=20; MAX_STEPS=60; PROBE=5; PROBE_IMAGES=16
    PIPE='{"n_train": 40, "n_val": 16, "epochs": 2}'
else
    SETS=16; PER_SET=1000; SCENE=128
    BATCH=${PRETRAIN_BATCH:-1024}
    PRE=(--image-size 128 --global-size 64 --local-size 32 --n-local 4 --batch-size "$BATCH" --out-dim 1024
         --hidden-dim 1024 --bottleneck-dim 256 --amp --lr "${PRETRAIN_LR:-$("$PY" -c "print(5e-4 * $BATCH / 256)")}")
    PRETRAIN_SECONDS=${PRETRAIN_SECONDS:-200}; MIN_STEPS=300; MAX_STEPS=20000; PROBE=30; PROBE_IMAGES=200
    PIPE='{}'
fi
read -r -a EXTRA <<<"${PRETRAIN_EXTRA:-}"
COMMON=(--arch vit_mini --patch-size 8 --lr 5e-4 "${PRE[@]}" --min-lr 1e-6 --momentum-teacher 0.996
        --seed 0 --preload --num-workers 8 --no-progress ${EXTRA[@]+"${EXTRA[@]}"})

stamp "repository $REPO, scratch $WORK, output $OUTDIR, quick=$QUICK"
"$PY" - <<'EOF'
import importlib, platform, sys
missing = []
for name in ("torch", "torchvision", "timm", "h5py", "yaml", "PIL", "scipy", "numpy", "tqdm"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(f"{name} ({e})")
if missing:
    sys.exit("missing Python packages (this script installs nothing): " + ", ".join(missing))
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else ""), flush=True)
EOF

stamp "1. pretraining scenes: $SETS sets x $PER_SET at $SCENE px (seeds 101..), layout $LAYOUT"
"$PY" - "$SETS" "$PER_SET" "$SCENE" "$LAYOUT" <<'EOF'
import sys
from multiprocessing import Pool
from transfgu.data.synthetic import write_synthetic_dataset
sets, per, size = map(int, sys.argv[1:4])
layout = sys.argv[4]
jobs = [(f"pretrain_data/set{s}", per, 0, size, s, layout) for s in range(101, 101 + sets)]
with Pool(min(sets, 16)) as pool:
    pool.starmap(write_synthetic_dataset, jobs)
EOF
IMAGES=(pretrain_data/set*/images/train)

stamp "2. throughput probe: $PROBE steps"
"$PY" -m transfgu.cli pretrain --images "${IMAGES[@]}" "${COMMON[@]}" --steps "$PROBE" --log-every "$PROBE" \
    --out probe/probe.pth
STEPS=$("$PY" - "$PRETRAIN_SECONDS" "$MIN_STEPS" "$MAX_STEPS" <<'EOF'
import csv, json, statistics, sys
budget, lo, hi = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
rows = list(csv.DictReader(open("probe/probe.pth.loss.csv")))
rate = statistics.median(float(r["images_per_s"]) for r in rows[len(rows) // 2:])  # after the warm-up steps
batch = json.load(open("probe/probe.pth.summary.json"))["batch_size"]
steps = int(max(lo, min(hi, budget * rate / batch)))
print(f"probe: {rate:.0f} images/s at batch {batch} -> {steps} steps in about {steps * batch / rate:.0f} s",
      file=sys.stderr)
print(steps)
EOF
)
MINUTES=$("$PY" -c "print(round(($PRETRAIN_SECONDS * 1.3 + 30) / 60, 2))")

CKPT=weights/dino_vit_mini8_synthetic.pth
TEACHER=weights/dino_vit_mini8_synthetic_teacher.pth
stamp "3. transfgu pretrain: $STEPS steps, safety stop --minutes $MINUTES"
"$PY" -m transfgu.cli pretrain --images "${IMAGES[@]}" "${COMMON[@]}" --steps "$STEPS" --minutes "$MINUTES" \
    --log-every $(( STEPS / 20 > 0 ? STEPS / 20 : 1 )) --checkpoint-minutes 2 --out "$CKPT" --teacher-out "$TEACHER"
cp "$CKPT" "$TEACHER" "$CKPT.loss.csv" "$CKPT.summary.json" "$OUTDIR/"
"$PY" -c "
import os, sys
mb = os.path.getsize('$TEACHER') / 2 ** 20
print(f'teacher file {mb:.2f} MB')
sys.exit(0 if mb <= 20 else 'the teacher file is over 20 MB')"

stamp "3b. quick signals of the teacher against the random backbone (benchmarks/backbone_probe.py)"
"$PY" "$REPO/benchmarks/backbone_probe.py" random "$TEACHER" --images "$PROBE_IMAGES" | tee "$OUTDIR/probe.jsonl"

GRANULARITIES=(6 12)
[[ ${PIPELINE:-1} == 0 ]] && GRANULARITIES=()
for G in ${GRANULARITIES[@]+"${GRANULARITIES[@]}"}; do
    stamp "4. default pipeline at granularity $G with the new teacher"
    "$PY" - "$G" "$WORK/$TEACHER" "$PIPE" <<'EOF'
import json, sys
import yaml
g, teacher, pipe = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
p = yaml.safe_load(open("params.base.yaml"))
p["granularity"] = g
p["dataset"]["root"] = "data/synthetic"
p["backbone"].update(arch="vit_mini", patch_size=8, checkpoint=teacher)
try:  # the dense CRF (evaluate.crf) needs the crf extra, which the GPU machine may lack: then plain scores only
    import pydensecrf.densecrf  # noqa: F401
except ImportError:
    p["evaluate"]["crf"] = False
if pipe:
    p["dataset"]["synthetic"].update(n_train=pipe["n_train"], n_val=pipe["n_val"])
    p["train"]["epochs"] = pipe["epochs"]
    p["train"]["bootstrap_start"] = 1
yaml.safe_dump(p, open(f"params.g{g}.yaml", "w"), sort_keys=False)
EOF
    export TRANSFGU_PARAMS=params.g$G.yaml
    for STAGE in prepare extract cluster pseudo train evaluate; do
        [[ $G == 12 && $STAGE == extract ]] && continue  # the crop features do not depend on the granularity
        stamp "   $STAGE (g$G)"
        "$PY" "stages/$STAGE.py"
    done
    mkdir -p "$OUTDIR/g$G"
    cp outputs/metrics.json outputs/pseudo_metrics.json outputs/per_class_iou.csv outputs/train_log.csv \
        "params.g$G.yaml" "$OUTDIR/g$G/"
done
unset TRANSFGU_PARAMS

stamp "5. summary"
"$PY" - "$OUTDIR" "$(( $(date +%s) - T0 ))" "$QUICK" "${GRANULARITIES[*]+${GRANULARITIES[*]}}" "$LAYOUT" <<'EOF'
import json, sys
from pathlib import Path
out, wall, quick = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
granularities = [int(g) for g in sys.argv[4].split()]
pre = json.loads((out / "dino_vit_mini8_synthetic.pth.summary.json").read_text())
s = {"quick": quick, "wall_s": wall, "layout": sys.argv[5], "pretrain": {k: pre[k] for k in (
    "steps_planned", "steps_done", "completed", "stopped_by", "images", "batch_size", "images_per_s", "loss_first",
    "loss_last", "train_s", "teacher_mb", "device", "amp", "compile")}}
probes = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines() if line.strip()]
run_fields = ("checkpoint", "images", "size", "seed", "seconds")  # the rest are the probe's signals
s["probe"] = {("random" if r["checkpoint"] == "random" else "teacher"): {k: v for k, v in r.items()
              if k not in run_fields} for r in probes}
for g in granularities:
    m = json.loads((out / f"g{g}" / "metrics.json").read_text())
    p = json.loads((out / f"g{g}" / "pseudo_metrics.json").read_text())
    s[f"g{g}"] = {k: round(v, 2) for k, v in {**m, **p}.items() if k in (
        "miou", "pixel_accuracy", "miou_things", "miou_stuff", "baseline_miou", "baseline_pixel_accuracy",
        "pseudo_miou", "pseudo_miou_things", "pseudo_miou_stuff", "attention_foreground_thing_share",
        "thing_share")}
line = json.dumps(s)
(out / "summary.json").write_text(line + "\n")
print(line)
EOF
stamp "done: $OUTDIR"
