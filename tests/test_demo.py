"""``stream-l2ae demo``: the whole pipeline through the embedded broker, with one command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from consumers.demo import run_streaming_demo
from stream_l2ae.errors import ConfigError


def tansu_processes() -> int:
    """Running Tansu brokers, read off /proc (no dependence on procps)."""
    count = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        count += argv[0].endswith(b"tansu") and b"broker" in argv
    return count


@pytest.mark.slow
def test_streaming_demo_runs_end_to_end_and_cleans_up():
    brokers_before = tansu_processes()
    result = subprocess.run(
        [sys.executable, "-m", "stream_l2ae.cli", "demo", "--quiet", "--epochs", "3"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    out = result.stdout
    counts = re.search(r"records\s+([\d,]+) consumed, ([\d,]+) scored, ([\d,]+) dead", out)
    assert counts, out
    consumed, scored, dead = (int(g.replace(",", "")) for g in counts.groups())
    assert consumed == scored == 29_459 and dead == 0  # the 60% of Shuttle after training
    assert float(re.search(r"AUC\s+([\d.]+)", out).group(1)) > 0.9
    assert int(re.search(r"alerts\s+([\d,]+)", out).group(1).replace(",", "")) > 0
    assert re.search(r"precision\s+0\.\d+", out) and re.search(r"recall\s+0\.\d+", out)
    assert re.search(r"throughput\s+[\d,]+ records/s end to end", out), out
    assert tansu_processes() == brokers_before  # the demo's own broker is gone


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_fraction": 1.0}, "train_fraction must be in (0, 1), got 1.0"),
        ({"rate": 0.0}, "rate must be > 0 records/s, got 0.0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"bundle": "/nonexistent/models"}, "no model bundle at '/nonexistent/models'"),
    ],
)
def test_bad_demo_settings_are_refused_before_anything_starts(kwargs, message):
    brokers_before = tansu_processes()
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_streaming_demo(progress=False, **kwargs)
    assert tansu_processes() == brokers_before


def test_cli_reports_bad_demo_settings_cleanly():
    result = subprocess.run(
        [sys.executable, "-m", "stream_l2ae.cli", "demo", "--train-fraction", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "stream-l2ae: error: train_fraction must be in (0, 1), got 2.0" in result.stderr
