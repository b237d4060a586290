"""Sustained throughput and latency of the scoring daemon on the embedded broker.

Two figures, both measured in the same run so that the ratio survives a noisy machine:

1. **Throughput.** All 49,097 Shuttle records (repeated ``--repeat`` times) are produced to a
   topic first. A raw kafka-python consumer with the daemon's fetch settings reads the topic
   with no processing (the baseline), then the daemon consumes the same topic in a new group:
   decode, features, encode, score, online update, alerts produced and acknowledged, offsets
   committed. Both are timed from the end of their first batch to their last record, and
   the records of that first batch (read before the clock starts) are not counted. The pair runs
   ``--rounds`` times, alternating, and the median ratio is reported: on a shared machine one
   pair can differ by 20% from the next.
2. **Latency.** With the daemon running, records are produced at a fixed rate (``--rate``) and
   the latency from each record's timestamp to its score is read off the scores topic.

Run: ``python bench/throughput.py [--repeat 8] [--rounds 5] [--rate 2000] [--seconds 10]
[--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import torch
from kafka import KafkaConsumer, TopicPartition

from consumers.daemon import ScoringDaemon, freeze_startup_objects
from consumers.embedded_broker import EmbeddedBroker
from consumers.kafka_io import ensure_topics, make_consumer, make_producer
from consumers.produce import encoded_records, produce_dataset
from consumers.settings import ServeSettings
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector

FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}


def preload(bootstrap: str, topic: str, repeat: int) -> int:
    shuttle = load_dataset("shuttle")
    values = list(encoded_records(shuttle))
    producer = make_producer({"bootstrap_servers": bootstrap})
    n = 0
    for _ in range(repeat):
        for value in values:
            producer.send(topic, key=str(n).encode(), value=value)
            n += 1
    producer.flush()
    producer.close()
    return n


def raw_consume(bootstrap: str, topic: str, n: int, batch_size: int) -> float:
    consumer = make_consumer(
        {"bootstrap_servers": bootstrap},
        f"raw-{time.time_ns()}",
        max_poll_records=batch_size,
        **FAST_GROUP,
    )
    consumer.subscribe([topic])
    seen, first, counted_from = 0, None, 0
    while seen < n:
        polled = consumer.poll(timeout_ms=500, max_records=batch_size)
        seen += sum(map(len, polled.values()))
        if polled and first is None:
            first, counted_from = time.perf_counter(), seen
    elapsed = time.perf_counter() - first
    consumer.close()
    return timed_rate(n, counted_from, elapsed)


def timed_rate(n: int, counted_from: int, elapsed: float) -> float:
    """Records/s after the first batch; refuses a run whose first batch held nearly everything."""
    if n - counted_from < n // 4:
        raise SystemExit(
            f"the first batch held {counted_from:,} of {n:,} records, too many to time the rest; "
            "raise --repeat or lower --batch-size"
        )
    return (n - counted_from) / elapsed


def daemon_settings(
    bootstrap: str,
    topic: str,
    model_dir: Path,
    workdir: Path,
    batch_size: int,
    scores_topic: str | None = None,
) -> ServeSettings:
    return ServeSettings(
        input_topics=(topic,),
        group_id=f"daemon-{time.time_ns()}",
        alerts_topic=f"{topic}-alerts",
        scores_topic=scores_topic,
        dead_letter_topic=f"{topic}-dead",
        model_dir=str(model_dir),
        checkpoint_dir=str(workdir / "checkpoints"),
        batch_size=batch_size,
        kafka={"bootstrap_servers": bootstrap},
        metrics_port=0,
        replica_id="bench",
    )


def start_daemon(settings: ServeSettings) -> ScoringDaemon:
    daemon = ScoringDaemon(settings, consumer_overrides=FAST_GROUP)
    daemon.open()
    return daemon


def daemon_consume(settings: ServeSettings, n: int) -> tuple[float, int]:
    """Records/s, and the alerts the daemon published (and had acknowledged) on the way."""
    daemon = start_daemon(settings)
    first, counted_from = None, 0
    try:
        while daemon.records_seen < n:
            if daemon.step() and first is None:
                first, counted_from = time.perf_counter(), daemon.records_seen
        rate = timed_rate(n, counted_from, time.perf_counter() - first)
        alerts = daemon.metrics.registry.get_sample_value("stream_l2ae_alerts_total")
        return rate, int(alerts or 0)
    finally:
        daemon.close()


def latency(
    bootstrap: str, model_dir: Path, workdir: Path, rate: float, seconds: float, batch_size: int
) -> dict[str, float]:
    topic = f"latency-{time.time_ns()}"
    scores_topic = f"{topic}-scores"
    ensure_topics({"bootstrap_servers": bootstrap}, {topic: 1, scores_topic: 1})
    settings = daemon_settings(bootstrap, topic, model_dir, workdir, batch_size, scores_topic)
    daemon = start_daemon(settings)
    deadline = time.monotonic() + 30
    while not daemon.consumer.assignment() and time.monotonic() < deadline:
        daemon.step()  # join the group before the clock starts
    n = int(rate * seconds)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            daemon.step()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        shuttle = load_dataset("shuttle", limit=n)
        produce_dataset({"bootstrap_servers": bootstrap}, shuttle, topic, rate=rate, progress=False)
        deadline = time.monotonic() + 60
        while daemon.records_seen < n and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        server.join()
        daemon.close()
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(scores_topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    lat = []
    while len(lat) < n:
        polled = consumer.poll(timeout_ms=2000)
        if not polled:
            break
        for records in polled.values():
            for record in records:
                doc = orjson.loads(record.value)
                lat.append(doc["scored_at_ms"] - doc["source"]["timestamp_ms"])
    consumer.close()
    lat_ms = np.asarray(lat, dtype=float)
    return {
        "rate": rate,
        "records": len(lat),
        "p50_ms": float(np.percentile(lat_ms, 50)),
        "p99_ms": float(np.percentile(lat_ms, 99)),
        "max_ms": float(lat_ms.max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of Shuttle to consume")
    parser.add_argument(
        "--rounds", type=int, default=5, help="raw/daemon pairs; the ratio reported is the median"
    )
    parser.add_argument("--batch-size", type=int, default=ServeSettings().batch_size)
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s for latency")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--alert-rate",
        type=float,
        default=0.05,
        help="threshold calibration, as in the demo: alerts are published and acknowledged",
    )
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="stream-l2ae-bench-"))
    model_dir = workdir / "models"
    detector = L2AEDetector(epochs=args.epochs, alert_rate=args.alert_rate, progress=False)
    detector.fit(load_dataset("shuttle")).save(model_dir)
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap_servers
        topic = f"throughput-{time.time_ns()}"
        ensure_topics(
            {"bootstrap_servers": bootstrap}, {topic: 1, f"{topic}-alerts": 1, f"{topic}-dead": 1}
        )
        n = preload(bootstrap, topic, args.repeat)
        freeze_startup_objects()  # as ScoringDaemon.run does, here for both consumers alike
        rounds = []
        for index in range(args.rounds):
            raw = raw_consume(bootstrap, topic, n, args.batch_size)
            settings = daemon_settings(bootstrap, topic, model_dir, workdir, args.batch_size)
            ours, alerts = daemon_consume(settings, n)
            rounds.append({"raw_records_per_s": raw, "daemon_records_per_s": ours})
            print(
                f"round {index + 1}/{args.rounds}: raw {raw:,.0f} records/s, "
                f"daemon {ours:,.0f} records/s ({ours / raw:.0%}), {alerts:,} alerts published",
                flush=True,
            )
        lat = latency(bootstrap, model_dir, workdir, args.rate, args.seconds, args.batch_size)
    ratios = [r["daemon_records_per_s"] / r["raw_records_per_s"] for r in rounds]
    raw = float(np.median([r["raw_records_per_s"] for r in rounds]))
    ours = float(np.median([r["daemon_records_per_s"] for r in rounds]))
    results = {
        "records": n,
        "batch_size": args.batch_size,
        "alerts_per_round": alerts,
        "rounds": rounds,
        "raw_consumer_records_per_s": raw,
        "daemon_records_per_s": ours,
        "daemon_vs_raw": float(np.median(ratios)),
        "latency": lat,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }
    print(f"records consumed per round  {n:,} ({len(rounds)} rounds, medians below)")
    print(f"raw kafka-python consumer   {raw:,.0f} records/s")
    print(
        f"stream-l2ae daemon          {ours:,.0f} records/s  "
        f"({results['daemon_vs_raw']:.0%} of raw; rounds {min(ratios):.0%}-{max(ratios):.0%})"
    )
    print(
        f"latency at {lat['rate']:,.0f} records/s    p50 {lat['p50_ms']:.0f} ms, "
        f"p99 {lat['p99_ms']:.0f} ms ({lat['records']:,} records)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
