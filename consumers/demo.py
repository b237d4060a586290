"""``stream-l2ae demo``: the whole pipeline on one machine, with one command.

It starts the embedded Tansu broker (or uses ``--bootstrap-servers``), trains a model on the first
part of the Shuttle stream (or uses ``--bundle``), starts ``stream-l2ae serve`` as a child
process, replays the rest of Shuttle into it, shows live progress read from the daemon's metrics
endpoint, and ends with a summary scored against the labels. It stops everything it started.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from tqdm.auto import tqdm

from stream_l2ae.bundle import latest_version
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.errors import ConfigError
from stream_l2ae.evaluation import precision_recall_at, roc_auc

from .embedded_broker import EmbeddedBroker, free_port
from .kafka_io import ensure_topics
from .produce import produce_dataset
from .serve_process import start_serve, write_serve_config

DEMO_PARTITIONS = 2
STREAM_TIMEOUT_S = 900


def scrape(port: int) -> dict[str, float]:
    """Sum of each sample name on the daemon's metrics endpoint (labels summed over)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


def _batch_rate(metrics: dict[str, float]) -> float:
    """Records consumed over the time spent processing batches, from the daemon's metrics."""
    seconds = metrics.get("stream_l2ae_batch_duration_seconds_sum", 0.0)
    consumed = metrics.get("stream_l2ae_records_consumed_total", 0.0)
    return consumed / seconds if seconds > 0 else float("nan")


