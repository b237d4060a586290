"""Shared online centroids across daemon replicas, through a compacted Kafka topic.

Kafka's consumer group splits the partitions between replicas; this module keeps their online
k-means states from drifting apart. Every ``state_publish_interval_s`` each replica publishes its
*own* sufficient statistics (decayed sums and counts, the clock, the model version), keyed by its
replica id, to ``state_topic`` (compacted, so the topic holds the latest state of each replica).
It reads the other replicas' latest states and keeps them as peers of its
:class:`~stream_l2ae.online.OnlineCentroids`: the centroids are the prior plus its own statistics
plus the peers', all decayed to the same clock. A republished state replaces the previous one,
so nothing is counted twice. A replica that joins reads the topic first and starts from the
merged state; a peer not heard from for ``peer_timeout_s`` stops counting.

The statistics are sums over records, so the merge is exact when all replicas decay on the same
clock: use ``online_clock = "event_time"`` (record timestamps) with a shared state topic.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import orjson
from kafka import TopicPartition

from stream_l2ae.online import CentroidStatistics, OnlineCentroids

from .kafka_io import make_consumer, make_producer

log = logging.getLogger("stream_l2ae.state_sync")


def encode_state(replica_id: str, model_version: str, stats: CentroidStatistics) -> bytes:
    return orjson.dumps(
        {
            "replica": replica_id,
            "model_version": model_version,
            "clock": stats.clock,
            "sums": np.asarray(stats.sums).tolist(),
            "counts": np.asarray(stats.counts).tolist(),
            "published_at": time.time(),
        }
    )


def decode_state(value: bytes) -> tuple[str, str, CentroidStatistics, float]:
    doc = orjson.loads(value)
    stats = CentroidStatistics(
        np.asarray(doc["sums"], dtype=np.float64),
        np.asarray(doc["counts"], dtype=np.float64),
        float(doc["clock"]),
    )
    return doc["replica"], doc["model_version"], stats, float(doc["published_at"])


class CentroidStateSync:
    """Publishes this replica's centroid statistics and merges the other replicas'.

    Parameters
    ----------
    kafka_settings
        kafka-python settings (``[kafka]``).
    state_topic
        A compacted topic, one record per replica and model version.
    replica_id
        This replica's key; must be unique in the group.
    """

    def __init__(
        self,
        kafka_settings: dict,
        state_topic: str,
        replica_id: str,
        *,
        publish_interval_s: float = 10.0,
        peer_timeout_s: float = 120.0,
    ) -> None:
        self.state_topic = state_topic
        self.replica_id = replica_id
        self.publish_interval_s = publish_interval_s
        self.peer_timeout_s = peer_timeout_s
        self.producer = make_producer(kafka_settings)
        self.consumer = make_consumer(kafka_settings, None)
        partitions = self.consumer.partitions_for_topic(state_topic) or {0}
        assigned = [TopicPartition(state_topic, p) for p in sorted(partitions)]
        self.consumer.assign(assigned)
        self.consumer.seek_to_beginning(*assigned)
        self._last_publish = float("-inf")
        self.peer_seen: dict[str, float] = {}

    def publish(self, online: OnlineCentroids, model_version: str) -> None:
        self._last_publish = time.monotonic()  # a broken broker must not stall every batch
        value = encode_state(self.replica_id, model_version, online.statistics())
        self.producer.send(self.state_topic, key=self.replica_id.encode(), value=value)
        self.producer.flush(timeout=5)

    def merge(self, online: OnlineCentroids, model_version: str, timeout_ms: int = 0) -> int:
        """Read new peer states and apply those of the same model; returns how many applied."""
        applied = 0
        for records in self.consumer.poll(timeout_ms=timeout_ms, max_records=10_000).values():
            for record in records:
                if record.value is None:
                    continue
                try:
                    replica, version, stats, published_at = decode_state(record.value)
                except (orjson.JSONDecodeError, KeyError, ValueError) as exc:
                    log.warning("ignoring a malformed state record: %s", exc)
                    continue
                if replica == self.replica_id or version != model_version:
                    continue
                if stats.sums.shape != online.initial_centroids.shape:
                    continue
                if time.time() - published_at > self.peer_timeout_s:
                    continue  # a replica that left long ago: old state still in the topic
                online.update_peer(replica, stats)
                self.peer_seen[replica] = time.monotonic()
                applied += 1
        now = time.monotonic()
        for replica, seen in list(self.peer_seen.items()):
            if now - seen > self.peer_timeout_s:
                log.info("replica %s silent for %.0f s: dropping its state", replica, now - seen)
                online.drop_peer(replica)
                del self.peer_seen[replica]
        return applied

    def catch_up(self, online: OnlineCentroids, model_version: str, timeout_s: float = 5.0) -> int:
        """Read the topic to its end before scoring: a joining replica starts from the merge."""
        deadline = time.monotonic() + timeout_s
        applied = 0
        while time.monotonic() < deadline:
            n = self.merge(online, model_version, timeout_ms=300)
            applied += n
            if n == 0 and all(
                self.consumer.highwater(tp) is not None
                and self.consumer.position(tp) >= self.consumer.highwater(tp)
                for tp in self.consumer.assignment()
            ):
                break
        return applied

    def tick(self, online: OnlineCentroids, model_version: str) -> None:
        """Merge what arrived; publish when the interval has passed. Called between batches."""
        self.merge(online, model_version)
        if time.monotonic() - self._last_publish >= self.publish_interval_s:
            self.publish(online, model_version)

    def close(self) -> None:
        for client in (self.producer, self.consumer):
            try:
                client.close()
            except Exception as exc:  # closing must not mask the daemon's own shutdown
                log.debug("closing state sync client: %s", exc)
