"""The cosine score (scoring.py) and the offline k-means fit (kmeans.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stream_l2ae.errors import ConfigError
from stream_l2ae.kmeans import fit_kmeans
from stream_l2ae.scoring import cosine_to_centroids, score_embeddings, unit_rows

SQRT_HALF = math.sqrt(0.5)


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# ----- score --------------------------------------------------------------------------------------


def test_score_is_one_minus_max_cosine_on_hand_computed_cases():
    centroids = t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    z = t(
        [
            [1.0, 0.0, 0.0],  # on centroid 0: cos (1, 0)
            [0.0, 1.0, 0.0],  # on centroid 1: cos (0, 1)
            [0.6, 0.8, 0.0],  # cos (0.6, 0.8)
            [0.0, 0.0, 1.0],  # orthogonal to both: cos (0, 0), tie -> score 1
            [-1.0, 0.0, 0.0],  # opposite centroid 0: cos (-1, 0)
            [SQRT_HALF, 0.0, SQRT_HALF],  # cos (0.7071, 0)
        ]
    )
    s = score_embeddings(z, centroids)
    np.testing.assert_allclose(s.score, [0.0, 0.0, 0.2, 1.0, 1.0, 1 - SQRT_HALF], atol=1e-6)
    assert s.cluster[[0, 1, 2, 4, 5]].tolist() == [0, 1, 1, 1, 0]
    np.testing.assert_allclose(s.margin, [1.0, 1.0, 0.2, 0.0, 1.0, SQRT_HALF], atol=1e-6)
    assert len(s) == 6
    assert s.score.dtype == np.float32 and s.margin.dtype == np.float32


def test_score_of_the_opposite_of_every_centroid_is_two():
    centroids = t([[1.0, 0.0], [1.0, 0.0]])
    s = score_embeddings(t([[-1.0, 0.0]]), centroids)
    np.testing.assert_allclose(s.score, [2.0], atol=1e-6)
    np.testing.assert_allclose(s.margin, [0.0], atol=1e-6)


def test_centroid_norm_does_not_matter():
    generator = torch.Generator().manual_seed(0)
    z = unit_rows(torch.randn(50, 4, generator=generator))
    centroids = torch.randn(3, 4, generator=generator)
    reference = score_embeddings(z, centroids)
    scaled = score_embeddings(z, centroids * torch.tensor([[10.0], [0.01], [3.0]]))
    np.testing.assert_allclose(scaled.score, reference.score, atol=1e-6)
    np.testing.assert_array_equal(scaled.cluster, reference.cluster)
    np.testing.assert_allclose(scaled.margin, reference.margin, atol=1e-6)


def test_embedding_norm_does_not_matter():
    """The scorer normalizes embeddings too (the l2-off ablation feeds raw embeddings)."""
    generator = torch.Generator().manual_seed(1)
    z = torch.randn(20, 4, generator=generator)
    centroids = torch.randn(3, 4, generator=generator)
    np.testing.assert_allclose(
        score_embeddings(z * 7.0, centroids).score, score_embeddings(z, centroids).score, atol=1e-6
    )


def test_nearest_cluster_and_margin_match_a_brute_force_computation():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(200, 5))
    centroids = rng.normal(size=(4, 5))
    cos = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (
        centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    ).T
    ordered = np.sort(cos, axis=1)
    s = score_embeddings(t(z), t(centroids))
    np.testing.assert_array_equal(s.cluster, cos.argmax(axis=1))
    np.testing.assert_allclose(s.score, 1.0 - ordered[:, -1], atol=1e-5)
    np.testing.assert_allclose(s.margin, ordered[:, -1] - ordered[:, -2], atol=1e-5)
    assert (s.margin >= 0).all()
    assert ((s.score >= 0.0) & (s.score <= 2.0)).all()


def test_score_range_on_random_data():
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(1000, 3, generator=generator)
    s = score_embeddings(z, torch.randn(2, 3, generator=generator))
    assert s.score.min() >= 0.0 and s.score.max() <= 2.0


def test_single_centroid():
    s = score_embeddings(t([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), t([[2.0, 0.0]]))
    np.testing.assert_allclose(s.score, [0.0, 1.0, 2.0], atol=1e-6)
    assert s.cluster.tolist() == [0, 0, 0]
    np.testing.assert_allclose(s.margin, [1.0, 1.0, 1.0])


def test_zero_embedding_scores_one():
    s = score_embeddings(t([[0.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(s.score, [1.0])


def test_empty_batch():
    s = score_embeddings(torch.empty(0, 3), t([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert len(s) == 0 and s.cluster.shape == (0,)


def test_cosine_matrix_accepts_other_dtypes():
    z = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    centroids = torch.tensor([[0.0, 5.0], [2.0, 0.0]], dtype=torch.float16)
    similarity = cosine_to_centroids(z, centroids)
    assert similarity.dtype == torch.float32 and similarity.shape == (1, 2)
    np.testing.assert_allclose(similarity.numpy(), [[0.8, 0.6]], atol=1e-6)


# ----- k-means ------------------------------------------------------------------------------------


def blob(center, n, rng, spread=0.05) -> np.ndarray:
    x = np.asarray(center, dtype=float) + spread * rng.normal(size=(n, len(center)))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


AXES = np.eye(4)


def matched(centroids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each target direction, the cosine of the best-matching centroid."""
    targets = targets / np.linalg.norm(targets, axis=1, keepdims=True)
    centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    return (targets @ centroids.T).max(axis=1)


