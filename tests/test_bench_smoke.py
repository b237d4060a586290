"""The benchmarks still run end to end: tiny settings, and only the output shape is checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_daemon_throughput_bench(tmp_path):
    out = tmp_path / "daemon.json"
    run_bench(
        "throughput.py",
        *("--repeat", "1", "--rounds", "2", "--batch-size", "8192", "--epochs", "1"),
        *("--rate", "500", "--seconds", "1"),
        *("--json", str(out)),
    )
    figures = json.loads(out.read_text())
    assert figures["records"] == 49_097
    assert len(figures["rounds"]) == 2
    assert figures["raw_consumer_records_per_s"] > 0 and figures["daemon_records_per_s"] > 0
    assert figures["latency"]["records"] == 500


@pytest.mark.slow
def test_scoring_throughput_bench(tmp_path):
    out = tmp_path / "scoring.json"
    run_bench(
        "scoring_throughput.py",
        *("--epochs", "1", "--train-records", "2000", "--repeats", "1", "--warmup", "0"),
        *("--latency-records", "10", "--river-records", "300", "--json", str(out)),
    )
    figures = json.loads(out.read_text())
    assert "ours: from JSON bytes (score_json)" in json.dumps(figures)


@pytest.mark.slow
def test_gpu_check_rehearses_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    run_bench(
        "gpu_check.py",
        *("--device", "cpu", "--limit", "1000", "--epochs", "1", "--cpu-images", "256"),
        *("--json", str(out)),
    )
    figures = json.loads(out.read_text())
    assert set(figures["gpu"]) == {"conv", "dense"}
    for row in figures["gpu"].values():
        assert 0.0 < row["clustering_accuracy"] <= 1.0
        assert row["inference_images_per_second"]["cpu"] > 0
