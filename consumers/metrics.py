"""Prometheus metrics of the consumer daemon.

Every metric lives in a registry owned by one :class:`DaemonMetrics` (never the process-wide
default ``prometheus_client.REGISTRY``), so several daemons, or many tests, can coexist in one
process. Names follow the Prometheus conventions: one ``stream_l2ae_`` prefix, base units
(``_seconds``), ``_total`` on counters, an ``_info`` metric for the model in service, and labels
only from bounded sets (``topic``, ``partition``, ``reason``, ``cluster``, ``version``): never a
label per record. Rates (records per second) and ages (``time() -
stream_l2ae_model_created_timestamp_seconds``) are left to PromQL.

Scores and record latencies are observed a whole batch at a time by :class:`BatchHistogram`,
a vectorised histogram collector: ``prometheus_client.Histogram.observe`` takes one value per
call, which costs more than the scoring itself at tens of thousands of records per second.

Exported metrics (``prometheus_client`` also exports a ``<name>_created`` gauge for every counter
and for ``batch_duration_seconds``)::

    stream_l2ae_records_consumed_total          counter
    stream_l2ae_records_scored_total            counter
    stream_l2ae_alerts_total                    counter
    stream_l2ae_dead_letters_total{reason}      counter, reasons pre-initialised at 0
    stream_l2ae_scores_published_total          counter
    stream_l2ae_batches_total                   counter
    stream_l2ae_commits_total                   counter
    stream_l2ae_commit_failures_total           counter
    stream_l2ae_produce_failures_total          counter
    stream_l2ae_broker_reconnects_total         counter
    stream_l2ae_broker_errors_total             counter
    stream_l2ae_model_swaps_total               counter
    stream_l2ae_checkpoints_total               counter
    stream_l2ae_checkpoint_failures_total       counter
    stream_l2ae_score                           histogram (batch-observed)
    stream_l2ae_record_latency_seconds          histogram (batch-observed)
    stream_l2ae_batch_duration_seconds          histogram
    stream_l2ae_threshold                       gauge
    stream_l2ae_consumer_lag_records{topic,partition}  gauge
    stream_l2ae_centroid_movement               gauge
    stream_l2ae_cluster_occupancy{cluster}      gauge
    stream_l2ae_broker_up                       gauge (0/1)
    stream_l2ae_last_commit_timestamp_seconds   gauge
    stream_l2ae_last_checkpoint_timestamp_seconds  gauge
    stream_l2ae_model_created_timestamp_seconds gauge
    stream_l2ae_model_info{version,n_clusters,embedding_dim}  info
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import prometheus_client
from numpy.typing import ArrayLike
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from stream_l2ae.errors import RecordError

__all__ = [
    "BATCH_DURATION_BUCKETS",
    "DEAD_LETTER_REASONS",
    "LATENCY_BUCKETS",
    "SCORE_BUCKETS",
    "BatchHistogram",
    "DaemonMetrics",
]

SCORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
"""Upper bounds of the score histogram: scores are in ``[0, 2]`` and normal ones are near 0."""

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Upper bounds, in seconds, of the record latency histogram (record timestamp to scored)."""

