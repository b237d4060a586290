"""Offline evaluation of anomaly scores and clusterings against ground-truth labels.

Labels follow the anomaly-detection convention: ``1`` (or ``True``) marks an anomaly, ``0`` a
normal record; scores are higher for more anomalous records.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = [
    "average_precision",
    "clustering_accuracy",
    "plot_report",
    "precision_recall_at",
    "roc_auc",
]


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``y_true``.

    Raises
    ------
    ValueError
        If ``y_true`` is not binary, holds only one class, or its length differs from ``scores``.

    Examples
    --------
    >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> roc_auc([0, 0, 0], [0.1, 0.2, 0.3])
    Traceback (most recent call last):
    ...
    ValueError: roc_auc needs both normal (0) and anomalous (1) labels, got only 0
    """
    labels = _binary_labels(y_true)
    values = _scores_matching(scores, labels.size)
    _require_both_classes(labels, "roc_auc")
    return float(roc_auc_score(labels, values))


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Average precision (area under the precision-recall curve) of ``scores``.

    Raises
    ------
    ValueError
        If ``y_true`` is not binary, has no anomaly, or its length differs from ``scores``.

    Examples
    --------
    >>> average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.8333333333333333
    """
    labels = _binary_labels(y_true)
    values = _scores_matching(scores, labels.size)
    if not labels.any():
        raise ValueError("average_precision needs at least one anomalous (1) label, got none")
    return float(average_precision_score(labels, values))


def precision_recall_at(
    y_true: ArrayLike, is_alert: ArrayLike, *, zero_division: float = 0.0
) -> tuple[float, float]:
    """Precision and recall of binary alerts.

    Parameters
    ----------
    y_true
        Binary labels, 1 for anomalies.
    is_alert
        Binary alerts, e.g. ``threshold.is_anomaly(scores)``.
    zero_division
        Returned for precision when there is no alert, and for recall when there is no anomaly.

    Examples
    --------
    >>> precision_recall_at([0, 1, 1, 0], [False, True, False, True])
    (0.5, 0.5)
    >>> precision_recall_at([0, 1, 1, 0], [False, False, False, False])  # no alert at all
    (0.0, 0.0)
    """
    labels = _binary_labels(y_true)
    alerts = _binary_labels(is_alert, name="is_alert")
    if alerts.size != labels.size:
        raise ValueError(
            f"is_alert has {alerts.size} values but y_true has {labels.size}; they must match"
        )
    true_positives = int(np.count_nonzero(labels & alerts))
    n_alerts = int(np.count_nonzero(alerts))
    n_anomalies = int(np.count_nonzero(labels))
    precision = true_positives / n_alerts if n_alerts else float(zero_division)
    recall = true_positives / n_anomalies if n_anomalies else float(zero_division)
    return precision, recall


def clustering_accuracy(y_true: ArrayLike, cluster_labels: ArrayLike) -> float:
    """Best accuracy over one-to-one matchings of clusters to classes (Hungarian algorithm).

    Labels of either kind can be any sortable values. With more clusters than classes the
    unmatched clusters count as errors; with fewer, the unmatched classes do.

    Examples
    --------
    >>> clustering_accuracy([0, 0, 1, 1, 2], [2, 2, 0, 0, 1])  # a renaming of the classes
    1.0
    >>> # contingency (rows classes, columns clusters) [[1, 2, 0], [2, 0, 1]]: 2 + 2 of 6 matched
    >>> round(clustering_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 2]), 4)
    0.6667
    """
    classes = np.asarray(y_true).reshape(-1)
    clusters = np.asarray(cluster_labels).reshape(-1)
    if classes.size != clusters.size:
        raise ValueError(
            f"cluster_labels has {clusters.size} values but y_true has {classes.size}; "
            "they must match"
        )
    if classes.size == 0:
        raise ValueError("clustering_accuracy needs at least one record, got empty arrays")
    _, class_index = np.unique(classes, return_inverse=True)
    _, cluster_index = np.unique(clusters, return_inverse=True)
    n_classes, n_clusters = int(class_index.max()) + 1, int(cluster_index.max()) + 1
    contingency = np.bincount(
        class_index * n_clusters + cluster_index, minlength=n_classes * n_clusters
    ).reshape(n_classes, n_clusters)
    rows, columns = linear_sum_assignment(contingency, maximize=True)
    return float(contingency[rows, columns].sum() / classes.size)


def plot_report(
    path: str | os.PathLike[str],
    *,
    scores: ArrayLike,
    threshold: float,
    cluster_labels: ArrayLike,
    y_true: ArrayLike | None = None,
    title: str = "",
) -> Path:
    r"""Write a three-panel PNG report: ROC curve, score histogram, cluster sizes.

    Uses matplotlib's object API with the Agg canvas, so it needs no display and leaves
    pyplot's global state alone. Missing parent directories are created.

    Parameters
    ----------
    path
        Where to write the PNG.
    scores
        Anomaly score of each record.
    threshold
        Alert threshold, drawn on the histogram and the ROC curve.
    cluster_labels
        Cluster of each record (e.g. the nearest centroid).
    y_true
        Optional binary labels, 1 for anomalies: enables the ROC curve and splits the histogram
        and the clusters by label.
    title
        Figure title.

    Returns
    -------
    Path
        ``path``.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> scores = np.concatenate([rng.exponential(0.02, 200), rng.uniform(0.2, 1.0, 10)])
    >>> labels = np.r_[np.zeros(200, int), np.ones(10, int)]
    >>> clusters = rng.integers(0, 4, size=210)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = plot_report(pathlib.Path(tmp) / "report.png", scores=scores, threshold=0.1,
    ...                        cluster_labels=clusters, y_true=labels, title="demo")
    ...     path.read_bytes()[:8]
    b'\x89PNG\r\n\x1a\n'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("plot_report needs at least one score, got an empty array")
    if not np.all(np.isfinite(values)):
        raise ValueError("scores contain non-finite values (NaN or inf)")
    threshold = float(threshold)
    clusters = np.asarray(cluster_labels).reshape(-1)
    if clusters.size != values.size:
        raise ValueError(
            f"cluster_labels has {clusters.size} values but scores has {values.size}; "
            "they must match"
        )
    labels = None
    if y_true is not None:
        labels = _binary_labels(y_true)
        if labels.size != values.size:
            raise ValueError(
                f"y_true has {labels.size} values but scores has {values.size}; they must match"
            )

    figure = Figure(figsize=(17, 5), layout="constrained")
    FigureCanvasAgg(figure)
    roc_axes, histogram_axes, cluster_axes = figure.subplots(1, 3)
    _plot_roc(roc_axes, values, threshold, labels)
    _plot_score_histogram(histogram_axes, values, threshold, labels)
    _plot_cluster_sizes(cluster_axes, clusters, labels)
    if title:
        figure.suptitle(title, fontsize="x-large")

    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=100)
    return output


