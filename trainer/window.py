"""Read a training window: the newest records of Kafka topics, or the tail of a file.

:func:`read_window` reads the last ``last_n`` records of some topics and/or every record whose
timestamp is at least ``since_ms``, with a group-less consumer (no group, no committed offsets:
the read leaves no trace on the cluster), and returns them as a
:class:`~stream_l2ae.datasets.Dataset` of JSON records. The job then trains a candidate on it.

How the window is found
-----------------------
The broker's answer to ListOffsets "latest" is not trusted (the embedded Tansu broker answers it
with the base offset of the last batch, not the log end), and ``offsets_for_times`` is not used
(Tansu does not support it). Instead:

1. Every partition of the topics is assigned, sought to its beginning (ListOffsets "earliest",
   which is right), and fetched once: the fetch response carries the partition's *high
   watermark*, the offset the next record will get. ``[beginning, highwater)`` is the partition's
   content at that moment; records produced meanwhile are not part of the window.
2. ``since_ms``: the first offset whose timestamp is ``>= since_ms`` is searched for by probing
   backwards from the high watermark in exponentially growing steps (1, 2, 4, ... records back;
   each probe is a seek and a fetch of one record) until a record older than ``since_ms`` or the
   beginning is found, then by a binary search between the last two probes. About
   ``2 log2(records newer than since_ms)`` probes per partition. This assumes timestamps grow
   with the offset (true for ``LogAppendTime``, and nearly so for producer ``CreateTime``); the
   records are filtered on their timestamp again while reading, so an out-of-order record is
   never let in, but one that sits before the found offset is missed.
3. ``last_n``: N is apportioned to the partitions in proportion to the records each holds (after
   the ``since_ms`` cut), by largest remainder, so the quotas add up to exactly N (or to every
   record when there are fewer than N). With evenly loaded partitions that is the newest N/P of
   each partition; a partition holding twice as many records gets twice the quota.
4. Each partition is sought to ``max(start, highwater - quota)`` and read forward up to its high
   watermark.

Records are JSON-decoded one by one with orjson; a value that is not a JSON object (invalid
JSON, a tombstone, an array, a number...) is skipped and counted. The window is the records
read minus those skipped and those excluded as alerts, so it can hold fewer than ``last_n``.

Labels come from a record header (``label`` by default, as ``stream-l2ae produce`` writes them):
when every kept record carries it as an integer (or ``True``/``False``), ``Dataset.y`` holds them;
otherwise ``y`` is ``None``.

The consumer settings are one dict of kafka-python keyword arguments (``bootstrap_servers``,
SSL/SASL settings, ...), the same dict the other clients take: keys that only a producer or an
admin client accepts are ignored here, keys no kafka-python client knows are an error. This
module does not import :mod:`consumers` (the daemon and the trainer do not depend on each
other).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaTimeoutError
from tqdm.auto import tqdm

from stream_l2ae.datasets import Dataset, load_dataset
from stream_l2ae.errors import ConfigError

__all__ = [
    "CONSUMER_DEFAULTS",
    "apportion",
    "consumer_config",
    "read_file_window",
    "read_window",
]

log = logging.getLogger(__name__)

#: Defaults of the window consumer; the caller's settings override them.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "auto_offset_reset": "earliest",
    "fetch_max_wait_ms": 100,
    "fetch_min_bytes": 1,
    "allow_auto_create_topics": False,
}

#: Settings of the window consumer that the caller cannot change: no group, no commits, raw
#: bytes (decoding is done here, record by record).
_FORCED: dict[str, Any] = {
    "group_id": None,
    "enable_auto_commit": False,
    "key_deserializer": None,
    "value_deserializer": None,
}

_POLL_MS = 100
ORDERS = ("offset", "time")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def consumer_config(kafka_settings: Mapping[str, Any]) -> dict[str, Any]:
    """KafkaConsumer keyword arguments for the window reader.

    :data:`CONSUMER_DEFAULTS`, then the keys of ``kafka_settings`` that ``KafkaConsumer``
    accepts, then the forced ``group_id=None``, no auto-commit and no deserializers. Keys that
    only the producer or the admin client accepts are dropped; unknown keys raise.

    Examples
    --------
    >>> config = consumer_config({"bootstrap_servers": "a:9092,b:9092", "acks": "all"})
    >>> config["bootstrap_servers"], config["group_id"], "acks" in config
    (['a:9092', 'b:9092'], None, False)
    >>> consumer_config({"bootstrap.servers": "a:9092"})
    Traceback (most recent call last):
    ...
    stream_l2ae.errors.ConfigError: unknown Kafka setting 'bootstrap.servers'; did you mean 'bootstrap_servers'?
    """  # noqa: E501
    if not isinstance(kafka_settings, Mapping):
        raise ConfigError(
            f"kafka settings must be a dict of kafka-python settings, "
            f"got {type(kafka_settings).__name__}"
        )
    accepted = set(KafkaConsumer.DEFAULT_CONFIG)
    known = accepted | set(KafkaProducer.DEFAULT_CONFIG) | set(KafkaAdminClient.DEFAULT_CONFIG)
    for key in kafka_settings:
        if key not in known:
            hint = ""
            if isinstance(key, str) and key.replace(".", "_").replace("-", "_") in known:
                hint = f"; did you mean {key.replace('.', '_').replace('-', '_')!r}?"
            raise ConfigError(f"unknown Kafka setting {key!r}{hint}")
    servers = kafka_settings.get("bootstrap_servers")
    if isinstance(servers, str):
        servers = [part.strip() for part in servers.split(",") if part.strip()]
    if not servers:
        raise ConfigError("kafka settings need 'bootstrap_servers' (e.g. 'localhost:9092')")
    config = {
        **CONSUMER_DEFAULTS,
        **{key: value for key, value in kafka_settings.items() if key in accepted},
        **_FORCED,
    }
    config["bootstrap_servers"] = servers
    return config


def apportion(total: int, sizes: Sequence[int]) -> list[int]:
    """Split ``total`` over parts in proportion to ``sizes`` (largest remainder method).

    The quotas add up to ``min(total, sum(sizes))`` and never exceed a part's size; ties in the
    remainders go to the earlier part.

    Examples
    --------
    >>> apportion(100, [180, 120])
    [60, 40]
    >>> apportion(10, [1, 1, 1])
    [1, 1, 1]
    >>> apportion(2, [5, 5, 5])
    [1, 1, 0]
    >>> apportion(5, [0, 7])
    [0, 5]
    """
    sizes = [max(0, int(size)) for size in sizes]
    available = sum(sizes)
    if total >= available:
        return sizes
    if total <= 0:
        return [0] * len(sizes)
    exact = [total * size / available for size in sizes]
    quotas = [int(value) for value in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for index in order[: total - sum(quotas)]:
        quotas[index] += 1
    return quotas


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class _Partition:
    tp: TopicPartition
    beginning: int = 0
    end: int = 0
    start: int = 0
    # offset, timestamp, value, label, alerted
    rows: list[tuple[int, int, Any, Any, bool]] = field(default_factory=list)


@dataclass
class _Counts:
    skipped: dict[str, int] = field(default_factory=dict)
    excluded_alerts: int = 0
    older_than_since: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


class _Deadline:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s

    def left_ms(self) -> int:
        return max(0, int((self.at - time.monotonic()) * 1000))

    def check(self, what: str) -> None:
        if time.monotonic() > self.at:
            raise KafkaTimeoutError(
                f"reading the training window: {what} after {self.timeout_s:g} s"
            )


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ConfigError(f"topic {topic!r} does not exist (or has no partitions)")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def _assign(consumer: KafkaConsumer, tps: Iterable[TopicPartition]) -> None:
    """Fetch from ``tps`` only. Partitions are never paused: in kafka-python 3.0.12, resuming
    two paused partitions that both had fetched records parked restores only one of them, and
    the other is never fetched again. Narrowing the assignment has no such trap (the state of a
    partition that stays assigned, its position included, is kept)."""
    wanted = set(tps)
    if wanted and wanted != consumer.assignment():
        consumer.assign(sorted(wanted))


def _learn_bounds(consumer: KafkaConsumer, parts: list[_Partition], deadline: _Deadline) -> None:
    """Each partition's beginning offset and high watermark (from one fetch response)."""
    _assign(consumer, [part.tp for part in parts])
    consumer.seek_to_beginning(*[part.tp for part in parts])
    for part in parts:
        part.beginning = consumer.position(part.tp, timeout_ms=deadline.left_ms())
        if part.beginning is None:
            deadline.check(f"no beginning offset for {part.tp.topic}/{part.tp.partition}")
    waiting = {part.tp: part for part in parts}
    while waiting:
        consumer.poll(timeout_ms=_POLL_MS)  # the records are dropped: only the bounds count
        for tp in list(waiting):
            highwater = consumer.highwater(tp)
            if highwater is not None:
                part = waiting.pop(tp)
                part.end = max(int(highwater), 0)
                part.beginning = min(part.beginning, part.end)
        _assign(consumer, waiting)  # stop fetching the partitions whose bounds are known
        if waiting:
            deadline.check(
                "no fetch response (high watermark) for "
                + ", ".join(f"{tp.topic}/{tp.partition}" for tp in waiting)
            )


