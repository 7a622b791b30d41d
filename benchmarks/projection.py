"""The speed targets and the full-dataset projection, from the JSON lines of benchmarks/bench.py.

    python benchmarks/projection.py OUT/bench.jsonl                 # target table + full-run projection
    python benchmarks/projection.py OUT/bench.jsonl --check STAGE   # exit 1 unless STAGE has a finite rate > 0

The projection is a full COCO-Stuff-171 run on the card the lines were measured on: extract and pseudo over
the train images, k-means over the crop vectors extract would produce (crops per image measured x train
images) at cluster.niter iterations, train for `epochs` epochs at the pipeline's train batch with a validation
pass over the val images after each epoch, and one evaluation of the val images. Each stage runs at the
slower of its compute rate and its data loader's rate (load_extract, load_pseudo for pseudo and evaluate,
load_train). Image counts: the published COCO 2017 lists (118,287 train / 5,000 val) by default; the subsets
with stuff annotations (117,266 / 4,952) are 0.9 % / 1.0 % smaller.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COCO_TRAIN, COCO_VAL = 118_287, 5_000  # published COCO 2017 lists (annotated: 117,266 / 4,952)

# (line, stage, field, target, "min" or "max", row filter): the table for one H100, ViT-S/8, R = 320.
# A target of None is relative: the loader must deliver at least what the compute stage(s) named consume.
TARGETS = [
    ("pseudo masks fp32, 27 concepts", "pseudo27", "img_per_s", 300, "min", {}),
    ("pseudo masks fp32, 171 concepts", "pseudo171", "img_per_s", 300, "min", {"batch": 8}),
    ("pseudo fp32 171: labels same with TF32 on", "pseudo171", "tf32_label_agreement", 0.9, "min", {"batch": 8}),
    ("pseudo masks fp32, 171, batch 32 (pipeline)", "pseudo171", "img_per_s", 300, "min", {"batch": 32}),
    ("pseudo masks fp32 + TF32 (--tf32 on), 171", "pseudo171", "img_per_s", 300, "min", {"tf32": "on"}),
    ("pseudo masks bf16, 27 concepts", "pseudo27_bf16", "img_per_s", 1000, "min", {}),
    ("pseudo masks bf16, 171 concepts", "pseudo171_bf16", "img_per_s", 800, "min", {}),
    ("evaluate: forward+upsample+argmax+confusion", "evaluate", "img_per_s", 1000, "min", {}),
    ("train step, bootstrap + device augment, b256", "train", "img_per_s", 2000, "min", {"batch": 256}),
    ("extract (images at 2R, crops at R)", "extract", "img_per_s", 30, "min", {}),
    ("extract crops", "extract", "crops_per_s", 2000, "min", {}),
    ("extract: window decisions same with TF32 on", "extract", "tf32_window_agreement", 0.9, "min", {}),
    ("extract + TF32 (--tf32 on): selection forward", "extract", "img_per_s", 30, "min", {"tf32": "on"}),
    ("k-means 5M x 384 -> 171, 100 iterations (s)", "cluster", "seconds", 120, "max", {}),
    ("load extract (JPEG -> 2R) >= extract", "load_extract", "img_per_s", None, "min", ("extract",)),
    ("load pseudo/evaluate (JPEG -> R) >= them", "load_pseudo", "img_per_s", None, "min",
     ("pseudo27", "pseudo171", "pseudo27_bf16", "pseudo171_bf16", "evaluate")),
    ("load train (JPEG + HDF5 maps) >= train", "load_train", "img_per_s", None, "min", ("train",)),
    ("option: JPEG decoded on the device -> R", "load_device_decode", "img_per_s", None, "min",
     ("pseudo27", "pseudo171", "pseudo27_bf16", "pseudo171_bf16", "evaluate")),
    ("option decode: device, extract loader >= extract", "load_extract_device", "img_per_s", None, "min",
     ("extract",)),
    ("option decode: device, train loader >= train", "load_train_device", "img_per_s", None, "min", ("train",)),
]
HOST_LOADERS = {"extract": "load_extract", "pseudo": "load_pseudo", "train": "load_train"}
# `decode: device` in extract, pseudo and train (pseudo's loader: images only at R, as load_device_decode times)
DEVICE_LOADERS = {"extract": "load_extract_device", "pseudo": "load_device_decode", "train": "load_train_device"}
QUICK_NOTE = "tiny --quick sizes on the CPU: the targets are the GPU's, the statuses mean nothing here"


def load_rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip().startswith("{")]


def find(rows, stage: str, **match) -> dict | None:
    """The last row of `stage` whose fields equal `match` (the last row of `stage` when none does). Rows
    measured with `--tf32 on` count only when `match` asks for tf32="on"."""
    tf32 = match.get("tf32") == "on"
    hits = [r for r in rows if r.get("stage") == stage and (r.get("tf32") == "on") == tf32]
    exact = [r for r in hits if all(r.get(k) == v for k, v in match.items())]
    return (exact or hits or [None])[-1]


def good(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check(rows, stage: str) -> str | None:
    """Why the stage's last line is unusable (missing, or a rate that is not a finite positive number), or None."""
    row = ([r for r in rows if r.get("stage") == stage] or [None])[-1]  # the last line, whatever its options
    if row is None:
        return f"no JSON line for stage {stage}"
    fields = ["img_per_s"] + {"extract": ["crops_per_s"], "cluster": ["seconds"]}.get(stage, [])
    bad = [f"{f}={row.get(f)!r}" for f in fields if not good(row.get(f))]
    return f"stage {stage}: not a finite positive rate: {', '.join(bad)}" if bad else None