BATCH_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds, in seconds, of the batch processing time histogram."""

OTHER_REASON = "other"
DEAD_LETTER_REASONS = (*RecordError.REASONS, OTHER_REASON)
"""Values of the ``reason`` label of ``dead_letters_total``; anything else is counted as other."""


class BatchHistogram:
    """A Prometheus histogram that observes a whole array of values in one call.

    Bucket counts are computed with ``np.searchsorted`` and ``np.bincount`` outside the lock;
    only adding them to the totals is locked, so concurrent observers and scrapes are safe and
    cheap. The export is identical to ``prometheus_client.Histogram`` (cumulative ``_bucket``
    samples with an inclusive ``le`` bound, ``_sum``, ``_count``), except that no ``_created``
    sample is exported. Register it with ``registry.register(histogram)``.

    Values that are not finite (NaN, infinities) are not observed: one NaN would turn ``_sum``
    into NaN for the life of the process. :attr:`dropped` counts them.

    Parameters
    ----------
    name
        Full metric name, without the ``_bucket``/``_sum``/``_count`` suffixes.
    documentation
        Help text.
    buckets
        Finite, strictly increasing upper bounds; ``+Inf`` is appended if missing.

    Examples
    --------
    >>> histogram = BatchHistogram("demo_seconds", "Demo.", buckets=[0.1, 1.0])
    >>> histogram.observe(np.array([0.05, 0.1, 0.5, 3.0]))
    >>> [(s.name, s.labels.get("le"), s.value) for s in next(iter(histogram.collect())).samples]
    ... # doctest: +NORMALIZE_WHITESPACE
    [('demo_seconds_bucket', '0.1', 2.0), ('demo_seconds_bucket', '1.0', 3.0),
     ('demo_seconds_bucket', '+Inf', 4.0), ('demo_seconds_count', None, 4.0),
     ('demo_seconds_sum', None, 3.65)]
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        bounds = [float(bound) for bound in buckets]
        if bounds and bounds[-1] == float("inf"):
            bounds.pop()
        if not bounds or not np.all(np.isfinite(bounds)) or np.any(np.diff(bounds) <= 0):
            raise ValueError(
                f"buckets of {name} must be finite and strictly increasing, got {list(buckets)}"
            )
        self.name = name
        self.documentation = documentation
        self._upper_bounds = np.array([*bounds, np.inf])
        self._labels = [floatToGoString(bound) for bound in self._upper_bounds]
        self._lock = threading.Lock()
        self._counts = np.zeros(len(self._upper_bounds), dtype=np.int64)
        self._sum = 0.0
        self.dropped = 0

    def observe(self, values: ArrayLike) -> None:
        """Add every value of ``values`` (any shape) to the histogram."""
        array = np.asarray(values, dtype=np.float64).ravel()
        finite = np.isfinite(array)
        dropped = int(array.size - np.count_nonzero(finite))
        if dropped:
            array = array[finite]
        # side="left": a value equal to a bound belongs to that bound's bucket (le is inclusive).
        indices = np.searchsorted(self._upper_bounds, array, side="left")
        counts = np.bincount(indices, minlength=len(self._upper_bounds))
        total = float(array.sum())
        with self._lock:
            self._counts += counts
            self._sum += total
            self.dropped += dropped

    @property
    def count(self) -> int:
        with self._lock:
            return int(self._counts.sum())

    @property
    def sum(self) -> float:
        with self._lock:
            return self._sum

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric(
            [],
            buckets=[(le, float(c)) for le, c in zip(self._labels, cumulative, strict=True)],
            sum_value=total,
        )
        yield family

    def describe(self) -> Iterator[Metric]:
        # Lets the registry detect name clashes at registration.
        yield HistogramMetricFamily(self.name, self.documentation)


