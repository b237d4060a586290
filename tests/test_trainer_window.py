"""The trainer's window reader against the embedded broker (no Kafka mocks)."""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from kafka import KafkaAdminClient

from consumers.kafka_io import client_config, ensure_topics, make_producer
from stream_l2ae.errors import ConfigError
from tests.kafka_fixtures import EXTERNAL_KAFKA_ENV
from trainer.window import apportion, read_file_window, read_window

#: Records per partition of the input topic, and the spacing of their timestamps (ms).
SIZES = (180, 120)
SPACING_MS = (1000, 1500)


@dataclass
class Stream:
    settings: dict
    topic: str
    alerts: str
    bad: str
    empty: str
    t0: int
    #: (partition, i) -> offset
    offsets: dict
    #: (partition, i) of the records named by the alerts
    alerted: set


def _label(i: int) -> int:
    return int(i % 10 == 0)


@pytest.fixture(scope="module")
def stream(request) -> Iterator[Stream]:
    """One input topic (2 partitions, 180 + 120 timestamped records with label headers), an
    alerts topic naming 5 of them, a topic with bad values and an empty topic."""
    external = os.environ.get(EXTERNAL_KAFKA_ENV)
    if external:
        settings = {"bootstrap_servers": external}
    else:
        settings = {"bootstrap_servers": request.getfixturevalue("broker").bootstrap_servers}
    suffix = uuid.uuid4().hex[:8]
    topic, alerts, bad, empty = (f"w-{name}-{suffix}" for name in ("in", "alerts", "bad", "empty"))
    ensure_topics(settings, {topic: 2, alerts: 1, bad: 1, empty: 1}, timeout_s=15)
    t0 = int(time.time() * 1000) - 3_600_000
    producer = make_producer(settings)
    try:
        futures = {}
        for p, (size, spacing) in enumerate(zip(SIZES, SPACING_MS, strict=True)):
            for i in range(size):
                futures[p, i] = producer.send(
                    topic,
                    value=orjson.dumps({"p": p, "i": i, "x": i * 0.5}),
                    key=str(i).encode(),
                    headers=[("label", str(_label(i)).encode())],
                    partition=p,
                    timestamp_ms=t0 + i * spacing,
                )
        producer.flush(timeout=30)
        offsets = {key: future.get(timeout=30).offset for key, future in futures.items()}
        # Alerts like the daemon's: key "topic/partition/offset", the source in the value. The
        # last one has no key: it is found through its value.
        alerted = {(0, 179), (0, 150), (1, 119), (1, 0), (0, 3)}
        for n, (p, i) in enumerate(sorted(alerted)):
            source = {"topic": topic, "partition": p, "offset": offsets[p, i], "key": str(i)}
            value = {"source": {**source, "timestamp_ms": t0}, "score": 0.9, "is_anomaly": True}
            key = None if n == len(alerted) - 1 else f"{topic}/{p}/{offsets[p, i]}".encode()
            producer.send(alerts, key=key, value=orjson.dumps(value))
        for value in (b'{"a": 1}', b"{oops", b"[1, 2]", None, b"42", b'{"a": 2}', b"\xff\xfe"):
            producer.send(bad, key=b"k", value=value, headers=[("label", b"0")])
        producer.send(bad, value=b'{"a": 3}')  # no label header: the window has no labels
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)
    yield Stream(settings, topic, alerts, bad, empty, t0, offsets, alerted)
    with contextlib.suppress(Exception):
        admin = KafkaAdminClient(**client_config(settings, "admin"))
        try:
            admin.delete_topics([topic, alerts, bad, empty], raise_errors=False)
        finally:
            admin.close()


def _keys(window) -> list[tuple[int, int]]:
    return [(record["p"], record["i"]) for record in window.records]


def test_last_n_reads_the_newest_records_of_each_partition(stream):
    window = read_window(stream.settings, [stream.topic], last_n=100)
    # 100 apportioned 180:120 -> 60 + 40, the newest of each partition, in partition order.
    expected = [(0, i) for i in range(120, 180)] + [(1, i) for i in range(80, 120)]
    assert _keys(window) == expected
    assert window.name == f"kafka:{stream.topic}"
    assert window.y.tolist() == [_label(i) for _, i in expected]
    d = window.description
    assert d["n"] == 100 and d["last_n"] == 100 and d["since_ms"] is None
    assert d["partitions"] == {
        f"{stream.topic}/0": [stream.offsets[0, 120], stream.offsets[0, 179] + 1],
        f"{stream.topic}/1": [stream.offsets[1, 80], stream.offsets[1, 119] + 1],
    }
    assert d["skipped"] == 0 and d["excluded_alerts"] == 0
    assert d["labels"] == "anomaly" and d["n_anomalies"] == sum(window.y)
    assert d["fields"] == ["p", "i", "x"]
    json.dumps(d)  # JSON-safe
    # split() of a window keeps working (the label summary follows).
    train, holdout = window.split(80)
    assert len(holdout) == 20 and holdout.description["n"] == 20