def _probe(
    consumer: KafkaConsumer, tp: TopicPartition, offset: int, end: int, deadline: _Deadline
) -> tuple[int, int] | None:
    """``(offset, timestamp_ms)`` of the first record at or after ``offset`` and before ``end``,
    or ``None`` when there is none."""
    _assign(consumer, [tp])
    consumer.seek(tp, offset)
    while True:
        polled = consumer.poll(timeout_ms=_POLL_MS, max_records=1).get(tp, [])
        if polled:
            record = polled[0]
            return (record.offset, record.timestamp) if record.offset < end else None
        position = consumer.position(tp, timeout_ms=deadline.left_ms())
        if position is not None and position >= end:
            return None
        deadline.check(f"probing {tp.topic}/{tp.partition} at offset {offset}")


def _first_offset_since(
    consumer: KafkaConsumer, part: _Partition, since_ms: int, deadline: _Deadline
) -> int:
    """The first offset of ``part`` holding a record with timestamp >= ``since_ms`` (``end`` when
    none): exponential probing backwards from the end, then a binary search."""
    tp, beginning, end = part.tp, part.beginning, part.end
    if beginning >= end:
        return end
    newer = end  # the records from here on are known to be >= since_ms
    older = None  # a record at this offset is known to be < since_ms
    step = 1
    while older is None:
        offset = max(beginning, end - step)
        found = _probe(consumer, tp, offset, end, deadline)
        if found is None or found[1] >= since_ms:
            newer = offset
            if offset == beginning:
                return beginning
            step *= 2
        else:
            older = found[0]
    while newer - older > 1:
        middle = (older + newer) // 2
        found = _probe(consumer, tp, middle, newer, deadline)
        if found is None or found[1] >= since_ms:
            newer = middle
        else:
            older = found[0]
    return newer


