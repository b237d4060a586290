"""Kafka client plumbing against a real (embedded Tansu) broker: no mocks."""

from __future__ import annotations

import logging
import socket
import uuid

import orjson
import pytest
from kafka import KafkaAdminClient, KafkaProducer, TopicPartition

from consumers.embedded_broker import EmbeddedBroker
from consumers.kafka_io import (
    CONSUMER_DEFAULTS,
    client_config,
    ensure_topics,
    highwater_lag,
    make_consumer,
    make_producer,
)
from stream_l2ae.errors import ConfigError
from tests.kafka_fixtures import (
    FAST_GROUP_SETTINGS,
    consume,
    produce_json,
    require_embedded_broker,
)


def _partition_counts(settings, topics):
    admin = KafkaAdminClient(**client_config(settings, "admin"))
    try:
        return {t["name"]: len(t["partitions"]) for t in admin.describe_topics(list(topics))}
    finally:
        admin.close()


def _list_topics(settings):
    admin = KafkaAdminClient(**client_config(settings, "admin"))
    try:
        return set(admin.list_topics())
    finally:
        admin.close()


# -- the embedded broker ----------------------------------------------------------------------


def test_broker_starts_and_stops():
    require_embedded_broker()
    broker = EmbeddedBroker()
    assert not broker.is_running
    with broker:
        assert broker.is_running and broker.pid
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        assert _list_topics({"bootstrap_servers": broker.bootstrap_servers}) == set()
        log_path = broker.log_path
        assert log_path.exists()
    assert not broker.is_running and broker.pid is None
    assert not log_path.exists()  # a temporary log is removed by stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", broker.port), 1):
        pass
    broker.stop()  # stopping twice is harmless


def test_restart_keeps_the_port_and_clients_reconnect():
    require_embedded_broker()
    with EmbeddedBroker() as broker:
        settings = {"bootstrap_servers": broker.bootstrap_servers}
        ensure_topics(settings, ["before"])
        producer = make_producer(settings)
        consumer = make_consumer(settings, None)
        try:
            producer.send("before", b"old", partition=0).get(timeout=10)
            port, pid = broker.port, broker.pid

            broker.restart()
            assert broker.is_running and broker.port == port and broker.pid != pid

            # The new broker is empty; the same client objects work against it.
            ensure_topics(settings, ["after"])
            metadata = producer.send("after", b"new", partition=0).get(timeout=30)
            assert metadata.offset == 0
            tp = TopicPartition("after", 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            assert [r.value for r in consume(consumer, 1, timeout_s=15)] == [b"new"]
        finally:
            consumer.close()
            producer.close(timeout=5)


# -- topics -----------------------------------------------------------------------------------


def test_ensure_topics_creates_with_partition_counts_and_is_idempotent(kafka_settings, caplog):
    a, b = f"t-{uuid.uuid4().hex[:8]}", f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_settings, {a: 3, b: 1})
    assert _partition_counts(kafka_settings, [a, b]) == {a: 3, b: 1}

    ensure_topics(kafka_settings, {a: 3, b: 1})  # existing: nothing to do
    ensure_topics(kafka_settings, [a, b], partitions=1)  # list form, count mismatch on `a`
    assert _partition_counts(kafka_settings, [a, b]) == {a: 3, b: 1}
    assert any(f"topic {a} exists with 3 partitions" in m for m in caplog.messages)


def test_ensure_topics_accepts_topic_configs(kafka_settings):
    name = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(kafka_settings, [name], partitions=2, config={"cleanup.policy": "compact"})
    assert _partition_counts(kafka_settings, [name]) == {name: 2}


def test_ensure_topics_rejects_bad_input(kafka_settings):
    with pytest.raises(ConfigError, match="invalid topic name"):
        ensure_topics(kafka_settings, ["no spaces"])
    with pytest.raises(ConfigError, match="partitions"):
        ensure_topics(kafka_settings, {"t-zero": 0})
    with pytest.raises(ConfigError, match="not the string|got the string"):
        ensure_topics(kafka_settings, "t-a-string")


# -- producing and consuming ------------------------------------------------------------------


