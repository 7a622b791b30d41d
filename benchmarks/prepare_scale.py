"""How long `dvc repro` takes when nothing changed, on a dataset of COCO's size.

    python benchmarks/prepare_scale.py --images 123000 --work /tmp/prepare_scale

Builds an image folder (`dataset.name: folder`) of that many tiny images with labels (COCO: 118k train + 5k val
images, so 246k image and label files), a copy of the project on it in a temporary git repository, and times:
the first `dvc repro prepare` (lists every file and hashes its contents, with an empty hash cache, and writes the
index), a second one with nothing changed (a stat per file, the hashes from the cache),
and the same after one image is replaced. `prepare` runs on every repro (dvc.yaml: always_changed), so the
second time is the cost a user pays on each `dvc repro` / `dvc exp run` for the dataset being tracked.
Prints one JSON line per measurement."""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def build_tree(root: Path, n_images: int, val_share: float = 5 / 123) -> None:
    rng = np.random.default_rng(0)
    image = png_bytes(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    label = png_bytes(rng.integers(0, 4, (16, 16), dtype=np.uint8))
    n_val = max(1, int(round(n_images * val_share)))
    for split, count in (("train", n_images - n_val), ("val", n_val)):
        for sub, data in (("images", image), ("labels", label)):
            folder = root / sub / split
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / f"{i:012d}.png").write_bytes(data)
    classes = [{"name": "a", "kind": "thing"}, {"name": "b", "kind": "thing"},
               {"name": "c", "kind": "stuff"}, {"name": "d", "kind": "stuff"}]
    (root / "classes.yaml").write_text(yaml.safe_dump({"classes": classes}, sort_keys=False))


def run(args, cwd) -> float:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", DVC_NO_ANALYTICS="1",
               GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b", GIT_COMMITTER_EMAIL="b@b",
               TRANSFGU_HASH_CACHE=str(Path(cwd).parent / "file-hashes.sqlite"))  # prepare's, empty at first
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=123_000, help="images (each with a label file)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/prepare_scale"), help="scratch folder (replaced)")
    args = ap.parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    project = args.work / "project"
    for name in ("stages", "transfgu"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    t0 = time.perf_counter()
    build_tree(project / "data" / "big", args.images)
    print(json.dumps({"what": "build tree", "images": args.images, "files": 2 * args.images + 1,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["granularity"] = 4
    params["dataset"].update(name="folder", root="data/big", R=32)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (project / ".gitignore").write_text("/data/big/\n__pycache__/\n")
    run(["git", "init", "-q"], project)
    run([sys.executable, "-m", "dvc", "init", "-q"], project)
    dvc = [sys.executable, "-m", "dvc", "repro", "prepare"]
    for what in ("first dvc repro prepare", "dvc repro prepare, nothing changed", "again, nothing changed"):
        print(json.dumps({"what": what, "seconds": round(run(dvc, project), 1)}), flush=True)
    index = project / "outputs" / "index.json"
    before = index.read_bytes()
    (project / "data/big/images/train/000000000007.png").write_bytes(png_bytes(np.zeros((16, 16, 3), np.uint8)))
    seconds = run(dvc, project)
    print(json.dumps({"what": "dvc repro prepare, one image replaced", "seconds": round(seconds, 1),
                      "index_changed": index.read_bytes() != before, "index_mb": round(len(before) / 2 ** 20, 1)}),
          flush=True)
    print(json.dumps({"what": "python stages/prepare.py alone",
                      "seconds": round(run([sys.executable, "stages/prepare.py"], project), 1)}), flush=True)


if __name__ == "__main__":
    main()
