"""The retraining job against the embedded broker: a topic window, the gate, notifications,
and a drift in the stream that triggers exactly one retrain within the cool-down."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers.produce import produce_dataset
from consumers.settings import ServeSettings
from stream_l2ae.bundle import list_versions
from stream_l2ae.datasets import Dataset, load_dataset
from stream_l2ae.detector import L2AEDetector
from tests.kafka_fixtures import DaemonThread
from trainer.job import DECISIONS_FILE, cooling_down, retrain, watch_drift
from trainer.settings import RetrainSettings

SMALL = {"epochs": 3, "n_clusters": 5, "n_init": 2}


def read_all(settings: dict, topic: str, timeout_s: float = 5.0) -> list[dict]:
    consumer = KafkaConsumer(**settings, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    values, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        polled = consumer.poll(timeout_ms=300)
        values += [orjson.loads(r.value) for rs in polled.values() for r in rs]
        if values and not polled:
            break
    consumer.close()
    return values


def decisions(model_dir) -> list[dict]:
    path = model_dir / DECISIONS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_retrain_from_a_topic_window(kafka_settings, topic_factory, tmp_path):
    events, updates = topic_factory(2), topic_factory(1)
    shuttle = load_dataset("shuttle", limit=4000)
    produce_dataset(kafka_settings, shuttle, events, progress=False)
    settings = RetrainSettings(
        input_topics=(events,),
        last_n=3000,
        model_dir=str(tmp_path / "models"),
        model_updates_topic=updates,
        exclude_alerts=False,
        detector=SMALL,
        kafka=kafka_settings,
    )
    first = retrain(settings, progress=False)
    assert first.promoted and first.version is not None
    assert first.n_train + first.n_holdout == 3000
    assert list_versions(settings.model_dir) == [first.version]
    notices = read_all(kafka_settings, updates)
    assert [n["type"] for n in notices] == ["model"] and notices[0]["version"] == first.version

    second = retrain(settings, progress=False)
    rows = {row["criterion"] for row in second.decision.rows}
    assert {"reconstruction_loss", "score_separation", "cluster_stability", "auc"} <= rows
    assert len(decisions(tmp_path / "models")) == 2
    assert len(list_versions(settings.model_dir)) == 1 + int(second.promoted)
    assert cooling_down(settings.with_overrides(cooldown_s=3600)) > 3000


def test_gate_refuses_a_candidate_trained_on_noise(kafka_settings, tmp_path):
    shuttle = load_dataset("shuttle", limit=6000)
    model_dir = tmp_path / "models"
    L2AEDetector(epochs=5, n_clusters=10, n_init=2, progress=False).fit(shuttle.head(5000)).save(
        model_dir
    )
    rng = np.random.default_rng(0)
    noise = [
        {k: float(v) for k, v in zip(shuttle.records[0], row, strict=True)}
        for row in rng.normal(0, 1000, size=(6000, 9))
    ]
    window = tmp_path / "noise.jsonl"
    window.write_text(
        "\n".join(
            json.dumps({**r, "label": int(y)})
            for r, y in zip(
                noise[:4800] + shuttle.records[4800:],
                np.r_[np.zeros(4800), shuttle.y[4800:]],
                strict=True,
            )
        )
    )
    settings = RetrainSettings(
        data=str(window),
        last_n=None,
        holdout_fraction=0.2,
        model_dir=str(model_dir),
        model_updates_topic=None,
        detector=SMALL,
        kafka=kafka_settings,
    )
    result = retrain(settings, progress=False)
    assert not result.promoted
    assert result.decision.reasons
    assert len(list_versions(model_dir)) == 1


def test_drift_triggers_exactly_one_retrain(kafka_settings, topic_factory, tmp_path):
    events, updates = topic_factory(1), topic_factory(1)
    shuttle = load_dataset("shuttle", limit=8000)
    model_dir = tmp_path / "models"
    L2AEDetector(epochs=5, n_clusters=10, n_init=2, alert_rate=0.02, progress=False).fit(
        shuttle.head(5000)
    ).save(model_dir)
    serve = ServeSettings(
        input_topics=(events,),
        group_id=f"g-{time.time_ns()}",
        alerts_topic=topic_factory(1),
        dead_letter_topic=topic_factory(1),
        model_updates_topic=updates,
        model_dir=str(model_dir),
        checkpoint_dir=str(tmp_path / "ckpt"),
        metrics_port=0,
        batch_size=500,
        drift_persist_s=1.0,
        drift_event_interval_s=0.2,
        kafka=kafka_settings,
        online_update=False,
    )
    server = DaemonThread(serve).start()
    daemon = server.daemon
    retrain_settings = RetrainSettings(
        input_topics=(events,),
        last_n=2000,
        model_dir=str(model_dir),
        model_updates_topic=updates,
        exclude_alerts=False,
        cooldown_s=3600,
        detector=SMALL,
        kafka=kafka_settings,
    )
    runs: list[int] = []
    watcher = threading.Thread(
        target=lambda: runs.append(watch_drift(retrain_settings, idle_timeout_s=8.0)), daemon=True
    )
    watcher.start()
    try:
        produce_dataset(kafka_settings, shuttle.split(5000)[1].head(1500), events, progress=False)
        shifted = [{k: v * 5 + 100 for k, v in r.items()} for r in shuttle.records[6500:8000]]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.metrics.drift_active._value.get() < 1:
            produce_dataset(
                kafka_settings, Dataset("shift", records=shifted), events, progress=False
            )
            time.sleep(0.5)
        assert daemon.metrics.drift_active._value.get() == 1
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.metrics.drift_events._value.get() < 3:
            produce_dataset(
                kafka_settings, Dataset("shift", records=shifted), events, progress=False
            )
            time.sleep(0.3)
        assert daemon.metrics.drift_events._value.get() >= 3
        watcher.join(timeout=120)
        assert not watcher.is_alive()
    finally:
        server.finish(timeout=30)
    assert runs == [1]
    assert [d["reason"] for d in decisions(model_dir)] == ["drift"]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_running_daemon_swaps_to_the_promoted_version(kafka_settings, topic_factory, tmp_path):
    events, scores, updates = topic_factory(2), topic_factory(2), topic_factory(1)
    shuttle = load_dataset("shuttle", limit=9000)
    model_dir = tmp_path / "models"
    first = L2AEDetector(**SMALL, progress=False).fit(shuttle.head(3000)).save(model_dir)
    serve = ServeSettings(
        input_topics=(events,),
        group_id=f"g-{time.time_ns()}",
        alerts_topic=topic_factory(1),
        dead_letter_topic=topic_factory(1),
        scores_topic=scores,
        model_updates_topic=updates,
        model_dir=str(model_dir),
        checkpoint_dir=str(tmp_path / "ckpt"),
        metrics_port=0,
        batch_size=256,
        model_poll_interval_s=0.2,
        kafka=kafka_settings,
    )
    server = DaemonThread(serve).start()
    daemon = server.daemon
    stream = shuttle.split(3000)[1]
    producer = threading.Thread(
        target=produce_dataset,
        args=(kafka_settings, stream, events),
        kwargs={"rate": 1500, "progress": False},
        daemon=True,
    )
    try:
        producer.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and daemon.records_seen < 600:
            time.sleep(0.1)  # the first model scores part of the stream
        result = retrain(
            RetrainSettings(
                input_topics=(events,),
                last_n=1500,
                model_dir=str(model_dir),
                model_updates_topic=updates,
                exclude_alerts=False,
                margin=0.99,
                margins={},
                detector=SMALL,
                kafka=kafka_settings,
            ),
            progress=False,
        )
        producer.join(timeout=60)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and daemon.records_seen < len(stream):
            time.sleep(0.2)
    finally:
        server.finish(timeout=30)
    assert result.promoted, result.decision.table()
    assert daemon.detector.version == result.version != first.version
    assert daemon.metrics.model_swaps._value.get() == 1
    assert daemon.records_seen == len(stream)
    published = []
    consumer = KafkaConsumer(**kafka_settings, enable_auto_commit=False)
    tps = [TopicPartition(scores, p) for p in range(2)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    while len(published) < len(stream):
        polled = consumer.poll(timeout_ms=2000)
        if not polled:
            break
        published += [orjson.loads(r.value) for rs in polled.values() for r in rs]
    consumer.close()
    keys = [doc["source"]["key"] for doc in published]
    assert len(keys) == len(set(keys)) == len(stream)  # nothing lost, nothing scored twice
    versions = {doc["model_version"] for doc in published}
    assert versions == {first.version, result.version}