def _label(headers: Iterable[tuple[str, bytes]] | None, name: str) -> int | None:
    for key, value in headers or ():
        if key == name and value is not None:
            text = value.decode("utf-8", "replace").strip()
            lowered = text.lower()
            if lowered in ("true", "false"):
                return int(lowered == "true")
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    return None
                return int(number) if number.is_integer() else None
    return None


def _read_ranges(
    consumer: KafkaConsumer,
    parts: list[_Partition],
    deadline: _Deadline,
    handle,
    bar: tqdm | None = None,
) -> None:
    """Read each partition from ``start`` to ``end``; ``handle(part, record)`` per record."""
    active = {part.tp: part for part in parts if part.start < part.end}
    _assign(consumer, active)
    for part in active.values():
        consumer.seek(part.tp, part.start)
    while active:
        polled = consumer.poll(timeout_ms=_POLL_MS)
        for tp, records in polled.items():
            part = active.get(tp)
            if part is None:
                continue
            kept = 0
            for record in records:
                if record.offset < part.start or record.offset >= part.end:
                    continue
                handle(part, record)
                kept += 1
            if bar is not None:
                bar.update(kept)
        for tp in list(active):
            position = consumer.position(tp, timeout_ms=deadline.left_ms())
            if position is not None and position >= active[tp].end:
                del active[tp]
        _assign(consumer, active)
        if active:
            deadline.check(
                "records missing in "
                + ", ".join(
                    f"{tp.topic}/{tp.partition} (at {consumer.position(tp, timeout_ms=0)}, "
                    f"end {part.end})"
                    for tp, part in active.items()
                )
            )