def line_row(rows, stage: str, filt) -> dict | None:
    """The row a TARGETS line reads: `find` with its filter when that is a dict of fields (a tuple names the
    consumers of a loader line instead)."""
    return find(rows, stage, **(filt if isinstance(filt, dict) else {}))


def target_table(rows) -> list[tuple[str, float | None, str, str]]:
    """(line, measured, target text, status) for every line of TARGETS; status ok / BELOW / ABOVE / missing."""
    out = []
    for line, stage, field, target, kind, filt in TARGETS:
        row = line_row(rows, stage, filt)
        value = row.get(field) if row else None
        if target is None:  # a loader: at least the fastest consumer measured
            consumers = [r["img_per_s"] for r in rows if r.get("stage") in filt and r.get("tf32") != "on"
                         and good(r.get("img_per_s"))]
            target = max(consumers) if consumers else None
        if not good(value):
            out.append((line, value, _target_text(target, kind), "missing"))
            continue
        if target is None:
            status = "no consumer measured"
        elif kind == "min":
            status = "ok" if value >= target else "BELOW"
        else:
            status = "ok" if value <= target else "ABOVE"
        out.append((line, value, _target_text(target, kind), status))
    return out


# a line whose own row has no baseline takes the last one measured for this stage (bf16 pseudo: the fp32 stage's,
# the same original per-concept loop)
BASE_STAGE = {"pseudo27_bf16": "pseudo27", "pseudo171_bf16": "pseudo171"}
BASELINE_NOTE = ("baseline: the straightforward path of the same maths, measured in the same run (float32, unfused "
                 "attention; extract: each window cut and resized on its own; pseudo: one backward per concept; train: "
                 "the encoder run for the teacher and again for the student; loaders: one process; k-means: {kmeans})")


def baseline_of(rows, stage: str, field: str, row: dict | None) -> float | None:
    """The straightforward path's value for a line of the target table: from the line's own row, else from the
    last row of its stage (or BASE_STAGE's) that measured one; None for fields without a baseline (agreements)
    and where none was measured. crops_per_s: the baseline's images/s x the crops per image (the same windows)."""
    if field not in ("img_per_s", "crops_per_s", "seconds"):
        return None
    key = "baseline_seconds" if field == "seconds" else "baseline_img_per_s"
    base = BASE_STAGE.get(stage, stage)
    for r in ([row] if row else []) + [r for r in reversed(rows) if r.get("stage") == base]:
        if good(r.get(key)):
            if field != "crops_per_s":
                return r[key]
            return r[key] * r["crops_per_image"] if good(r.get("crops_per_image")) else None
    return None


