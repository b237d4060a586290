"""Processing of one polled batch: decode, map, encode, score, threshold, online update.

Nothing here talks to Kafka: the daemon hands in the raw values and their coordinates and gets
back what to publish. A batch of flat numeric records is decoded and mapped in one typed pass
(:meth:`~stream_l2ae.detector.L2AEDetector.score_json`, sound only under the checks described in
:mod:`stream_l2ae.json_batch`). When that path declines -- a bad value anywhere, a tombstone,
nested or non-numeric fields -- each value is decoded on its own with ``orjson`` (a naive joined
array would let an invalid value borrow bytes from its neighbours and parse) and the records are
mapped field by field, so that every bad one is named for the dead-letter topic. Either way the
batch is encoded by the auto-encoder in one forward pass and scored against the centroids in one
matrix product.
"""

from __future__ import annotations

import operator
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import orjson

from stream_l2ae.detector import DetectorScores, L2AEDetector
from stream_l2ae.thresholds import (
    SPOTThreshold,
    StreamingQuantileThreshold,
    Threshold,
)

_VALUE = operator.attrgetter("value")
_TIMESTAMP = operator.attrgetter("timestamp")

DECODE = "decode"
#: Dead letters keep at most this much of the original value (and say so in a header).
DEAD_LETTER_MAX_VALUE_BYTES = 65_536
TOO_LARGE = "too_large"


class InputBatch:
    """Raw records of one poll, in a fixed order, with their Kafka coordinates.

    Only the values and timestamps are read off every record; the coordinates and keys are read
    from the records when an alert, a score or a dead letter needs them.
    """

    def __init__(self, records: list) -> None:
        self.records = records
        self.values: list[bytes | None] = list(map(_VALUE, records))
        self.timestamps_ms = np.fromiter(map(_TIMESTAMP, records), np.int64, len(records))

    @classmethod
    def from_records(cls, records: list) -> InputBatch:
        """From kafka-python ``ConsumerRecord`` objects (or anything with the same fields)."""
        return cls(records)

    def __len__(self) -> int:
        return len(self.values)

    def key(self, index: int) -> bytes | None:
        return self.records[index].key

    def source_key(self, index: int) -> bytes:
        """``topic/partition/offset``: the key of an alert, unique per source record."""
        record = self.records[index]
        return f"{record.topic}/{record.partition}/{record.offset}".encode()


@dataclass
class DeadLetter:
    index: int
    reason: str
    detail: str
    field: str | None = None


@dataclass
class BatchOutcome:
    """What scoring a batch produced, aligned with ``indices`` into the input batch."""

    indices: np.ndarray
    score: np.ndarray
    cluster: np.ndarray
    margin: np.ndarray
    is_anomaly: np.ndarray
    threshold: float
    model_version: str
    dead_letters: list[DeadLetter] = field(default_factory=list)
    scored_at_ms: int = 0

    @property
    def dead_letter_reasons(self) -> Counter:
        return Counter(d.reason for d in self.dead_letters)


def decode_values(
    values: list[bytes | None], max_record_bytes: int
) -> tuple[list, np.ndarray, list[DeadLetter]]:
    """JSON-decode values; returns the decoded ones, their indices, and the dead letters.

    Examples
    --------
    >>> records, indices, dead = decode_values([b'{"a": 1}', b'{oops', None, b'{"a": 2}'], 100)
    >>> records, indices.tolist(), [(d.index, d.reason) for d in dead]
    ([{'a': 1}, {'a': 2}], [0, 3], [(1, 'decode'), (2, 'decode')])
    """
    # One loads per value: joined into one array without the checks of stream_l2ae.json_batch,
    # b'{"a": 1', b'"b": 2}' and b'1,2' would decode as a valid array of three.
    dead: list[DeadLetter] = []
    decoded, kept = [], []
    for index, value in enumerate(values):
        if value is None:
            dead.append(DeadLetter(index, DECODE, "record has no value (tombstone)"))
        elif len(value) > max_record_bytes:
            dead.append(
                DeadLetter(index, TOO_LARGE, f"{len(value)} bytes > limit {max_record_bytes}")
            )
        else:
            try:
                decoded.append(orjson.loads(value))
                kept.append(index)
            except orjson.JSONDecodeError as exc:
                dead.append(DeadLetter(index, DECODE, f"invalid JSON: {exc}"))
    return decoded, np.asarray(kept, dtype=np.int64), dead


def make_threshold(mode: str, detector: L2AEDetector) -> Threshold:
    """The threshold the daemon applies: the bundle's, or an adaptive one seeded from it."""
    if mode == "bundle":
        return detector.threshold
    alert_rate = getattr(detector.threshold, "alert_rate", detector.config.alert_rate)
    if mode == "streaming":
        threshold = StreamingQuantileThreshold(alert_rate=alert_rate)
    else:
        threshold = SPOTThreshold(risk=min(alert_rate, 0.01) / 10)
    if len(detector.training_scores_):
        threshold.fit(detector.training_scores_)
    return threshold