def test_kmeans_recovers_well_separated_unit_clusters():
    rng = np.random.default_rng(0)
    sizes = [120, 80, 60, 40]
    z = np.vstack([blob(axis, n, rng) for axis, n in zip(AXES, sizes, strict=True)])
    truth = np.repeat(np.arange(4), sizes)
    result = fit_kmeans(z, 4, n_init=3, seed=0)
    assert result.centroids.shape == (4, 4) and result.centroids.dtype == np.float32
    assert (matched(result.centroids, AXES) > 0.99).all()
    # labels are the true partition up to a permutation
    for cluster in range(4):
        assert len(np.unique(truth[result.labels == cluster])) == 1
    assert sorted(result.sizes.tolist()) == sorted(map(float, sizes))
    assert result.sizes.sum() == len(z)
    assert result.inertia > 0


def test_kmeans_is_seeded():
    rng = np.random.default_rng(1)
    z = blob([1.0, 1.0, 1.0], 200, rng, spread=1.0)
    first = fit_kmeans(z, 5, n_init=2, seed=7)
    second = fit_kmeans(z, 5, n_init=2, seed=7)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.labels, second.labels)


def test_kmeans_zero_weighted_outliers_do_not_pull_centroids():
    rng = np.random.default_rng(2)
    normal = np.vstack([blob(AXES[0], 100, rng), blob(AXES[1], 100, rng)])
    outliers = blob(AXES[2], 40, rng)
    z = np.vstack([normal, outliers])
    weight = np.r_[np.ones(200), np.zeros(40)]

    unweighted = fit_kmeans(z, 2, n_init=3, seed=0)
    assert matched(unweighted.centroids, AXES[:2]).min() < 0.99  # the outliers do pull

    for seed in range(3):
        result = fit_kmeans(z, 2, n_init=3, seed=seed, sample_weight=weight)
        assert (matched(result.centroids, AXES[:2]) > 0.99).all()
        # sizes count weight, so the zero-weighted outliers add nothing
        assert sorted(result.sizes.tolist()) == [100.0, 100.0]
        assert len(result.labels) == len(z)


def test_kmeans_centroids_are_the_weighted_means():
    rng = np.random.default_rng(3)
    z = np.vstack([blob(AXES[0], 30, rng), blob(AXES[3], 30, rng)])
    weight = rng.uniform(0.5, 2.0, size=60)
    result = fit_kmeans(z, 2, n_init=2, seed=0, sample_weight=weight)
    for cluster in range(2):
        members = result.labels == cluster
        expected = np.average(z[members], axis=0, weights=weight[members])
        np.testing.assert_allclose(result.centroids[cluster], expected, atol=1e-5)
        assert result.sizes[cluster] == pytest.approx(weight[members].sum())


def test_kmeans_single_cluster():
    rng = np.random.default_rng(4)
    z = blob(AXES[1], 10, rng)
    result = fit_kmeans(z, 1, n_init=1)
    np.testing.assert_allclose(result.centroids[0], z.mean(axis=0), atol=1e-6)
    assert result.labels.tolist() == [0] * 10


def test_kmeans_rejects_more_clusters_than_records():
    z = np.eye(3, dtype=np.float32)
    with pytest.raises(ConfigError, match="n_clusters=4"):
        fit_kmeans(z, 4)
    # zero-weighted records do not count as records to cluster
    with pytest.raises(ConfigError, match="n_clusters=3 exceeds the 2 records"):
        fit_kmeans(z, 3, sample_weight=np.array([1.0, 1.0, 0.0]))
    fit_kmeans(z, 3, n_init=1)  # exactly as many clusters as records is fine


@pytest.mark.parametrize("n_clusters", [0, -2])
def test_kmeans_rejects_non_positive_cluster_counts(n_clusters):
    with pytest.raises(ConfigError, match=f"got {n_clusters}"):
        fit_kmeans(np.eye(3), n_clusters)
