"""The container, compose, Kubernetes and Grafana files agree with the code.

Structural checks only, nothing is built or run: the files parse, every PromQL expression names
only metrics that ``DaemonMetrics`` exports, and the images, ports, paths, commands and config
files are the ones the code uses (``ServeSettings``, ``load_serve_settings``,
``load_retrain_settings``, the ``stream-l2ae`` argument parser).
"""

from __future__ import annotations

import json
import posixpath
import re
import shlex
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest

import stream_l2ae
from consumers.kafka_io import client_config
from consumers.metrics import DaemonMetrics
from consumers.settings import ServeSettings, load_serve_settings
from stream_l2ae.cli import build_parser
from stream_l2ae.detector import DetectorConfig
from trainer.settings import load_retrain_settings

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = DEPLOY / "compose" / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "compose" / "config.toml"
IMAGE_CONFIG = DEPLOY / "docker" / "config.toml"
KUBERNETES = DEPLOY / "kubernetes"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "stream-l2ae.json"
PROMETHEUS = DEPLOY / "prometheus"

IMAGE = f"stream-l2ae:{stream_l2ae.__version__}"
CONFIG_PATH = "/etc/stream-l2ae/config.toml"
MODELS_PATH = "/models"
METRICS_PATH = "/metrics"
METRICS_PORT = ServeSettings().metrics_port
SECRET_VARIABLE = "STREAM_L2AE_KAFKA__SASL_PLAIN_PASSWORD"
SERVE = ["serve", "--config", CONFIG_PATH]
RETRAIN = ["retrain", "--config", CONFIG_PATH]

# A metric name of the daemon, not part of a recording-rule name (those contain ':').
METRIC_TOKEN = re.compile(r"(?<![\w:])stream_l2ae_[a-zA-Z0-9_]+(?![\w:])")
RECORDING_RULE_TOKEN = re.compile(r"(?<![\w:])[a-zA-Z_][a-zA-Z0-9_]*:[a-zA-Z0-9_:]*(?![\w:])")
# String literals of PromQL: label values and regexes never name a metric.
PROMQL_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
STANDARD_METRICS = {"up"}


# --- helpers ------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yml", ".yaml") and p.is_file())


def _documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _exported_metrics() -> set[str]:
    return DaemonMetrics().metric_names() | STANDARD_METRICS


def _metric_names(expr: str) -> set[str]:
    return set(METRIC_TOKEN.findall(PROMQL_STRING.sub('""', expr)))


def _dashboard_exprs(node: Any) -> Iterator[str]:
    """Every PromQL expression of a dashboard: targets, annotations and variable queries."""
    if isinstance(node, dict):
        if node.get("type") == "datasource":  # the datasource variable's query is a plugin id
            return
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            elif key == "query" and isinstance(value, str):
                yield value
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item)


def _rule_files() -> list[Path]:
    return sorted((PROMETHEUS / "rules").glob("*.y*ml"))


def _rules(path: Path) -> list[dict]:
    return [
        rule
        for document in _documents(path)
        for group in document.get("groups", [])
        for rule in group.get("rules", [])
    ]


