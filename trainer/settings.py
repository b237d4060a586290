"""Settings of the retraining job: the ``[retrain]`` table, with ``[kafka]``, ``[model]``,
``[detector]`` and the input topics of ``[serve]`` from the same config file."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from stream_l2ae.config import coerce_to_fields, load_config
from stream_l2ae.errors import ConfigError


@dataclass(frozen=True)
class RetrainSettings:
    """Everything ``stream-l2ae retrain`` needs; see the README for each key."""

    input_topics: tuple[str, ...] = ("events",)
    data: str | None = None
    last_n: int | None = 50_000
    since_s: float | None = None
    exclude_alerts: bool = True
    alerts_topic: str = "stream-l2ae-alerts"
    holdout_fraction: float = 0.2
    margin: float = 0.02
    # Unlabelled criteria are noisy from one window to the next: wider margins for these two.
    margins: dict[str, float] = field(
        default_factory=lambda: {"score_separation": 0.25, "cluster_stability": 0.1}
    )
    model_dir: str = "models"
    keep: int = 5
    model_updates_topic: str | None = "stream-l2ae-model-updates"
    cooldown_s: float = 3600.0
    label_header: str = "label"
    detector: dict[str, Any] = field(default_factory=dict)
    kafka: dict[str, Any] = field(default_factory=lambda: {"bootstrap_servers": "localhost:9092"})

    def __post_init__(self) -> None:
        topics = self.input_topics
        if isinstance(topics, str):
            topics = tuple(t.strip() for t in topics.split(",") if t.strip())
        object.__setattr__(self, "input_topics", tuple(topics))
        if self.data is None and not self.input_topics:
            raise ConfigError("retrain needs input_topics or a data file")
        if self.last_n is not None and self.last_n < 10:
            raise ConfigError(f"last_n must be >= 10, got {self.last_n!r}")
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ConfigError(
                f"holdout_fraction must be in (0, 0.9), got {self.holdout_fraction!r}"
            )
        if not 0.0 <= self.margin < 1.0:
            raise ConfigError(f"margin must be in [0, 1), got {self.margin!r}")
        if self.keep < 1:
            raise ConfigError(f"keep must be >= 1, got {self.keep!r}")
        if self.cooldown_s < 0:
            raise ConfigError(f"cooldown_s must be >= 0, got {self.cooldown_s!r}")

    def with_overrides(self, **overrides: Any) -> RetrainSettings:
        overrides = {k: v for k, v in overrides.items() if v is not None}
        kafka = overrides.pop("kafka", None)
        settings = replace(self, **overrides)
        return replace(settings, kafka={**settings.kafka, **kafka}) if kafka else settings

    def client_settings(self, role: str) -> dict[str, Any]:
        common = {k: v for k, v in self.kafka.items() if not isinstance(v, dict)}
        return {**common, **self.kafka.get(role, {})}


def load_retrain_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None, **overrides: Any
) -> RetrainSettings:
    """``[retrain]`` of the config file, completed from ``[serve]``, ``[model]``, ``[detector]``.

    Examples
    --------
    >>> s = load_retrain_settings(environ={"STREAM_L2AE_RETRAIN__LAST_N": "1000"})
    >>> s.last_n, s.model_dir
    (1000, 'models')
    """
    config = load_config(path, environ=environ)
    retrain = dict(config.get("retrain", {}))
    known = {f.name for f in fields(RetrainSettings)}
    unknown = set(retrain) - known
    if unknown:
        raise ConfigError(f"unknown [retrain] settings {sorted(unknown)}; known: {sorted(known)}")
    serve = config.get("serve", {})
    for key in ("input_topics", "alerts_topic"):
        if key not in retrain and key in serve:
            retrain[key] = serve[key]
    retrain.setdefault("model_dir", config["model"]["dir"])
    retrain.setdefault("keep", config["model"]["keep"])
    retrain.setdefault("detector", dict(config.get("detector", {})))
    kafka = {"bootstrap_servers": "localhost:9092", **config.get("kafka", {})}
    retrain = coerce_to_fields(retrain, RetrainSettings)
    return RetrainSettings(**retrain, kafka=kafka).with_overrides(**overrides)
