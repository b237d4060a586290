"""Settings of the scoring daemon: the ``[serve]`` and ``[kafka]`` tables of the config file.

The file is the single source of truth; ``STREAM_L2AE_SERVE__BATCH_SIZE=2048`` or
``STREAM_L2AE_KAFKA__BOOTSTRAP_SERVERS=kafka:9092`` override it, and command-line flags override
both. ``[kafka]`` is handed to kafka-python as it is, which is how SSL and SASL are configured;
``[kafka.consumer]`` and ``[kafka.producer]`` hold settings for one client only.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stream_l2ae.config import coerce_to_fields, load_config
from stream_l2ae.errors import ConfigError

THRESHOLD_MODES = ("bundle", "streaming", "spot")
ONLINE_CLOCKS = ("records", "event_time")


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``stream-l2ae serve`` needs. See the README for each key."""

    input_topics: tuple[str, ...] = ("events",)
    group_id: str = "stream-l2ae"
    alerts_topic: str = "stream-l2ae-alerts"
    scores_topic: str | None = None
    dead_letter_topic: str = "stream-l2ae-dead-letters"
    model_dir: str = "models"
    checkpoint_dir: str = "checkpoints"
    checkpoint_interval_s: float = 30.0
    model_poll_interval_s: float = 5.0
    #: Most records per poll. Large enough that one poll takes everything a fetch brought in,
    #: so kafka-python sends the next fetch at once and it travels while the batch is scored.
    batch_size: int = 65_536
    poll_timeout_ms: int = 200
    max_record_bytes: int = 1_048_576
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9108
    online_update: bool = True
    online_clock: str = "records"
    threshold: str = "bundle"
    replica_id: str = field(default_factory=socket.gethostname)
    torch_threads: int | None = 1
    device: str = "auto"
    model_updates_topic: str | None = "stream-l2ae-model-updates"
    state_topic: str | None = None
    state_publish_interval_s: float = 10.0
    peer_timeout_s: float = 120.0
    drift_rate_factor: float = 3.0
    drift_persist_s: float = 60.0
    drift_event_interval_s: float = 300.0
    retry_backoff_initial_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    kafka: dict[str, Any] = field(default_factory=lambda: {"bootstrap_servers": "localhost:9092"})

    def __post_init__(self) -> None:
        topics = self.input_topics
        if isinstance(topics, str):
            topics = tuple(t.strip() for t in topics.split(",") if t.strip())
        object.__setattr__(self, "input_topics", tuple(topics))
        if not self.input_topics:
            raise ConfigError("input_topics must name at least one topic")
        outputs = {
            self.alerts_topic,
            self.dead_letter_topic,
            self.scores_topic,
            self.state_topic,
            self.model_updates_topic,
        } - {None}
        looping = outputs & set(self.input_topics)
        if looping:
            raise ConfigError(f"topic {sorted(looping)[0]!r} is both an input and an output")
        for name in ("batch_size", "poll_timeout_ms", "max_record_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a port number, got {self.metrics_port!r}")
        for name in ("checkpoint_interval_s", "model_poll_interval_s", "retry_backoff_initial_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.threshold not in THRESHOLD_MODES:
            raise ConfigError(f"threshold must be one of {THRESHOLD_MODES}, got {self.threshold!r}")
        if self.online_clock not in ONLINE_CLOCKS:
            raise ConfigError(
                f"online_clock must be one of {ONLINE_CLOCKS}, got {self.online_clock!r}"
            )
        if self.state_topic and self.online_clock != "event_time":
            raise ConfigError(
                "replicas sharing centroids through state_topic must decay on the same clock: "
                f"set online_clock = 'event_time' (got {self.online_clock!r})"
            )
        if not isinstance(self.kafka, dict) or not self.kafka.get("bootstrap_servers"):
            raise ConfigError("[kafka] bootstrap_servers must be set")

    @property
    def bootstrap_servers(self) -> str:
        servers = self.kafka["bootstrap_servers"]
        return servers if isinstance(servers, str) else ",".join(servers)

    def client_settings(self, role: str) -> dict[str, Any]:
        """``[kafka]`` without the per-client subtables, plus the subtable of ``role``."""
        common = {k: v for k, v in self.kafka.items() if not isinstance(v, dict)}
        return {**common, **self.kafka.get(role, {})}

    def checkpoint_path(self) -> Path:
        return Path(self.checkpoint_dir) / self.group_id

    def with_overrides(self, **overrides: Any) -> ServeSettings:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        kafka_overrides = overrides.pop("kafka", None)
        settings = replace(self, **overrides)
        if kafka_overrides:
            settings = replace(settings, kafka={**settings.kafka, **kafka_overrides})
        return settings


def load_serve_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> ServeSettings:
    """``[serve]`` and ``[kafka]`` of the config file, with the environment and ``overrides``.

    Examples
    --------
    >>> s = load_serve_settings(environ={"STREAM_L2AE_SERVE__BATCH_SIZE": "512"},
    ...                         input_topics="sensors")
    >>> s.batch_size, s.input_topics, s.bootstrap_servers
    (512, ('sensors',), 'localhost:9092')
    """
    config = load_config(path, environ=environ)
    serve = dict(config.get("serve", {}))
    known = {f.name for f in fields(ServeSettings)}
    unknown = set(serve) - known
    if unknown:
        raise ConfigError(f"unknown [serve] settings {sorted(unknown)}; known: {sorted(known)}")
    kafka = {"bootstrap_servers": "localhost:9092", **config.get("kafka", {})}
    settings = ServeSettings(**coerce_to_fields(serve, ServeSettings), kafka=kafka)
    return settings.with_overrides(**overrides)