def baseline_column(rows) -> dict[str, tuple[float | None, float | None]]:
    """line -> (baseline value, speedup) for every line of TARGETS (speedup: how many times faster this project's
    path is; (None, None) where no baseline was measured)."""
    out = {}
    for line, stage, field, _, kind, filt in TARGETS:
        row = line_row(rows, stage, filt)
        value, base = row.get(field) if row else None, baseline_of(rows, stage, field, row)
        speedup = None
        if good(value) and base is not None:
            speedup = value / base if kind == "min" else base / value
        out[line] = (base, speedup)
    return out


def _target_text(target, kind) -> str:
    return "-" if target is None else (">= " if kind == "min" else "<= ") + f"{target:,.6g}"


def _rate(rows, stage, loader, strict: bool = False, **match):
    """min(compute rate, loader rate) and which of the two bounds it; (None, None) when compute is missing, and
    with `strict` when the loader's line is missing too."""
    row, load = find(rows, stage, **match), find(rows, loader) if loader else None
    if not row or not good(row.get("img_per_s")):
        return None, None
    if strict and not (load and good(load.get("img_per_s"))):
        return None, f"n/a (no {loader} line)"
    if load and good(load.get("img_per_s")) and load["img_per_s"] < row["img_per_s"]:
        return load["img_per_s"], f"{load['img_per_s']:,.0f} img/s ({loader}-bound; {stage} {row['img_per_s']:,.0f})"
    return row["img_per_s"], f"{row['img_per_s']:,.0f} img/s ({stage})"


def project(rows, n_train: int = COCO_TRAIN, n_val: int = COCO_VAL, epochs: int = 200, train_batch: int = 32,
            niter: int = 100, pseudo_stage: str = "pseudo171", dim: int = 384, k: int = 171,
            pseudo_batch: int = 32, loaders: dict = HOST_LOADERS) -> dict:
    """Seconds per stage of the full run (None where a needed line is missing) and the rates used; `loaders`:
    the loader line each of extract, pseudo and train runs with (evaluate always decodes on the host); other
    loaders than the host ones must have been measured."""
    notes, sec = {}, {}
    strict = loaders != HOST_LOADERS
    r, notes["extract"] = _rate(rows, "extract", loaders["extract"], strict)
    sec["extract"] = n_train / r if r else None
    ex, cl = find(rows, "extract"), find(rows, "cluster")
    crops = ex["crops_per_image"] * n_train if ex and good(ex.get("crops_per_image")) else None
    notes["vectors"] = crops
    if crops and cl and good(cl.get("seconds")) and good(cl.get("vectors")) and good(cl.get("iterations")):
        shape = (dim / cl["dim"]) * (k / cl["k"]) if good(cl.get("dim")) and good(cl.get("k")) else 1.0
        sec["cluster"] = cl["seconds"] * (crops / cl["vectors"]) * (niter / cl["iterations"]) * shape
        notes["cluster"] = f"{cl['seconds']} s for {cl['vectors']:,} x {cl.get('dim')} -> {cl.get('k')}, " \
                           f"{cl['iterations']} iterations ({cl.get('backend')}), scaled linearly to " \
                           f"{crops:,.0f} x {dim} -> {k}"
    else:
        sec["cluster"] = None
    r, notes["pseudo"] = _rate(rows, pseudo_stage, loaders["pseudo"], strict, batch=pseudo_batch)
    sec["pseudo"] = n_train / r if r else None
    row = find(rows, pseudo_stage, batch=pseudo_batch)
    notes["pseudo_batch"] = row.get("batch") if row else None
    ev, notes["evaluate"] = _rate(rows, "evaluate", "load_pseudo")
    sec["evaluate"] = n_val / ev if ev else None
    tr, notes["train"] = _rate(rows, "train", loaders["train"], strict, batch=train_batch)
    row = find(rows, "train", batch=train_batch)
    notes["train_batch"] = row.get("batch") if row else None
    sec["train"] = epochs * (n_train / tr + n_val / ev) if tr and ev else None
    return {"seconds": sec, "notes": notes, "n_train": n_train, "n_val": n_val, "epochs": epochs}


