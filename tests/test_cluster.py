"""k-means of crop features: the faiss and torch backends (the torch one on the CPU here)."""
import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

import transfgu.cluster as cluster
from transfgu.cluster import EPS, init_rows, kmeans, kmeans_fit, resolve_backend, split_empty

BACKENDS = ["faiss", "torch"]


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for torch and faiss on these tiny problems: with two threads on a 2-core machine whose other
    core is busy, every OpenMP region waits for a time slice (a 200 x 16 index_add_ took 90 ms, not 20 us)."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


def blobs(k=5, n=200, d=16, seed=0, spread=10.0, noise=0.5):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(k, d))
    labels = rng.integers(0, k, size=n)
    return (centres[labels] + rng.normal(scale=noise, size=(n, d))).astype(np.float32), labels, centres


def gaussian_cloud(n=2000, d=32, seed=1):
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def numpy_lloyd(x, k, niter, seed):
    """Slow float64 Lloyd from the same initial rows; returns the centres (means of the final assignment),
    the final assignment and whether any cluster was ever empty (then the backends' split rules apply)."""
    x = x.astype(np.float64)
    c = x[init_rows(len(x), k, seed)].copy()
    emptied = False
    for _ in range(niter + 1):
        assign = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        for j in range(k):
            if (assign == j).any():
                c[j] = x[assign == j].mean(0)
            else:
                emptied = True
    return c, assign, emptied