def _alert_sources(
    consumer: KafkaConsumer, parts: list[_Partition], deadline: _Deadline
) -> set[tuple[str, int, int]]:
    """``(topic, partition, offset)`` of every record the alerts topic reports on.

    The alert key is ``topic/partition/offset`` (topic names cannot hold ``/``); an alert whose
    key does not parse is looked up through its value's ``source`` object."""
    sources: set[tuple[str, int, int]] = set()
    unreadable = 0

    def handle(part: _Partition, record: Any) -> None:
        nonlocal unreadable
        source = _parse_source_key(record.key)
        if source is None:
            try:
                value = orjson.loads(record.value)
                src = value["source"]
                source = (str(src["topic"]), int(src["partition"]), int(src["offset"]))
            except (orjson.JSONDecodeError, TypeError, KeyError, ValueError):
                unreadable += 1
                return
        sources.add(source)

    for part in parts:
        part.start = part.beginning
    _read_ranges(consumer, parts, deadline, handle)
    if unreadable:
        log.warning("%d alert records name no source record; they exclude nothing", unreadable)
    return sources


def _parse_source_key(key: bytes | None) -> tuple[str, int, int] | None:
    if not key:
        return None
    try:
        topic, partition, offset = key.decode("utf-8").rsplit("/", 2)
        return topic, int(partition), int(offset)
    except ValueError:
        return None