def test_group_consumer_reads_everything_commits_and_a_successor_resumes(
    kafka_settings, topic_factory
):
    topic = topic_factory(3)
    group = f"g-{uuid.uuid4().hex[:8]}"
    first = [{"i": i, "x": [0.5] * 4} for i in range(300)]
    produce_json(kafka_settings, topic, first, key_fn=lambda r: str(r["i"] % 10))

    consumer = make_consumer(kafka_settings, group, max_poll_records=64, **FAST_GROUP_SETTINGS)
    try:
        consumer.subscribe([topic])
        records = consume(consumer, len(first))
        assert len(consumer.assignment()) == 3
        consumer.commit()
    finally:
        consumer.close()
    assert sorted(orjson.loads(r.value)["i"] for r in records) == list(range(300))
    assert all(isinstance(r.value, bytes) and isinstance(r.key, bytes) for r in records)

    second = [{"i": i} for i in range(300, 350)]
    produce_json(kafka_settings, topic, second)
    successor = make_consumer(kafka_settings, group, **FAST_GROUP_SETTINGS)
    try:
        successor.subscribe([topic])
        resumed = consume(successor, len(second))
        extra = consume(successor, 1, timeout_s=0.5)  # nothing beyond the new records
    finally:
        successor.close()
    assert sorted(orjson.loads(r.value)["i"] for r in resumed + extra) == list(range(300, 350))


def test_headers_and_keys_round_trip(kafka_settings, topic_factory):
    topic = topic_factory(1)
    records = [{"i": i} for i in range(5)]
    produce_json(
        kafka_settings,
        topic,
        records,
        key_fn=lambda r: f"k{r['i']}",
        headers_fn=lambda r: [("trace-id", f"tr-{r['i']}".encode()), ("empty", b"")],
    )
    consumer = make_consumer(kafka_settings, None)
    try:
        consumer.assign([TopicPartition(topic, 0)])
        got = consume(consumer, len(records))
    finally:
        consumer.close()
    assert [(r.key, orjson.loads(r.value)) for r in got] == [
        (f"k{i}".encode(), {"i": i}) for i in range(5)
    ]
    assert [list(r.headers) for r in got] == [
        [("trace-id", f"tr-{i}".encode()), ("empty", b"")] for i in range(5)
    ]


def test_produce_json_targets_a_partition(kafka_settings, topic_factory):
    topic = topic_factory(3)
    metadata = produce_json(kafka_settings, topic, [{"i": i} for i in range(4)], partition=2)
    assert [m.partition for m in metadata] == [2, 2, 2, 2]
    assert [m.offset for m in metadata] == [0, 1, 2, 3]


def test_highwater_lag_counts_records_not_yet_returned(kafka_settings, topic_factory):
    topic = topic_factory(2)
    produce_json(kafka_settings, topic, [{"i": i} for i in range(100)], partition=0)
    produce_json(kafka_settings, topic, [{"i": i} for i in range(30)], partition=1)
    p0, p1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = make_consumer(kafka_settings, None, max_poll_records=10)
    try:
        consumer.assign([p0, p1])
        assert highwater_lag(consumer) == {}  # nothing fetched yet: highwater unknown
        returned = 0
        while consumer.highwater(p0) is None or consumer.highwater(p1) is None:
            batch = consume(consumer, 1)  # at most max_poll_records per poll
            assert batch, "no records within the timeout"
            returned += len(batch)
        assert returned < 130
        lag = highwater_lag(consumer)
        assert lag == {p0: 100 - consumer.position(p0), p1: 30 - consumer.position(p1)}
        assert sum(lag.values()) == 130 - returned
        assert len(consume(consumer, 130 - returned)) == 130 - returned
        assert highwater_lag(consumer) == {p0: 0, p1: 0}
    finally:
        consumer.close()


# -- configuration ----------------------------------------------------------------------------

SETTINGS = {
    "bootstrap_servers": "a:9093, b:9093,",
    "security_protocol": "SASL_SSL",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": "scorer",
    "sasl_plain_password": "secret",
    "ssl_cafile": "/etc/ca.pem",
    "ssl_check_hostname": True,
    "client_id": "stream-l2ae",
    "group_id": "from-settings",
    "max_poll_records": 123,
    "acks": 1,
    "linger_ms": 20,
    "ssl_ciphers": "ECDHE+AESGCM",
}
COMMON = {
    "bootstrap_servers",
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_check_hostname",
    "client_id",
}


