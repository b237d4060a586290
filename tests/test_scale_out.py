"""Scale-out: replicas in one consumer group split the partitions and share their centroids."""

from __future__ import annotations

import threading
import time

import numpy as np
import orjson
import pytest
import torch
from kafka import KafkaConsumer, TopicPartition

from consumers.produce import produce_dataset
from consumers.serve_process import start_serve, write_serve_config
from consumers.settings import ServeSettings
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.errors import ConfigError
from tests.kafka_fixtures import DaemonThread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    L2AEDetector(epochs=3, n_clusters=5, n_init=2, progress=False).fit(
        load_dataset("shuttle", limit=5000)
    ).save(root)
    torch.set_num_threads(threads)
    return root


def read_topic(kafka_settings: dict, topic: str, partitions: int, idle_s: float = 3.0) -> list:
    consumer = KafkaConsumer(**kafka_settings, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out, last = [], time.monotonic()
    while time.monotonic() - last < idle_s:
        polled = consumer.poll(timeout_ms=300)
        for records in polled.values():
            out += [orjson.loads(r.value) for r in records]
            last = time.monotonic()
    consumer.close()
    return out


def test_sharing_state_needs_event_time():
    with pytest.raises(ConfigError, match="event_time"):
        ServeSettings(state_topic="state", online_clock="records")


def test_three_replicas_score_each_record_once_and_converge(
    kafka_settings, topic_factory, model_dir, tmp_path
):
    events = topic_factory(3)
    scores = topic_factory(3)
    state = topic_factory(1)
    group = f"replicas-{time.time_ns()}"
    replicas = [
        DaemonThread(
            ServeSettings(
                input_topics=(events,),
                group_id=group,
                replica_id=f"r{i}",
                alerts_topic=topic_factory(1),
                dead_letter_topic=topic_factory(1),
                scores_topic=scores,
                state_topic=state,
                online_clock="event_time",
                state_publish_interval_s=0.3,
                model_updates_topic=None,
                model_dir=str(model_dir),
                checkpoint_dir=str(tmp_path / "ckpt"),
                batch_size=512,
                metrics_port=0,
                kafka=kafka_settings,
            )
        ).start()
        for i in range(3)
    ]
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            r.daemon.consumer is not None and r.daemon.consumer.assignment() for r in replicas
        ):
            time.sleep(0.2)
        stream = load_dataset("shuttle", limit=12000).split(5000)[1]
        produce_dataset(kafka_settings, stream, events, progress=False)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and sum(r.daemon.records_seen for r in replicas) < len(
            stream
        ):
            time.sleep(0.2)
        assert sum(r.daemon.records_seen for r in replicas) == len(stream)
        assert sum(1 for r in replicas if r.daemon.records_seen) >= 2  # the work was split
        time.sleep(2.0)  # a few publish/merge rounds after the last batch
        centroids = [r.daemon.detector.online.centroids for r in replicas]
    finally:
        for replica in replicas:
            replica.finish()
    published = read_topic(kafka_settings, scores, 3)
    keys = [doc["source"]["key"] for doc in published]
    assert len(keys) == len(stream) and len(set(keys)) == len(stream)  # exactly once
    for other in centroids[1:]:
        np.testing.assert_allclose(other, centroids[0], atol=1e-6)
    assert not np.allclose(centroids[0], replicas[0].daemon.detector.online.initial_centroids)


def _write_replica_config(
    path, *, kafka_settings, events, scores, state, group, model_dir, replica, port, workdir
) -> None:
    write_serve_config(
        path,
        {
            "input_topics": [events],
            "group_id": group,
            "replica_id": replica,
            "alerts_topic": f"{events}-alerts",
            "dead_letter_topic": f"{events}-dead",
            "scores_topic": scores,
            "state_topic": state,
            "online_clock": "event_time",
            "state_publish_interval_s": 0.5,
            "model_dir": model_dir,
            "checkpoint_dir": workdir / "ckpt",
            "metrics_port": port,
            "metrics_host": "127.0.0.1",
            "batch_size": 256,
            "checkpoint_interval_s": 1.0,
        },
        {"bootstrap_servers": kafka_settings["bootstrap_servers"]},
        {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
    )


def test_a_killed_replica_loses_no_record(kafka_settings, topic_factory, model_dir, tmp_path):
    import signal
    import subprocess

    from consumers.demo import scrape
    from consumers.embedded_broker import free_port
    from consumers.kafka_io import ensure_topics

    events, scores, state = topic_factory(3), topic_factory(3), topic_factory(1)
    ensure_topics(kafka_settings, {f"{events}-alerts": 1, f"{events}-dead": 1})
    group = f"killed-{time.time_ns()}"
    processes, ports = [], []
    for i in range(3):
        port = free_port()
        config = tmp_path / f"r{i}.toml"
        _write_replica_config(
            config,
            kafka_settings=kafka_settings,
            events=events,
            scores=scores,
            state=state,
            group=group,
            model_dir=model_dir,
            replica=f"r{i}",
            port=port,
            workdir=tmp_path,
        )
        processes.append(start_serve(config, tmp_path / f"r{i}.log", threads=1))
        ports.append(port)

    def consumed(port: int) -> float:
        try:
            return scrape(port).get("stream_l2ae_records_consumed_total", 0.0)
        except OSError:
            return 0.0

    try:
        stream = load_dataset("shuttle", limit=20000).split(5000)[1]
        producer = threading.Thread(
            target=produce_dataset,
            args=(kafka_settings, stream, events),
            kwargs={"rate": 3000, "progress": False},
            daemon=True,
        )
        producer.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and consumed(ports[0]) < 500:
            time.sleep(0.2)
        assert consumed(ports[0]) >= 500, (tmp_path / "r0.log").read_text()[-2000:]
        processes[0].send_signal(signal.SIGKILL)  # mid-stream, without a goodbye
        processes[0].wait(timeout=10)
        producer.join(timeout=60)
        expected = {str(i) for i in range(len(stream))}  # produce_dataset keys by index
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not expected <= seen:
            seen |= {doc["source"]["key"] for doc in read_topic(kafka_settings, scores, 3, 1.5)}
        assert expected <= seen, f"{len(expected - seen)} records never scored"
    finally:
        for process in processes[1:]:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def test_a_silent_replica_stops_counting(kafka_settings, topic_factory):
    from consumers.state_sync import CentroidStateSync
    from stream_l2ae.online import OnlineCentroids

    state = topic_factory(1)
    centroids = np.eye(3)
    a, b = OnlineCentroids(centroids), OnlineCentroids(centroids)
    b.partial_fit(np.array([[1.0, 1.0, 0.0]] * 10), np.zeros(10, dtype=int))
    sync_b = CentroidStateSync(kafka_settings, state, "b", peer_timeout_s=5.0)
    sync_a = CentroidStateSync(kafka_settings, state, "a", peer_timeout_s=5.0)
    try:
        sync_b.publish(b, "v1")
        assert sync_a.catch_up(a, "v1") == 1
        assert "b" in a.peers and a.counts[0] == pytest.approx(10.0, rel=0.01)
        time.sleep(5.2)
        sync_a.merge(a, "v1")
        assert "b" not in a.peers and a.counts[0] == 0.0
    finally:
        sync_a.close()
        sync_b.close()