def read_window(
    kafka_settings: Mapping[str, Any],
    topics: Sequence[str],
    *,
    last_n: int | None = None,
    since_ms: int | None = None,
    exclude_alerts_topic: str | None = None,
    label_header: str = "label",
    timeout_s: float = 60,
    progress: bool = False,
    order: str = "offset",
    alerted_rows: list[int] | None = None,
) -> Dataset:
    """Read a training window from Kafka topics (see the module docstring for how).

    With ``alerted_rows`` (a list to fill), records alerted on are kept rather than dropped,
    and their positions in the returned data set are appended to it: the retraining job leaves
    them out of the training part only, so that the holdout is not biased.

    Parameters
    ----------
    kafka_settings
        kafka-python settings (``bootstrap_servers``, security...); see :func:`consumer_config`.
    topics
        Input topics; they must exist.
    last_n
        The newest ``last_n`` records across the topics' partitions, apportioned to the
        partitions in proportion to their sizes. ``None``: no count limit.
    since_ms
        Only records with a timestamp ``>= since_ms`` (epoch milliseconds). With ``last_n``
        too: the newest ``last_n`` of those. Neither: every record of the topics.
    exclude_alerts_topic
        Read this topic (the daemon's alerts) fully and leave the records it names out of the
        window, so that a candidate does not learn the anomalies the model in service found.
    label_header
        Header holding each record's label.
    timeout_s
        Deadline for the whole read; :class:`kafka.errors.KafkaTimeoutError` past it.
    progress
        Show a progress bar of the records read.
    order
        ``"offset"`` (default): topic by topic in the given order, partition by partition,
        by offset. ``"time"``: by record timestamp (ties by topic, partition, offset), so that
        ``split`` gives an older part and a newer part across all partitions.

    Returns
    -------
    Dataset
        ``name`` ``"kafka:<topic>,<topic>"``; JSON-safe ``description`` with ``source``
        (``"kafka"``), ``topics``, ``n``, ``last_n``, ``since_ms``, ``partitions``
        (``"topic/partition" -> [start, end)`` offsets read), ``skipped`` (undecodable or
        non-object values) and ``skipped_reasons``, ``excluded_alerts``, ``older_than_since``
        (records in range dropped on their timestamp), ``labels``, ``timestamp_ms``
        (``[oldest, newest]`` or ``None``), ``fields``, ``order``, ``seconds``.

    Raises
    ------
    ConfigError
        Bad arguments, unknown settings, a topic that does not exist.
    kafka.errors.KafkaTimeoutError
        When the window is not read within ``timeout_s``.
    """
    started = time.perf_counter()
    topics = _check_topics(topics)
    if last_n is not None and (isinstance(last_n, bool) or not isinstance(last_n, int)):
        raise ConfigError(f"last_n must be a non-negative int or None, got {last_n!r}")
    if last_n is not None and last_n < 0:
        raise ConfigError(f"last_n must be a non-negative int or None, got {last_n!r}")
    if since_ms is not None and (isinstance(since_ms, bool) or not isinstance(since_ms, int)):
        raise ConfigError(f"since_ms must be an int (epoch milliseconds) or None, got {since_ms!r}")
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {ORDERS}, got {order!r}")
    if exclude_alerts_topic is not None and exclude_alerts_topic in topics:
        raise ConfigError(f"the alerts topic {exclude_alerts_topic!r} is also an input topic")
    deadline = _Deadline(timeout_s)
    consumer = KafkaConsumer(**consumer_config(kafka_settings))
    counts = _Counts()
    try:
        parts = [_Partition(tp) for topic in topics for tp in _partitions(consumer, topic)]
        alert_parts = (
            [_Partition(tp) for tp in _partitions(consumer, exclude_alerts_topic)]
            if exclude_alerts_topic
            else []
        )
        _learn_bounds(consumer, parts + alert_parts, deadline)
        excluded = _alert_sources(consumer, alert_parts, deadline) if alert_parts else set()
        for part in parts:
            part.start = part.beginning
            if since_ms is not None:
                part.start = _first_offset_since(consumer, part, since_ms, deadline)
        if last_n is not None:
            quotas = apportion(last_n, [part.end - part.start for part in parts])
            for part, quota in zip(parts, quotas, strict=True):
                part.start = max(part.start, part.end - quota)

        def handle(part: _Partition, record: Any) -> None:
            if since_ms is not None and record.timestamp < since_ms:
                counts.older_than_since += 1
                return
            alerted = (record.topic, record.partition, record.offset) in excluded
            if alerted and alerted_rows is None:
                counts.excluded_alerts += 1
                return
            if record.value is None:
                counts.skip("tombstone")
                return
            try:
                value = orjson.loads(record.value)
            except orjson.JSONDecodeError:
                counts.skip("invalid_json")
                return
            if not isinstance(value, dict):
                counts.skip("not_an_object")
                return
            part.rows.append(
                (
                    record.offset,
                    record.timestamp,
                    value,
                    _label(record.headers, label_header),
                    alerted,
                )
            )

        total = sum(part.end - part.start for part in parts)
        with tqdm(total=total, unit="rec", disable=not progress, desc="window") as bar:
            _read_ranges(consumer, parts, deadline, handle, bar)
    finally:
        consumer.close()
    return _window_dataset(
        topics, parts, counts, order=order, label_header=label_header, alerted_rows=alerted_rows,
        last_n=last_n, since_ms=since_ms, alerts_topic=exclude_alerts_topic,
        seconds=time.perf_counter() - started,
    )  # fmt: skip


