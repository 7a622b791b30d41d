"""cluster: k-means of the thing and stuff crop features into the concept centroids (docs/method.md section 2)."""
import numpy as np

from common import CENTROIDS, FEATURE_BANK, log, setup, stage_main, task_of, timed

from transfgu.centroids import write_centroids
from transfgu.cluster import describe_backend, kmeans, resolve_backend
from transfgu.feature_bank import read_features


@stage_main
def main():
    params = setup("cluster")
    task, cfg, seed = task_of(params), params["cluster"], int(params["seed"])
    backend = resolve_backend(cfg.get("backend", "auto"))  # a bad cluster.backend fails before any reading
    parts = []
    with timed("cluster"):
        for group, k in (("thing", task.n_things), ("stuff", task.n_stuff)):
            if k == 0:
                continue
            x = read_features(FEATURE_BANK, group)  # a missing file or group: one line (BadInput, stage_main)
            log.info("k-means of %d %s vectors (dim %d) into %d centres, %d iterations, %s", len(x), group,
                     x.shape[1], k, int(cfg["niter"]), describe_backend(backend))
            parts.append(kmeans(x, k, int(cfg["niter"]), seed, backend=backend, name=f"{group} crops",
                                nredo=int(cfg.get("nredo", 1))))
    centroids = np.concatenate(parts)
    write_centroids(CENTROIDS, centroids, task.n_things, task.n_stuff)
    log.info("wrote %s: %d centroids (%d things, %d stuff)", CENTROIDS, len(centroids), task.n_things,
             task.n_stuff)


if __name__ == "__main__":
    main()
