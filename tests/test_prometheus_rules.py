"""The Prometheus files under deploy/prometheus/ are valid, tested, and match the daemon's metrics.

The promtool checks need ``promtool`` on PATH (Debian: ``apt-get install prometheus``). Without
it they are skipped, except in CI (the ``CI`` environment variable set), where they fail: CI
installs it (``.ci/run``), so a missing promtool there is a broken pipeline, not a reason to
skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from consumers.metrics import DaemonMetrics
from consumers.settings import ServeSettings

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "deploy" / "prometheus"
CONFIG = PROMETHEUS / "prometheus.yml"
RULES = PROMETHEUS / "rules" / "stream-l2ae.rules.yml"
RULE_TESTS = PROMETHEUS / "tests" / "stream-l2ae.rules.test.yml"
JOB = "stream-l2ae"

# Metric names as they appear in PromQL; recording-rule names (level:metric:operations) contain
# colons and are dropped from the matches.
METRIC_TOKEN = re.compile(r"(?<![\w:])stream_l2ae_[\w:]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))  # as tests/kafka_fixtures.py reads it


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool is not on PATH; install it with `apt-get install prometheus` "
            "(Debian/Ubuntu) to check deploy/prometheus/"
        )
        if _in_ci():
            pytest.fail(f"{message}. CI is set, so this is an error, not a skip.")
        pytest.skip(message)
    return path


def _run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, (
        f"promtool {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    return result


def test_config_is_valid(promtool):
    # Also checks that every rule file it lists exists and parses.
    result = _run(promtool, "check", "config", str(CONFIG.relative_to(ROOT)))
    assert "SUCCESS" in result.stdout + result.stderr


def test_rules_are_valid(promtool):
    result = _run(promtool, "check", "rules", str(RULES.relative_to(ROOT)))
    assert "SUCCESS" in result.stdout + result.stderr


def test_rule_unit_tests_pass(promtool):
    result = _run(promtool, "test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert "SUCCESS" in result.stdout + result.stderr


# --- checks that need no promtool -------------------------------------------------------------


@pytest.fixture(scope="module")
def yaml():
    return pytest.importorskip("yaml")


@pytest.fixture(scope="module")
def rules(yaml) -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


@pytest.fixture(scope="module")
def alerts(rules) -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules if "alert" in rule}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    metrics = DaemonMetrics()
    try:
        return metrics.metric_names()
    finally:
        metrics.close()


def _referenced(text: str) -> set[str]:
    return {token for token in METRIC_TOKEN.findall(text) if ":" not in token}


def test_every_metric_in_the_rules_is_exported(rules, exported):
    referenced = set().union(*(_referenced(rule["expr"]) for rule in rules))
    # The regex must find the metrics, or this test checks nothing.
    assert {"stream_l2ae_score_bucket", "stream_l2ae_broker_up"} <= referenced
    missing = {}
    for name in sorted(referenced - exported):
        if name + "_bucket" in exported:
            # A classic histogram exports only its _bucket/_sum/_count samples.
            missing[name] = f"a histogram: query one of {[name + s for s in HISTOGRAM_SUFFIXES]}"
        else:
            missing[name] = "not exported by DaemonMetrics"
    assert not missing, f"rule expressions reference unknown metrics: {missing}"


def test_metrics_named_in_annotations_exist(alerts, exported):
    # Annotations may name a histogram by its family name (no _bucket suffix).
    known = exported | {name.removesuffix("_bucket") for name in exported}
    for name, alert in alerts.items():
        text = " ".join(alert.get("annotations", {}).values())
        unknown = _referenced(text) - known
        assert not unknown, f"{name} annotations name unknown metrics {sorted(unknown)}"


def test_recording_rules_follow_the_naming_convention(rules):
    for rule in rules:
        if "record" in rule:
            assert re.fullmatch(r"stream_l2ae:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule


def test_every_alert_has_for_severity_and_annotations(alerts):
    expected = {
        "StreamL2AEAnomalyRateHigh",
        "StreamL2AEAnomalyBurst",
        "StreamL2AEDaemonDown",
        "StreamL2AENotScraping",
        "StreamL2AEConsumerLagGrowing",
        "StreamL2AEDeadLetterRateHigh",
        "StreamL2AEBrokerDisconnected",
        "StreamL2AEModelTooOld",
        "StreamL2AEDriftDetected",
    }
    assert expected <= set(alerts)
    for name, alert in alerts.items():
        assert re.fullmatch(r"\d+[smh]", str(alert.get("for", ""))), f"{name} has no for:"
        assert alert.get("labels", {}).get("severity") in ("critical", "warning", "info"), name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name


def test_every_alert_is_unit_tested_both_ways(yaml, alerts):
    """Each alert has a promtool test where it fires and one where it must stay quiet."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [os.path.relpath(RULES, RULE_TESTS.parent)]
    fires, quiet = set(), set()
    for test in tests["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
            for expected in case.get("exp_alerts") or []:
                assert expected.get("exp_annotations"), f"{case['alertname']}: no annotations"
    assert set(alerts) - fires == set(), "alerts never shown to fire"
    assert set(alerts) - quiet == set(), "alerts never shown to stay quiet"
    assert fires | quiet <= set(alerts), "tests of alerts that do not exist"


def test_config_scrapes_the_daemons_and_loads_the_rules(yaml, rules):
    config = yaml.safe_load(CONFIG.read_text())
    assert config["global"]["scrape_interval"] == "15s"
    assert [PROMETHEUS / path for path in config["rule_files"]] == [RULES]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    port = ServeSettings().metrics_port
    targets = [t for static in job.get("static_configs", []) for t in static["targets"]]
    discovered = job.get("dns_sd_configs", [])
    assert targets or discovered
    assert all(target.endswith(f":{port}") for target in targets)
    assert all(sd["port"] == port for sd in discovered)
    # The rules select the daemons by this job name.
    selectors = set(re.findall(r'job="([^"]+)"', " ".join(rule["expr"] for rule in rules)))
    assert selectors == {JOB}
