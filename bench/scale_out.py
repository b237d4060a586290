"""Aggregate throughput of 1 against 2 daemon replicas in one consumer group.

The embedded broker holds a topic with 2 partitions preloaded with Shuttle (``--repeat`` copies).
Then one ``stream-l2ae serve`` process consumes it, and afterwards two processes in a new group
do; each figure is records consumed per second from the first batch to the last record (the
records of that first batch, read before the clock starts, are not counted), read off the
daemons' metrics endpoints. On a 2-core machine the second replica can use the second
core, but it shares it with the broker and the first replica.

Run: ``python bench/scale_out.py [--repeat 10] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

from consumers.demo import scrape
from consumers.embedded_broker import EmbeddedBroker, free_port
from consumers.kafka_io import ensure_topics
from consumers.serve_process import start_serve, write_serve_config
from stream_l2ae.datasets import load_dataset
from stream_l2ae.detector import L2AEDetector

sys.path.insert(0, str(Path(__file__).parent))
from throughput import preload, timed_rate  # noqa: E402


def write_config(
    path: Path, bootstrap: str, topic: str, group: str, model_dir: Path, port: int, replica: str
) -> None:
    write_serve_config(
        path,
        {
            "input_topics": [topic],
            "group_id": group,
            "alerts_topic": f"{topic}-alerts",
            "dead_letter_topic": f"{topic}-dead",
            "model_dir": model_dir,
            "checkpoint_dir": path.parent / "ckpt",
            "metrics_port": port,
            "metrics_host": "127.0.0.1",
            "replica_id": replica,
        },
        {"bootstrap_servers": bootstrap},
        {"session_timeout_ms": 2000, "heartbeat_interval_ms": 500},
    )


def run_replicas(
    n_replicas: int, bootstrap: str, topic: str, model_dir: Path, workdir: Path, n_records: int
) -> float:
    group = f"scale-{n_replicas}-{time.time_ns()}"
    processes, ports = [], []
    for i in range(n_replicas):
        port = free_port()
        config = workdir / f"replica-{n_replicas}-{i}.toml"
        write_config(config, bootstrap, topic, group, model_dir, port, f"r{i}")
        processes.append(start_serve(config, workdir / f"replica-{n_replicas}-{i}.log", threads=1))
        ports.append(port)
    first = last = None
    counted_from = 0.0
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            total = 0.0
            for port in ports:
                try:
                    total += scrape(port).get("stream_l2ae_records_consumed_total", 0.0)
                except OSError:
                    pass
            now = time.monotonic()
            if total > 0 and first is None:
                first, counted_from = now, total
            if total >= n_records:
                last = now
                break
            time.sleep(0.05)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(timeout=30)
    if first is None or last is None:
        raise RuntimeError(f"{n_replicas} replica(s) did not finish; see {workdir}")
    return timed_rate(n_records, int(counted_from), last - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="copies of Shuttle to consume")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    workdir = Path(tempfile.mkdtemp(prefix="stream-l2ae-scale-"))
    model_dir = workdir / "models"
    L2AEDetector(epochs=3, progress=False).fit(load_dataset("shuttle")).save(model_dir)
    with EmbeddedBroker() as broker:
        topic = f"scale-{os.getpid()}"
        ensure_topics(
            {"bootstrap_servers": broker.bootstrap_servers},
            {topic: 2, f"{topic}-alerts": 1, f"{topic}-dead": 1},
        )
        n = preload(broker.bootstrap_servers, topic, args.repeat)
        one = run_replicas(1, broker.bootstrap_servers, topic, model_dir, workdir, n)
        two = run_replicas(2, broker.bootstrap_servers, topic, model_dir, workdir, n)
    print(f"records           {n:,} on 2 partitions")
    print(f"1 replica         {one:,.0f} records/s")
    print(f"2 replicas        {two:,.0f} records/s  ({two / one:.2f}x)")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"records": n, "one": one, "two": two, "scaling": two / one}, indent=2)
        )


if __name__ == "__main__":
    main()
