"""k-means of crop features (faiss)."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from transfgu.cluster import kmeans


def blobs(k=5, n=200, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10, size=(k, d))
    labels = rng.integers(0, k, size=n)
    return (centres[labels] + rng.normal(scale=0.5, size=(n, d))).astype(np.float32), labels, centres


def test_recovers_separable_blobs():
    """With a few restarts (one random initialisation often starts two centres in one blob)."""
    x, labels, centres = blobs()
    found = kmeans(x, 5, niter=50, seed=1, nredo=20)
    assign = ((x[:, None] - found[None]) ** 2).sum(-1).argmin(1)
    assert adjusted_rand_score(labels, assign) == 1.0
    # every true centre has a found centre within the noise level
    dist = np.sqrt(((centres[:, None] - found[None]) ** 2).sum(-1))
    assert (dist.min(1) < 0.5).all()


def test_centres_are_means_of_their_points():
    x, _, _ = blobs(k=4, n=300, d=8, seed=3)
    found = kmeans(x, 6, niter=10, seed=0)  # more centres than blobs: some blobs are split
    assign = ((x[:, None] - found[None]) ** 2).sum(-1).argmin(1)
    for c in range(6):
        if (assign == c).any():
            np.testing.assert_allclose(found[c], x[assign == c].mean(0), rtol=0, atol=1e-4)


def test_same_seed_same_centres():
    x, _, _ = blobs(k=3, n=100, seed=5)
    np.testing.assert_array_equal(kmeans(x, 3, seed=7), kmeans(x, 3, seed=7))


def test_too_few_vectors_is_a_clear_error():
    x, _, _ = blobs(k=2, n=3)
    with pytest.raises(ValueError, match="3 vectors cannot make 5 clusters"):
        kmeans(x, 5, name="thing crops")
