"""The anomaly detector: features, l2-normalized auto-encoder, k-means, cosine score, threshold.

:class:`L2AEDetector` is the object the CLI, the consumer daemon and the retraining job use. Its
API follows scikit-learn: ``fit`` on a training window, ``score_samples`` / ``predict`` on new
data, ``partial_fit`` to move the centroids with the stream, and ``save`` / ``load`` for model
bundles.

Training on a contaminated window
---------------------------------
The paper trains on normal data. A real training window also holds anomalies, and when they are
*clustered* (a fault that repeats), k-means gives them clusters of their own and the cosine score
calls them normal. With ``robust=True`` (the default) training runs in two passes:

1. Train the auto-encoder and k-means on the whole window. Clusters holding less than
   ``min_cluster_share`` of the window are taken for anomaly clusters; their records and the
   ``trim_fraction`` highest-scoring records of the others are the *suspects*.
2. Train the auto-encoder again, from the same seed, with the suspects' loss weight at zero, and
   fit k-means on the remaining records only. These centroids are the normal clusters.

The score is the paper's, ``1 - max_j cos(z, c_j)``, against the normal clusters. The README
reports what each step is worth on Shuttle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .bundle import Bundle, BundleContents, load_bundle, save_bundle
from .datasets import Dataset
from .device import select_device
from .errors import BundleError, ConfigError, NotFittedError
from .features import FeatureMapper, Rejected, Schema
from .kmeans import fit_kmeans
from .model import AutoEncoderConfig, L2AutoEncoder
from .online import OnlineCentroids
from .scoring import ClusterScores, score_embeddings
from .thresholds import QuantileThreshold, Threshold, threshold_from_dict
from .training import TrainingHistory, as_tensor, embed, train_autoencoder

log = logging.getLogger(__name__)

#: Tabular records with fewer features than this get the small default network.
WIDE_INPUT = 64
SMALL_HIDDEN_UNITS = (64, 64)
#: Training scores kept in a bundle, to seed the adaptive thresholds of the daemon.
TRAINING_SCORE_SAMPLE = 20_000
PAPER_HIDDEN_UNITS = (500, 500, 2000)


@dataclass(frozen=True)
class DetectorConfig:
    """Hyper-parameters of :class:`L2AEDetector`, validated once, here.

    Parameters
    ----------
    n_clusters
        k of k-means.
    epochs, batch_size, learning_rate
        Auto-encoder training.
    hidden_units
        Dense network widths. ``None`` picks the paper's ``(500, 500, 2000)`` for inputs of at
        least 64 features and ``(64, 64)`` for narrower tabular records.
    conv_channels, embedding_dim, kind, l2_normalize
        See :class:`~stream_l2ae.model.AutoEncoderConfig`.
    robust, min_cluster_share, trim_fraction
        Two-pass training on a contaminated window (see the module docstring).
    alert_rate
        Share of the training window above the calibrated threshold.
    online_half_life, online_prior_weight
        Forgetting of the online centroid update, in records (or seconds of event time).
    n_init
        k-means restarts.
    seed, device
        Reproducibility and placement (``"auto"``: CUDA when present).
    """

    n_clusters: int = 10
    epochs: int = 20
    batch_size: int = 256
    learning_rate: float = 1e-3
    hidden_units: tuple[int, ...] | None = None
    conv_channels: tuple[int, ...] = (32, 64, 128)
    embedding_dim: int = 10
    kind: str | None = None
    l2_normalize: bool = True
    robust: bool = True
    min_cluster_share: float = 0.05
    trim_fraction: float = 0.10
    alert_rate: float = 0.01
    online_half_life: float = 50_000.0
    online_prior_weight: float = 100.0
    n_init: int = 10
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("n_clusters", "epochs", "batch_size", "n_init", "embedding_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("min_cluster_share", "trim_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value!r}")
        if not 0.0 < self.alert_rate < 1.0:
            raise ConfigError(f"alert_rate must be in (0, 1), got {self.alert_rate!r}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not self.online_prior_weight >= 0:
            raise ConfigError(f"online_prior_weight must be >= 0, got {self.online_prior_weight!r}")
        if not self.online_half_life > 0:
            raise ConfigError(f"online_half_life must be > 0, got {self.online_half_life!r}")
        if self.hidden_units is not None:
            object.__setattr__(self, "hidden_units", tuple(int(h) for h in self.hidden_units))
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_units"] = None if self.hidden_units is None else list(self.hidden_units)
        d["conv_channels"] = list(self.conv_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DetectorConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigError(f"unknown detector settings {sorted(unknown)}")
        return cls(**d)


@dataclass
class DetectorScores:
    """Scores of a batch, aligned with its good records.

    ``indices`` are the positions of the scored records in the input batch; ``rejected`` lists
    the records that could not be mapped to features, with the reason.
    """

    score: np.ndarray
    cluster: np.ndarray
    margin: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    indices: np.ndarray
    rejected: list[Rejected]
    embeddings: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.score)


def _records_or_array(data: Any) -> tuple[list[dict] | None, np.ndarray | None]:
    if isinstance(data, Dataset):
        return data.records, data.X
    if isinstance(data, np.ndarray):
        return None, data
    if isinstance(data, torch.Tensor):
        return None, data.cpu().numpy()
    return list(data), None


class L2AEDetector:
    """Unsupervised anomaly detector on l2-normalized auto-encoder embeddings.

    Parameters
    ----------
    config
        A :class:`DetectorConfig`; keyword arguments override its fields.

    Examples
    --------
    Train on the first part of river's Shuttle stream (anomalies included, no labels used)
    and score the next records:

    >>> from stream_l2ae.datasets import load_dataset
    >>> shuttle = load_dataset("shuttle", limit=12000)
    >>> train, test = shuttle.split(10000)
    >>> detector = L2AEDetector(epochs=5, n_clusters=10, n_init=2, progress=False).fit(train)
    >>> scores = detector.score_samples(test)
    >>> from stream_l2ae.evaluation import roc_auc
    >>> roc_auc(test.y, scores) > 0.9
    True
    >>> detector.predict(test.records[:3]).tolist()
    [False, False, False]

    Records straight off a topic, as JSON bytes, are scored in one decoding pass:

    >>> import json
    >>> values = [json.dumps(record).encode() for record in test.records]
    >>> bool((detector.score_json(values).score == scores).all())
    True
    """

    def __init__(
        self, config: DetectorConfig | None = None, *, progress: bool = True, **overrides: Any
    ) -> None:
        config = config or DetectorConfig()
        try:
            self.config = replace(config, **overrides)
        except TypeError as exc:
            raise ConfigError(f"unknown detector setting: {exc}") from None
        self.progress = progress
        self.mapper: FeatureMapper | None = None
        self.model: L2AutoEncoder | None = None
        self.online: OnlineCentroids | None = None
        self.threshold: Threshold | None = None
        self.device = select_device(self.config.device)
        self.training_report_: dict[str, Any] = {}
        self.training_scores_: np.ndarray = np.empty(0, dtype=np.float32)
        self.version: str | None = None

    # ----- fitting ------------------------------------------------------------------------
    def _model_config(self, input_shape: tuple[int, ...]) -> AutoEncoderConfig:
        c = self.config
        hidden = c.hidden_units
        if hidden is None:
            n_inputs = int(np.prod(input_shape))
            hidden = PAPER_HIDDEN_UNITS if n_inputs >= WIDE_INPUT else SMALL_HIDDEN_UNITS
        return AutoEncoderConfig(
            input_shape=input_shape,
            kind=c.kind,
            hidden_units=hidden,
            conv_channels=c.conv_channels,
            embedding_dim=c.embedding_dim,
            l2_normalize=c.l2_normalize,
        )

    def _fit_features(self, data: Any) -> np.ndarray:
        records, array = _records_or_array(data)
        self.mapper = FeatureMapper()
        if array is not None:
            self.mapper.fit_array(array)
            X = self.mapper.transform_array(array)
        else:
            X = self.mapper.fit(records).transform(records)
        return X.reshape(self.mapper.output_shape(len(X)))

    def _train_pass(
        self, X: np.ndarray, weight: np.ndarray | None, description: str
    ) -> tuple[L2AutoEncoder, TrainingHistory, torch.Tensor]:
        c = self.config
        torch.manual_seed(c.seed)  # weight initialisation, so that a fit is reproducible
        model = L2AutoEncoder(self._model_config(tuple(X.shape[1:])))
        history = train_autoencoder(
            model,
            X,
            epochs=c.epochs,
            batch_size=c.batch_size,
            learning_rate=c.learning_rate,
            sample_weight=weight,
            seed=c.seed,
            device=self.device,
            progress=self.progress,
            description=description,
        )
        z, _ = embed(model, X)
        return model, history, z

    def fit(self, data: Any, y: Any = None) -> L2AEDetector:
        """Fit features, auto-encoder, k-means and threshold on ``data`` (labels are ignored).

        ``data`` is a list of record dicts, an array of shape ``(n, ...)`` or a
        :class:`~stream_l2ae.datasets.Dataset`.
        """
        c = self.config
        started = time.perf_counter()
        X = self._fit_features(data)
        if len(X) < c.n_clusters:
            raise ConfigError(f"{len(X)} records cannot make n_clusters={c.n_clusters} clusters")
        model, history, z = self._train_pass(X, None, "pass 1" if c.robust else "train")
        z_np = z.cpu().numpy()
        clusters = fit_kmeans(z_np, c.n_clusters, n_init=c.n_init, seed=c.seed)
        report: dict[str, Any] = {"n_records": len(X), "histories": [history.to_dict()]}
        if c.robust:
            share = clusters.sizes / clusters.sizes.sum()
            major = share >= c.min_cluster_share
            if not major.any():
                major = share == share.max()
            first = score_embeddings(z, torch.as_tensor(clusters.centroids[major]))
            suspect = ~major[clusters.labels]
            if c.trim_fraction > 0:
                suspect |= first.score > np.quantile(first.score, 1.0 - c.trim_fraction)
            weight = (~suspect).astype(np.float32)
            report.update(
                minor_cluster_shares=share[~major].round(4).tolist(),
                n_suspects=int(suspect.sum()),
            )
            log.info("pass 1: %d suspects of %d records", suspect.sum(), len(X))
            model, history, z = self._train_pass(X, weight, "pass 2")
            report["histories"].append(history.to_dict())
            z_np = z.cpu().numpy()
            clusters = fit_kmeans(
                z_np, c.n_clusters, n_init=c.n_init, seed=c.seed, sample_weight=weight
            )
        self.model = model
        self.online = OnlineCentroids(
            clusters.centroids,
            half_life=c.online_half_life,
            prior_weight=c.online_prior_weight,
            device=self.device,
        )
        training_scores = score_embeddings(z, self.online.centroids_tensor())
        self.threshold = QuantileThreshold(alert_rate=c.alert_rate).fit(training_scores.score)
        sample = np.random.default_rng(c.seed).permutation(len(training_scores.score))
        self.training_scores_ = training_scores.score[sample[:TRAINING_SCORE_SAMPLE]]
        report.update(
            cluster_shares=(clusters.sizes / clusters.sizes.sum()).round(4).tolist(),
            threshold=self.threshold.value,
            training_score_quantiles={
                str(q): float(np.quantile(training_scores.score, q)) for q in (0.5, 0.9, 0.99)
            },
            seconds=time.perf_counter() - started,
            device=str(self.device),
        )
        self.training_report_ = report
        return self

    # ----- scoring ------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.model is None or self.mapper is None or self.online is None:
            raise NotFittedError("this detector is not fitted: call fit() or load() first")

    def features(self, data: Any) -> tuple[np.ndarray, np.ndarray, list[Rejected]]:
        """Feature tensor input of the good records, their indices, and the rejected records."""
        self._require_fitted()
        records, array = _records_or_array(data)
        if array is not None:
            X = self.mapper.transform_array(array)
            indices, rejected = np.arange(len(X)), []
        else:
            batch = self.mapper.transform_batch(records)
            X, indices, rejected = batch.X, batch.indices, batch.rejected
        return X.reshape(self.mapper.output_shape(len(X))), indices, rejected

    @torch.no_grad()
    def embed(self, X: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Unit embeddings of feature rows, on the model's device."""
        self._require_fitted()
        z, _ = embed(self.model, X)
        return z

    @torch.no_grad()
    def score_embeddings(self, z: torch.Tensor) -> ClusterScores:
        self._require_fitted()
        return score_embeddings(z, self.online.centroids_tensor(), centroids_are_unit=True)

    def score_batch(self, data: Any, *, keep_embeddings: bool = False) -> DetectorScores:
        """Score a batch; bad records are returned in ``rejected`` instead of raising."""
        X, indices, rejected = self.features(data)
        return self._score_features(X, indices, rejected, keep_embeddings)

    def score_json(
        self, values: Sequence[bytes], *, keep_embeddings: bool = False
    ) -> DetectorScores | None:
        """Score raw JSON values in one decoding pass; ``None`` when they need the careful path.

        ``None`` (never a partial result) comes back unless the schema is all-numeric and every
        value is a clean flat JSON object (:meth:`FeatureMapper.transform_json`); decode the
        values and call :meth:`score_batch` then, which reports each bad record.
        """
        self._require_fitted()
        batch = self.mapper.transform_json(values)
        if batch is None:
            return None
        X = batch.X.reshape(self.mapper.output_shape(len(batch.X)))
        return self._score_features(X, batch.indices, [], keep_embeddings)

    def _score_features(
        self, X: np.ndarray, indices: np.ndarray, rejected: list[Rejected], keep_embeddings: bool
    ) -> DetectorScores:
        z = self.embed(X)
        scores = self.score_embeddings(z)
        threshold = self.threshold.value
        return DetectorScores(
            score=scores.score,
            cluster=scores.cluster,
            margin=scores.margin,
            is_anomaly=scores.score > threshold,
            threshold=threshold,
            indices=indices,
            rejected=rejected,
            embeddings=z if keep_embeddings else None,
        )

    def score_samples(self, data: Any) -> np.ndarray:
        """Anomaly scores ``1 - max_j cos(z, c_j)``; raises on the first bad record."""
        result = self.score_batch(data)
        if result.rejected:
            first = result.rejected[0]
            raise first.error
        return result.score

    def predict(self, data: Any) -> np.ndarray:
        """``True`` where the score is above the calibrated threshold."""
        return self.score_samples(data) > self.threshold.value

    def reconstruction_error(self, data: Any) -> np.ndarray:
        """Per-record reconstruction error: the baseline the paper compares with."""
        X, _, _ = self.features(data)
        with torch.no_grad():
            _, errors = embed(self.model, X, with_reconstruction_error=True)
        return errors.cpu().numpy()

    def partial_fit(self, data: Any, *, now: float | None = None) -> L2AEDetector:
        """Move the centroids towards the normal records of a batch (anomalies are skipped)."""
        result = self.score_batch(data, keep_embeddings=True)
        self.online.partial_fit(result.embeddings, result.cluster, skip=result.is_anomaly, now=now)
        return self

    # ----- persistence --------------------------------------------------------------------
    def to_contents(self, metadata: dict[str, Any] | None = None) -> BundleContents:
        self._require_fitted()
        arrays, online_doc = self.online.state()
        arrays["centroids"] = self.online.centroids.astype(np.float32)
        arrays["training_scores"] = np.asarray(self.training_scores_, dtype=np.float32)
        return BundleContents(
            tensors={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            arrays=arrays,
            documents={
                "model_config": self.model.config.to_dict(),
                "detector": self.config.to_dict(),
                "features": self.mapper.to_dict(),
                "threshold": self.threshold.to_dict(),
                "online": online_doc,
            },
            metadata={
                "package_version": __version__,
                "training": _json_safe(self.training_report_),
                **(metadata or {}),
            },
        )

    def save(
        self,
        root: str | Path,
        *,
        metadata: dict[str, Any] | None = None,
        version: str | None = None,
        keep: int | None = None,
    ) -> Bundle:
        """Write a new model version under ``root`` atomically and point ``LATEST`` at it."""
        return save_bundle(root, self.to_contents(metadata), version=version, keep=keep)

    @classmethod
    def from_bundle(cls, bundle: Bundle, *, device: str = "auto") -> L2AEDetector:
        docs = bundle.contents.documents
        try:
            config = DetectorConfig.from_dict({**docs["detector"], "device": device})
            detector = cls(config, progress=False)
            model = L2AutoEncoder(AutoEncoderConfig.from_dict(docs["model_config"]))
            model.load_state_dict(bundle.contents.tensors, strict=True)
            detector.model = model.to(detector.device).eval()
            detector.mapper = FeatureMapper.from_dict(docs["features"])
            detector.threshold = threshold_from_dict(docs["threshold"])
            detector.online = OnlineCentroids.from_state(
                bundle.contents.arrays, docs["online"], device=detector.device
            )
        except BundleError:
            raise
        except (KeyError, RuntimeError, TypeError, ValueError) as exc:
            raise BundleError(
                f"bundle {bundle.path} is incompatible with stream-l2ae {__version__}: {exc}"
            ) from exc
        detector.training_report_ = bundle.manifest.get("metadata", {}).get("training", {})
        detector.training_scores_ = bundle.contents.arrays.get(
            "training_scores", np.empty(0, dtype=np.float32)
        )
        detector.created_at = bundle.manifest.get("created_at")
        detector.version = bundle.version
        return detector

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> L2AEDetector:
        """Load a bundle (a version directory, or a model root whose ``LATEST`` is followed)."""
        return cls.from_bundle(load_bundle(path), device=device)

    @property
    def schema(self) -> Schema:
        self._require_fitted()
        return self.mapper.schema


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


__all__ = ["DetectorConfig", "DetectorScores", "L2AEDetector", "as_tensor"]
