"""The trainer's evaluation gate on small Shuttle detectors.

The good model is the session's ``fitted_detector`` (10,000 records, 5 epochs, 10 clusters: AUC
about 0.99 on the next 2,000). Smaller set-ups do not make a good model on Shuttle: 3 epochs and 5
clusters on the first 4,500 records score an AUC below 0.5 on the next 1,500.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_l2ae.datasets import Dataset
from stream_l2ae.detector import L2AEDetector
from stream_l2ae.errors import ConfigError
from tests.conftest import SHUTTLE_SETTINGS
from trainer.gate import (
    CRITERIA,
    GateDecision,
    cluster_stability,
    compare_models,
    score_separation,
)


@pytest.fixture(scope="module")
def holdout(shuttle_split) -> Dataset:
    return shuttle_split[1]


@pytest.fixture(scope="module")
def unlabelled(holdout) -> Dataset:
    return Dataset("unlabelled", records=holdout.records)


@pytest.fixture(scope="module")
def weak_detector(shuttle_split) -> L2AEDetector:
    """Stopped after one epoch: an AUC of about 0.36."""
    settings = {**SHUTTLE_SETTINGS, "epochs": 1}
    return L2AEDetector(progress=False, **settings).fit(shuttle_split[0])


@pytest.fixture(scope="module")
def untrained_detector(shuttle_split) -> L2AEDetector:
    """Barely trained (learning rate 1e-5): its auto-encoder reconstructs nothing."""
    settings = {**SHUTTLE_SETTINGS, "epochs": 1, "learning_rate": 1e-5}
    return L2AEDetector(progress=False, **settings).fit(shuttle_split[0])


def _row(decision: GateDecision, name: str) -> dict:
    return next(row for row in decision.rows if row["criterion"] == name)


def test_worse_candidate_is_refused_by_the_auc(fitted_detector, weak_detector, holdout):
    decision = compare_models(fitted_detector, weak_detector, holdout)
    assert not decision.promote
    assert decision.reasons[0].startswith("auc (decisive): candidate")
    auc = _row(decision, "auc")
    assert auc["verdict"] == "worse" and auc["binding"]
    assert auc["current"] > 0.95 and auc["candidate"] < auc["current"] - 0.3
    assert [row["criterion"] for row in decision.rows] == [c.name for c in CRITERIA]


def test_better_candidate_is_promoted(fitted_detector, weak_detector, holdout):
    decision = compare_models(weak_detector, fitted_detector, holdout)
    assert decision.promote
    assert _row(decision, "auc")["verdict"] == "better"
    assert "better on auc" in decision.reasons[1]
    # The weak model's clusters are more stable: an advisory regression, reported, not binding.
    stability = _row(decision, "cluster_stability")
    assert stability["verdict"] == "worse" and not stability["binding"]
    assert any(r.startswith("advisory") and "cluster_stability" in r for r in decision.reasons)
    # With every criterion binding, that proxy would keep the weak model in service.
    strict = compare_models(weak_detector, fitted_detector, holdout, auc_decides=False)
    assert not strict.promote and "cluster_stability" in strict.reasons[0]
    # ...unless its margin is widened.
    lenient = compare_models(
        weak_detector,
        fitted_detector,
        holdout,
        auc_decides=False,
        margins={"cluster_stability": 0.5},
    )
    assert lenient.promote


def test_unlabelled_holdout_uses_every_criterion(
    tmp_path, fitted_detector, untrained_detector, unlabelled
):
    decision = compare_models(fitted_detector, untrained_detector, unlabelled)
    assert "auc" not in [row["criterion"] for row in decision.rows]
    assert all(row["binding"] for row in decision.rows)
    assert not decision.promote
    assert any(r.startswith("reconstruction_loss: candidate") for r in decision.reasons)
    assert decision.holdout == {"name": "unlabelled", "n": len(unlabelled), "labelled": False}
    # The same model, through a bundle: similar on everything, promoted.
    reloaded = L2AEDetector.load(fitted_detector.save(tmp_path / "models").path, device="cpu")
    same = compare_models(fitted_detector, reloaded, unlabelled)
    assert same.promote, same.table()
    assert {row["verdict"] for row in same.rows} == {"similar"}


def test_no_current_model_promotes(weak_detector, holdout):
    decision = compare_models(None, weak_detector, holdout)
    assert decision.promote
    assert decision.reasons == ["no model in service: the candidate is promoted"]
    assert all(row["current"] is None for row in decision.rows)
    assert {row["verdict"] for row in decision.rows} == {"no current model"}
    assert decision.details["current"] is None


def test_table_and_to_dict(fitted_detector, weak_detector, holdout):
    decision = compare_models(fitted_detector, weak_detector, holdout)
    table = decision.table()
    lines = table.splitlines()
    assert lines[0].split() == ["criterion", "better", "current", "candidate", "verdict"]
    assert set(lines[1]) == {"-", " "}
    for criterion in CRITERIA:
        assert any(line.startswith(criterion.name) for line in lines)
    assert "decision: KEEP CURRENT (margin 0.02, holdout 2000 records)" in table
    assert "(advisory)" in table
    as_dict = decision.to_dict()
    restored = json.loads(json.dumps(as_dict, allow_nan=False))
    assert restored["promote"] is False and restored["margin"] == 0.02
    assert restored["rows"][0]["criterion"] == "auc"
    assert restored["details"]["candidate"]["n_scored"] == 2000


def test_candidate_that_rejects_everything_is_refused(fitted_detector, holdout):
    bad = Dataset("bad", records=[{**r, "f1": "oops"} for r in holdout.records[:50]])
    decision = compare_models(fitted_detector, fitted_detector, bad)
    assert not decision.promote
    assert "rejects every holdout record" in decision.reasons[0]
    assert _row(decision, "rejected_rate")["candidate"] == 1.0
    json.dumps(decision.to_dict(), allow_nan=False)


def test_arguments_are_checked(fitted_detector, holdout):
    with pytest.raises(ConfigError, match="margin"):
        compare_models(None, fitted_detector, holdout, margin=1.5)
    with pytest.raises(ConfigError, match="unknown gate criterion"):
        compare_models(None, fitted_detector, holdout, margins={"speed": 0.1})
    with pytest.raises(ConfigError, match="non-empty holdout"):
        compare_models(None, fitted_detector, holdout.head(0))


def test_score_separation_and_cluster_stability():
    rng = np.random.default_rng(0)
    bulk = rng.normal(0.1, 0.01, 990)
    far = np.concatenate([bulk, rng.normal(0.6, 0.01, 10)])
    near = np.concatenate([bulk, rng.normal(0.13, 0.01, 10)])
    assert score_separation(far) > 3 * score_separation(near)
    assert score_separation(far) == pytest.approx(score_separation(far * 7.0))  # scale-free
    # Four tight blobs cluster the same way from any half; uniform noise does not.
    centers = np.eye(4, dtype=np.float32)
    blobs = np.repeat(centers, 100, axis=0) + rng.normal(0, 0.01, (400, 4)).astype(np.float32)
    noise = rng.normal(size=(400, 4)).astype(np.float32)
    assert cluster_stability(blobs, 4) > 0.99
    assert cluster_stability(noise, 4) < cluster_stability(blobs, 4) - 0.2
    assert np.isnan(cluster_stability(blobs[:6], 4))
