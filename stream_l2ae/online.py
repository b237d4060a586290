"""Online mini-batch k-means on unit embeddings, with forgetting and replica merging.

The state is a set of sufficient statistics, per cluster a decayed sum of the embeddings assigned
to it and a decayed count. A centroid is ``(prior + sums) / (prior_weight + counts)`` where the
prior is the centroid the model was trained with. Because the statistics are sums, replicas that
see disjoint parts of a stream can share them and add them up: the result equals what one
process fed the whole stream would hold, provided all use the same clock (event time).

Forgetting is exponential with a half-life measured on a clock the caller chooses: by default the
number of records seen (one replica), or record timestamps in seconds passed as ``now`` (several
replicas, whose record counts differ but whose event times agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .scoring import cosine_to_centroids, unit_rows


@dataclass
class CentroidStatistics:
    """Decayed per-cluster sums and counts of one replica's contribution, valid at ``clock``."""

    sums: np.ndarray
    counts: np.ndarray
    clock: float

    def decayed_to(self, clock: float, half_life: float) -> CentroidStatistics:
        factor = 0.5 ** (max(clock - self.clock, 0.0) / half_life)
        return CentroidStatistics(self.sums * factor, self.counts * factor, max(clock, self.clock))

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "sums": np.asarray(self.sums, dtype=np.float64),
            "counts": np.asarray(self.counts, dtype=np.float64),
            "clock": np.asarray([self.clock], dtype=np.float64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> CentroidStatistics:
        return cls(
            sums=np.asarray(arrays["sums"], dtype=np.float64),
            counts=np.asarray(arrays["counts"], dtype=np.float64),
            clock=float(np.asarray(arrays["clock"]).reshape(-1)[0]),
        )


class OnlineCentroids:
    """Centroids that follow the stream: a mini-batch k-means update with exponential forgetting.

    Parameters
    ----------
    initial_centroids
        ``(k, d)`` centroids from the offline k-means fit; they act as a prior of weight
        ``prior_weight`` records per cluster, so an empty cluster keeps its trained centroid.
    half_life
        After this much clock time, a record's weight in the centroids has halved.
    prior_weight
        Weight of the trained centroid, in records.
    device
        Where the statistics live; the encoder's device, so updates need no copies.

    Examples
    --------
    >>> import numpy as np
    >>> online = OnlineCentroids(np.array([[1.0, 0.0], [0.0, 1.0]]), half_life=100, prior_weight=1)
    >>> z = np.array([[0.8, 0.6], [0.8, 0.6], [0.0, 1.0]])
    >>> online.partial_fit(z, skip=np.array([False, False, True])).counts.round(3).tolist()
    [2.0, 0.0]
    >>> online.centroids.round(3).tolist()
    [[0.867, 0.4], [0.0, 1.0]]
    """

    def __init__(
        self,
        initial_centroids: np.ndarray,
        *,
        half_life: float = 50_000.0,
        prior_weight: float = 100.0,
        device: str | torch.device = "cpu",
    ) -> None:
        initial = np.asarray(initial_centroids, dtype=np.float64)
        if initial.ndim != 2 or len(initial) == 0:
            raise ConfigError(
                f"initial_centroids must be a (k, d) array, got shape {initial.shape}"
            )
        if not half_life > 0:
            raise ConfigError(f"half_life must be > 0, got {half_life!r}")
        if not prior_weight >= 0:
            raise ConfigError(f"prior_weight must be >= 0, got {prior_weight!r}")
        self.half_life = float(half_life)
        self.prior_weight = float(prior_weight)
        self.device = torch.device(device)
        self.initial_centroids = initial
        k, d = initial.shape
        self._sums = torch.zeros(k, d, dtype=torch.float64, device=self.device)
        self._counts = torch.zeros(k, dtype=torch.float64, device=self.device)
        self.clock = 0.0
        self.peers: dict[str, CentroidStatistics] = {}
        self.last_movement_ = 0.0
        self.n_updates_ = 0
        self._centroids_cache: torch.Tensor | None = None

    @property
    def n_clusters(self) -> int:
        return self.initial_centroids.shape[0]

    @property
    def counts(self) -> np.ndarray:
        """Decayed number of records per cluster, this replica's and its peers'."""
        return self._combined()[1]

    @property
    def occupancy(self) -> np.ndarray:
        """Share of the (decayed) records held by each cluster."""
        counts = self.counts
        total = counts.sum()
        return counts / total if total > 0 else np.full(len(counts), 1.0 / len(counts))

    @property
    def centroids(self) -> np.ndarray:
        sums, counts = self._combined()
        prior = self.prior_weight * self.initial_centroids
        weight = self.prior_weight + counts[:, None]
        empty = weight[:, 0] <= 0
        weight[empty] = 1.0
        centroids = (prior + sums) / weight
        centroids[empty] = self.initial_centroids[empty]
        return centroids

    def centroids_tensor(self) -> torch.Tensor:
        """Unit-length centroids as a float32 tensor on the device, cached between updates."""
        if self._centroids_cache is None:
            centroids = torch.as_tensor(self.centroids, dtype=torch.float32, device=self.device)
            self._centroids_cache = unit_rows(centroids)
        return self._centroids_cache

    def _combined(self) -> tuple[np.ndarray, np.ndarray]:
        # Align everything to the newest clock: a replica that lags its peers must decay its
        # own statistics forward too, or its records would weigh more than theirs.
        reference = max([self.clock, *(peer.clock for peer in self.peers.values())])
        local = self.statistics().decayed_to(reference, self.half_life)
        sums, counts = local.sums, local.counts
        for peer in self.peers.values():
            aligned = peer.decayed_to(reference, self.half_life)
            sums += aligned.sums
            counts += aligned.counts
        return sums, counts

    def _advance(self, now: float) -> None:
        if now > self.clock:
            factor = 0.5 ** ((now - self.clock) / self.half_life)
            self._sums *= factor
            self._counts *= factor
            self.clock = float(now)
            self._centroids_cache = None

    @torch.no_grad()
    def partial_fit(
        self,
        z: np.ndarray | torch.Tensor,
        clusters: np.ndarray | torch.Tensor | None = None,
        *,
        skip: np.ndarray | torch.Tensor | None = None,
        now: float | None = None,
    ) -> OnlineCentroids:
        """Add a batch of unit embeddings to the statistics of their nearest clusters.

        Parameters
        ----------
        z
            ``(n, d)`` embeddings.
        clusters
            Nearest cluster of each row, if the caller has already scored the batch.
        skip
            Boolean mask of rows to leave out, typically the records flagged as anomalies, so
            that an attack does not drag the centroids towards itself.
        now
            Clock value of this batch (e.g. its newest record timestamp in seconds). By default
            the clock counts records.
        """
        z = torch.as_tensor(z, device=self.device).to(torch.float64)
        if z.ndim != 2 or z.shape[1] != self.initial_centroids.shape[1]:
            raise ConfigError(
                f"embeddings of shape {tuple(z.shape)} do not match centroids of dimension "
                f"{self.initial_centroids.shape[1]}"
            )
        z = unit_rows(z)
        before = self.centroids
        if clusters is None:
            clusters = cosine_to_centroids(z, self.centroids_tensor()).argmax(dim=1)
        clusters = torch.as_tensor(clusters, device=self.device, dtype=torch.long)
        if skip is not None:
            keep = ~torch.as_tensor(skip, device=self.device, dtype=torch.bool)
            z, clusters = z[keep], clusters[keep]
        self._advance(self.clock + len(z) if now is None else float(now))
        self._sums.index_add_(0, clusters, z)
        self._counts += torch.bincount(clusters, minlength=self.n_clusters).to(torch.float64)
        self._centroids_cache = None
        after = self.centroids
        cosine = (unit_rows(torch.as_tensor(before)) * unit_rows(torch.as_tensor(after))).sum(1)
        self.last_movement_ = float((1.0 - cosine).max())
        self.n_updates_ += 1
        return self

    def statistics(self) -> CentroidStatistics:
        """This replica's own contribution (peers excluded), to publish or checkpoint."""
        return CentroidStatistics(
            self._sums.cpu().numpy().copy(), self._counts.cpu().numpy().copy(), self.clock
        )

    def absorb(self, other: CentroidStatistics) -> None:
        """Add another state's statistics into this one for good (e.g. merging checkpoints)."""
        self._check_shape(other)
        aligned = other.decayed_to(self.clock, self.half_life)
        self._advance(aligned.clock)
        self._sums += torch.as_tensor(aligned.sums, device=self.device)
        self._counts += torch.as_tensor(aligned.counts, device=self.device)
        self._centroids_cache = None

    def update_peer(self, replica_id: str, statistics: CentroidStatistics) -> None:
        """Use the latest statistics another live replica published, replacing its previous ones.

        Peers are kept apart from the local statistics so that a republished state is never
        counted twice.
        """
        self._check_shape(statistics)
        self.peers[replica_id] = statistics
        self._centroids_cache = None

    def drop_peer(self, replica_id: str) -> None:
        self.peers.pop(replica_id, None)
        self._centroids_cache = None

    def _check_shape(self, statistics: CentroidStatistics) -> None:
        if statistics.sums.shape != self.initial_centroids.shape:
            raise ConfigError(
                f"cannot merge statistics of shape {statistics.sums.shape} into centroids of "
                f"shape {self.initial_centroids.shape}: the models differ"
            )

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Arrays and a JSON document that :meth:`from_state` rebuilds this object from."""
        arrays = {f"online.{k}": v for k, v in self.statistics().to_arrays().items()}
        arrays["online.initial_centroids"] = self.initial_centroids
        document = {
            "half_life": self.half_life,
            "prior_weight": self.prior_weight,
            "n_updates": self.n_updates_,
        }
        return arrays, document

    @classmethod
    def from_state(
        cls,
        arrays: dict[str, np.ndarray],
        document: dict[str, Any],
        device: str | torch.device = "cpu",
    ) -> OnlineCentroids:
        online = cls(
            arrays["online.initial_centroids"],
            half_life=document["half_life"],
            prior_weight=document["prior_weight"],
            device=device,
        )
        stats = CentroidStatistics.from_arrays(
            {k.removeprefix("online."): v for k, v in arrays.items() if k.startswith("online.")}
        )
        online._check_shape(stats)
        online._sums = torch.as_tensor(stats.sums, device=online.device).clone()
        online._counts = torch.as_tensor(stats.counts, device=online.device).clone()
        online.clock = stats.clock
        online._centroids_cache = None
        online.n_updates_ = int(document.get("n_updates", 0))
        return online
