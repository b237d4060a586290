"""The paper's score: cosine similarity of a unit embedding to its nearest centroid."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ClusterScores:
    """Scores of a batch of embeddings against a set of centroids.

    Attributes
    ----------
    score
        Anomaly score ``1 - v`` where ``v = max_j z . c_j / ||c_j||``; in ``[0, 2]``.
    cluster
        Index of the nearest centroid.
    margin
        ``v`` minus the second-best cosine: how clearly the record belongs to its cluster.
    """

    score: np.ndarray
    cluster: np.ndarray
    margin: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=1, eps=1e-12)


@torch.no_grad()
def cosine_to_centroids(z: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix ``(n, k)`` between embeddings and centroids.

    Embeddings are normalized too, so the scorer also works for a model trained without the
    l2 layer (the ablation).
    """
    return unit_rows(z.float()) @ unit_rows(centroids.to(z.device, torch.float32)).T


@torch.no_grad()
def score_embeddings(
    z: torch.Tensor, centroids: torch.Tensor, *, centroids_are_unit: bool = False
) -> ClusterScores:
    """Anomaly score, nearest cluster and margin for each row of ``z``.

    ``centroids_are_unit`` skips normalizing centroids that already have unit length (the
    online centroids cache them so).

    Examples
    --------
    >>> import torch
    >>> centroids = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    >>> s = score_embeddings(torch.tensor([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]]), centroids)
    >>> s.score.round(2), s.cluster, s.margin.round(2)
    (array([0. , 0.2, 1. ], dtype=float32), array([0, 1, 1]), array([1. , 0.2, 1. ], dtype=float32))
    """
    centroids = centroids.to(z.device, torch.float32)
    if not centroids_are_unit:
        centroids = unit_rows(centroids)
    similarity = unit_rows(z.float()) @ centroids.T
    if similarity.shape[1] >= 2:
        top = similarity.topk(2, dim=1)
        values = top.values.cpu().numpy()
        best, margin = values[:, 0], values[:, 0] - values[:, 1]
        cluster = top.indices[:, 0].cpu().numpy()
    else:
        best = similarity[:, 0].cpu().numpy()
        cluster = np.zeros(len(best), dtype=np.int64)
        margin = np.ones_like(best)
    return ClusterScores(score=np.clip(1.0 - best, 0.0, 2.0), cluster=cluster, margin=margin)
