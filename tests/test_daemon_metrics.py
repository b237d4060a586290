"""Tests of consumers.metrics: the batch histogram, the daemon's metrics and their exposition."""

from __future__ import annotations

import threading
import urllib.request
from collections import Counter

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from consumers.metrics import (
    DEAD_LETTER_REASONS,
    LATENCY_BUCKETS,
    SCORE_BUCKETS,
    BatchHistogram,
    DaemonMetrics,
)
from stream_l2ae.errors import RecordError


def samples(registry: CollectorRegistry, name: str) -> dict[tuple, float]:
    """``{(sample name, sorted labels): value}`` of the family ``name``."""
    result = {}
    for family in registry.collect():
        if family.name == name:
            for sample in family.samples:
                result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(metrics: DaemonMetrics, sample_name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(sample_name, labels)


# --- BatchHistogram ------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets", [SCORE_BUCKETS, LATENCY_BUCKETS])
def test_batch_histogram_matches_prometheus_histogram(buckets):
    rng = np.random.default_rng(0)
    batches = [
        rng.exponential(0.05, size=1000),
        rng.uniform(0, 2, size=500),
        np.array(buckets),  # values exactly on the bounds: le is inclusive
        np.array([0.0, 100.0]),  # the lowest bucket and +Inf
        np.array([]),
    ]
    reference_registry, batch_registry = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("h", "help", buckets=buckets, registry=reference_registry)
    batched = BatchHistogram("h", "help", buckets)
    batch_registry.register(batched)
    for batch in batches:
        for item in batch:
            reference.observe(float(item))
        batched.observe(batch)

    expected = samples(reference_registry, "h")
    got = samples(batch_registry, "h")
    expected = {key: v for key, v in expected.items() if key[0] != "h_created"}
    assert got.keys() == expected.keys()
    for key, expected_value in expected.items():
        assert got[key] == pytest.approx(expected_value, rel=1e-12), key
    assert batched.count == sum(len(batch) for batch in batches)
    # The text exposition is the same apart from _created.
    ours = generate_latest(batch_registry).decode().splitlines()
    theirs = [line for line in generate_latest(reference_registry).decode().splitlines()]
    theirs = [line for line in theirs if "h_created" not in line and "_sum" not in line]
    assert [line for line in ours if "_sum" not in line] == theirs


def test_batch_histogram_skips_non_finite_values():
    histogram = BatchHistogram("h", "help", [1.0])
    histogram.observe([0.5, np.nan, np.inf, -np.inf, 2.0])
    assert histogram.count == 2
    assert histogram.sum == 2.5
    assert histogram.dropped == 3


def test_batch_histogram_rejects_bad_buckets():
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchHistogram("h", "help", [1.0, 0.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        BatchHistogram("h", "help", [])


def test_batch_histogram_is_thread_safe():
    registry = CollectorRegistry()
    histogram = BatchHistogram("h", "help", SCORE_BUCKETS)
    registry.register(histogram)
    n_threads, n_batches, batch = 8, 200, np.linspace(0, 2, 101)
    stop = threading.Event()
    scrape_errors = []

    def scrape():
        while not stop.is_set():
            try:
                # Cumulative buckets must never decrease and must end at the count.
                values = [s.value for s in next(iter(histogram.collect())).samples]
                bucket_values = values[: len(SCORE_BUCKETS) + 1]
                assert bucket_values == sorted(bucket_values)
                generate_latest(registry)
            except Exception as error:  # reported below
                scrape_errors.append(error)

    def observe():
        for _ in range(n_batches):
            histogram.observe(batch)

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=observe) for _ in range(n_threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    stop.set()
    scraper.join()

    assert not scrape_errors
    assert histogram.count == n_threads * n_batches * len(batch)
    assert histogram.sum == pytest.approx(n_threads * n_batches * batch.sum())


def test_batch_histogram_name_clash_is_detected():
    registry = CollectorRegistry()
    registry.register(BatchHistogram("h", "help", [1.0]))
    with pytest.raises(ValueError, match="Duplicated"):
        Histogram("h", "help", registry=registry)


# --- DaemonMetrics -------------------------------------------------------------------------------


def test_metrics_use_a_private_registry():
    first, second = DaemonMetrics(), DaemonMetrics()  # would clash in one shared registry
    first.observe_batch(2, 2, 0, np.array([0.1, 0.2]), None, 0.01)
    assert value(first, "stream_l2ae_records_consumed_total") == 2
    assert value(second, "stream_l2ae_records_consumed_total") == 0


def test_observe_batch_updates_counters_and_histograms():
    metrics = DaemonMetrics()
    metrics.observe_batch(
        n_consumed=5,
        n_scored=4,
        n_alerts=1,
        scores=np.array([0.0005, 0.01, 0.3, 1.9]),
        latencies_s=np.array([-0.5, 0.01, 0.2, 3.0]),  # a producer clock ahead of ours
        duration_s=0.02,
    )
    assert value(metrics, "stream_l2ae_records_consumed_total") == 5
    assert value(metrics, "stream_l2ae_records_scored_total") == 4
    assert value(metrics, "stream_l2ae_alerts_total") == 1
    assert value(metrics, "stream_l2ae_batches_total") == 1
    assert value(metrics, "stream_l2ae_score_count") == 4
    assert value(metrics, "stream_l2ae_score_bucket", le="0.001") == 1
    assert value(metrics, "stream_l2ae_score_bucket", le="2.0") == 4
    assert value(metrics, "stream_l2ae_record_latency_seconds_bucket", le="0.001") == 1
    assert value(metrics, "stream_l2ae_record_latency_seconds_sum") == pytest.approx(3.21)
    assert value(metrics, "stream_l2ae_batch_duration_seconds_count") == 1


def test_dead_letter_reasons_are_pre_initialised():
    metrics = DaemonMetrics()
    for reason in RecordError.REASONS:
        assert value(metrics, "stream_l2ae_dead_letters_total", reason=reason) == 0.0
    metrics.dead_lettered(Counter({"nan": 3, "decode": 1, "something-new": 2}))
    assert value(metrics, "stream_l2ae_dead_letters_total", reason="nan") == 3
    assert value(metrics, "stream_l2ae_dead_letters_total", reason="decode") == 1
    assert value(metrics, "stream_l2ae_dead_letters_total", reason="other") == 2
    assert value(metrics, "stream_l2ae_dead_letters_total", reason="something-new") is None
    reasons = {
        labels[0][1]
        for name, labels in samples(metrics.registry, "stream_l2ae_dead_letters")
        if name.endswith("_total")
    }
    assert reasons == set(DEAD_LETTER_REASONS)


def test_lag_gauge_removes_revoked_partitions():
    metrics = DaemonMetrics()
    metrics.set_lag({("events", 0): 10, ("events", 1): 20, ("other", 0): 5})
    assert value(metrics, "stream_l2ae_consumer_lag_records", topic="events", partition="1") == 20
    metrics.set_lag({("events", 0): 7})  # partitions 1 and other/0 were revoked
    assert value(metrics, "stream_l2ae_consumer_lag_records", topic="events", partition="0") == 7
    assert value(metrics, "stream_l2ae_consumer_lag_records", topic="events", partition="1") is None
    assert value(metrics, "stream_l2ae_consumer_lag_records", topic="other", partition="0") is None
    metrics.set_lag({})
    assert samples(metrics.registry, "stream_l2ae_consumer_lag_records") == {}


def test_occupancy_follows_the_number_of_clusters():
    metrics = DaemonMetrics()
    metrics.set_occupancy(np.array([0.5, 0.25, 0.25]))
    assert value(metrics, "stream_l2ae_cluster_occupancy", cluster="2") == 0.25
    metrics.set_occupancy(np.array([0.6, 0.4]))  # a new model with fewer clusters
    assert value(metrics, "stream_l2ae_cluster_occupancy", cluster="1") == 0.4
    assert value(metrics, "stream_l2ae_cluster_occupancy", cluster="2") is None


def test_model_info_and_created_timestamp():
    metrics = DaemonMetrics()
    metrics.set_model("v000003-20261204T161920Z", "2026-12-04T16:19:20.000000+00:00", 10, 32)
    info = samples(metrics.registry, "stream_l2ae_model")
    assert info == {
        (
            "stream_l2ae_model_info",
            (
                ("embedding_dim", "32"),
                ("n_clusters", "10"),
                ("version", "v000003-20261204T161920Z"),
            ),
        ): 1.0
    }
    created = value(metrics, "stream_l2ae_model_created_timestamp_seconds")
    assert created == 1796401160.0
    metrics.set_model("v2", "2026-12-04T16:19:20", 10, 32)  # naive: UTC
    assert value(metrics, "stream_l2ae_model_created_timestamp_seconds") == created
    metrics.set_model("v3", "not a time", 10, 32)
    assert np.isnan(value(metrics, "stream_l2ae_model_created_timestamp_seconds"))
    # The info metric holds one label set: the model in service.
    assert len(samples(metrics.registry, "stream_l2ae_model")) == 1


def test_state_methods():
    metrics = DaemonMetrics()
    metrics.set_threshold(0.42)
    metrics.set_centroid_movement(1e-4)
    metrics.set_broker_up(True)
    metrics.committed(timestamp=1000.0)
    metrics.commit_failed()
    metrics.checkpointed(timestamp=2000.0)
    metrics.checkpoint_failed()
    metrics.scores_produced(7)
    metrics.produce_failed()
    metrics.broker_reconnected()
    metrics.broker_error()
    metrics.model_swapped()
    expected = {
        "stream_l2ae_threshold": 0.42,
        "stream_l2ae_centroid_movement": 1e-4,
        "stream_l2ae_broker_up": 1,
        "stream_l2ae_last_commit_timestamp_seconds": 1000.0,
        "stream_l2ae_commits_total": 1,
        "stream_l2ae_commit_failures_total": 1,
        "stream_l2ae_last_checkpoint_timestamp_seconds": 2000.0,
        "stream_l2ae_checkpoints_total": 1,
        "stream_l2ae_checkpoint_failures_total": 1,
        "stream_l2ae_scores_published_total": 7,
        "stream_l2ae_produce_failures_total": 1,
        "stream_l2ae_broker_reconnects_total": 1,
        "stream_l2ae_broker_errors_total": 1,
        "stream_l2ae_model_swaps_total": 1,
    }
    for name, expected_value in expected.items():
        assert value(metrics, name) == expected_value, name
    metrics.set_broker_up(False)
    assert value(metrics, "stream_l2ae_broker_up") == 0


def test_metric_names_include_metrics_without_samples_yet():
    names = DaemonMetrics().metric_names()
    for name in [
        "stream_l2ae_records_consumed_total",
        "stream_l2ae_dead_letters_total",
        "stream_l2ae_score_bucket",
        "stream_l2ae_score_sum",
        "stream_l2ae_score_count",
        "stream_l2ae_record_latency_seconds_bucket",
        "stream_l2ae_batch_duration_seconds_bucket",
        "stream_l2ae_consumer_lag_records",  # labelled, no partition assigned yet
        "stream_l2ae_cluster_occupancy",
        "stream_l2ae_model_info",
        "stream_l2ae_model_created_timestamp_seconds",
    ]:
        assert name in names, name
    assert all(name.startswith("stream_l2ae_") for name in names)


def test_names_follow_prometheus_conventions():
    metrics = DaemonMetrics()
    metrics.set_lag({("events", 0): 1})
    metrics.set_occupancy([1.0])
    text = generate_latest(metrics.registry).decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    assert types, text
    for name, kind in types.items():
        assert name.startswith("stream_l2ae_"), name
        if kind == "counter":
            assert name.endswith("_total"), name
        if name.endswith("_total"):
            assert kind == "counter", name
        assert "_milliseconds" not in name and "_ms" not in name, name
    for family in metrics.registry.collect():
        for sample in family.samples:
            assert set(sample.labels) <= {
                "topic",
                "partition",
                "reason",
                "cluster",
                "version",
                "n_clusters",
                "embedding_dim",
                "le",
            }, sample


# --- HTTP exposition -----------------------------------------------------------------------------


def test_http_scrape_shows_the_counters():
    metrics = DaemonMetrics()
    metrics.observe_batch(3, 3, 1, np.array([0.01, 0.02, 1.5]), np.array([0.1, 0.1, 0.1]), 0.01)
    metrics.dead_lettered({"type": 2})
    metrics.set_model("v1", None, 4, 8)
    with metrics:
        port = metrics.start_http_server(0, addr="127.0.0.1")
        assert port > 0 and metrics.port == port
        with pytest.raises(RuntimeError, match="already running"):
            metrics.start_http_server(0, addr="127.0.0.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            assert response.status == 200
            body = response.read().decode()

    scraped = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    assert scraped[("stream_l2ae_records_consumed_total", ())] == 3
    assert scraped[("stream_l2ae_alerts_total", ())] == 1
    assert scraped[("stream_l2ae_dead_letters_total", (("reason", "type"),))] == 2
    assert scraped[("stream_l2ae_dead_letters_total", (("reason", "nan"),))] == 0
    assert scraped[("stream_l2ae_score_count", ())] == 3
    assert scraped[("stream_l2ae_score_bucket", (("le", "0.02"),))] == 2
    info_labels = (("embedding_dim", "8"), ("n_clusters", "4"), ("version", "v1"))
    assert scraped[("stream_l2ae_model_info", info_labels)] == 1
    assert {name for name, _ in scraped} <= metrics.metric_names()

    # close() (via the context manager) stopped the server.
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # idempotent
