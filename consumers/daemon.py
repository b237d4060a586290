"""The scoring daemon: consume, score, alert, commit; with checkpoints and model hot-swap.

Delivery guarantees
-------------------
*At least once, nothing lost.* For every polled batch the daemon

1. scores it and updates the online centroids (a snapshot of their state is kept);
2. sends the alerts, the optional scores and the dead letters, then flushes the producer and
   checks that the broker acknowledged every one of them (``acks=all``);
3. only then commits the batch's offsets (``last offset + 1`` per partition).

The per-batch commit is asynchronous: it is sent after the acknowledgements, never before, and a
lost commit is covered by the next one, which carries higher offsets. On shutdown the last
processed offsets are committed synchronously; on partition revocation they are committed
asynchronously from kafka-python's network thread (where a blocking commit is not allowed), so a
commit lost in a rebalance means the new owner reads a batch again: a duplicate, never a loss.

If step 2 fails, the consumer seeks back to the batch's first offsets, the centroid and
threshold state are restored from the snapshot, and the batch is processed again once the broker
answers: a record can be alerted twice but never skipped. Alerts are keyed
``topic/partition/offset`` so that consumers downstream can deduplicate. A crash (SIGKILL)
loses nothing either: the uncommitted records are consumed again by whoever owns the partition
next. The online centroid state is checkpointed every ``checkpoint_interval_s`` and on shutdown;
after a crash it is restored from the last checkpoint, so it may miss up to one interval of
updates (approximate by design; Kafka's committed offsets are the source of truth for records).

SIGTERM and SIGINT finish the batch in hand, commit, checkpoint, flush and exit. A rebalance that
revokes partitions commits what was processed for them first. A new model version in the model
directory is swapped in between two batches, so no record is dropped or scored twice by it.
"""

from __future__ import annotations

import copy
import gc
import logging
import signal
import threading
import time
from itertools import chain
from pathlib import Path

import numpy as np
import orjson
from kafka import ConsumerRebalanceListener, TopicPartition
from kafka import errors as kafka_errors
from kafka.structs import OffsetAndMetadata

from stream_l2ae.bundle import latest_version, load_bundle
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.device import configure_threads
from stream_l2ae.errors import BundleError

from .checkpoint import Checkpoint, CheckpointStore, CheckpointTimer
from .drift import DriftMonitor
from .kafka_io import ensure_topics, highwater_lag, make_consumer, make_producer
from .metrics import DaemonMetrics
from .processing import (
    BatchOutcome,
    BatchScorer,
    InputBatch,
    alert_messages,
    dead_letter_message,
    make_threshold,
    score_messages,
)
from .settings import ServeSettings
from .state_sync import CentroidStateSync

log = logging.getLogger("stream_l2ae.daemon")

PUBLISH_TIMEOUT_S = 30.0
#: A refused model version is tried again after this long (the volume may have been flaky).
MODEL_RETRY_S = 60.0
COMMIT_TIMEOUT_MS = 15_000


class BrokerUnavailable(Exception):
    """The broker did not acknowledge a send or a commit in time."""


