"""cluster: k-means of the thing and stuff crop features into the concept centroids (METHOD.md section 2)."""
import h5py
import numpy as np

from common import CENTROIDS, FEATURE_BANK, log, setup, task_of, timed

from transfgu.cluster import describe_backend, kmeans, resolve_backend
from transfgu.io import atomic_output


def main():
    params = setup("cluster")
    task, cfg, seed = task_of(params), params["cluster"], int(params["seed"])
    backend = resolve_backend(cfg.get("backend", "auto"))  # a bad cluster.backend fails before any reading
    if not FEATURE_BANK.is_file():
        raise SystemExit(f"{FEATURE_BANK} not found: run the extract stage first (dvc repro)")
    parts = []
    with h5py.File(FEATURE_BANK, "r") as h5, timed("cluster"):
        for group, k in (("thing", task.n_things), ("stuff", task.n_stuff)):
            if k == 0:
                continue
            if f"{group}/features" not in h5:
                raise SystemExit(f"{FEATURE_BANK} has no {group} crops; re-run extract for dataset "
                                 f"'{task.dataset}'")
            x = np.asarray(h5[f"{group}/features"][:], dtype=np.float32)  # no second copy when float32
            log.info("k-means of %d %s vectors (dim %d) into %d centres, %d iterations, %s", len(x), group,
                     x.shape[1], k, int(cfg["niter"]), describe_backend(backend))
            parts.append(kmeans(x, k, int(cfg["niter"]), seed, backend=backend, name=f"{group} crops",
                                nredo=int(cfg.get("nredo", 1))))
    centroids = np.concatenate(parts)
    with atomic_output(CENTROIDS) as tmp, open(tmp, "wb") as f:
        np.savez(f, centroids=centroids, n_things=task.n_things, n_stuff=task.n_stuff)
    log.info("wrote %s: %d centroids (%d things, %d stuff)", CENTROIDS, len(centroids), task.n_things,
             task.n_stuff)


if __name__ == "__main__":
    main()