class DaemonMetrics:
    """All the metrics of one consumer daemon, in a registry of their own.

    Parameters
    ----------
    registry
        Where to register the metrics; a new private :class:`CollectorRegistry` by default.
    namespace
        Prefix of every metric name.

    Examples
    --------
    >>> import numpy as np
    >>> from prometheus_client import generate_latest
    >>> m = DaemonMetrics()
    >>> m.observe_batch(
    ...     n_consumed=4, n_scored=3, n_alerts=1, scores=np.array([0.001, 0.004, 1.2]),
    ...     latencies_s=np.array([0.02, 0.03, 0.2]), duration_s=0.015,
    ... )
    >>> text = generate_latest(m.registry).decode()
    >>> wanted = ("stream_l2ae_alerts_total", 'stream_l2ae_score_bucket{le="0.005"}')
    >>> print("\\n".join(line for line in text.splitlines() if line.startswith(wanted)))
    stream_l2ae_alerts_total 1.0
    stream_l2ae_score_bucket{le="0.005"} 2.0
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, namespace: str = "stream_l2ae"
    ) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        self.namespace = namespace
        self._lock = threading.Lock()
        self._lag_labels: set[tuple[str, str]] = set()
        self._n_occupancy_labels = 0
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self.port: int | None = None

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, namespace=namespace, registry=self.registry)

        def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(name, doc, labels, namespace=namespace, registry=self.registry)

        # --- counters ---
        self.records_consumed = counter("records_consumed", "Records read from Kafka.")
        self.records_scored = counter("records_scored", "Records scored by the model.")
        self.alerts = counter("alerts", "Records whose score exceeded the alert threshold.")
        self.dead_letters = counter(
            "dead_letters", "Records sent to the dead-letter topic, by reason.", ["reason"]
        )
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason=reason)  # export 0 so that rate() works from start
        self.scores_published = counter("scores_published", "Score records produced to Kafka.")
        self.batches = counter("batches", "Batches processed.")
        self.commits = counter("commits", "Successful Kafka offset commits.")
        self.commit_failures = counter("commit_failures", "Failed Kafka offset commits.")
        self.produce_failures = counter(
            "produce_failures", "Records that could not be produced to Kafka."
        )
        self.broker_reconnects = counter("broker_reconnects", "Reconnections to the brokers.")
        self.broker_errors = counter("broker_errors", "Errors reported by the Kafka client.")
        self.model_swaps = counter("model_swaps", "Model bundles swapped in while running.")
        self.checkpoints = counter("checkpoints", "State checkpoints written.")
        self.checkpoint_failures = counter(
            "checkpoint_failures", "State checkpoints that could not be written."
        )

        # --- histograms ---
        self.score = BatchHistogram(
            f"{namespace}_score", "Anomaly scores (1 - cosine similarity) in [0, 2].", SCORE_BUCKETS
        )
        self.registry.register(self.score)
        self.record_latency = BatchHistogram(
            f"{namespace}_record_latency_seconds",
            "Time from a record's Kafka timestamp to its score.",
            LATENCY_BUCKETS,
        )
        self.registry.register(self.record_latency)
        self.batch_duration = Histogram(
            "batch_duration_seconds",
            "Time to process one batch, from poll to produce.",
            namespace=namespace,
            registry=self.registry,
            buckets=BATCH_DURATION_BUCKETS,
        )

        # --- gauges ---
        self.threshold = gauge("threshold", "Current alert threshold on the anomaly score.")
        self.consumer_lag = gauge(
            "consumer_lag_records",
            "Records between the consumer's position and the high watermark, per partition.",
            ["topic", "partition"],
        )
        self.centroid_movement = gauge(
            "centroid_movement", "Largest centroid move (1 - cosine) in the last online update."
        )
        self.cluster_occupancy = gauge(
            "cluster_occupancy", "Share of the (decayed) records held by each cluster.", ["cluster"]
        )
        self.broker_up = gauge("broker_up", "1 if the Kafka brokers are reachable, else 0.")
        self.last_commit_timestamp = gauge(
            "last_commit_timestamp_seconds", "Unix time of the last successful offset commit."
        )
        self.last_checkpoint_timestamp = gauge(
            "last_checkpoint_timestamp_seconds", "Unix time of the last state checkpoint."
        )
        self.model_created_timestamp = gauge(
            "model_created_timestamp_seconds", "Unix time the model in service was saved."
        )

        # --- drift ---
        self.score_drifts = counter("score_drifts", "Changes in the mean score detected by ADWIN.")
        self.drift_events = counter(
            "drift_events", "Persistent-drift events published to trigger a retrain."
        )
        self.drift_active = gauge("drift_active", "1 while a drift signal is on, else 0.")
        self.alert_rate_ratio = gauge(
            "alert_rate_ratio", "Recent alert rate divided by the calibrated alert rate."
        )
        self.calibrated_alert_rate = gauge(
            "calibrated_alert_rate", "Share of alerts the threshold was calibrated for."
        )

        # --- info ---
        self.model = Info(
            "model", "The model bundle in service.", namespace=namespace, registry=self.registry
        )

    # --- per batch ---------------------------------------------------------------------------

    def set_drift(self, *, score_drift: bool, active: bool, alert_rate_ratio: float) -> None:
        if score_drift:
            self.score_drifts.inc()
        self.drift_active.set(1.0 if active else 0.0)
        self.alert_rate_ratio.set(alert_rate_ratio)

    def observe_batch(
        self,
        n_consumed: int,
        n_scored: int,
        n_alerts: int,
        scores: ArrayLike,
        latencies_s: ArrayLike | None,
        duration_s: float,
    ) -> None:
        """Record one processed batch.

        Negative latencies (a producer clock ahead of ours) are counted as 0, which keeps
        ``_sum`` a counter; pass ``None`` when records carry no timestamp.
        """
        self.records_consumed.inc(n_consumed)
        self.records_scored.inc(n_scored)
        self.alerts.inc(n_alerts)
        self.batches.inc()
        self.score.observe(scores)
        if latencies_s is not None:
            self.record_latency.observe(np.maximum(np.asarray(latencies_s, dtype=np.float64), 0))
        self.batch_duration.observe(duration_s)

    def dead_lettered(self, reasons: Mapping[str, int]) -> None:
        """Count dead-lettered records by reason (e.g. a ``Counter`` of ``RecordError.reason``).

        Reasons outside :data:`DEAD_LETTER_REASONS` are counted as ``other`` so the label stays
        bounded.
        """
        for reason, count in reasons.items():
            if count:
                label = reason if reason in DEAD_LETTER_REASONS else OTHER_REASON
                self.dead_letters.labels(reason=label).inc(count)

    def scores_produced(self, n: int) -> None:
        self.scores_published.inc(n)

    def produce_failed(self, n: int = 1) -> None:
        self.produce_failures.inc(n)

    def committed(self, timestamp: float | None = None) -> None:
        """Count a successful commit and stamp it (now by default)."""
        self.commits.inc()
        self.last_commit_timestamp.set(time.time() if timestamp is None else timestamp)

    def commit_failed(self) -> None:
        self.commit_failures.inc()

    def checkpointed(self, timestamp: float | None = None) -> None:
        """Count a written checkpoint and stamp it (now by default)."""
        self.checkpoints.inc()
        self.last_checkpoint_timestamp.set(time.time() if timestamp is None else timestamp)

    def checkpoint_failed(self) -> None:
        self.checkpoint_failures.inc()

    # --- state gauges ------------------------------------------------------------------------

    def set_threshold(self, value: float) -> None:
        self.threshold.set(value)

    def set_centroid_movement(self, value: float) -> None:
        self.centroid_movement.set(value)

    def set_lag(self, lags: Mapping[tuple[str, int], int]) -> None:
        """Set the lag of every assigned partition; partitions not in ``lags`` are removed.

        Call it with the whole assignment (an empty dict after all partitions are revoked), so
        that a partition moved to another consumer stops being reported here.
        """
        with self._lock:
            current = set()
            for (topic, partition), lag in lags.items():
                key = (str(topic), str(partition))
                self.consumer_lag.labels(*key).set(lag)
                current.add(key)
            for stale in self._lag_labels - current:
                self.consumer_lag.remove(*stale)
            self._lag_labels = current

    def set_occupancy(self, occupancy: ArrayLike) -> None:
        """Set ``cluster_occupancy{cluster="i"}`` from a ``(k,)`` array; extra clusters go."""
        values = np.asarray(occupancy, dtype=np.float64).ravel()
        with self._lock:
            for cluster, value in enumerate(values.tolist()):
                self.cluster_occupancy.labels(cluster=str(cluster)).set(value)
            for cluster in range(len(values), self._n_occupancy_labels):
                self.cluster_occupancy.remove(str(cluster))
            self._n_occupancy_labels = len(values)

    def set_broker_up(self, up: bool) -> None:
        self.broker_up.set(1 if up else 0)

    def broker_reconnected(self) -> None:
        self.broker_reconnects.inc()

    def broker_error(self) -> None:
        self.broker_errors.inc()

    def set_model(
        self,
        version: str,
        created_at_iso: str | None,
        n_clusters: int,
        embedding_dim: int,
    ) -> None:
        """Publish the model in service in ``model_info`` and its creation time.

        ``created_at_iso`` is an ISO 8601 time (a bundle's ``created_at``); a naive one is taken
        as UTC. When it is missing or unparsable the creation gauge is set to NaN.
        """
        self.model.info(
            {
                "version": str(version),
                "n_clusters": str(int(n_clusters)),
                "embedding_dim": str(int(embedding_dim)),
            }
        )
        self.model_created_timestamp.set(_parse_timestamp(created_at_iso))

    def model_swapped(self) -> None:
        self.model_swaps.inc()

    # --- introspection and exposition --------------------------------------------------------

    def metric_names(self) -> set[str]:
        """Every sample name the registry exports or will export.

        Labelled metrics with no label set yet (``consumer_lag_records`` before any partition
        is assigned) have no samples; their sample names are derived from the metric type.
        """
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("_sum", "_count"),
            "info": ("_info",),
        }
        names: set[str] = set()
        for family in self.registry.collect():
            if family.samples:
                names.update(sample.name for sample in family.samples)
            else:
                names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        return names

    def start_http_server(self, port: int = 0, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from this registry on a daemon thread; return the bound port.

        ``port=0`` binds an ephemeral port. :meth:`close` stops the server.
        """
        if self._server is not None:
            raise RuntimeError(f"the metrics server is already running on port {self.port}")
        result = prometheus_client.start_http_server(port, addr=addr, registry=self.registry)
        if isinstance(result, tuple):  # prometheus_client >= 0.20: (server, thread)
            self._server, self._server_thread = result
            self.port = int(self._server.server_address[1])
        else:  # older clients return None and give no handle to find the port or stop it
            if port == 0:
                raise RuntimeError(
                    "this prometheus_client cannot report an ephemeral port; pass a port or "
                    "upgrade to prometheus-client>=0.20"
                )
            self._server = False
            self.port = port
        return self.port

    def close(self) -> None:
        """Stop the metrics server, if one was started. Safe to call more than once."""
        server, thread = self._server, self._server_thread
        self._server, self._server_thread = None, None
        if server:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> DaemonMetrics:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _parse_timestamp(value: str | None) -> float:
    if not value:
        return float("nan")
    with contextlib.suppress(ValueError, TypeError):
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return float("nan")