def projection_line(rows, p: dict, suffix: str = "") -> str:
    card = rows[0].get("device", "?") if rows else "?"
    s = p["seconds"]
    fmt = lambda k, unit: "n/a" if s[k] is None else (  # noqa: E731
        f"{s[k] / 3600:.2f} h" if unit == "h" else f"{s[k] / 60:.1f} min")
    return (f"full COCO-Stuff-171 run on one {card}{suffix}: extract {fmt('extract', 'h')}, cluster {fmt('cluster', 'min')}, "
            f"pseudo {fmt('pseudo', 'min')}, train {fmt('train', 'h')} ({p['epochs']} epochs), "
            f"evaluate {fmt('evaluate', 'min')}")


def pipeline_batch(stage: str, params=REPO / "params.yaml") -> int:
    import yaml
    return int(yaml.safe_load(Path(params).read_text())[stage]["batch_size"])


def report(rows, args) -> str:
    lines = []
    if rows and str(rows[0].get("device", "")).startswith("cpu"):
        lines.append(f"({QUICK_NOTE})")
    table, base = target_table(rows), baseline_column(rows)
    w = max(len(t[0]) for t in table)
    num = lambda x: (f"{x:,.1f}" if x >= 10 else f"{x:.4f}") if good(x) else str(x)  # noqa: E731
    lines.append(f"{'line':<{w}}  {'measured':>12}  {'baseline':>12}  {'speedup':>7}  {'target':>10}  status")
    for line, value, target, status in table:
        b, x = base[line]
        lines.append(f"{line:<{w}}  {num(value):>12}  {num(b) if b else '-':>12}  "
                     f"{f'{x:.2f}x' if x else '-':>7}  {target:>10}  {status}")
    cl = find(rows, "cluster")
    lines.append("(" + BASELINE_NOTE.format(kmeans=(cl or {}).get("baseline") or "none measured") + ")")
    p = project(rows, args.train_images, args.val_images, args.epochs, args.train_batch, args.niter,
                pseudo_batch=args.pseudo_batch)
    n = p["notes"]
    lines.append("")
    lines.append(projection_line(rows, p))
    vec = f"{n['vectors']:,.0f}" if n["vectors"] else "n/a"
    lines.append(f"  images: {args.train_images:,} train / {args.val_images:,} val "
                 f"(published COCO 2017 lists by default; annotated subsets 117,266 / 4,952); "
                 f"k-means vectors: {vec} (crops per image measured x train images), {args.niter} iterations")
    lines.append(f"  rates: extract {n['extract']}; pseudo (171 concepts, float32, batch {n['pseudo_batch']}) "
                 f"{n['pseudo']}; train (measured at batch "
                 f"{n['train_batch']}, pipeline batch {args.train_batch}) {n['train']} + val after every epoch "
                 f"at {n['evaluate']}; cluster {n.get('cluster')}")
    if any(r.get("stage") in ("load_extract_device", "load_train_device") for r in rows):
        d = project(rows, args.train_images, args.val_images, args.epochs, args.train_batch, args.niter,
                    pseudo_batch=args.pseudo_batch, loaders=DEVICE_LOADERS)
        lines.append(projection_line(rows, d, " with decode: device"))
        lines.append(f"  rates: extract {d['notes']['extract']}; pseudo {d['notes']['pseudo']}; "
                     f"train {d['notes']['train']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("jsonl")
    ap.add_argument("--check", metavar="STAGE", help="exit 1 unless STAGE's last line has a finite rate > 0")
    ap.add_argument("--train-images", type=int, default=COCO_TRAIN)
    ap.add_argument("--val-images", type=int, default=COCO_VAL)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--train-batch", type=int, default=None, help="default: params.yaml train.batch_size")
    ap.add_argument("--pseudo-batch", type=int, default=None, help="default: params.yaml pseudo.batch_size")
    ap.add_argument("--niter", type=int, default=100, help="k-means iterations of the full run")
    args = ap.parse_args(argv)
    rows = load_rows(args.jsonl)
    if args.check:
        why = check(rows, args.check)
        if why:
            print(f"FAILED: {why}", file=sys.stderr)
            return 1
        return 0
    if args.train_batch is None:
        args.train_batch = pipeline_batch("train")
    if args.pseudo_batch is None:
        args.pseudo_batch = pipeline_batch("pseudo")
    print(report(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
