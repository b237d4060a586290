"""The scheduling files under deploy/ parse and run the retraining job the way the docs say."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest

import stream_l2ae

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RETRAIN = ["stream-l2ae", "retrain", "--config", "/etc/stream-l2ae/config.toml"]
SECRET_VARIABLE = "STREAM_L2AE_KAFKA__SASL_PLAIN_PASSWORD"
# One cron schedule field: *, a number, a range, a list, a step, or a month/day name.
_CRON_ITEM = r"(\*|[0-9A-Za-z]+(-[0-9A-Za-z]+)?)(/[0-9]+)?"
CRON_FIELD = re.compile(rf"{_CRON_ITEM}(,{_CRON_ITEM})*")


@pytest.fixture(scope="module")
def cronjob() -> dict:
    yaml = pytest.importorskip("yaml")
    documents = list(yaml.safe_load_all((DEPLOY / "kubernetes/trainer-cronjob.yaml").read_text()))
    assert len(documents) == 1
    return documents[0]


def _pod(cronjob: dict) -> dict:
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def test_cronjob_schedules_one_run_at_a_time(cronjob):
    assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
    spec = cronjob["spec"]
    assert len(spec["schedule"].split()) == 5
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] >= 1
    # A run must end before the next one is due, or Forbid skips it.
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 3600


def test_cronjob_runs_retrain_on_one_gpu(cronjob):
    pod = _pod(cronjob)
    (container,) = pod["containers"]
    assert container["command"] + container.get("args", []) == RETRAIN
    assert container["image"] == f"stream-l2ae:{stream_l2ae.__version__}"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["restartPolicy"] in ("Never", "OnFailure")


def test_cronjob_mounts_models_config_and_the_kafka_secret(cronjob):
    pod = _pod(cronjob)
    (container,) = pod["containers"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert "persistentVolumeClaim" in mounts["/models"]
    assert "configMap" in mounts["/etc/stream-l2ae"]
    items = mounts["/etc/stream-l2ae"]["configMap"].get("items")
    assert items is None or any(item["path"] == "config.toml" for item in items)
    env = {variable["name"]: variable for variable in container["env"]}
    assert "secretKeyRef" in env[SECRET_VARIABLE]["valueFrom"]


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_systemd_service_runs_retrain_once_as_a_dedicated_user():
    service = _unit("stream-l2ae-retrain.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] not in ("", "root")
    assert service["EnvironmentFile"] == "-/etc/stream-l2ae/env"
    command = shlex.split(service["ExecStart"])
    assert command[0].startswith("/") and Path(command[0]).name == "stream-l2ae"
    assert ["stream-l2ae", *command[1:]] == RETRAIN
    assert "PrivateDevices" not in service  # would hide the GPU


def test_systemd_timer_is_hourly_and_catches_up():
    timer = _unit("stream-l2ae-retrain.timer")
    assert timer["Timer"]["OnCalendar"] == "hourly"
    assert timer["Timer"]["Persistent"] == "true"
    assert timer["Timer"]["RandomizedDelaySec"]
    assert timer["Timer"].get("Unit", "stream-l2ae-retrain.service") == (
        "stream-l2ae-retrain.service"
    )
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_cron_line_schedules_retrain_under_flock():
    text = (DEPLOY / "cron/stream-l2ae-retrain.cron").read_text()
    assert text.endswith("\n")  # cron ignores a last line without a newline
    lines = [
        line
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not re.match(r"\w+=", line)
    ]
    assert len(lines) == 1
    fields = lines[0].split(None, 6)
    schedule, user, command = fields[:5], fields[5], fields[6]
    assert all(CRON_FIELD.fullmatch(field) for field in schedule), schedule
    assert user == "stream-l2ae"
    assert command.startswith("flock -n ")
    assert " ".join(RETRAIN) in command
    assert re.search(r">> *\S+\.log 2>&1$", command)
    assert "%" not in command  # cron turns % into a newline