def _check_topics(topics: Sequence[str]) -> list[str]:
    if isinstance(topics, str):
        topics = [t.strip() for t in topics.split(",") if t.strip()]
    topics = list(topics)
    if not topics or not all(isinstance(t, str) and t for t in topics):
        raise ConfigError(f"topics must be a non-empty list of topic names, got {topics!r}")
    if len(set(topics)) != len(topics):
        raise ConfigError(f"topics are listed twice: {topics!r}")
    return topics


def _window_dataset(
    topics: list[str],
    parts: list[_Partition],
    counts: _Counts,
    *,
    order: str,
    label_header: str,
    last_n: int | None,
    since_ms: int | None,
    alerts_topic: str | None,
    seconds: float,
    alerted_rows: list[int] | None = None,
) -> Dataset:
    rows = [(index, part, row) for index, part in enumerate(parts) for row in part.rows]
    if order == "time":
        rows.sort(key=lambda item: (item[2][1], item[0], item[2][0]))
    records = [row[2] for _, _, row in rows]
    labels = [row[3] for _, _, row in rows]
    if alerted_rows is not None:
        alerted_rows.extend(i for i, (_, _, row) in enumerate(rows) if row[4])
    y = None
    if records and all(label is not None for label in labels):
        y = np.asarray(labels, dtype=np.int64)
    timestamps = [row[1] for _, _, row in rows]
    description: dict[str, Any] = {
        "source": "kafka",
        "topics": list(topics),
        "n": len(records),
        "last_n": last_n,
        "since_ms": since_ms,
        "partitions": {f"{p.tp.topic}/{p.tp.partition}": [p.start, p.end] for p in parts},
        "skipped": sum(counts.skipped.values()),
        "skipped_reasons": dict(counts.skipped),
        "excluded_alerts": counts.excluded_alerts,
        "alerts_topic": alerts_topic,
        "older_than_since": counts.older_than_since,
        "label_header": label_header,
        "timestamp_ms": [min(timestamps), max(timestamps)] if timestamps else None,
        "fields": list(records[0]) if records else [],
        "order": order,
        "seconds": round(seconds, 3),
    }
    description.update(_label_description(y))
    return Dataset(name="kafka:" + ",".join(topics), records=records, y=y, description=description)


def _label_description(y: np.ndarray | None) -> dict[str, Any]:
    """``labels`` and its summary, the way :mod:`stream_l2ae.datasets` describes them."""
    if y is None:
        return {"labels": None}
    values, counts = np.unique(y, return_counts=True)
    if set(values.tolist()) <= {0, 1}:
        return {"labels": "anomaly", "n_anomalies": int(np.count_nonzero(y))}
    return {
        "labels": "class",
        "classes": {str(v): int(c) for v, c in zip(values.tolist(), counts, strict=True)},
    }


def read_file_window(
    path: str | os.PathLike[str], last_n: int | None = None, *, label_field: str | None = None
) -> Dataset:
    """The last ``last_n`` samples of a file (or built-in data set) read by
    :func:`~stream_l2ae.datasets.load_dataset`; all of them when ``last_n`` is ``None``.

    Examples
    --------
    >>> window = read_file_window("digits", last_n=100)
    >>> len(window), window.description["last_n"], window.description["n"]
    (100, 100, 100)
    """
    if last_n is not None and (
        isinstance(last_n, bool) or not isinstance(last_n, int) or last_n < 0
    ):
        raise ConfigError(f"last_n must be a non-negative int or None, got {last_n!r}")
    data = load_dataset(path, label_field=label_field)
    if last_n is not None and last_n < len(data):
        _, data = data.split(len(data) - last_n)
    data.description["last_n"] = last_n
    return data
