"""The command line, end to end on small data: train, evaluate --json, report, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_l2ae.bundle import list_versions
from stream_l2ae.cli import main
from stream_l2ae.datasets import load_dataset


@pytest.fixture(scope="module")
def shuttle_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    code = main(
        ["train", "--data", "shuttle", "--limit", "10000", "--epochs", "5", "--out", str(out), "-q"]
    )
    assert code == 0
    return out


def test_train_writes_a_bundle_version(shuttle_model, capsys):
    assert len(list_versions(shuttle_model)) == 1


def test_evaluate_json_reports_auc(shuttle_model, capsys, tmp_path):
    report = tmp_path / "report.png"
    code = main(
        [
            "evaluate",
            "--model",
            str(shuttle_model),
            "--data",
            "shuttle",
            "--limit",
            "12000",
            "--json",
            "--report",
            str(report),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 12000 and result["n_scored"] == 12000
    assert result["auc"] > 0.9
    assert 0 <= result["alert_rate"] <= 1
    assert report.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_clustering_accuracy_on_class_labels(tmp_path, capsys):
    digits = load_dataset("digits")
    npz = tmp_path / "digits.npz"
    np.savez(npz, X=digits.X, y=digits.y)
    models = tmp_path / "models"
    assert main(["train", "--data", str(npz), "--epochs", "2", "--out", str(models), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--model", str(models), "--data", str(npz), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "auc" not in result
    assert 0.1 < result["clustering_acc"] <= 1.0


def test_evaluate_counts_malformed_jsonl_records(shuttle_model, tmp_path, capsys):
    records = load_dataset("shuttle", limit=50).records
    rows = [dict(r, label=0) for r in records]
    rows[3]["f2"] = "oops"
    del rows[7]["f5"]
    path = tmp_path / "stream.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code = main(["evaluate", "--model", str(shuttle_model), "--data", str(path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 50 and result["n_scored"] == 48
    assert result["rejected_reasons"] == {"type": 1, "missing": 1}


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data", "no-such-dataset", "--out", str(tmp_path)])
    assert code == 2
    assert "no-such-dataset" in capsys.readouterr().err


def test_bad_setting_names_the_value(tmp_path, capsys):
    code = main(["train", "--data", "digits", "--clusters", "0", "--out", str(tmp_path)])
    assert code == 2
    assert "n_clusters" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    code = main(["evaluate", "--model", str(tmp_path / "nope"), "--data", "digits"])
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_config_file_and_environment(tmp_path, monkeypatch, capsys):
    config = tmp_path / "config.toml"
    config.write_text(f'[model]\ndir = "{tmp_path / "m"}"\n\n[detector]\nepochs = 1\n')
    monkeypatch.setenv("STREAM_L2AE_DETECTOR__N_CLUSTERS", "3")
    code = main(["train", "--data", "digits", "--limit", "300", "--config", str(config), "-q"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["path"].startswith(str(tmp_path / "m"))
    bundle_doc = json.loads(
        (tmp_path / "m" / "versions" / summary["version"] / "detector.json").read_text()
    )
    assert bundle_doc["epochs"] == 1 and bundle_doc["n_clusters"] == 3
