from __future__ import annotations

import numpy as np
import pytest

from stream_l2ae.evaluation import (
    average_precision,
    clustering_accuracy,
    plot_report,
    precision_recall_at,
    roc_auc,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- roc_auc / average_precision -----------------------------------------------------------------


def test_roc_auc_perfect_inverted_and_known_case():
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert roc_auc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    # positive pairs (anomaly above normal): (0.35 > 0.1), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4
    assert roc_auc(labels.astype(bool), [0.1, 0.4, 0.35, 0.8]) == 0.75


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1], [True, True]])
def test_roc_auc_with_one_class_raises_clear_error(labels):
    with pytest.raises(ValueError, match="needs both normal"):
        roc_auc(labels, np.linspace(0, 1, len(labels)))


def test_metrics_reject_bad_inputs():
    with pytest.raises(ValueError, match="binary"):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="must match"):
        roc_auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="non-finite"):
        roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="at least one anomalous"):
        average_precision([0, 0], [0.1, 0.2])


def test_average_precision_known_case():
    # ranking by score: 1 (0.8), 0 (0.4), 1 (0.35), 0 (0.1): precision at the hits 1 and 2/3
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(5 / 6)
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


# --- precision_recall_at -------------------------------------------------------------------------


def test_precision_recall_at_known_case():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    alerts = np.array([1, 1, 0, 1, 0, 0, 0, 0], dtype=bool)
    assert precision_recall_at(labels, alerts) == pytest.approx((2 / 3, 2 / 3))


def test_precision_recall_at_tolerates_zero_alerts_and_zero_anomalies():
    assert precision_recall_at([0, 1, 0], [False, False, False]) == (0.0, 0.0)
    assert precision_recall_at([0, 0, 0], [False, True, False]) == (0.0, 0.0)
    precision, recall = precision_recall_at([0, 1], [0, 0], zero_division=1.0)
    assert (precision, recall) == (1.0, 0.0)


def test_precision_recall_at_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="must match"):
        precision_recall_at([0, 1, 1], [True, False])


# --- clustering_accuracy -------------------------------------------------------------------------


def test_clustering_accuracy_is_one_for_permuted_labels():
    rng = np.random.default_rng(0)
    classes = rng.integers(0, 5, size=1_000)
    renaming = rng.permutation(5) + 10
    assert clustering_accuracy(classes, renaming[classes]) == 1.0


def test_clustering_accuracy_accepts_string_labels():
    assert clustering_accuracy(["a", "a", "b"], ["x", "x", "y"]) == 1.0


def test_clustering_accuracy_hand_computed_case():
    # contingency (rows classes 0, 1; columns clusters 0, 1, 2):
    #   class 0: [1, 2, 0]    class 1: [2, 0, 1]
    # best matching: class 0 -> cluster 1 (2), class 1 -> cluster 0 (2) -> 4 / 6
    accuracy = clustering_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 2])
    assert accuracy == pytest.approx(4 / 6)


def test_clustering_accuracy_with_fewer_clusters_than_classes():
    # one cluster holds classes 0 and 1 (3 + 2 records), another class 2 (2 records):
    # only one of classes 0 and 1 can be matched, so the best is 3 + 2 of 7.
    accuracy = clustering_accuracy([0, 0, 0, 1, 1, 2, 2], [5, 5, 5, 5, 5, 6, 6])
    assert accuracy == pytest.approx(5 / 7)


def test_clustering_accuracy_rejects_bad_inputs():
    with pytest.raises(ValueError, match="must match"):
        clustering_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="at least one record"):
        clustering_accuracy([], [])


# --- plot_report ---------------------------------------------------------------------------------


@pytest.fixture
def report_data():
    rng = np.random.default_rng(1)
    scores = np.concatenate([rng.exponential(0.02, 2_000), rng.uniform(0.2, 1.5, 40)])
    labels = np.r_[np.zeros(2_000, dtype=int), np.ones(40, dtype=int)]
    clusters = rng.integers(0, 6, size=scores.size)
    return scores, labels, clusters


def assert_is_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000


def test_plot_report_with_labels(tmp_path, report_data):
    scores, labels, clusters = report_data
    path = plot_report(
        tmp_path / "nested" / "report.png",
        scores=scores,
        threshold=0.1,
        cluster_labels=clusters,
        y_true=labels,
        title="with labels",
    )
    assert path == tmp_path / "nested" / "report.png"
    assert_is_png(path)


def test_plot_report_without_labels(tmp_path, report_data):
    scores, _, clusters = report_data
    path = plot_report(
        str(tmp_path / "report.png"), scores=scores, threshold=0.1, cluster_labels=clusters
    )
    assert_is_png(path)


def test_plot_report_with_single_class_labels_and_degenerate_scores(tmp_path):
    path = plot_report(
        tmp_path / "report.png",
        scores=np.zeros(50),
        threshold=0.0,
        cluster_labels=np.zeros(50, dtype=int),
        y_true=np.zeros(50, dtype=int),
    )
    assert_is_png(path)


def test_plot_report_rejects_mismatched_lengths(tmp_path, report_data):
    scores, labels, clusters = report_data
    with pytest.raises(ValueError, match="cluster_labels"):
        plot_report(tmp_path / "r.png", scores=scores, threshold=0.1, cluster_labels=clusters[:-1])
    with pytest.raises(ValueError, match="y_true"):
        plot_report(
            tmp_path / "r.png",
            scores=scores,
            threshold=0.1,
            cluster_labels=clusters,
            y_true=labels[:-1],
        )
    assert not (tmp_path / "r.png").exists()