def test_recovers_separable_blobs():
    """With a few restarts (one random initialisation often starts two centres in one blob)."""
    x, labels, centres = blobs()
    for backend in BACKENDS:
        found = kmeans(x, 5, niter=50, seed=1, nredo=20, backend=backend)
        assign = ((x[:, None] - found[None]) ** 2).sum(-1).argmin(1)
        assert adjusted_rand_score(labels, assign) == 1.0, backend
        # every true centre has a found centre within the noise level
        dist = np.sqrt(((centres[:, None] - found[None]) ** 2).sum(-1))
        assert (dist.min(1) < 0.5).all(), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_centres_are_means_of_their_points(backend):
    x, _, _ = blobs(k=4, n=300, d=8, seed=3)
    found = kmeans(x, 6, niter=10, seed=0, backend=backend)  # more centres than blobs: some blobs are split
    assign = ((x[:, None] - found[None]) ** 2).sum(-1).argmin(1)
    for c in range(6):
        if (assign == c).any():
            np.testing.assert_allclose(found[c], x[assign == c].mean(0), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_centres(backend):
    x, _, _ = blobs(k=3, n=100, seed=5)
    np.testing.assert_array_equal(kmeans(x, 3, seed=7, backend=backend), kmeans(x, 3, seed=7, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_too_few_vectors_is_a_clear_error(backend):
    x, _, _ = blobs(k=2, n=3)
    with pytest.raises(ValueError, match="3 vectors cannot make 5 clusters"):
        kmeans(x, 5, name="thing crops", backend=backend)


# Seeds: float32 distances (||x||^2 - 2 x.c + ||c||^2) round differently in faiss and in torch, so a point
# almost equidistant from two centres can go either way and the runs then drift apart. Measured over seeds
# 0-19 (k=16, niter=10): the gaussian cloud agreed exactly on all 20; the blobs on 18, seed 0 emptied a
# cluster (the backends' split rules differ by design) and seed 1 moved 5 of 2000 points.
@pytest.mark.parametrize("data,seed", [("blobs", 2), ("blobs", 3), ("blobs", 4),
                                       ("gaussian", 0), ("gaussian", 1), ("gaussian", 2)])
def test_torch_and_faiss_backends_agree(data, seed):
    x = blobs(k=4, n=2000, d=16, seed=0, spread=3.0)[0] if data == "blobs" else gaussian_cloud()
    assert not numpy_lloyd(x, 16, 10, seed)[2]  # no split in these runs
    f = kmeans_fit(x, 16, niter=10, seed=seed, backend="faiss")
    t = kmeans_fit(x, 16, niter=10, seed=seed, backend="torch", device="cpu")
    assert (f.backend, t.backend) == ("faiss", "torch")
    np.testing.assert_array_equal(t.assign, f.assign)
    np.testing.assert_allclose(t.centres, f.centres, rtol=0, atol=1e-4)
    assert t.objective == pytest.approx(f.objective, rel=1e-5)


@pytest.mark.parametrize("data,seed", [("blobs", 3), ("gaussian", 0)])
def test_torch_backend_matches_a_float64_numpy_lloyd(data, seed):
    x = blobs(k=4, n=2000, d=16, seed=0, spread=3.0)[0] if data == "blobs" else gaussian_cloud()
    ref_centres, ref_assign, emptied = numpy_lloyd(x, 16, 10, seed)
    assert not emptied
    t = kmeans_fit(x, 16, niter=10, seed=seed, backend="torch", device="cpu")
    np.testing.assert_array_equal(t.assign, ref_assign)
    np.testing.assert_allclose(t.centres, ref_centres, rtol=0, atol=1e-5)
    assert t.centres.dtype == np.float32 and t.centres.shape == (16, x.shape[1])


def test_split_empty_follows_the_documented_rule():
    centres = np.array([[9, 9, 9], [1, 2, 4], [5, 5, 5]], dtype=np.float32)
    sizes = np.array([0.0, 5.0, 1.0])  # only centre 1 has more than one point: it must be the one split
    assert split_empty(centres, sizes, np.random.default_rng(0)) == 1
    up, down = np.float32(1 + EPS), np.float32(1 - EPS)
    np.testing.assert_array_equal(centres[0], np.array([1, 2, 4], dtype=np.float32) * [up, down, up])
    np.testing.assert_array_equal(centres[1], np.array([1, 2, 4], dtype=np.float32) * [down, up, down])
    np.testing.assert_array_equal(centres[2], [5, 5, 5])
    np.testing.assert_array_equal(sizes, [2.5, 2.5, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_cluster_emptied_by_the_initialisation_is_split(backend):
    """Rows 1-3 of the initialisation are copies of row 0, so centres 1-3 start on centre 0 and lose every
    tie to it: three empty clusters after the first assignment. Both backends end with none empty."""
    x, _, _ = blobs(k=4, n=400, d=8, seed=4, spread=3.0)
    rows = init_rows(len(x), 8, 0)
    x[rows[1:4]] = x[rows[0]]
    start = kmeans_fit(x, 8, niter=0, seed=0, backend=backend)
    assert (np.bincount(start.assign, minlength=8)[1:4] == 0).all()
    done = kmeans_fit(x, 8, niter=10, seed=0, backend=backend)
    assert (np.bincount(done.assign, minlength=8) > 0).all()
    assert done.objective < start.objective


@pytest.mark.parametrize("backend", BACKENDS)
def test_nredo_keeps_the_restart_with_the_lowest_objective(backend):
    x, _, _ = blobs(k=5, n=500, d=8, seed=2, spread=3.0)
    alone = [kmeans_fit(x, 5, niter=20, seed=1 + r, backend=backend) for r in range(4)]
    objectives = [a.objective for a in alone]
    best = int(np.argmin(objectives))
    assert best != 0 and sorted(objectives)[1] > 1.5 * objectives[best]  # a clear winner, not the first
    kept = kmeans_fit(x, 5, niter=20, seed=1, nredo=4, backend=backend)
    assert kept.restart == best and kept.objective == objectives[best]
    np.testing.assert_array_equal(kept.centres, alone[best].centres)
    np.testing.assert_array_equal(kmeans(x, 5, niter=20, seed=1, nredo=4, backend=backend), alone[best].centres)


def test_backend_resolution(monkeypatch):
    if not cluster.gpu_available() and not torch.cuda.is_available():  # this CPU-only machine
        assert resolve_backend("auto") == "faiss"
    assert resolve_backend("faiss") == "faiss" and resolve_backend("torch") == "torch"
    for faiss_gpu, torch_cuda, expected in [(True, True, "faiss"), (True, False, "faiss"),
                                            (False, True, "torch"), (False, False, "faiss")]:
        monkeypatch.setattr(cluster, "gpu_available", lambda: faiss_gpu)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: torch_cuda)
        assert resolve_backend("auto") == expected
        assert resolve_backend() == expected


def test_auto_backend_without_faiss_is_torch_and_explicit_faiss_is_an_error(monkeypatch):
    monkeypatch.setattr(cluster, "faiss", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cluster.gpu_available()
    assert resolve_backend("auto") == "torch"
    with pytest.raises(ValueError, match=r"cluster\.backend is 'faiss' but faiss is not installed"):
        resolve_backend("faiss")
    x = gaussian_cloud(60, 4)
    with_torch = kmeans(x, 3, niter=5, seed=0, backend="torch")
    np.testing.assert_array_equal(kmeans(x, 3, niter=5, seed=0), with_torch)


def test_describe_backend(monkeypatch):
    monkeypatch.setattr(cluster, "gpu_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cluster.describe_backend("auto") == "faiss on the CPU"
    assert cluster.describe_backend("torch") == "torch on cpu"
    monkeypatch.setattr(cluster, "gpu_available", lambda: True)
    assert cluster.describe_backend("faiss") == "faiss on the GPU"


@pytest.mark.parametrize("backend", BACKENDS)
def test_as_many_vectors_as_centres(backend):
    x = gaussian_cloud(6, 4)
    np.testing.assert_array_equal(kmeans(x, 6, backend=backend), x)


def test_torch_backend_rejects_nan():
    x = gaussian_cloud(50, 4)
    x[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kmeans(x, 2, backend="torch", device="cpu")


def test_torch_backend_leaves_matmul_precision_as_it_was():
    before = torch.backends.cuda.matmul.fp32_precision
    kmeans(gaussian_cloud(50, 4), 2, niter=2, backend="torch", device="cpu")
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_centroids_file_round_trip_and_its_checks(tmp_path):
    """transfgu.centroids: what cluster writes pseudo reads back; the counts are checked, a missing file named."""
    from transfgu.centroids import read_centroids, write_centroids
    from transfgu.errors import InputFileNotFound, InputValueError
    c = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    write_centroids(tmp_path / "centroids.npz", c, 2, 3)
    with np.load(tmp_path / "centroids.npz") as f:
        assert sorted(f.files) == ["centroids", "n_stuff", "n_things"] and int(f["n_things"]) == 2
    np.testing.assert_array_equal(read_centroids(tmp_path / "centroids.npz", 2, 3), c)
    with pytest.raises(InputValueError, match=r"holds 2\+3 concepts, granularity fine needs 3\+2: re-run cluster"):
        read_centroids(tmp_path / "centroids.npz", 3, 2, "fine")
    with pytest.raises(InputFileNotFound, match="run the cluster stage first"):
        read_centroids(tmp_path / "none.npz", 2, 3)
