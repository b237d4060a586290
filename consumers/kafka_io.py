"""Kafka clients for the consumer daemon: configuration, factories, topics and lag.

This module holds all the Kafka client plumbing and nothing about records or models. The
connection settings are one plain dict of kafka-python keyword arguments (``kafka_settings``),
passed through verbatim, so whatever kafka-python supports, the daemon supports: SSL, SASL
(PLAIN, SCRAM, OAUTHBEARER, GSSAPI), client ids, timeouts. For example::

    kafka_settings = {
        "bootstrap_servers": "broker-1:9093,broker-2:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "scorer",
        "sasl_plain_password": "...",
        "ssl_cafile": "/etc/kafka/ca.pem",
        "client_id": "stream-l2ae",
    }

:func:`client_config` keeps, for each client class, only the keys that class accepts, so one
dict can configure the consumer, the producer and the admin client; a key that no client accepts
is a :class:`~stream_l2ae.errors.ConfigError`. Precedence in the factories: this module's
defaults, then ``kafka_settings``, then the keyword overrides of the call.

Values are never logged (they may hold passwords); error messages name keys only.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import re
import time
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any, Literal

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors

from stream_l2ae.errors import ConfigError

log = logging.getLogger(__name__)

Role = Literal["consumer", "producer", "admin"]

_CLIENT_CLASSES: dict[str, type] = {
    "consumer": KafkaConsumer,
    "producer": KafkaProducer,
    "admin": KafkaAdminClient,
}

_MIB = 1024 * 1024

#: Producer defaults, tuned for throughput with durable writes.
#:
#: ``enable_idempotence`` is off although kafka-python 3 turns it on by default: the embedded
#: broker (Tansu) forgets producer ids on restart and then rejects the idempotent producer's
#: epoch bump (``InitProducerId`` -> UnknownError), which leaves the producer failing every send
#: until it is recreated. Without idempotence a retried batch may be written twice or, with
#: several requests in flight, out of order; the daemon is at-least-once anyway. Against a real
#: cluster, set ``enable_idempotence: true`` in the Kafka settings to get it back.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger_ms": 5,
    "batch_size": 256 * 1024,
    "compression_type": None,
    "retries": 2_147_483_647,
    "max_in_flight_requests_per_connection": 5,
    "enable_idempotence": False,
    "allow_auto_create_topics": False,
}

#: Consumer defaults: manual commits, start from the beginning of a new group, large fetches.
#: Keys and values stay ``bytes`` (no deserializers): decoding is the processing layer's job.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "fetch_max_bytes": 50 * _MIB,
    "max_partition_fetch_bytes": 8 * _MIB,
    "fetch_min_bytes": 1,
    "fetch_max_wait_ms": 100,
    "allow_auto_create_topics": False,
}

_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")

#: CreateTopics errors that mean the request itself is wrong, reported as ConfigError.
_CONFIG_ERRORS = (
    kafka_errors.InvalidTopicError,
    kafka_errors.InvalidPartitionsError,
    kafka_errors.InvalidReplicationFactorError,
)

#: CreateTopics errors after which a topic is retried without its configs (with a warning).
_TOPIC_CONFIG_ERRORS = (
    kafka_errors.InvalidConfigurationError,
    kafka_errors.PolicyViolationError,
    kafka_errors.UnsupportedVersionError,
    kafka_errors.InvalidRequestError,
)


@cache
def _accepted_keys(role: str) -> frozenset[str]:
    return frozenset(_CLIENT_CLASSES[role].DEFAULT_CONFIG)


@cache
def _all_keys() -> frozenset[str]:
    return frozenset().union(*(_accepted_keys(role) for role in _CLIENT_CLASSES))


def _unknown_key_error(key: object, known: Iterable[str], where: str) -> ConfigError:
    hint = ""
    if isinstance(key, str):
        candidates = sorted(known)
        dotted = key.replace(".", "_").replace("-", "_").lower()
        if dotted != key and dotted in candidates:
            hint = f"; did you mean {dotted!r}?"
        else:
            close = difflib.get_close_matches(key, candidates, n=1)
            if close:
                hint = f"; did you mean {close[0]!r}?"
    return ConfigError(f"unknown Kafka setting {key!r} {where}{hint}")


def _normalise_servers(value: object) -> list[str]:
    if isinstance(value, str):
        servers = [part.strip() for part in value.split(",")]
    elif isinstance(value, Iterable):
        servers = []
        for item in value:
            if not isinstance(item, str):
                raise ConfigError(
                    f"bootstrap_servers must be strings 'host:port', got {type(item).__name__}"
                )
            servers.extend(part.strip() for part in item.split(","))
    else:
        raise ConfigError(
            "bootstrap_servers must be a 'host:port' string (comma-separated for several) "
            f"or a list of them, got {type(value).__name__}"
        )
    servers = [server for server in servers if server]
    if not servers:
        raise ConfigError("bootstrap_servers is empty")
    return servers


def client_config(kafka_settings: Mapping[str, Any], role: Role) -> dict[str, Any]:
    """The subset of ``kafka_settings`` that the ``role``'s kafka-python client accepts.

    ``bootstrap_servers`` is required; a comma-separated string becomes a list. Values are
    passed through unchanged.

    Raises
    ------
    ConfigError
        When ``role`` is unknown, ``bootstrap_servers`` is missing or empty, or a key is accepted
        by none of ``KafkaConsumer``, ``KafkaProducer`` and ``KafkaAdminClient`` (the message
        names the key).

    Examples
    --------
    >>> settings = {"bootstrap_servers": "a:9092, b:9092", "acks": "all", "group_id": "g"}
    >>> client_config(settings, "producer")
    {'bootstrap_servers': ['a:9092', 'b:9092'], 'acks': 'all'}
    >>> sorted(client_config(settings, "consumer"))
    ['bootstrap_servers', 'group_id']
    >>> client_config({"bootstrap.servers": "a:9092"}, "admin")
    Traceback (most recent call last):
    ...
    stream_l2ae.errors.ConfigError: unknown Kafka setting 'bootstrap.servers' in kafka settings; did you mean 'bootstrap_servers'?
    """  # noqa: E501
    if role not in _CLIENT_CLASSES:
        raise ConfigError(
            f"unknown Kafka client role {role!r}; expected one of {tuple(_CLIENT_CLASSES)}"
        )
    known = _all_keys()
    for key in kafka_settings:
        if key not in known:
            raise _unknown_key_error(key, known, "in kafka settings")
    if "bootstrap_servers" not in kafka_settings:
        raise ConfigError("kafka settings need 'bootstrap_servers' (e.g. 'localhost:9092')")
    accepted = _accepted_keys(role)
    config = {key: value for key, value in kafka_settings.items() if key in accepted}
    config["bootstrap_servers"] = _normalise_servers(kafka_settings["bootstrap_servers"])
    return config


def _merged(
    role: Role,
    defaults: Mapping[str, Any],
    kafka_settings: Mapping[str, Any],
    overrides: Mapping[str, Any],
) -> dict[str, Any]:
    accepted = _accepted_keys(role)
    for key in overrides:
        if key not in accepted:
            raise _unknown_key_error(key, accepted, f"for the Kafka {role}")
    config = {**defaults, **client_config(kafka_settings, role), **overrides}
    if "bootstrap_servers" in overrides:
        config["bootstrap_servers"] = _normalise_servers(overrides["bootstrap_servers"])
    return config


def make_producer(kafka_settings: Mapping[str, Any], **overrides: Any) -> KafkaProducer:
    """A ``KafkaProducer`` with :data:`PRODUCER_DEFAULTS`, then ``kafka_settings``, then
    ``overrides``. Keys and values are sent as given (``bytes``; no serializers by default)."""
    return KafkaProducer(**_merged("producer", PRODUCER_DEFAULTS, kafka_settings, overrides))


@cache
def _warn_if_slow_crc() -> None:
    if importlib.util.find_spec("crc32c") is None:
        log.warning(
            "the crc32c package is not installed: kafka-python checks record CRCs in pure Python, "
            "2-3x slower; pip install crc32c"
        )


def make_consumer(
    kafka_settings: Mapping[str, Any], group_id: str | None, **overrides: Any
) -> KafkaConsumer:
    """A ``KafkaConsumer`` in consumer group ``group_id``, subscribed to nothing yet.

    Settings: :data:`CONSUMER_DEFAULTS`, then ``kafka_settings``, then ``overrides`` (e.g.
    ``max_poll_records``, ``session_timeout_ms``); ``group_id`` wins over all of them. Offsets
    are committed by the caller (``enable_auto_commit=False``). ``group_id=None`` gives a
    consumer for manual ``assign`` without a group.
    """
    _warn_if_slow_crc()
    config = _merged("consumer", CONSUMER_DEFAULTS, kafka_settings, overrides)
    config["group_id"] = group_id
    return KafkaConsumer(**config)


def _wanted_topics(topics: Mapping[str, int] | Iterable[str], partitions: int) -> dict[str, int]:
    if isinstance(topics, str):
        raise ConfigError(
            f"topics must be a list or a dict of topic names, got the string {topics!r}"
        )
    wanted = dict(topics) if isinstance(topics, Mapping) else dict.fromkeys(topics, partitions)
    for name, count in wanted.items():
        if not isinstance(name, str) or not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
            raise ConfigError(
                f"invalid topic name {name!r}: use 1-249 of the characters A-Z a-z 0-9 . _ -"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(
                f"topic {name!r}: partitions must be a positive integer, got {count!r}"
            )
    return wanted


def ensure_topics(
    kafka_settings: Mapping[str, Any],
    topics: Mapping[str, int] | Iterable[str],
    partitions: int = 1,
    replication_factor: int = 1,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 30,
) -> None:
    """Create the topics that do not exist yet and wait until metadata shows them.

    Parameters
    ----------
    topics
        Topic names (each created with ``partitions`` partitions) or a dict name -> partitions.
    replication_factor
        For the topics created here; 1 suits a single broker, production clusters want 3.
    config
        Topic configs for the topics created here, e.g. ``{"cleanup.policy": "compact"}``. If the
        broker rejects them, the topic is created without them and a warning is logged. Tansu
        stores any config without validating or applying it (no compaction, no retention).
    timeout_s
        Deadline for creation and for the metadata to show every topic with a leader.

    Existing topics are left alone, configs included: when one has a different partition count
    than asked, a warning is logged and its count is accepted. Creating a topic that another
    process creates concurrently is not an error.

    Raises
    ------
    ConfigError
        For invalid names, partition counts or replication factors.
    kafka.errors.KafkaError
        When the broker refuses to create a topic for another reason.
    kafka.errors.KafkaTimeoutError
        When the topics are not all visible with leaders within ``timeout_s``.
    """
    wanted = _wanted_topics(topics, partitions)
    if isinstance(replication_factor, bool) or not (
        isinstance(replication_factor, int) and replication_factor >= 1
    ):
        raise ConfigError(
            f"replication_factor must be a positive integer, got {replication_factor!r}"
        )
    if not wanted:
        return
    topic_config = {str(key): str(value) for key, value in (config or {}).items()}
    deadline = time.monotonic() + timeout_s
    admin = KafkaAdminClient(**client_config(kafka_settings, "admin"))
    try:
        existing = set(admin.list_topics())
        created = _create_topics(
            admin,
            {name: count for name, count in wanted.items() if name not in existing},
            replication_factor,
            topic_config,
            timeout_ms=max(1000, int(timeout_s * 1000)),
        )
        _wait_for_topics(admin, wanted, created, deadline, timeout_s)
    finally:
        admin.close()


def _create_topics(
    admin: KafkaAdminClient,
    missing: Mapping[str, int],
    replication_factor: int,
    topic_config: Mapping[str, str],
    timeout_ms: int,
) -> set[str]:
    """Create ``missing``; the names this call created (not those created concurrently)."""
    if not missing:
        return set()

    def request(names: Iterable[str], configs: Mapping[str, str]) -> dict[str, Any]:
        new_topics = {
            name: {
                "num_partitions": missing[name],
                "replication_factor": replication_factor,
                "configs": dict(configs),
            }
            for name in names
        }
        response = admin.create_topics(new_topics, timeout_ms=timeout_ms, raise_errors=False)
        return {result["name"]: result for result in response["topics"]}

    created: set[str] = set()
    results = request(missing, topic_config)
    retry_without_config = []
    for name in missing:
        result = results.get(name)
        error = kafka_errors.for_code(result["error_code"]) if result else kafka_errors.NoError
        if error is kafka_errors.NoError:
            created.add(name)
        elif error is kafka_errors.TopicAlreadyExistsError:
            log.debug("topic %s was created concurrently", name)
        elif topic_config and issubclass(error, _TOPIC_CONFIG_ERRORS):
            log.warning(
                "broker rejected the configs %s of topic %s (%s: %s); creating it without them",
                sorted(topic_config),
                name,
                error.__name__,
                result.get("error_message"),
            )
            retry_without_config.append(name)
        else:
            raise _creation_error(name, error, result)
    if retry_without_config:
        for name, result in request(retry_without_config, {}).items():
            error = kafka_errors.for_code(result["error_code"])
            if error is kafka_errors.NoError:
                created.add(name)
            elif error is not kafka_errors.TopicAlreadyExistsError:
                raise _creation_error(name, error, result)
    if created:
        log.info("created topics %s", ", ".join(f"{n}[{missing[n]}]" for n in sorted(created)))
    return created


def _creation_error(name: str, error: type, result: Mapping[str, Any]) -> Exception:
    message = f"cannot create topic {name!r}: {error.__name__}: {result.get('error_message')}"
    if issubclass(error, _CONFIG_ERRORS):
        return ConfigError(message)
    return error(message)


def _wait_for_topics(
    admin: KafkaAdminClient,
    wanted: Mapping[str, int],
    created: set[str],
    deadline: float,
    timeout_s: float,
) -> None:
    pending = dict(wanted)
    while True:
        for topic in admin.describe_topics(list(pending)):
            name = topic["name"]
            partitions = topic.get("partitions") or []
            if (
                name not in pending
                or topic["error_code"] != 0
                or not partitions
                or any(p["leader_id"] < 0 for p in partitions)
            ):
                continue
            if len(partitions) == pending[name]:
                del pending[name]
            elif name not in created:
                log.warning(
                    "topic %s exists with %d partitions, not %d; leaving it as it is",
                    name,
                    len(partitions),
                    pending[name],
                )
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise kafka_errors.KafkaTimeoutError(
                f"topics not ready after {timeout_s:g} s (missing, without leader, or with fewer "
                f"partitions than asked): {sorted(pending)}"
            )
        time.sleep(0.05)


def highwater_lag(consumer: KafkaConsumer, timeout_ms: int = 0) -> dict[TopicPartition, int]:
    """Records not yet returned by ``poll``, per assigned partition: ``highwater - position``.

    The highwater mark is the one carried by the consumer's latest fetch response for the
    partition, so it costs no request; partitions not fetched yet (highwater ``None``) or
    without a known position are left out. ``end_offsets`` is not used because it sends a
    ListOffsets request per call, and the embedded broker (Tansu) answers "latest" with the
    base offset of the last batch instead of the log end, so the lag would be wrong.
    ``timeout_ms`` bounds the wait for a position still being looked up (by default there is
    no wait: cheap enough to call after every ``poll``, about 20 us per partition).

    A position beyond the highwater mark gives a lag of 0. That happens on Tansu after a broker
    restart (its log starts again at offset 0 and a fetch past the end returns no error, so a
    consumer that keeps its old position silently waits there); a real Kafka cluster answers
    OFFSET_OUT_OF_RANGE and the consumer resets per ``auto_offset_reset``.
    """
    lags: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        try:
            position = consumer.position(tp, timeout_ms=timeout_ms)
        except (kafka_errors.IllegalStateError, kafka_errors.KafkaTimeoutError):
            continue  # revoked meanwhile, or the position is still being looked up
        if position is None:
            continue
        lags[tp] = max(0, highwater - position)
    return lags
