"""k-means with k-means++ seeding and restarts on unit embeddings."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans

from .errors import ConfigError


@dataclass
class KMeansResult:
    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    sizes: np.ndarray


def fit_kmeans(
    z: np.ndarray,
    n_clusters: int,
    *,
    n_init: int = 10,
    max_iter: int = 300,
    sample_weight: np.ndarray | None = None,
    seed: int = 0,
) -> KMeansResult:
    """k-means (k-means++ seeding, ``n_init`` restarts, best inertia kept) on embeddings ``z``.

    ``sample_weight`` lets a trimmed fit give zero weight to suspected anomalies.

    Examples
    --------
    >>> import numpy as np
    >>> z = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype="float32")
    >>> result = fit_kmeans(z, 2, seed=0)
    >>> sorted(result.sizes.tolist())
    [2.0, 2.0]
    """
    z = np.asarray(z, dtype=np.float32)
    if n_clusters < 1:
        raise ConfigError(f"n_clusters must be >= 1, got {n_clusters!r}")
    n_effective = len(z) if sample_weight is None else int(np.count_nonzero(sample_weight))
    if n_effective < n_clusters:
        raise ConfigError(
            f"n_clusters={n_clusters} exceeds the {n_effective} records available to cluster"
        )
    model = KMeans(n_clusters=n_clusters, n_init=n_init, max_iter=max_iter, random_state=seed)
    model.fit(z, sample_weight=sample_weight)
    labels = model.predict(z)
    weights = np.ones(len(z)) if sample_weight is None else np.asarray(sample_weight)
    sizes = np.bincount(labels, weights=weights, minlength=n_clusters)
    return KMeansResult(
        centroids=model.cluster_centers_.astype(np.float32),
        labels=labels,
        inertia=float(model.inertia_),
        sizes=sizes,
    )
