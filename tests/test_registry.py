"""The model registry and ``stream-l2ae models``: list, show, roll back."""

from __future__ import annotations

import json

import pytest

from stream_l2ae.bundle import latest_version, list_versions
from stream_l2ae.cli import main
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.errors import BundleError
from stream_l2ae.registry import describe_versions, format_table, rollback, show_version

#: What the retraining job stores (trainer.gate.GateDecision.to_dict), abridged.
RETRAIN_GATE = {
    "promote": True,
    "reasons": ["not worse on any criterion"],
    "rows": [
        {"criterion": "reconstruction_loss", "current": 0.02, "candidate": 0.0123},
        {"criterion": "auc", "current": 0.95, "candidate": 0.9712},
        {"criterion": "rejected_rate", "current": None, "candidate": None},
    ],
}


@pytest.fixture
def model_dir(tmp_path, conv_detector, digits_split):
    """Three versions of the tiny digits detector; the third is LATEST.

    The first is what ``stream-l2ae train`` stores, the second what ``stream-l2ae retrain``
    stores, the third has a plain gate string.
    """
    train, _ = digits_split
    root = tmp_path / "models"
    conv_detector.save(root, metadata={"data": train.description, "metrics": {"training_auc": 0.9}})
    conv_detector.save(root, metadata={"data": train.description, "gate": RETRAIN_GATE})
    conv_detector.save(
        root,
        metadata={"data": train.description, "metrics": {"training_auc": 0.92}, "gate": "pass"},
    )
    return root


def test_describe_versions_lists_all_with_latest_marked(model_dir):
    rows = describe_versions(model_dir)
    assert [row["version"] for row in rows] == list_versions(model_dir)
    assert [row["is_latest"] for row in rows] == [False, False, True]
    assert [row["gate"] for row in rows] == [None, "promote", "pass"]
    assert rows[1]["metrics"] == {"reconstruction_loss": 0.0123, "auc": 0.9712}
    first = rows[0]
    assert first["data"] == {"source": "sklearn.datasets.load_digits", "n": 1000}
    assert first["metrics"] == {"training_auc": 0.9}
    assert first["created_at"].startswith("20") and first["package_version"]
    assert first["size_bytes"] > 1000 and first["error"] is None


def test_show_version_returns_the_manifest(model_dir):
    latest = show_version(model_dir)
    assert latest["version"] == latest_version(model_dir) and latest["is_latest"]
    assert latest["metadata"]["gate"] == "pass"
    assert {"format", "files", "documents", "created_at", "sequence"} <= set(latest)
    assert latest["document_summary"]["model_config"]["kind"] == "conv"
    assert latest["n_parameters"] > 0 and "centroids" in latest["arrays"]
    first = show_version(model_dir, list_versions(model_dir)[0])
    assert not first["is_latest"] and "gate" not in first["metadata"]
    with pytest.raises(BundleError, match="does not exist"):
        show_version(model_dir, "v999")


def test_rollback_steps_back_and_the_detector_follows(model_dir):
    first, second, third = list_versions(model_dir)
    assert rollback(model_dir) == second
    assert latest_version(model_dir) == second
    assert L2AEDetector.load(model_dir, device="cpu").version == second
    assert rollback(model_dir) == first
    with pytest.raises(BundleError, match="oldest"):
        rollback(model_dir)
    assert latest_version(model_dir) == first
    assert list_versions(model_dir) == [first, second, third]  # nothing deleted


def test_rollback_to_a_named_version(model_dir):
    first, _, third = list_versions(model_dir)
    assert rollback(model_dir, to=first) == first
    assert L2AEDetector.load(model_dir, device="cpu").version == first
    assert rollback(model_dir, to=third) == third  # and forward again
    assert rollback(model_dir, to=third) == third  # already in service: no change
    with pytest.raises(BundleError, match="does not exist"):
        rollback(model_dir, to="nope")


def test_rollback_with_a_single_version_refuses(tmp_path, conv_detector):
    root = tmp_path / "models"
    only = conv_detector.save(root).version
    with pytest.raises(BundleError, match="oldest"):
        rollback(root)
    assert latest_version(root) == only


def test_a_corrupt_version_is_listed_but_never_put_in_service(model_dir):
    first, second, third = list_versions(model_dir)
    weights = model_dir / "versions" / second / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    (model_dir / "versions" / first / "metadata.json").write_text("{not json")
    rows = describe_versions(model_dir)
    assert rows[0]["error"] == "metadata.json is not valid JSON"
    assert "ERROR" in format_table(rows)
    with pytest.raises(BundleError, match="cannot roll back to .*checksum mismatch"):
        rollback(model_dir)
    assert latest_version(model_dir) == third


def test_not_a_model_directory(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        describe_versions(tmp_path / "missing")
    with pytest.raises(BundleError, match="not a model directory"):
        rollback(tmp_path)


def test_cli_models_list_show_rollback(model_dir, capsys):
    first, second, third = list_versions(model_dir)
    assert main(["models", "list", "--dir", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["VERSION", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [first, second, third]
    assert "*" in lines[3].split() and "*" not in lines[1].split()
    assert "training_auc=0.900" in lines[1]
    assert "auc=0.971 reconstruction_loss=0.012" in lines[2] and "promote" in lines[2]

    assert main(["models", "list", "--dir", str(model_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["is_latest"] for row in rows] == [False, False, True]

    assert main(["models", "show", "--dir", str(model_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == third
    assert main(["models", "show", "--dir", str(model_dir), first]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == first

    assert main(["models", "rollback", "--dir", str(model_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"LATEST: {third} -> {second}"
    assert main(["models", "rollback", "--dir", str(model_dir), "--to", third]) == 0
    assert capsys.readouterr().out.strip() == f"LATEST: {second} -> {third}"
    assert latest_version(model_dir) == third


def test_cli_models_errors_exit_2(tmp_path, conv_detector, capsys):
    root = tmp_path / "models"
    conv_detector.save(root)
    assert main(["models", "rollback", "--dir", str(root)]) == 2
    assert "stream-l2ae: error: cannot roll back" in capsys.readouterr().err
    assert main(["models", "list", "--dir", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["models", "show", "--dir", str(root), "v999"]) == 2


def test_cli_models_dir_defaults_to_the_config(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STREAM_L2AE_MODEL__DIR", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\ndir = "{model_dir}"\n')
    assert main(["models", "list", "--config", str(config), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3
    monkeypatch.setenv("STREAM_L2AE_MODEL__DIR", str(model_dir))
    assert main(["models", "show"]) == 0
    assert json.loads(capsys.readouterr().out)["is_latest"]