def _parse_cli(argv: list[str]) -> Any:
    """``argv`` (without the program name) parsed by the real ``stream-l2ae`` parser."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on an unknown command or flag
        pytest.fail(f"stream-l2ae {shlex.join(argv)} is not a valid command line ({exc})")


def _shell_invocations(script: str) -> list[list[str]]:
    """The ``stream-l2ae ...`` command lines of a (compose-escaped) shell script."""
    script = script.replace("$$", "$").replace("\\\n", " ")
    script = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", script)  # ${VAR:-default} -> default
    invocations = []
    for match in re.finditer(r"(?<![\w-])stream-l2ae\s+[^;|&\n]*", script):
        words = shlex.split(match.group(0))
        invocations.append(words[1:])
    return invocations


# --- every file parses --------------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_yaml_file_parses(path):
    documents = _documents(path)
    assert documents, f"{path} holds no YAML document"
    assert all(isinstance(document, dict) for document in documents)


def test_the_deploy_files_exist():
    for path in (
        DOCKERFILE,
        DOCKERIGNORE,
        COMPOSE,
        COMPOSE_CONFIG,
        IMAGE_CONFIG,
        DASHBOARD,
        GRAFANA / "provisioning/datasources/prometheus.yml",
        GRAFANA / "provisioning/dashboards/stream-l2ae.yml",
        *(
            KUBERNETES / name
            for name in (
                "namespace.yaml",
                "configmap.yaml",
                "secret.yaml",
                "daemon-deployment.yaml",
                "service.yaml",
                "servicemonitor.yaml",
                "models-pvc.yaml",
                "trainer-cronjob.yaml",
            )
        ),
    ):
        assert path.is_file(), f"{path.relative_to(ROOT)} is missing"


# --- PromQL: only metrics the daemon exports ----------------------------------------------------


def test_metric_token_extraction():
    expr = (
        'sum by (le) (rate(stream_l2ae_score_bucket{job=~"stream_l2ae_job"}[5m]))'
        " / stream_l2ae:records_scored:rate5m + job:stream_l2ae_alerts:rate5m"
    )
    assert _metric_names(expr) == {"stream_l2ae_score_bucket"}
    assert set(RECORDING_RULE_TOKEN.findall(PROMQL_STRING.sub('""', expr))) == {
        "stream_l2ae:records_scored:rate5m",
        "job:stream_l2ae_alerts:rate5m",
    }
    assert _metric_names("time() - stream_l2ae_model_created_timestamp_seconds > 60") == {
        "stream_l2ae_model_created_timestamp_seconds"
    }


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_promql_names_only_exported_metrics(dashboard):
    exported = _exported_metrics()
    exprs = list(_dashboard_exprs(dashboard))
    assert len(exprs) > 20
    used = set()
    for expr in exprs:
        names = _metric_names(expr)
        assert names <= exported, f"{expr!r} names metrics the daemon does not export"
        used |= names
    assert len(used) >= 15


def test_dashboard_recording_rules_are_defined(dashboard):
    recorded = {
        rule["record"] for path in _rule_files() for rule in _rules(path) if "record" in rule
    }
    for expr in _dashboard_exprs(dashboard):
        for name in RECORDING_RULE_TOKEN.findall(PROMQL_STRING.sub('""', expr)):
            assert name in recorded, (
                f"{expr!r} uses {name}, which no rule in deploy/prometheus records"
            )


@pytest.mark.parametrize("path", _rule_files(), ids=lambda p: p.name)
def test_rule_promql_names_only_exported_metrics(path):
    exported = _exported_metrics()
    rules = _rules(path)
    assert rules
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        expr = str(rule["expr"])
        names = _metric_names(expr)
        assert names <= exported, f"{rule.get('record') or rule.get('alert')}: {expr!r}"
        for name in RECORDING_RULE_TOKEN.findall(PROMQL_STRING.sub('""', expr)):
            assert name in recorded, f"{expr!r} uses {name}, which no rule of {path.name} records"


# --- Grafana ------------------------------------------------------------------------------------


def _panels(dashboard: dict) -> Iterator[dict]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_is_provisionable_with_a_datasource_variable(dashboard):
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("job", "instance"):
        assert variables[name]["type"] == "query"
        assert "stream_l2ae_" in variables[name]["definition"]
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert "$job" in target["expr"] and "$instance" in target["expr"], panel["title"]


def test_dashboard_shows_the_operational_views(dashboard):
    exprs = list(_dashboard_exprs(dashboard))

    def some(*needles: str) -> bool:
        return any(all(needle in expr for needle in needles) for expr in exprs)

    assert some("rate(stream_l2ae_records_consumed_total")
    assert some("rate(stream_l2ae_records_scored_total")
    assert some("stream_l2ae_consumer_lag_records", "sum")
    assert some("stream_l2ae_consumer_lag_records", "by (topic, partition)")
    assert some("stream_l2ae_alerts_total", "stream_l2ae_records_scored_total")
    assert some("stream_l2ae_calibrated_alert_rate")
    assert some("stream_l2ae_threshold")
    assert some("histogram_quantile(", "stream_l2ae_score_bucket")
    assert some("histogram_quantile(0.5", "stream_l2ae_record_latency_seconds_bucket")
    assert some("histogram_quantile(0.99", "stream_l2ae_record_latency_seconds_bucket")
    assert some("stream_l2ae_dead_letters_total", "by (reason)")
    assert some("stream_l2ae_cluster_occupancy")
    assert some("stream_l2ae_centroid_movement")
    assert some("stream_l2ae_drift_active")
    assert some("stream_l2ae_alert_rate_ratio")
    assert some("stream_l2ae_score_drifts_total")
    assert some("stream_l2ae_model_info")
    assert some("time() - stream_l2ae_model_created_timestamp_seconds")
    assert some("stream_l2ae_broker_up")


def test_grafana_provisioning_matches_the_compose_mounts(compose):
    (datasource,) = _documents(GRAFANA / "provisioning/datasources/prometheus.yml")[0][
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    (provider,) = _documents(GRAFANA / "provisioning/dashboards/stream-l2ae.yml")[0]["providers"]
    assert provider["type"] == "file"
    mounts = _mounts(compose["services"]["grafana"])
    assert mounts["/etc/grafana/provisioning"]["source"] == GRAFANA / "provisioning"
    dashboards = mounts[provider["options"]["path"]]
    assert dashboards["source"] == DASHBOARD.parent


# --- Dockerfile ---------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _torch_pin() -> str:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (pin,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    return pin


def test_dockerfile_pins_torch_and_installs_the_package():
    runs = [rest for keyword, rest in _instructions() if keyword == "RUN"]
    assert _torch_pin() == "torch==2.13.0"
    assert any(re.search(r"pip install\b.*\btorch==2\.13\.0\b", run) for run in runs)
    assert any(re.search(r"pip install \.(\s|$)", run) for run in runs)
    # No package index is named: pip uses whatever the build environment is set up with.
    assert "://" not in DOCKERFILE.read_text()
    assert "--index-url" not in DOCKERFILE.read_text()


def test_dockerfile_base_user_port_and_command():
    instructions = _instructions()
    args = {rest.split("=")[0]: rest.partition("=")[2] for kw, rest in instructions if kw == "ARG"}
    assert args["BASE_IMAGE"] == "python:3.11-slim"
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert base.split()[0] == "${BASE_IMAGE}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    exposed = {port for kw, rest in instructions if kw == "EXPOSE" for port in rest.split()}
    assert str(METRICS_PORT) in exposed
    entrypoint = [json.loads(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    command = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entrypoint[-1] == ["stream-l2ae"] and "stream-l2ae" in pyproject["project"]["scripts"]
    assert command[-1] == SERVE
    assert _parse_cli(command[-1]).func.__name__ == "cmd_serve"


def test_dockerfile_bakes_a_config_that_loads():
    copies = [rest.split() for keyword, rest in _instructions() if keyword == "COPY"]
    assert [str(IMAGE_CONFIG.relative_to(ROOT)), CONFIG_PATH] in copies
    serve = load_serve_settings(IMAGE_CONFIG, environ={})
    retrain = load_retrain_settings(IMAGE_CONFIG, environ={})
    assert serve.model_dir == retrain.model_dir == MODELS_PATH
    assert serve.metrics_port == METRICS_PORT


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether the .dockerignore ``patterns`` leave ``path`` out (the last match wins)."""
    parts = path.strip("/").split("/")
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):
            if fnmatch("/".join(parts[:depth]), pattern):
                ignored = not negated
                break
    return ignored


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_heavy():
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    for keyword, rest in _instructions():
        if keyword == "COPY" and not rest.startswith("--from"):
            for source in rest.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert not _ignored(source, patterns), f"{source} is excluded by .dockerignore"
                if (ROOT / source).is_dir():
                    assert not _ignored(f"{source}/__init__.py", patterns)
    for heavy in (".venv", ".git", "runs", "models", "tests", "stream_l2ae/__pycache__"):
        assert _ignored(heavy, patterns), f"{heavy} must stay out of the build context"