def test_client_config_keeps_what_each_client_accepts():
    consumer = client_config(SETTINGS, "consumer")
    producer = client_config(SETTINGS, "producer")
    admin = client_config(SETTINGS, "admin")
    assert set(consumer) == COMMON | {"group_id", "max_poll_records", "ssl_ciphers"}
    assert set(producer) == COMMON | {"acks", "linger_ms", "ssl_ciphers"}
    assert set(admin) == COMMON  # KafkaAdminClient takes no ssl_ciphers
    for config in (consumer, producer, admin):
        assert config["bootstrap_servers"] == ["a:9093", "b:9093"]
        assert config["sasl_plain_password"] == "secret"  # passed through verbatim
    assert client_config({"bootstrap_servers": ["a:1", "b:2,c:3"]}, "admin") == {
        "bootstrap_servers": ["a:1", "b:2", "c:3"]
    }


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"bootstrap_servers": "a:1", "no_such_option": 1}, "'no_such_option'"),
        ({"bootstrap.servers": "a:1"}, "'bootstrap.servers'.*did you mean 'bootstrap_servers'"),
        ({"bootstrap_servers": "a:1", "sasl_plain_pasword": "x"}, "'sasl_plain_pasword'"),
        ({"client_id": "x"}, "bootstrap_servers"),
        ({"bootstrap_servers": " , "}, "bootstrap_servers is empty"),
        ({"bootstrap_servers": 9092}, "bootstrap_servers must be"),
    ],
)
def test_client_config_rejects_bad_settings(settings, match):
    for role in ("consumer", "producer", "admin"):
        with pytest.raises(ConfigError, match=match):
            client_config(settings, role)


def test_client_config_messages_never_show_values():
    with pytest.raises(ConfigError) as caught:
        client_config({"bootstrap_servers": "a:1", "sasl_password": "hunter2"}, "consumer")
    assert "hunter2" not in str(caught.value)
    with pytest.raises(ConfigError, match="role"):
        client_config({"bootstrap_servers": "a:1"}, "streams")


def test_factories_apply_defaults_settings_then_overrides(kafka_settings):
    producer = make_producer({**kafka_settings, "linger_ms": 7, "group_id": "ignored"})
    try:
        assert producer.config["linger_ms"] == 7  # settings over defaults
        assert producer.config["batch_size"] == 256 * 1024
        assert producer.config["enable_idempotence"] is False
        assert producer.config["max_in_flight_requests_per_connection"] == 5
    finally:
        producer.close(timeout=5)
    assert isinstance(producer, KafkaProducer)

    settings = {**kafka_settings, "group_id": "from-settings", "fetch_max_wait_ms": 300}
    consumer = make_consumer(settings, "explicit", max_poll_records=77, fetch_max_wait_ms=50)
    try:
        config = consumer.config
        assert config["group_id"] == "explicit"
        assert config["max_poll_records"] == 77
        assert config["fetch_max_wait_ms"] == 50  # overrides over settings
        for key in ("enable_auto_commit", "auto_offset_reset", "fetch_max_bytes"):
            assert config[key] == CONSUMER_DEFAULTS[key]
        assert config["max_partition_fetch_bytes"] == 8 * 1024 * 1024
        assert config["key_deserializer"] is None and config["value_deserializer"] is None
    finally:
        consumer.close()

    with pytest.raises(ConfigError, match="'acks'"):
        make_consumer(kafka_settings, "g", acks="all")  # a producer key
    with pytest.raises(ConfigError, match="'lingerms'"):
        make_producer(kafka_settings, lingerms=5)


def test_make_consumer_warns_without_crc32c(monkeypatch, caplog, kafka_settings):
    import importlib.util

    from consumers import kafka_io

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "crc32c" else real_find_spec(name, *a),
    )
    kafka_io._warn_if_slow_crc.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="consumers.kafka_io"):
            make_consumer(kafka_settings, None).close()
    finally:
        kafka_io._warn_if_slow_crc.cache_clear()
    assert any("crc32c" in m for m in caplog.messages)