class BatchScorer:
    """Scores batches with a detector and keeps its online centroids and threshold moving.

    Parameters
    ----------
    detector
        A loaded :class:`~stream_l2ae.detector.L2AEDetector`.
    threshold
        The threshold to apply (default: the detector's calibrated one).
    online_update
        Move the centroids with the records not flagged as anomalies.
    online_clock
        ``"records"`` (forgetting counts records) or ``"event_time"`` (record timestamps, in
        seconds; use it when several replicas share their centroid state).
    """

    def __init__(
        self,
        detector: L2AEDetector,
        *,
        threshold: Threshold | None = None,
        online_update: bool = True,
        online_clock: str = "records",
        max_record_bytes: int = 1_048_576,
        model_version: str | None = None,
    ) -> None:
        self.detector = detector
        self.threshold = threshold or detector.threshold
        self.online_update = online_update
        self.online_clock = online_clock
        self.max_record_bytes = max_record_bytes
        self.model_version = model_version or getattr(detector, "version", "unversioned")

    def process(self, batch: InputBatch) -> BatchOutcome:
        result, indices, dead = self._score_values(batch.values)
        threshold = float(self.threshold.value)
        is_anomaly = result.score > threshold
        if self.online_update and len(indices):
            now = None
            if self.online_clock == "event_time":
                now = float(batch.timestamps_ms[indices].max()) / 1000.0
            self.detector.online.partial_fit(
                result.embeddings, result.cluster, skip=is_anomaly, now=now
            )
        if len(indices):
            self.threshold.update(result.score)
        dead.sort(key=lambda d: d.index)
        return BatchOutcome(
            indices=indices,
            score=result.score,
            cluster=result.cluster,
            margin=result.margin,
            is_anomaly=is_anomaly,
            threshold=threshold,
            model_version=self.model_version,
            dead_letters=dead,
            scored_at_ms=int(time.time() * 1000),
        )

    def _score_values(self, values: list[bytes | None]) -> tuple[DetectorScores, np.ndarray, list]:
        """Scores, the batch indices they belong to, and the dead letters."""
        try:
            within_limit = max(map(len, values), default=0) <= self.max_record_bytes
        except TypeError:  # a tombstone (None value)
            within_limit = False
        if within_limit:
            result = self.detector.score_json(values, keep_embeddings=self.online_update)
            if result is not None:
                return result, result.indices, []
        records, decoded_indices, dead = decode_values(values, self.max_record_bytes)
        result = self.detector.score_batch(records, keep_embeddings=self.online_update)
        for rejected in result.rejected:
            error = rejected.error
            dead.append(
                DeadLetter(
                    int(decoded_indices[rejected.index]), error.reason, str(error), error.field
                )
            )
        indices = decoded_indices[result.indices] if len(result.indices) else result.indices
        return result, indices, dead


def _source(batch: InputBatch, index: int) -> dict:
    record = batch.records[index]
    key = record.key
    return {
        "topic": record.topic,
        "partition": int(record.partition),
        "offset": int(record.offset),
        "key": key.decode("utf-8", "backslashreplace") if key is not None else None,
        "timestamp_ms": int(batch.timestamps_ms[index]),
    }


def score_message(batch: InputBatch, outcome: BatchOutcome, row: int, replica: str) -> dict:
    """The JSON document published for one scored record (alerts and the scores topic)."""
    return {
        "source": _source(batch, int(outcome.indices[row])),
        "score": float(outcome.score[row]),
        "threshold": outcome.threshold,
        "is_anomaly": bool(outcome.is_anomaly[row]),
        "cluster": int(outcome.cluster[row]),
        "margin": float(outcome.margin[row]),
        "model_version": outcome.model_version,
        "scored_at_ms": outcome.scored_at_ms,
        "replica": replica,
    }


def alert_messages(
    batch: InputBatch, outcome: BatchOutcome, replica: str
) -> list[tuple[bytes, bytes]]:
    """``(key, value)`` of each alert; the key is ``topic/partition/offset`` for deduplication."""
    return [
        (
            batch.source_key(int(outcome.indices[row])),
            orjson.dumps(score_message(batch, outcome, int(row), replica)),
        )
        for row in np.flatnonzero(outcome.is_anomaly)
    ]


def score_messages(
    batch: InputBatch, outcome: BatchOutcome, replica: str
) -> list[tuple[bytes, bytes]]:
    return [
        (
            batch.source_key(int(outcome.indices[row])),
            orjson.dumps(score_message(batch, outcome, row, replica)),
        )
        for row in range(len(outcome.indices))
    ]


def dead_letter_message(
    batch: InputBatch, letter: DeadLetter
) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """``(key, original value, headers)``: the record as it came, with the reason in headers."""
    headers = [
        ("dlq.reason", letter.reason.encode()),
        ("dlq.detail", letter.detail[:1000].encode()),
        ("dlq.source", batch.source_key(letter.index)),
    ]
    if letter.field is not None:
        headers.append(("dlq.field", letter.field.encode()))
    value = batch.values[letter.index] or b""
    if len(value) > DEAD_LETTER_MAX_VALUE_BYTES:
        # The broker would refuse the whole record (max.request.size), blocking the daemon.
        headers += [("dlq.original_bytes", str(len(value)).encode()), ("dlq.truncated", b"true")]
        value = value[:DEAD_LETTER_MAX_VALUE_BYTES]
    return batch.key(letter.index), value, headers
