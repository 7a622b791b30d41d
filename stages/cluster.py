"""cluster: k-means of the thing and stuff crop features into the concept centroids (docs/method.md section 2)."""
import numpy as np

from transfgu.centroids import write_centroids
from transfgu.cluster import describe_backend, kmeans, resolve_backend
from transfgu.feature_bank import read_features
from transfgu.stage import log, run_stage


def main(stage):
    task, cfg, seed = stage.params.task, stage.config, stage.params.seed
    backend = resolve_backend(cfg.backend)  # faiss asked for but not installed: fails before any reading
    parts = []
    with stage.timed():
        for group, k in (("thing", task.n_things), ("stuff", task.n_stuff)):
            if k == 0:
                continue
            x = read_features(stage.dep("feature_bank.h5"), group)
            log.info("k-means of %d %s vectors (dim %d) into %d centres, %d iterations, %s", len(x), group,
                     x.shape[1], k, cfg.niter, describe_backend(backend))
            parts.append(kmeans(x, k, cfg.niter, seed, backend=backend, name=f"{group} crops", nredo=cfg.nredo))
    out = stage.out("centroids.npz")
    write_centroids(out, np.concatenate(parts), task.n_things, task.n_stuff)
    log.info("wrote %s: %d centroids (%d things, %d stuff)", out, task.n_concepts, task.n_things, task.n_stuff)


if __name__ == "__main__":
    run_stage("cluster", main)
