"""Which class each output channel (cluster) of a trained decoder stands for.

A decoder learns clusters, not classes: cluster i is not class i. `evaluate` matches clusters to the val
split's classes with the Hungarian algorithm (metrics.segmentation_scores) and saves the matching as
`cluster_classes.json`; `transfgu predict` reads it to name and colour its outputs. Without a matching
(no labels, or no file) cluster i is called "cluster i".

Names and colours come from one legend: the classes first (colour k = viz.palette's k-th colour, the colour
of class k in evaluate's pictures), then the clusters left unmatched (more clusters than classes), each
named "cluster i" in the next palette colour."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import write_json
from .viz import palette

FORMAT = "transfgu cluster classes v1"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ClusterNames:
    """Per cluster: its name, its matched class id (None: unmatched), the matched IoU in percent (None: no
    matching, or the class is in neither the ground truth nor the prediction) and its RGB colour; `legend` maps
    every cluster to its entry of the legend (`legend_names`, `legend_colors`), shared with the ground truth's
    class ids 0..n_classes-1."""
    names: list
    classes: list
    iou: list
    colors: np.ndarray
    legend: np.ndarray
    legend_names: list
    legend_colors: np.ndarray

    @property
    def matched(self) -> bool:
        return any(c is not None for c in self.classes)


def match_clusters(mapping, class_names, per_class_iou=None) -> ClusterNames:
    """The legend of a Hungarian `mapping` (cluster -> class id, -1 unmatched): classes first, then the unmatched
    clusters."""
    mapping = np.asarray(mapping, dtype=np.int64)
    class_names = list(class_names)
    unmatched = [c for c in range(len(mapping)) if mapping[c] < 0]
    legend_names = class_names + [f"cluster {c}" for c in unmatched]
    legend = np.where(mapping >= 0, mapping, 0)
    for j, c in enumerate(unmatched):
        legend[c] = len(class_names) + j
    colors = palette(len(legend_names))
    classes = [int(k) if k >= 0 else None for k in mapping]
    iou = [None if k is None or per_class_iou is None or per_class_iou[k] is None else float(per_class_iou[k])
           for k in classes]
    return ClusterNames([legend_names[i] for i in legend], classes, iou, colors[legend], legend, legend_names,
                        colors)


def unmatched_clusters(n_clusters: int) -> ClusterNames:
    """No matching: cluster i is "cluster i", in the i-th palette colour."""
    return match_clusters(np.full(n_clusters, -1), [])


def write_cluster_classes(path, clusters: ClusterNames, class_names, decoder=None):
    """Save the matching (atomically) as JSON: one entry per cluster (cluster, class_id, name, iou, color), the
    class names, the split it was computed on (evaluate's: val) and the decoder file with its SHA-256 (predict
    checks it)."""
    record = {
        "format": FORMAT,
        "split": "val",
        "matched": clusters.matched,
        "decoder": None if decoder is None else str(decoder),
        "decoder_sha256": None if decoder is None else file_sha256(decoder),
        "classes": list(class_names),
        "clusters": [{"cluster": i, "class_id": k, "name": n, "iou": None if v is None else round(v, 4),
                      "color": "#%02x%02x%02x" % tuple(int(x) for x in c)}
                     for i, (k, n, v, c) in enumerate(zip(clusters.classes, clusters.names, clusters.iou,
                                                           clusters.colors))],
    }
    write_json(Path(path), record)
    return record


def read_cluster_classes(path, n_clusters: int, decoder=None) -> ClusterNames:
    """The matching saved by write_cluster_classes, for a decoder with `n_clusters` outputs. ValueError when the
    file is not such a matching, has another number of clusters, or was computed for another decoder file
    (`decoder` given and its SHA-256 differs from the recorded one)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a cluster -> class matching ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path}: not a cluster -> class matching written by evaluate")
    entries = record["clusters"]
    if len(entries) != n_clusters:
        raise ValueError(f"{path} names {len(entries)} clusters, the decoder has {n_clusters} outputs")
    if decoder is not None and record.get("decoder_sha256") and record["decoder_sha256"] != file_sha256(decoder):
        raise ValueError(f"{path} was computed for another decoder ({record.get('decoder')}, SHA-256 "
                         f"{record['decoder_sha256'][:12]}...) than {decoder}: re-run evaluate on it")
    mapping = np.array([-1 if e["class_id"] is None else int(e["class_id"]) for e in entries])
    per_class = [None] * len(record["classes"])
    for e in entries:
        if e["class_id"] is not None:
            per_class[e["class_id"]] = e["iou"]
    return match_clusters(mapping, record["classes"], per_class)