def test_since_ms_reads_exactly_the_newer_records(stream):
    since = stream.t0 + 100_500
    window = read_window(stream.settings, [stream.topic], since_ms=since)
    # p0: i * 1000 >= 100500 -> i >= 101; p1: i * 1500 >= 100500 -> i >= 67.
    expected = [(0, i) for i in range(101, 180)] + [(1, i) for i in range(67, 120)]
    assert _keys(window) == expected
    assert window.description["older_than_since"] == 0
    assert window.description["timestamp_ms"][0] >= since
    # Nothing newer, and everything newer.
    assert len(read_window(stream.settings, [stream.topic], since_ms=stream.t0 + 10**9)) == 0
    assert len(read_window(stream.settings, [stream.topic], since_ms=stream.t0)) == sum(SIZES)


def test_last_n_and_since_ms_take_the_newest_n_of_the_newer_records(stream):
    since = stream.t0 + 100_500
    window = read_window(stream.settings, [stream.topic], last_n=50, since_ms=since)
    # 79 and 53 records are newer than since: 50 apportioned -> 30 + 20.
    expected = [(0, i) for i in range(150, 180)] + [(1, i) for i in range(100, 120)]
    assert _keys(window) == expected
    # last_n larger than what is newer than since: all of those.
    assert len(read_window(stream.settings, [stream.topic], last_n=1000, since_ms=since)) == 132


def test_alerted_records_are_excluded(stream):
    window = read_window(stream.settings, [stream.topic], exclude_alerts_topic=stream.alerts)
    keys = _keys(window)
    assert len(keys) == sum(SIZES) - len(stream.alerted)
    assert not set(keys) & stream.alerted
    assert window.description["excluded_alerts"] == len(stream.alerted)
    assert window.description["alerts_topic"] == stream.alerts
    # Within last_n: the excluded records count against the quota, the window is smaller.
    newest = read_window(
        stream.settings, [stream.topic], last_n=100, exclude_alerts_topic=stream.alerts
    )
    assert len(newest) == 100 - 3  # (0, 179), (0, 150) and (1, 119) are among the newest 100
    assert newest.description["excluded_alerts"] == 3


def test_alerted_records_can_be_kept_and_marked(stream):
    from trainer.job import _without_alerted

    alerted: list[int] = []
    window = read_window(
        stream.settings, [stream.topic], exclude_alerts_topic=stream.alerts, alerted_rows=alerted
    )
    keys = _keys(window)
    assert len(keys) == sum(SIZES)
    assert {keys[i] for i in alerted} == stream.alerted
    train, holdout = window.split(len(window) - 50)
    kept = _without_alerted(train, alerted)
    assert len(kept) == len(train) - sum(i < len(train) for i in alerted)
    assert not set(_keys(kept)) & stream.alerted


def test_time_order_interleaves_the_partitions(stream):
    window = read_window(stream.settings, [stream.topic], last_n=100, order="time")
    times = [stream.t0 + record["i"] * SPACING_MS[record["p"]] for record in window.records]
    assert times == sorted(times) and len(window) == 100


def test_undecodable_values_are_skipped_and_missing_labels_drop_y(stream):
    window = read_window(stream.settings, [stream.bad])
    assert window.records == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert window.y is None and window.description["labels"] is None
    assert window.description["skipped"] == 5
    assert window.description["skipped_reasons"] == {
        "invalid_json": 2,
        "not_an_object": 2,
        "tombstone": 1,
    }
    # Several topics at once, in the order given.
    both = read_window(stream.settings, [stream.bad, stream.topic], last_n=10)
    assert both.name == f"kafka:{stream.bad},{stream.topic}"
    assert both.description["topics"] == [stream.bad, stream.topic]


def test_empty_and_missing_topics(stream):
    empty = read_window(stream.settings, [stream.empty], last_n=10, since_ms=stream.t0)
    assert len(empty) == 0 and empty.y is None
    assert empty.description["partitions"] == {f"{stream.empty}/0": [0, 0]}
    with pytest.raises(ConfigError, match="does not exist"):
        read_window(stream.settings, ["no-such-topic-" + uuid.uuid4().hex[:6]], timeout_s=10)
    with pytest.raises(ConfigError, match="also an input topic"):
        read_window(stream.settings, [stream.topic], exclude_alerts_topic=stream.topic)


def test_settings_are_checked():
    with pytest.raises(ConfigError, match="did you mean 'bootstrap_servers'"):
        read_window({"bootstrap.servers": "localhost:1"}, ["t"])
    with pytest.raises(ConfigError, match="last_n"):
        read_window({"bootstrap_servers": "localhost:1"}, ["t"], last_n=-1)


def test_apportion_adds_up():
    assert apportion(100, [180, 120]) == [60, 40]
    assert apportion(50, [79, 53]) == [30, 20]
    assert sum(apportion(997, [13, 1000, 7, 333])) == 997
    assert apportion(0, [5, 5]) == [0, 0]


def test_read_file_window_takes_the_tail(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"v": i, "label": i % 2}) + "\n" for i in range(20)))
    window = read_file_window(path, last_n=5)
    assert [r["v"] for r in window.records] == [15, 16, 17, 18, 19]
    assert window.y.tolist() == [1, 0, 1, 0, 1]
    assert window.description["last_n"] == 5 and window.description["n"] == 5
    assert len(read_file_window(path)) == 20
