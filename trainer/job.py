"""The retraining job: ``stream-l2ae retrain`` once, or ``--on-drift`` as a long-running loop.

One run reads a training window (the newest records of the input topics, or a file), trains a
candidate with the contamination-robust procedure of the library (on CUDA when present), scores
the newest part of the window with the candidate and the model in service, and promotes the
candidate only if the gate says it is not worse. A promoted model becomes a new version in the
model directory (written atomically, ``LATEST`` moved, old versions pruned), and a notification
goes to the model-updates topic. Running daemons pick the new version up between two batches.

The time of the last retrain is kept in ``<model_dir>/retrain-state.json`` so that drift-driven
retrains respect a cool-down across processes and restarts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError

from stream_l2ae.bundle import latest_version
from stream_l2ae.datasets import Dataset
from stream_l2ae.detector import DetectorConfig, L2AEDetector
from stream_l2ae.errors import BundleError, ConfigError
from stream_l2ae.training import is_main_process

from .gate import GateDecision, compare_models
from .settings import RetrainSettings
from .window import read_file_window, read_window

log = logging.getLogger("stream_l2ae.trainer")

STATE_FILE = "retrain-state.json"
DECISIONS_FILE = "decisions.jsonl"


@dataclass
class RetrainResult:
    promoted: bool
    version: str | None
    decision: GateDecision
    n_train: int
    n_holdout: int
    seconds: float


def _kafka_config(settings: RetrainSettings, client_class: type, role: str) -> dict[str, Any]:
    accepted = set(client_class.DEFAULT_CONFIG)
    return {k: v for k, v in settings.client_settings(role).items() if k in accepted}


def load_window(
    settings: RetrainSettings, *, progress: bool = True, alerted_rows: list[int] | None = None
) -> Dataset:
    if settings.data is not None:
        return read_file_window(settings.data, last_n=settings.last_n)
    since_ms = None
    if settings.since_s is not None:
        since_ms = int((time.time() - settings.since_s) * 1000)
    return read_window(
        settings.client_settings("consumer"),
        list(settings.input_topics),
        last_n=settings.last_n,
        since_ms=since_ms,
        exclude_alerts_topic=settings.alerts_topic if settings.exclude_alerts else None,
        label_header=settings.label_header,
        progress=progress,
        order="time",  # so that the holdout is the newest records across partitions
        alerted_rows=alerted_rows,
    )


def _without_alerted(train: Dataset, alerted: list[int]) -> Dataset:
    """The training part without the records the model in service alerted on.

    Only the training part: the holdout keeps them, or the gate would compare the two models on
    data from which the current model's alerts had been removed.
    """
    drop = [i for i in alerted if i < len(train)]
    if not drop or train.records is None:
        return train
    keep = np.ones(len(train), dtype=bool)
    keep[drop] = False
    records = [record for record, kept in zip(train.records, keep, strict=True) if kept]
    y = train.y[keep] if train.y is not None else None
    description = {**train.description, "n": len(records), "excluded_alerts": len(drop)}
    return Dataset(train.name, records=records, y=y, description=description)


def _current_model(model_dir: str) -> L2AEDetector | None:
    try:
        if latest_version(model_dir) is None:
            return None
        return L2AEDetector.load(model_dir)
    except (BundleError, OSError) as exc:
        log.warning(
            "the model in service cannot be loaded (%s): the candidate is compared with nothing",
            exc,
        )
        return None


def read_state(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_state(model_dir: str | Path, state: dict[str, Any]) -> None:
    path = Path(model_dir)
    path.mkdir(parents=True, exist_ok=True)
    temporary = path / f".{STATE_FILE}.{os.getpid()}"
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path / STATE_FILE)


def notify(settings: RetrainSettings, message: dict[str, Any]) -> None:
    """Publish ``message`` to the model-updates topic and wait for the acknowledgement."""
    if not settings.model_updates_topic:
        return
    try:
        producer = KafkaProducer(**_kafka_config(settings, KafkaProducer, "producer"))
        try:
            producer.send(
                settings.model_updates_topic,
                key=message["type"].encode(),
                value=orjson.dumps(message),
            ).get(timeout=30)
        finally:
            producer.close(timeout=10)
    except KafkaError as exc:
        # The version is saved and LATEST moved: daemons find it by polling the model directory.
        log.warning(
            "could not publish to %s (%s); daemons still pick the model up",
            settings.model_updates_topic,
            exc,
        )


def retrain(
    settings: RetrainSettings, *, progress: bool = True, reason: str = "schedule"
) -> RetrainResult:
    """Train a candidate on the newest window and promote it if the gate allows."""
    started = time.perf_counter()
    alerted: list[int] = []
    window = load_window(settings, progress=progress, alerted_rows=alerted)
    n_holdout = max(1, int(len(window) * settings.holdout_fraction))
    if len(window) - n_holdout < 10:
        raise ConfigError(f"the training window holds only {len(window)} records")
    train, holdout = window.split(len(window) - n_holdout)
    train = _without_alerted(train, alerted)
    print(
        f"retrain ({reason}): {len(train):,} records to train, {len(holdout):,} to compare",
        file=sys.stderr,
    )
    config = DetectorConfig.from_dict(dict(settings.detector))
    candidate = L2AEDetector(config, progress=progress).fit(train)
    if not is_main_process():
        return RetrainResult(False, None, None, len(train), len(holdout), 0.0)
    current = _current_model(settings.model_dir)
    decision = compare_models(
        current, candidate, holdout, margin=settings.margin, margins=dict(settings.margins)
    )
    print(decision.table())
    record = {
        "at": time.time(),
        "reason": reason,
        "promote": decision.promote,
        "current": getattr(current, "version", None),
        "gate": decision.to_dict(),
    }
    version = None
    if decision.promote:
        bundle = candidate.save(
            settings.model_dir,
            metadata={"data": train.description, "gate": decision.to_dict(), "reason": reason},
            keep=settings.keep,
        )
        version = bundle.version
        record["version"] = version
        print(f"promoted {version} (was {record['current']})")
        notify(
            settings,
            {
                "type": "model",
                "version": version,
                "path": str(bundle.path),
                "previous": record["current"],
                "reason": reason,
                "created_at": bundle.manifest.get("created_at"),
            },
        )
    else:
        print(f"kept {record['current']}: " + "; ".join(decision.reasons))
    Path(settings.model_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(settings.model_dir) / DECISIONS_FILE, "ab") as decisions:
        decisions.write(orjson.dumps(record) + b"\n")
    _write_state(
        settings.model_dir,
        {
            "last_retrain_at": record["at"],
            "reason": reason,
            "promoted": decision.promote,
            "version": version,
        },
    )
    return RetrainResult(
        decision.promote, version, decision, len(train), len(holdout), time.perf_counter() - started
    )


def cooling_down(settings: RetrainSettings, now: float | None = None) -> float:
    """Seconds left in the cool-down after the last retrain (0 when a retrain may run)."""
    last = read_state(settings.model_dir).get("last_retrain_at")
    if last is None:
        return 0.0
    now = time.time() if now is None else now
    return max(0.0, settings.cooldown_s - (now - last))


def watch_drift(
    settings: RetrainSettings,
    *,
    progress: bool = False,
    stop_after: int | None = None,
    idle_timeout_s: float | None = None,
) -> int:
    """Retrain when a daemon reports persistent drift on the model-updates topic.

    Drift events that arrive during the cool-down are acknowledged in the log and ignored.
    Returns the number of retrains run (``stop_after`` and ``idle_timeout_s`` end the loop, for
    tests and one-shot use).
    """
    if not settings.model_updates_topic:
        raise ConfigError("--on-drift needs a model_updates_topic")
    consumer = KafkaConsumer(
        **_kafka_config(settings, KafkaConsumer, "consumer"),
        group_id=None,
        enable_auto_commit=False,
    )
    partitions = consumer.partitions_for_topic(settings.model_updates_topic) or {0}
    assigned = [TopicPartition(settings.model_updates_topic, p) for p in sorted(partitions)]
    consumer.assign(assigned)
    # Skip history: start from each partition's high watermark, learnt from one fetch.
    consumer.seek_to_beginning(*assigned)
    consumer.poll(timeout_ms=1000, max_records=1)
    for tp in assigned:
        highwater = consumer.highwater(tp)
        if highwater is not None:
            consumer.seek(tp, highwater)
    runs, last_event = 0, time.monotonic()
    print(f"watching {settings.model_updates_topic} for drift events", file=sys.stderr)
    try:
        while stop_after is None or runs < stop_after:
            if idle_timeout_s is not None and time.monotonic() - last_event > idle_timeout_s:
                break
            polled = consumer.poll(timeout_ms=500)
            events = []
            for record in (r for rs in polled.values() for r in rs):
                try:
                    events.append(orjson.loads(record.value))
                except (orjson.JSONDecodeError, TypeError):
                    log.warning("ignoring a malformed record on %s", settings.model_updates_topic)
            drift = [e for e in events if isinstance(e, dict) and e.get("type") == "drift"]
            if not drift:
                continue
            last_event = time.monotonic()
            left = cooling_down(settings)
            if left > 0:
                log.info(
                    "drift reported by %s; cooling down for %.0f s more",
                    drift[-1].get("replica"),
                    left,
                )
                continue
            try:
                retrain(settings, progress=progress, reason="drift")
            except Exception:  # a failed retrain must not end the watcher; the next event retries
                log.exception("retrain on drift failed")
                continue
            runs += 1
    finally:
        consumer.close()
    return runs