# --- compose ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    (document,) = _documents(COMPOSE)
    return document


def _mounts(service: dict) -> dict[str, dict]:
    """Mount target -> {"source": Path or volume name, "read_only": bool}."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            read_only = bool(mode) and "ro" in mode[0].split(",")
            kind = "bind" if source.startswith((".", "/")) else "volume"
        else:
            source, target = volume["source"], volume["target"]
            read_only = bool(volume.get("read_only"))
            kind = volume["type"]
        if kind == "bind":
            source = (COMPOSE.parent / source).resolve()
        mounts[target] = {"source": source, "read_only": read_only, "type": kind}
    return mounts


def _service_running(compose: dict, subcommand: str) -> tuple[str, dict]:
    matches = [
        (name, service)
        for name, service in compose["services"].items()
        if not service.get("profiles")
        and any(argv[:1] == [subcommand] for argv in _compose_invocations(service))
    ]
    assert len(matches) == 1, f"one service (no profile) must run `stream-l2ae {subcommand}`"
    return matches[0]


def _compose_invocations(service: dict) -> list[list[str]]:
    """The stream-l2ae command lines a compose service runs (image ENTRYPOINT or a script)."""
    if service.get("image") != IMAGE:
        return []
    command = service.get("command", SERVE)
    entrypoint = service.get("entrypoint")
    if entrypoint is None:
        return [command]
    assert entrypoint[:2] == ["/bin/sh", "-c"], entrypoint
    return _shell_invocations(command[0])


def test_compose_kafka_runs_in_kraft_mode(compose):
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{env['KAFKA_NODE_ID']}@kafka:")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert len(env["CLUSTER_ID"]) == 22
    assert not any("ZOOKEEPER" in key for key in env)
    assert "zookeeper" not in compose["services"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_daemon_has_two_replicas_on_the_metrics_port(compose):
    name, daemon = _service_running(compose, "serve")
    assert daemon["image"] == IMAGE
    assert daemon["deploy"]["replicas"] == 2
    assert daemon["command"] == SERVE
    assert _parse_cli(daemon["command"]).func.__name__ == "cmd_serve"
    assert str(METRICS_PORT) in [str(port) for port in daemon["expose"]]
    assert "ports" not in daemon, "two replicas cannot publish the same host port"
    build = daemon["build"]
    assert (COMPOSE.parent / build["context"]).resolve() == ROOT
    assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    assert daemon["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"


def test_compose_daemon_and_trainer_share_the_models_volume(compose):
    _, daemon = _service_running(compose, "serve")
    _, trainer = _service_running(compose, "retrain")
    serve = load_serve_settings(COMPOSE_CONFIG, environ={})
    retrain = load_retrain_settings(COMPOSE_CONFIG, environ={})
    daemon_models = _mounts(daemon)[serve.model_dir]
    trainer_models = _mounts(trainer)[retrain.model_dir]
    assert daemon_models["type"] == trainer_models["type"] == "volume"
    assert daemon_models["source"] == trainer_models["source"]
    assert daemon_models["source"] in compose["volumes"]
    assert daemon_models["read_only"] and not trainer_models["read_only"]
    assert _mounts(daemon)[serve.checkpoint_dir]["type"] == "volume"
    for service in (daemon, trainer):
        config = _mounts(service)[CONFIG_PATH]
        assert config["source"] == COMPOSE_CONFIG and config["read_only"]


def test_compose_trainer_retrains_on_a_schedule(compose):
    _, trainer = _service_running(compose, "retrain")
    (argv,) = _compose_invocations(trainer)
    assert argv == RETRAIN
    assert _parse_cli(argv).func.__name__ == "cmd_retrain"
    assert re.search(r"\bsleep\b", trainer["command"][0])
    assert "while true" in trainer["command"][0]


def test_compose_commands_are_valid_stream_l2ae_command_lines(compose):
    seen = set()
    for service in compose["services"].values():
        for argv in _compose_invocations(service):
            args = _parse_cli(argv)
            seen.add(args.command)
            if "--config" in argv:
                assert args.config == CONFIG_PATH
            if "--bootstrap-servers" in argv:
                assert args.bootstrap_servers == "kafka:9092"
    assert {"serve", "retrain"} <= seen
    drift = _compose_invocations(compose["services"]["trainer-on-drift"])
    assert drift == [[*RETRAIN, "--on-drift"]]


def test_compose_shell_scripts_escape_dollars(compose):
    # Compose interpolates $VAR itself: a shell variable must be written $$VAR.
    for name, service in compose["services"].items():
        for part in [*service.get("entrypoint", []), *service.get("command", [])]:
            assert "$" not in str(part).replace("$$", ""), f"{name}: unescaped $ in {part!r}"


def test_compose_creates_every_topic_of_the_config(compose):
    serve = load_serve_settings(COMPOSE_CONFIG, environ={})
    retrain = load_retrain_settings(COMPOSE_CONFIG, environ={})
    init = compose["services"]["kafka-init"]
    assert init["image"] == compose["services"]["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    created = set(re.findall(r"([\w.-]+):\d+", init["command"][0]))
    wanted = {
        *serve.input_topics,
        serve.alerts_topic,
        serve.dead_letter_topic,
        serve.model_updates_topic,
        serve.scores_topic,
        *retrain.input_topics,
        retrain.model_updates_topic,
    } - {None}
    assert wanted <= created
    assert "--if-not-exists" in init["command"][0]
    assert serve.bootstrap_servers == "kafka:9092"


def test_compose_prometheus_scrapes_the_daemons(compose):
    prometheus = compose["services"]["prometheus"]
    mounts = _mounts(prometheus)
    assert mounts["/etc/prometheus"]["source"] == PROMETHEUS
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config_file = PROMETHEUS / "prometheus.yml"
    if not config_file.exists():
        pytest.skip("deploy/prometheus/prometheus.yml is not written yet")
    daemon_name, _ = _service_running(compose, "serve")
    (config,) = _documents(config_file)
    for rule_file in config.get("rule_files", []):
        assert list(PROMETHEUS.glob(rule_file)), f"rule file {rule_file} not found"
    addresses = set()
    for job in config["scrape_configs"]:
        if job.get("metrics_path", METRICS_PATH) != METRICS_PATH:
            continue
        for static in job.get("static_configs", []):
            addresses.update(static.get("targets", []))
        for dns in job.get("dns_sd_configs", []):
            addresses.update(f"{name}:{dns.get('port')}" for name in dns.get("names", []))
    assert f"{daemon_name}:{METRICS_PORT}" in addresses


# --- config files -------------------------------------------------------------------------------


def _configmap_toml(tmp_path: Path) -> Path:
    (configmap,) = _kubernetes()["ConfigMap"]
    path = tmp_path / "config.toml"
    path.write_text(configmap["data"]["config.toml"])
    return path


@pytest.mark.parametrize("which", ["compose", "image", "kubernetes"])
def test_config_files_load_for_serve_and_retrain(which, tmp_path):
    path = {"compose": COMPOSE_CONFIG, "image": IMAGE_CONFIG}.get(which) or _configmap_toml(
        tmp_path
    )
    serve = load_serve_settings(path, environ={})
    retrain = load_retrain_settings(path, environ={})
    assert serve.model_dir == retrain.model_dir == MODELS_PATH
    assert serve.metrics_port == METRICS_PORT
    assert serve.metrics_host == "0.0.0.0"
    assert serve.checkpoint_dir.startswith("/var/lib/stream-l2ae")
    DetectorConfig.from_dict(dict(retrain.detector))
    for role in ("consumer", "producer", "admin"):
        client_config(serve.client_settings(role), role)
        client_config(retrain.client_settings(role), role)
    # The secret arrives through the environment, as in the manifests.
    with_secret = load_serve_settings(path, environ={SECRET_VARIABLE: "s3cret"})
    assert with_secret.kafka["sasl_plain_password"] == "s3cret"


# --- Kubernetes ---------------------------------------------------------------------------------


def _kubernetes() -> dict[str, list[dict]]:
    objects: dict[str, list[dict]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in _documents(path):
            objects.setdefault(document["kind"], []).append(document)
    return objects


@pytest.fixture(scope="module")
def k8s() -> dict[str, list[dict]]:
    return _kubernetes()


def _one(k8s: dict, kind: str) -> dict:
    (obj,) = k8s[kind]
    return obj


def _pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def _container_mounts(pod: dict, container: dict) -> dict[str, tuple[dict, dict]]:
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container["volumeMounts"]}


def test_k8s_objects_share_one_namespace(k8s):
    namespace = _one(k8s, "Namespace")["metadata"]["name"]
    for kind, objects in k8s.items():
        for obj in objects:
            if kind in ("Namespace", "Kustomization"):
                continue
            # trainer-cronjob.yaml leaves the namespace to `kubectl -n` / kustomize
            assert obj["metadata"].get("namespace", namespace) == namespace, obj["metadata"]
    assert _one(k8s, "Kustomization")["namespace"] == namespace


def test_k8s_kustomization_lists_every_manifest_but_the_secret(k8s):
    resources = set(_one(k8s, "Kustomization")["resources"])
    manifests = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert resources == manifests - {"secret.yaml"}


def test_k8s_daemon_deployment(k8s):
    deployment = _one(k8s, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pod = _pod_spec(deployment)
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    argv = container["command"] + container.get("args", [])
    assert argv == ["stream-l2ae", *SERVE]
    assert _parse_cli(argv[1:]).func.__name__ == "cmd_serve"
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("metrics", METRICS_PORT)
    for probe in ("livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] == METRICS_PATH and http["port"] in ("metrics", METRICS_PORT)
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][bound])
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == METRICS_PATH
    assert pod["securityContext"]["runAsNonRoot"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_daemon_and_cronjob_mount_the_same_models_and_config(k8s):
    pvc = _one(k8s, "PersistentVolumeClaim")
    configmap = _one(k8s, "ConfigMap")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for obj in (_one(k8s, "Deployment"), _one(k8s, "CronJob")):
        pod = _pod_spec(obj)
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        mounts = _container_mounts(pod, container)
        models_mount, models = mounts[MODELS_PATH]
        assert models["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        if obj["kind"] == "Deployment":
            assert models_mount["readOnly"] is True
        _, config = mounts[posixpath.dirname(CONFIG_PATH)]
        assert config["configMap"]["name"] == configmap["metadata"]["name"]
        items = config["configMap"].get("items")
        assert items is None or {"key": "config.toml", "path": "config.toml"} in items
    cronjob = _pod_spec(_one(k8s, "CronJob"))["containers"][0]
    assert cronjob["command"] + cronjob.get("args", []) == ["stream-l2ae", *RETRAIN]
    assert _parse_cli(RETRAIN).func.__name__ == "cmd_retrain"


def test_k8s_config_model_dir_is_the_mounted_volume(k8s, tmp_path):
    path = _configmap_toml(tmp_path)
    assert load_serve_settings(path, environ={}).model_dir == MODELS_PATH
    assert load_retrain_settings(path, environ={}).model_dir == MODELS_PATH
    deployment = _one(k8s, "Deployment")
    pod = _pod_spec(deployment)
    (container,) = pod["containers"]
    checkpoint_dir = load_serve_settings(path, environ={}).checkpoint_dir
    _, checkpoints = _container_mounts(pod, container)[checkpoint_dir]
    assert "emptyDir" in checkpoints or "persistentVolumeClaim" in checkpoints


def test_k8s_secret_holds_the_sasl_password_variable(k8s):
    secret = _one(k8s, "Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert SECRET_VARIABLE in keys
    # Every secretKeyRef of every manifest (trainer-cronjob.yaml too) resolves in this Secret,
    # and every one feeds the SASL password variable.
    refs = 0
    for kind in ("Deployment", "CronJob"):
        for obj in k8s[kind]:
            for container in _pod_spec(obj)["containers"]:
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {}).get("secretKeyRef")
                    if ref is None:
                        continue
                    refs += 1
                    assert ref["name"] == secret["metadata"]["name"]
                    assert ref["key"] in keys
                    assert variable["name"] == SECRET_VARIABLE
    assert refs >= 2
    (daemon,) = _pod_spec(_one(k8s, "Deployment"))["containers"]
    (variable,) = [v for v in daemon["env"] if v["name"] == SECRET_VARIABLE]
    assert variable["valueFrom"]["secretKeyRef"]["key"] == SECRET_VARIABLE


def test_k8s_service_and_servicemonitor_expose_the_metrics_port(k8s):
    service = _one(k8s, "Service")
    monitor = _one(k8s, "ServiceMonitor")
    deployment = _one(k8s, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["port"] == METRICS_PORT and port["targetPort"] in ("metrics", METRICS_PORT)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert service["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == METRICS_PATH
    # The rules of deploy/prometheus select job="stream-l2ae": the job label is the Service's
    # app.kubernetes.io/name.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "stream-l2ae"