def _plot_roc(axes, scores: np.ndarray, threshold: float, labels: np.ndarray | None) -> None:
    axes.set_title("ROC curve")
    if labels is None or labels.all() or not labels.any():
        note = "no labels given" if labels is None else "labels hold only one class"
        axes.text(
            0.5, 0.5, f"ROC curve unavailable:\n{note}", ha="center", va="center", fontsize="large"
        )
        axes.set_axis_off()
        return
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    auc = roc_auc_score(labels, scores)
    axes.plot(false_positive_rate, true_positive_rate, label=f"scores (AUC = {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    alerts = scores > threshold
    axes.plot(
        alerts[~labels].mean(),
        alerts[labels].mean(),
        "o",
        color="C3",
        label=f"threshold {threshold:.4g}",
    )
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right")


def _plot_score_histogram(
    axes, scores: np.ndarray, threshold: float, labels: np.ndarray | None
) -> None:
    low = min(float(scores.min()), threshold)
    high = max(float(scores.max()), threshold)
    edges = np.linspace(low, high if high > low else low + 1e-6, 61)
    if labels is None:
        axes.hist(scores, bins=edges, log=True, color="C0", label=f"all ({scores.size})")
    else:
        for mask, name, color in ((~labels, "normal", "C0"), (labels, "anomalous", "C3")):
            if mask.any():
                axes.hist(
                    scores[mask],
                    bins=edges,
                    log=True,
                    alpha=0.6,
                    color=color,
                    label=f"{name} ({int(mask.sum())})",
                )
    alert_fraction = float(np.mean(scores > threshold))
    axes.axvline(
        threshold,
        color="black",
        linestyle="--",
        label=f"threshold {threshold:.4g} ({alert_fraction:.2%} above)",
    )
    axes.set_title("Score distribution")
    axes.set_xlabel("anomaly score (1 - cosine similarity)")
    axes.set_ylabel("records (log scale)")
    axes.legend(loc="upper right")


def _plot_cluster_sizes(axes, clusters: np.ndarray, labels: np.ndarray | None) -> None:
    names, cluster_index, sizes = np.unique(clusters, return_inverse=True, return_counts=True)
    positions = np.arange(names.size)
    bars = axes.bar(positions, sizes, color="C0", label="records")
    axes.set_title("Cluster sizes")
    axes.set_xlabel("cluster")
    axes.set_ylabel("records")
    axes.set_ylim(0, sizes.max() * 1.2)  # headroom for the legend
    if names.size <= 40:
        axes.set_xticks(positions, [str(name) for name in names])
    if labels is None:
        return
    anomaly_fraction = np.bincount(cluster_index, weights=labels, minlength=names.size) / sizes
    fraction_axes = axes.twinx()
    (points,) = fraction_axes.plot(
        positions, anomaly_fraction, "o", color="C3", label="anomaly fraction"
    )
    fraction_axes.set_ylim(0, max(float(anomaly_fraction.max()) * 1.15, 1e-3))
    fraction_axes.set_ylabel("anomaly fraction", color="C3")
    axes.legend(handles=[bars, points], loc="upper right")


def _binary_labels(values: ArrayLike, name: str = "y_true") -> np.ndarray:
    array = np.asarray(values).reshape(-1)
    if array.dtype != bool:
        if not np.all(np.isin(array, (0, 1))):
            unexpected = np.unique(array[~np.isin(array, (0, 1))])[:5].tolist()
            raise ValueError(f"{name} must be binary (0/1 or bool), found values {unexpected}")
        array = array.astype(bool)
    return array


def _scores_matching(scores: ArrayLike, n_labels: int) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if values.size != n_labels:
        raise ValueError(
            f"scores has {values.size} values but y_true has {n_labels}; they must match"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError("scores contain non-finite values (NaN or inf)")
    return values


def _require_both_classes(labels: np.ndarray, metric: str) -> None:
    if labels.size == 0:
        raise ValueError(f"{metric} needs labelled records, got empty arrays")
    if labels.all() or not labels.any():
        present = 1 if labels.any() else 0
        raise ValueError(
            f"{metric} needs both normal (0) and anomalous (1) labels, got only {present}"
        )