def _read_scores(bootstrap: str, topic: str, expected: int, timeout_s: float) -> dict[int, dict]:
    """Every score on ``topic`` by source key, deduplicated (the daemon is at-least-once)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=50 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    partitions = [TopicPartition(topic, p) for p in range(DEMO_PARTITIONS)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    scores: dict[int, dict] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(scores) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=10_000).values():
                for record in records:
                    document = orjson.loads(record.value)
                    scores[int(document["source"]["key"])] = document
    finally:
        consumer.close()
    return scores


def run_streaming_demo(
    *,
    bootstrap_servers: str | None = None,
    bundle: str | None = None,
    epochs: int = 20,
    alert_rate: float = 0.05,
    rate: float | None = None,
    train_fraction: float = 0.4,
    progress: bool = True,
) -> dict[str, float]:
    if not 0.0 < train_fraction < 1.0:
        raise ConfigError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    if rate is not None and not rate > 0:
        raise ConfigError(f"rate must be > 0 records/s, got {rate!r}")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs!r}")
    if bundle is not None and latest_version(bundle) is None:
        raise ConfigError(f"no model bundle at {bundle!r}: expected a model root with LATEST")
    workdir = Path(tempfile.mkdtemp(prefix="stream-l2ae-demo-"))
    broker = None
    daemon = None
    say = print if progress else (lambda *a, **k: None)
    try:
        if bootstrap_servers is None:
            say("Starting the embedded Tansu broker...", file=sys.stderr)
            broker = EmbeddedBroker().start()
            bootstrap_servers = broker.bootstrap_servers
        kafka = {"bootstrap_servers": bootstrap_servers}
        run = uuid.uuid4().hex[:6]
        topics = {
            "run": run,
            "input": f"shuttle-{run}",
            "alerts": f"alerts-{run}",
            "scores": f"scores-{run}",
            "dead": f"dead-letters-{run}",
        }
        ensure_topics(
            kafka, {topics[k]: DEMO_PARTITIONS for k in ("input", "alerts", "scores", "dead")}
        )
        say(
            f"Broker {bootstrap_servers}, topics {topics['input']} -> {topics['alerts']}",
            file=sys.stderr,
        )

        shuttle = load_dataset("shuttle")
        n_train = int(len(shuttle) * train_fraction)
        model_dir = Path(bundle) if bundle else workdir / "models"
        if not bundle:
            train = shuttle.head(n_train)
            say(
                f"Training on the first {n_train:,} Shuttle records (labels unused)...",
                file=sys.stderr,
            )
            detector = L2AEDetector(epochs=epochs, alert_rate=alert_rate, progress=progress)
            detector.fit(train).save(model_dir, metadata={"data": train.description})
        stream = shuttle
        n_stream = len(shuttle) - n_train

        metrics_port = free_port()
        config = write_serve_config(
            workdir / "demo.toml",
            {
                "input_topics": [topics["input"]],
                "group_id": f"demo-{topics['run']}",
                "alerts_topic": topics["alerts"],
                "scores_topic": topics["scores"],
                "dead_letter_topic": topics["dead"],
                "model_dir": model_dir,
                "checkpoint_dir": workdir / "checkpoints",
                "metrics_port": metrics_port,
                "metrics_host": "127.0.0.1",
                "replica_id": "demo",
            },
            kafka,
            # Short group timeouts suit a one-machine demo, not production.
            {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
        )
        daemon = start_serve(config, workdir / "daemon.log")
        say(
            f"Daemon started (pid {daemon.pid}); metrics on "
            f"http://127.0.0.1:{metrics_port}/metrics",
            file=sys.stderr,
        )

        producer_thread = threading.Thread(
            target=produce_dataset,
            args=(kafka, stream, topics["input"]),
            kwargs={"rate": rate, "offset": n_train, "progress": False},
            daemon=True,
        )
        producer_thread.start()
        started = time.monotonic()
        last_seen = None
        done = 0.0
        with tqdm(total=n_stream, unit="rec", disable=not progress, desc="scored") as bar:
            while time.monotonic() - started < STREAM_TIMEOUT_S:
                if daemon.poll() is not None:
                    raise RuntimeError(
                        f"the daemon exited with {daemon.returncode}; see {workdir}/daemon.log"
                    )
                try:
                    m = scrape(metrics_port)
                except OSError:
                    time.sleep(0.5)
                    continue
                consumed = m.get("stream_l2ae_records_consumed_total", 0.0)
                if consumed > done:
                    last_seen = time.monotonic()
                    bar.update(int(consumed - done))
                    done = consumed
                bar.set_postfix(
                    alerts=int(m.get("stream_l2ae_alerts_total", 0)),
                    lag=int(m.get("stream_l2ae_consumer_lag_records", 0)),
                )
                if done >= n_stream:
                    break
                time.sleep(0.5)
        producer_thread.join(timeout=60)
        final = scrape(metrics_port)
        scores = _read_scores(bootstrap_servers, topics["scores"], n_stream, timeout_s=60)
        keys = np.array(sorted(scores))
        y = stream.y[keys]
        score = np.array([scores[k]["score"] for k in keys])
        is_alert = np.array([scores[k]["is_anomaly"] for k in keys])
        precision, recall = precision_recall_at(y, is_alert)
        # From the start of the replay to the last record scored (one big batch has no inner span).
        span = (last_seen - started) if last_seen else 0.0
        summary = {
            "records": int(final.get("stream_l2ae_records_consumed_total", 0)),
            "scored": len(scores),
            "dead_letters": int(final.get("stream_l2ae_dead_letters_total", 0)),
            "alerts": int(final.get("stream_l2ae_alerts_total", 0)),
            "precision": precision,
            "recall": recall,
            "auc": roc_auc(y, score),
            "records_per_second": done / span if span > 0 else float("nan"),
            "batch_records_per_second": _batch_rate(final),
        }
        print(
            "\nstream-l2ae demo (Shuttle through Kafka)\n"
            f"  records        {summary['records']:,} consumed, {summary['scored']:,} scored, "
            f"{summary['dead_letters']:,} dead-lettered\n"
            f"  alerts         {summary['alerts']:,} on topic {topics['alerts']}\n"
            f"  precision      {precision:.3f}\n"
            f"  recall         {recall:.3f}\n"
            f"  AUC            {summary['auc']:.4f} over the streamed scores\n"
            f"  throughput     {summary['records_per_second']:,.0f} records/s end to end "
            "(from the start of the replay, daemon start-up included)\n"
            f"                 {summary['batch_records_per_second']:,.0f} records/s inside the "
            "daemon's batches (decode to commit)"
        )
        return summary
    finally:
        if daemon is not None and daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
