"""A real Prometheus server scrapes a real daemon fed by the embedded broker.

The test starts Debian's ``prometheus`` on loopback with the shipped rules, points it at a daemon
consuming from the embedded broker, queries the HTTP API for the counters, the score histogram and
the model version, then injects a burst of anomalies and waits for the burst alert.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import torch

from consumers.embedded_broker import free_port
from consumers.produce import produce_dataset
from consumers.settings import ServeSettings
from stream_l2ae.datasets import Dataset, load_dataset
from stream_l2ae.detector import L2AEDetector
from tests.kafka_fixtures import DaemonThread

RULES = Path(__file__).parents[1] / "deploy" / "prometheus" / "rules" / "stream-l2ae.rules.yml"


def _prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs the Debian package")
        pytest.skip("prometheus (Debian package prometheus) is not installed")
    return binary


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())["data"]["result"]


def alerts(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as response:
        return json.loads(response.read())["data"]["alerts"]


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def daemon(kafka_settings, topic_factory, tmp_path):
    torch.set_num_threads(1)
    shuttle = load_dataset("shuttle", limit=6000)
    model_dir = tmp_path / "models"
    L2AEDetector(epochs=3, n_clusters=5, n_init=2, progress=False).fit(shuttle.head(4000)).save(
        model_dir
    )
    events = topic_factory(1)
    settings = ServeSettings(
        input_topics=(events,),
        group_id=f"prom-{time.time_ns()}",
        alerts_topic=topic_factory(1),
        dead_letter_topic=topic_factory(1),
        model_updates_topic=None,
        model_dir=str(model_dir),
        checkpoint_dir=str(tmp_path / "ckpt"),
        batch_size=256,
        metrics_port=free_port(),
        metrics_host="127.0.0.1",
        kafka=kafka_settings,
    )
    server = DaemonThread(settings)
    server.daemon.metrics.start_http_server(settings.metrics_port, "127.0.0.1")
    server.start()
    yield server.daemon, events, shuttle
    server.finish(timeout=30)


@pytest.fixture
def prometheus(daemon, tmp_path):
    binary = _prometheus_binary()
    scorer = daemon[0]
    port = free_port()
    shutil.copy(RULES, tmp_path / "rules.yml")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n  - job_name: stream-l2ae\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{scorer.settings.metrics_port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(lambda: query(port, "up") is not None, 30, "Prometheus to answer")
        yield port
    finally:
        process.kill()
        process.wait(timeout=10)
        log.close()


def test_prometheus_scrapes_the_daemon_and_fires_the_burst_alert(
    daemon, prometheus, kafka_settings
):
    scorer, events, shuttle = daemon
    produce_dataset(kafka_settings, shuttle.split(4000)[1], events, progress=False)
    scored = wait_for(
        lambda: query(prometheus, "stream_l2ae_records_scored_total > 1000"),
        60,
        "the scored-records counter in Prometheus",
    )
    assert float(scored[0]["value"][1]) >= 1000
    assert query(prometheus, "stream_l2ae_alerts_total")
    buckets = query(prometheus, "stream_l2ae_score_bucket")
    assert {b["metric"]["le"] for b in buckets} >= {"0.01", "+Inf"}
    info = query(prometheus, "stream_l2ae_model_info")
    assert info[0]["metric"]["version"] == scorer.detector.version
    assert not [
        a for a in alerts(prometheus) if a["labels"]["alertname"] == "StreamL2AEAnomalyBurst"
    ]

    anomalies = Dataset(
        "burst", records=[{k: -3 * v for k, v in r.items()} for r in shuttle.records[:600]]
    )

    def burst_alert():
        produce_dataset(kafka_settings, anomalies, events, progress=False)
        return [
            a
            for a in alerts(prometheus)
            if a["labels"]["alertname"] == "StreamL2AEAnomalyBurst"
            and a["state"] in ("pending", "firing")
        ]

    found = wait_for(burst_alert, 90, "StreamL2AEAnomalyBurst to go pending", poll_s=1.0)
    assert found[0]["labels"]["severity"] == "warning"