class _CommitOnRevoke(ConsumerRebalanceListener):
    def __init__(self, daemon: ScoringDaemon) -> None:
        self.daemon = daemon

    def on_partitions_revoked(self, revoked) -> None:
        self.daemon._on_revoked(set(revoked))

    def on_partitions_assigned(self, assigned) -> None:
        log.info("assigned partitions: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))


def broker_connected(consumer) -> bool | None:
    """Whether the consumer holds a live connection to any broker (``None``: unknown)."""
    try:
        client = consumer._client
        # kafka-python 3 names the id node_id (MetadataResponseBroker); 2.x named it nodeId.
        return any(
            client.connected(broker.node_id if hasattr(broker, "node_id") else broker.nodeId)
            for broker in client.cluster.brokers()
        )
    except Exception:  # private API of kafka-python; the metric is best effort
        return None


def freeze_startup_objects() -> None:
    """Move everything allocated so far out of the garbage collector's reach.

    torch, numpy and the Kafka clients leave some 400,000 long-lived objects that every full
    collection would walk again, while the scoring loop allocates records fast enough to trigger
    collections all the time; freezing them (as ``gc.freeze`` is meant for) makes each
    collection cheap. Objects frozen here are never collected, which is right for startup state.
    """
    gc.collect()
    gc.freeze()


class ScoringDaemon:
    """Long-running consumer that scores records and publishes alerts.

    Parameters
    ----------
    settings
        A :class:`~consumers.settings.ServeSettings`.
    consumer_overrides
        Extra kafka-python consumer settings (tests use short session timeouts).
    """

    def __init__(
        self,
        settings: ServeSettings,
        *,
        metrics: DaemonMetrics | None = None,
        consumer_overrides: dict | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or DaemonMetrics()
        self.consumer_overrides = consumer_overrides or {}
        self._stop = threading.Event()
        self.consumer = None
        self.producer = None
        self.detector: L2AEDetector | None = None
        self.scorer: BatchScorer | None = None
        self.store = CheckpointStore(settings.checkpoint_path(), replica_id=settings.replica_id)
        self.checkpoint_timer = CheckpointTimer(settings.checkpoint_interval_s)
        self.records_seen = 0
        self.metrics_port: int | None = None
        self._backoff = settings.retry_backoff_initial_s
        self._broker_down = False
        self._failed_versions: dict[str, float] = {}
        self._resume_pending = False
        self._last_model_check = 0.0
        self._processed: dict[TopicPartition, int] = {}
        self.drift: DriftMonitor | None = None
        self.state_sync: CentroidStateSync | None = None
        self._last_drift_event = float("-inf")

    # ----- lifecycle ------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if not self._stop.is_set():
            log.info("stop requested: finishing the batch in hand")
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run(self) -> int:
        s = self.settings
        configure_threads(s.torch_threads)
        if s.metrics_port is not None:
            self.metrics_port = self.metrics.start_http_server(s.metrics_port, s.metrics_host)
            log.info("metrics on http://%s:%d/metrics", s.metrics_host, self.metrics_port)
        try:
            if not self.open():
                return 0
            freeze_startup_objects()
            while not self.stopping:
                self.step()
        finally:
            self.close()
        return 0

    def open(self) -> bool:
        """Load the model in service and join the group; ``False`` when stopped before a model."""
        if not self._load_initial_model():
            return False
        self._connect()
        return True

    def _sleep_backoff(self, reason: str) -> None:
        log.warning("%s; retrying in %.1f s", reason, self._backoff)
        self._stop.wait(self._backoff)
        self._backoff = min(self._backoff * 2, self.settings.retry_backoff_max_s)

    def _broker_ok(self) -> None:
        was_down = self._broker_down
        self._broker_down = False
        self._backoff = self.settings.retry_backoff_initial_s
        self.metrics.set_broker_up(True)
        if was_down:
            log.info("broker reachable again: resuming from the committed offsets")
            self.metrics.broker_reconnected()
            self._resume_pending = True

    def _broker_trouble(self, exc: BaseException) -> None:
        self._mark_down()
        self.metrics.broker_error()
        self._sleep_backoff(f"broker unavailable ({type(exc).__name__}: {exc})")

    def _mark_down(self) -> None:
        self._broker_down = True
        self.metrics.set_broker_up(False)
        # Offsets processed before an outage are not committed again afterwards: a broker that
        # lost its log would take them for positions in the new one. A lost commit only means
        # those records are read again.
        self._processed.clear()

    def _connect(self) -> None:
        s = self.settings
        while not self.stopping:
            try:
                outputs = (
                    s.alerts_topic,
                    s.dead_letter_topic,
                    s.scores_topic,
                    s.model_updates_topic,
                )
                ensure_topics(s.client_settings("admin"), [t for t in outputs if t])
                self.producer = make_producer(s.client_settings("producer"))
                self.consumer = make_consumer(
                    s.client_settings("consumer"),
                    s.group_id,
                    max_poll_records=s.batch_size,
                    **self.consumer_overrides,
                )
                self._start_state_sync()
                self.consumer.subscribe(list(s.input_topics), listener=_CommitOnRevoke(self))
                self._processed.clear()
                self._broker_down = False
                self._backoff = s.retry_backoff_initial_s
                self.metrics.set_broker_up(True)
                log.info("consuming %s as group %r", ", ".join(s.input_topics), s.group_id)
                return
            except (kafka_errors.KafkaError, OSError) as exc:
                self._close_clients()
                self._broker_trouble(exc)

    def _start_state_sync(self) -> None:
        s = self.settings
        if not s.state_topic or self.state_sync is not None:
            return
        ensure_topics(
            s.client_settings("admin"), [s.state_topic], config={"cleanup.policy": "compact"}
        )
        self.state_sync = CentroidStateSync(
            s.client_settings("state"),  # the common [kafka] settings
            s.state_topic,
            s.replica_id,
            publish_interval_s=s.state_publish_interval_s,
            peer_timeout_s=s.peer_timeout_s,
        )
        peers = self.state_sync.catch_up(self.detector.online, self.detector.version)
        log.info("joined the shared centroid state: %d peer states merged", peers)

    def _sync_state(self) -> None:
        if self.state_sync is None:
            return
        try:
            self.state_sync.tick(self.detector.online, self.detector.version)
        except kafka_errors.KafkaError as exc:
            log.warning("centroid state sync failed (retried later): %s", exc)

    def _resume_from_committed(self) -> None:
        """Seek the assigned partitions back to the group's committed offsets.

        A broker that lost its log (or a failover to a lagging replica) may not answer a stale
        fetch position with OffsetOutOfRange, so the position is re-derived from the commits;
        without a commit, from the beginning. The consumer itself is kept: closing it while
        kafka-python re-joins the group can leave a ghost member behind.
        """
        for tp in list(self.consumer.assignment()):
            try:
                committed = self.consumer.committed(tp, timeout_ms=5000)
                if committed is None:
                    self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, committed)
            except (kafka_errors.KafkaError, AssertionError) as exc:
                log.warning("could not re-seek %s/%d: %s", tp.topic, tp.partition, exc)

    def _close_clients(self) -> None:
        for client in (self.consumer, self.producer):
            if client is not None:
                try:
                    client.close(timeout=5) if client is self.producer else client.close(
                        autocommit=False
                    )
                except Exception as exc:  # closing a broken client must not mask the cause
                    log.debug("closing client: %s", exc)
        self.consumer = self.producer = None

    def close(self) -> None:
        """Commit what was processed, checkpoint, and close the clients."""
        if self.consumer is not None and self._processed:
            try:
                self._commit_sync(self._processed)
            except kafka_errors.KafkaError as exc:
                log.warning("final commit failed (records will be consumed again): %s", exc)
        if self.detector is not None:
            self.checkpoint()
        if self.producer is not None:
            try:
                self.producer.flush(timeout=10)
            except kafka_errors.KafkaError as exc:
                log.warning("flush on shutdown failed: %s", exc)
        if self.state_sync is not None:
            try:
                self.state_sync.publish(self.detector.online, self.detector.version)
            except kafka_errors.KafkaError as exc:
                log.warning("could not publish the final centroid state: %s", exc)
            self.state_sync.close()
            self.state_sync = None
        self._close_clients()
        self.metrics.close()
        log.info("stopped after %d records", self.records_seen)

    # ----- model ----------------------------------------------------------------------------
    def _load_initial_model(self) -> bool:
        while not self.stopping:
            try:
                self._install(
                    L2AEDetector.load(self.settings.model_dir, device=self.settings.device),
                    restore_checkpoint=True,
                )
                return True
            except BundleError as exc:
                self._sleep_backoff(f"no usable model in {self.settings.model_dir}: {exc}")
        return False

    def _install(
        self,
        detector: L2AEDetector,
        *,
        restore_checkpoint: bool = False,
        previous: L2AEDetector | None = None,
    ) -> None:
        s = self.settings
        threshold = make_threshold(s.threshold, detector)
        if restore_checkpoint:
            checkpoint = self.store.load()
            if checkpoint is not None and checkpoint.model_version == detector.version:
                detector.online = checkpoint.restore_online(detector.device)
                restored = checkpoint.restore_threshold()
                if s.threshold != "bundle" and restored.kind == threshold.kind:
                    threshold = restored
                self.records_seen = checkpoint.records_seen
                log.info(
                    "resumed online state from checkpoint (%d records seen)",
                    checkpoint.records_seen,
                )
            elif checkpoint is not None:
                log.info(
                    "checkpoint is for model %s, not %s: starting from the bundle",
                    checkpoint.model_version,
                    detector.version,
                )
        elif previous is not None and _same_embedding_space(previous, detector):
            detector.online = previous.online
            log.info("same embedding space: online centroids carried over")
        self.detector = detector
        self.scorer = BatchScorer(
            detector,
            threshold=threshold,
            online_update=s.online_update,
            online_clock=s.online_clock,
            max_record_bytes=s.max_record_bytes,
            model_version=detector.version,
        )
        config = detector.model.config
        self.metrics.set_model(
            detector.version,
            getattr(detector, "created_at", None),
            detector.online.n_clusters,
            config.embedding_dim,
        )
        self.metrics.set_threshold(float(threshold.value))
        self.metrics.set_occupancy(detector.online.occupancy)
        # The rate the threshold in force aims at: SPOT's risk, else the calibrated alert rate.
        alert_rate = getattr(threshold, "risk", None) or getattr(
            threshold, "alert_rate", detector.config.alert_rate
        )
        self.drift = DriftMonitor(
            alert_rate, rate_factor=s.drift_rate_factor, persist_s=s.drift_persist_s
        )
        self.metrics.calibrated_alert_rate.set(alert_rate)
        log.info("serving model %s", detector.version)

    def maybe_swap_model(self, force: bool = False) -> bool:
        """Load a new model version if the model directory's ``LATEST`` moved."""
        now = time.monotonic()
        if not force and now - self._last_model_check < self.settings.model_poll_interval_s:
            return False
        self._last_model_check = now
        try:
            version = latest_version(self.settings.model_dir)
        except (BundleError, OSError) as exc:
            log.warning("cannot read the model directory: %s", exc)
            return False
        refused_at = self._failed_versions.get(version)
        if version is None or version == self.detector.version:
            return False
        if refused_at is not None and now - refused_at < MODEL_RETRY_S:
            return False
        try:
            bundle = load_bundle(Path(self.settings.model_dir) / "versions" / version)
            detector = L2AEDetector.from_bundle(bundle, device=self.settings.device)
        except BundleError as exc:
            self._failed_versions[version] = now
            log.error("model %s refused, keeping %s: %s", version, self.detector.version, exc)
            return False
        previous = self.detector
        self._install(detector, previous=previous)
        self.metrics.model_swapped()
        self.checkpoint()
        log.info("hot-swapped model %s -> %s", previous.version, detector.version)
        return True

    # ----- the loop -------------------------------------------------------------------------
    def step(self) -> int:
        """Poll and process one batch; returns the number of records processed."""
        self.maybe_swap_model()
        if self.consumer is None:
            self._connect()
            return 0
        if self._resume_pending:
            self._resume_pending = False
            if self._processed:
                try:
                    self._commit_sync(self._processed)
                except kafka_errors.KafkaError as exc:
                    log.warning("commit before resuming failed: %s", exc)
            self._resume_from_committed()
        try:
            polled = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.batch_size
            )
        except kafka_errors.KafkaError as exc:
            self._broker_trouble(exc)
            return 0
        records = list(chain.from_iterable(polled.values()))
        ranges = {tp: (rs[0].offset, rs[-1].offset) for tp, rs in polled.items() if rs}
        self.metrics.set_lag(
            {(tp.topic, tp.partition): lag for tp, lag in highwater_lag(self.consumer).items()}
        )
        if not records:
            self._idle()
            self._sync_state()
            return 0
        started = time.perf_counter()
        batch = InputBatch.from_records(records)
        snapshot = self._snapshot()
        outcome = self.scorer.process(batch)
        try:
            n_scores = self._publish(batch, outcome)
            self._commit(ranges)
        except (BrokerUnavailable, kafka_errors.KafkaError) as exc:
            self._restore(snapshot)
            self._rewind(ranges)
            self._broker_trouble(exc)
            return 0
        self._broker_ok()
        self.records_seen += len(batch)
        self._observe(batch, outcome, n_scores, time.perf_counter() - started)
        self._sync_state()
        if self.checkpoint_timer.due():
            self.checkpoint()
        return len(batch)

    def _idle(self) -> None:
        connected = broker_connected(self.consumer)
        if connected is False and not self._broker_down:
            self._mark_down()
            log.warning("lost the connection to the broker; kafka-python is reconnecting")
        elif connected and self._broker_down:
            self._broker_ok()
        if self.checkpoint_timer.due():
            self.checkpoint()

    def _snapshot(self):
        detector = self.detector
        threshold = self.scorer.threshold
        adaptive = threshold is not detector.threshold
        return copy.deepcopy(detector.online), copy.deepcopy(threshold) if adaptive else None

    def _restore(self, snapshot) -> None:
        online, threshold = snapshot
        self.detector.online = online
        if threshold is not None:
            self.scorer.threshold = threshold

    def _publish(self, batch: InputBatch, outcome: BatchOutcome) -> int:
        s = self.settings
        futures = []
        for key, value in alert_messages(batch, outcome, s.replica_id):
            futures.append(self.producer.send(s.alerts_topic, key=key, value=value))
        n_scores = 0
        if s.scores_topic:
            for key, value in score_messages(batch, outcome, s.replica_id):
                futures.append(self.producer.send(s.scores_topic, key=key, value=value))
            n_scores = len(outcome.indices)
        for letter in outcome.dead_letters:
            key, value, headers = dead_letter_message(batch, letter)
            futures.append(
                self.producer.send(s.dead_letter_topic, key=key, value=value, headers=headers)
            )
        if not futures:
            return 0
        try:
            self.producer.flush(timeout=PUBLISH_TIMEOUT_S)
        except kafka_errors.KafkaTimeoutError as exc:
            self.metrics.produce_failed(len(futures))
            raise BrokerUnavailable(f"{len(futures)} records not acknowledged: {exc}") from exc
        failed = [f for f in futures if f.failed()]
        if failed:
            self.metrics.produce_failed(len(failed))
            raise BrokerUnavailable(f"{len(failed)} sends failed: {failed[0].exception}")
        return n_scores

    def _commit(self, ranges: dict[TopicPartition, tuple[int, int]]) -> None:
        """Commit asynchronously the batch whose outputs the broker has acknowledged."""
        offsets = {tp: last + 1 for tp, (_, last) in ranges.items()}
        self._processed.update(offsets)
        self.consumer.commit_async(
            {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()},
            callback=self._on_commit,
        )

    def _on_commit(self, offsets, response) -> None:
        if isinstance(response, Exception):
            self.metrics.commit_failed()
            log.warning("commit failed (the next one covers it): %s", response)
        else:
            self.metrics.committed()

    def _commit_sync(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            self.consumer.commit(
                {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in offsets.items()},
                timeout_ms=COMMIT_TIMEOUT_MS,
            )
        except kafka_errors.KafkaError:
            self.metrics.commit_failed()
            raise
        self.metrics.committed()

    def _rewind(self, ranges: dict[TopicPartition, tuple[int, int]]) -> None:
        starts = {tp: start for tp, (start, _) in ranges.items()}
        for tp, offset in starts.items():
            try:
                self.consumer.seek(tp, offset)
            except (kafka_errors.IllegalStateError, AssertionError):
                pass  # no longer ours: the new owner starts from the committed offset

    def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))
        done = {tp: offset for tp, offset in self._processed.items() if tp in revoked}
        if done:
            # kafka-python 3 runs a synchronous listener on its IO thread, where a blocking
            # commit() raises RuntimeError (and a listener that raises fails poll() at every
            # rebalance, so the group never settles). An async commit is queued there instead,
            # ahead of the rest of the rebalance; losing it costs duplicates, never records.
            try:
                self.consumer.commit_async(
                    {tp: OffsetAndMetadata(offset, "", -1) for tp, offset in done.items()},
                    callback=self._on_commit,
                )
            except Exception as exc:
                log.warning("commit on revocation failed (records will be re-read): %s", exc)
        for tp in revoked:
            self._processed.pop(tp, None)
        if self.detector is not None:
            self.checkpoint()

    def _observe(
        self, batch: InputBatch, outcome: BatchOutcome, n_scores: int, seconds: float
    ) -> None:
        m = self.metrics
        latencies = None
        if len(outcome.indices):
            latencies = (outcome.scored_at_ms - batch.timestamps_ms[outcome.indices]) / 1000.0
        m.observe_batch(
            n_consumed=len(batch),
            n_scored=len(outcome.indices),
            n_alerts=int(outcome.is_anomaly.sum()),
            scores=outcome.score,
            latencies_s=latencies,
            duration_s=seconds,
        )
        if outcome.dead_letters:
            m.dead_lettered(outcome.dead_letter_reasons)
        if n_scores:
            m.scores_produced(n_scores)
        m.set_threshold(float(self.scorer.threshold.value))
        self._watch_drift(outcome)
        m.set_centroid_movement(self.detector.online.last_movement_)
        m.set_occupancy(self.detector.online.occupancy)

    def _watch_drift(self, outcome: BatchOutcome) -> None:
        if not len(outcome.score):
            return
        status = self.drift.update(outcome.score, threshold=outcome.threshold)
        self.metrics.set_drift(
            score_drift=status.score_drift,
            active=status.active,
            alert_rate_ratio=status.alert_rate_ratio,
        )
        now = time.monotonic()
        interval = self.settings.drift_event_interval_s
        if status.persistent and now - self._last_drift_event >= interval:
            self._last_drift_event = now
            self._publish_drift_event(status)

    def _publish_drift_event(self, status) -> None:
        """Tell the retraining job (``stream-l2ae retrain --on-drift``); best effort."""
        topic = self.settings.model_updates_topic
        log.warning(
            "persistent drift: alert rate %.2f%% (%.1fx calibrated), mean score %.4f",
            100 * status.alert_rate,
            status.alert_rate_ratio,
            status.mean_score,
        )
        if not topic:
            return
        event = {
            "type": "drift",
            "replica": self.settings.replica_id,
            "group": self.settings.group_id,
            "model_version": self.detector.version,
            "alert_rate": status.alert_rate,
            "alert_rate_ratio": status.alert_rate_ratio,
            "mean_score": status.mean_score,
            "at": time.time(),
        }
        try:
            self.producer.send(topic, key=b"drift", value=orjson.dumps(event))
            self.metrics.drift_events.inc()
        except kafka_errors.KafkaError as exc:
            log.warning("could not publish the drift event: %s", exc)

    def checkpoint(self) -> None:
        try:
            self.store.save(
                Checkpoint.capture(
                    self.detector.version,
                    self.detector.online,
                    self.scorer.threshold,
                    records_seen=self.records_seen,
                )
            )
            self.metrics.checkpointed()
        except Exception as exc:  # a full disk must not stop scoring; the metric says so
            self.metrics.checkpoint_failed()
            log.error("checkpoint failed: %s", exc)
        self.checkpoint_timer.mark()


def _same_embedding_space(old: L2AEDetector, new: L2AEDetector) -> bool:
    """Same features, same auto-encoder weights, same number of clusters: the online statistics
    of the old model stay meaningful for the new one (a retrain that only re-ran k-means or
    recalibrated the threshold)."""
    if old.online.initial_centroids.shape != new.online.initial_centroids.shape:
        return False
    if old.mapper.to_dict() != new.mapper.to_dict():
        return False
    old_state, new_state = old.model.state_dict(), new.model.state_dict()
    if old_state.keys() != new_state.keys():
        return False
    return all(
        np.array_equal(old_state[k].cpu().numpy(), new_state[k].cpu().numpy()) for k in old_state
    )
