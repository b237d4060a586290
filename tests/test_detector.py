"""The end-to-end detector (detector.py): fit, score, stream updates and bundles."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from stream_l2ae.datasets import Dataset
from stream_l2ae.detector import DetectorConfig, L2AEDetector
from stream_l2ae.errors import BundleError, ConfigError, NotFittedError, RecordError
from stream_l2ae.evaluation import roc_auc

SMALL_SETTINGS = {
    "epochs": 1,
    "n_clusters": 4,
    "n_init": 1,
    "hidden_units": (16, 16),
    "device": "cpu",
}


def small_detector(**overrides) -> L2AEDetector:
    return L2AEDetector(progress=False, **{**SMALL_SETTINGS, **overrides})


# ----- fit and score ------------------------------------------------------------------------------


def test_fit_and_score_shuttle(fitted_detector, shuttle_split):
    _, test = shuttle_split
    scores = fitted_detector.score_samples(test)
    assert scores.shape == (len(test),) and scores.dtype == np.float32
    assert ((scores >= 0.0) & (scores <= 2.0)).all()
    assert roc_auc(test.y, scores) > 0.9
    assert fitted_detector.model.config.kind == "dense"
    assert fitted_detector.model.config.input_shape == (9,)


def test_predict_is_score_above_threshold(fitted_detector, shuttle_split):
    _, test = shuttle_split
    flags = fitted_detector.predict(test)
    assert flags.dtype == bool and flags.shape == (len(test),)
    threshold = fitted_detector.threshold.value
    np.testing.assert_array_equal(flags, fitted_detector.score_samples(test) > threshold)
    assert 0 < flags.sum() < len(test)
    # flagged records are mostly the labelled anomalies
    assert test.y[flags].mean() > 0.5


def test_scores_do_not_depend_on_the_batch(fitted_detector, shuttle_split):
    _, test = shuttle_split
    scores = fitted_detector.score_samples(test.records)
    one_by_one = np.concatenate([fitted_detector.score_samples([r]) for r in test.records[:20]])
    np.testing.assert_allclose(one_by_one, scores[:20], atol=1e-6)
    np.testing.assert_allclose(fitted_detector.score_samples(test), scores, atol=0)


def test_labels_are_never_used_in_fit(shuttle_split):
    train, test = shuttle_split
    window = train.head(2000)
    relabelled = Dataset(window.name, records=window.records, y=1 - window.y)
    reference = small_detector().fit(window).score_samples(test)
    for data, y in ((window.records, None), (relabelled, None), (window, 1 - window.y)):
        scores = small_detector().fit(data, y).score_samples(test)
        np.testing.assert_array_equal(scores, reference)


def test_robust_training_report(fitted_detector):
    report = fitted_detector.training_report_
    n = report["n_records"]
    assert n == 10000
    assert isinstance(report["n_suspects"], int)
    # suspects: the records of the minor clusters plus the trim_fraction highest scores
    minor = sum(report["minor_cluster_shares"]) * n
    trim = fitted_detector.config.trim_fraction * n
    assert max(minor, trim) - 5 <= report["n_suspects"] <= minor + trim + 5
    assert all(
        share < fitted_detector.config.min_cluster_share for share in report["minor_cluster_shares"]
    )
    assert len(report["histories"]) == 2
    assert len(report["cluster_shares"]) == 10
    assert sum(report["cluster_shares"]) == pytest.approx(1.0, abs=1e-3)
    assert report["threshold"] == fitted_detector.threshold.value
    json.dumps(report)


def test_non_robust_mode(shuttle_split):
    train, test = shuttle_split
    detector = small_detector(robust=False, epochs=2).fit(train.head(3000))
    report = detector.training_report_
    assert "n_suspects" not in report and "minor_cluster_shares" not in report
    assert len(report["histories"]) == 1
    scores = detector.score_samples(test)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 2)).all()
    assert roc_auc(test.y, scores) > 0.7


def test_l2_off_ablation_still_scores(shuttle_split):
    train, test = shuttle_split
    detector = small_detector(l2_normalize=False, robust=False).fit(train.head(2000))
    result = detector.score_batch(test.records[:100], keep_embeddings=True)
    norms = result.embeddings.norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
    assert ((result.score >= 0) & (result.score <= 2)).all()


def test_fit_needs_at_least_n_clusters_records(shuttle_split):
    train, _ = shuttle_split
    with pytest.raises(ConfigError, match="n_clusters=4"):
        small_detector().fit(train.records[:3])


def test_reconstruction_error(fitted_detector, shuttle_split):
    _, test = shuttle_split
    errors = fitted_detector.reconstruction_error(test.records[:50])
    assert errors.shape == (50,) and (errors >= 0).all()


# ----- bad records --------------------------------------------------------------------------------


def mixed_batch(records):
    good = records[:3]
    missing = {k: v for k, v in records[3].items() if k != "f3"}
    return [
        good[0],  # 0
        missing,  # 1: f3 missing
        good[1],  # 2
        {**records[4], "f2": "abc"},  # 3: wrong type
        {**records[5], "f5": float("nan")},  # 4: NaN
        "not a record",  # 5
        good[2],  # 6
        None,  # 7
        {**records[6], "f1": True},  # 8: bool is not a number
        [1, 2, 3],  # 9
    ]


EXPECTED_REJECTED = [
    (1, "f3", "missing"),
    (3, "f2", "type"),
    (4, "f5", "nan"),
    (5, None, "not_a_record"),
    (7, None, "not_a_record"),
    (8, "f1", "type"),
    (9, None, "not_a_record"),
]


def test_score_batch_keeps_good_records_and_reports_bad_ones(fitted_detector, shuttle_split):
    _, test = shuttle_split
    batch = mixed_batch(test.records)
    result = fitted_detector.score_batch(batch)
    assert result.indices.tolist() == [0, 2, 6]
    assert len(result) == 3
    good = [batch[i] for i in result.indices]
    np.testing.assert_allclose(result.score, fitted_detector.score_samples(good), atol=1e-6)
    assert result.cluster.shape == result.margin.shape == result.is_anomaly.shape == (3,)
    assert result.threshold == fitted_detector.threshold.value
    np.testing.assert_array_equal(result.is_anomaly, result.score > result.threshold)
    assert result.embeddings is None
    rejected = [(r.index, r.error.field, r.error.reason) for r in result.rejected]
    assert rejected == EXPECTED_REJECTED
    assert all(isinstance(r.error, RecordError) for r in result.rejected)


def test_score_batch_of_bad_records_only(fitted_detector):
    result = fitted_detector.score_batch([None, {"f1": "x"}])
    assert len(result) == 0 and result.indices.tolist() == []
    assert [r.index for r in result.rejected] == [0, 1]


def test_score_batch_keeps_unit_embeddings(fitted_detector, shuttle_split):
    _, test = shuttle_split
    result = fitted_detector.score_batch(test.records[:10], keep_embeddings=True)
    assert result.embeddings.shape == (10, fitted_detector.config.embedding_dim)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(10))


@pytest.mark.parametrize(("index", "field", "reason"), [(1, "f3", "missing"), (3, "f2", "type")])
def test_score_samples_raises_on_a_bad_record(fitted_detector, shuttle_split, index, field, reason):
    _, test = shuttle_split
    batch = mixed_batch(test.records)
    with pytest.raises(RecordError) as excinfo:
        fitted_detector.score_samples([batch[0], batch[index], batch[2]])
    assert (excinfo.value.field, excinfo.value.reason) == (field, reason)
    with pytest.raises(RecordError):
        fitted_detector.predict([batch[index]])


# ----- array input --------------------------------------------------------------------------------


def test_array_input_picks_the_conv_network(conv_detector, digits_split):
    _, rest = digits_split
    assert conv_detector.model.config.kind == "conv"
    assert conv_detector.model.config.input_shape == (1, 8, 8)
    assert conv_detector.model.config.conv_channels == (4, 8, 8)
    scores = conv_detector.score_samples(rest.X)
    assert scores.shape == (len(rest),)
    assert np.isfinite(scores).all() and ((scores >= 0) & (scores <= 2)).all()
    np.testing.assert_allclose(conv_detector.score_samples(rest), scores, atol=1e-6)
    np.testing.assert_allclose(
        conv_detector.score_samples(torch.as_tensor(rest.X)), scores, atol=1e-6
    )
    result = conv_detector.score_batch(rest.X[:5])
    assert result.indices.tolist() == list(range(5)) and result.rejected == []


def test_array_input_with_nan_raises_record_error(conv_detector, digits_split):
    _, rest = digits_split
    X = rest.X[:4].copy()
    X[2, 0, 3, 3] = np.nan
    with pytest.raises(RecordError) as excinfo:
        conv_detector.score_samples(X)
    assert excinfo.value.reason == "nan"


def test_array_input_of_the_wrong_shape_raises_config_error(conv_detector):
    with pytest.raises(ConfigError, match="shape"):
        conv_detector.score_samples(np.zeros((2, 1, 7, 7), dtype=np.float32))


# ----- streaming updates --------------------------------------------------------------------------


def test_partial_fit_moves_centroids_with_the_normal_records(fresh_detector, shuttle_split):
    _, test = shuttle_split
    batch = test.records[:500]
    before = fresh_detector.online.centroids
    result = fresh_detector.score_batch(batch)
    fresh_detector.partial_fit(batch, now=1234.0)
    online = fresh_detector.online
    assert online.clock == 1234.0 and online.n_updates_ == 1
    normal = ~result.is_anomaly
    assert 0 < result.is_anomaly.sum() < 500
    expected_counts = np.bincount(result.cluster[normal], minlength=online.n_clusters)
    np.testing.assert_allclose(online.counts, expected_counts)
    assert not np.allclose(online.centroids, before)


def test_partial_fit_skips_rejected_records(fresh_detector, shuttle_split):
    _, test = shuttle_split
    batch = mixed_batch(test.records)
    result = fresh_detector.score_batch(batch)
    fresh_detector.partial_fit(batch)
    assert fresh_detector.online.counts.sum() == pytest.approx((~result.is_anomaly).sum())


# ----- persistence --------------------------------------------------------------------------------


def test_save_load_round_trip(fitted_detector, shuttle_split, tmp_path):
    _, test = shuttle_split
    bundle = fitted_detector.save(tmp_path / "model", metadata={"run": "test"})
    loaded = L2AEDetector.load(tmp_path / "model", device="cpu")
    np.testing.assert_allclose(
        loaded.score_samples(test), fitted_detector.score_samples(test), atol=1e-6
    )
    assert loaded.threshold.value == fitted_detector.threshold.value
    assert loaded.config == fitted_detector.config
    assert loaded.model.config == fitted_detector.model.config
    assert loaded.schema == fitted_detector.schema
    assert loaded.version == bundle.version
    assert loaded.training_report_["n_suspects"] == fitted_detector.training_report_["n_suspects"]
    assert bundle.manifest["metadata"]["run"] == "test"
    # the version directory loads as well as the root
    again = L2AEDetector.load(bundle.path, device="cpu")
    np.testing.assert_array_equal(again.online.centroids, loaded.online.centroids)


def test_loaded_online_state_continues_identically(fresh_detector, shuttle_split, tmp_path):
    _, test = shuttle_split
    first, second = test.records[:400], test.records[400:800]
    fresh_detector.partial_fit(first, now=100.0)
    fresh_detector.save(tmp_path)
    loaded = L2AEDetector.load(tmp_path, device="cpu")
    np.testing.assert_array_equal(loaded.online.centroids, fresh_detector.online.centroids)
    assert loaded.online.clock == 100.0 and loaded.online.n_updates_ == 1

    fresh_detector.partial_fit(second, now=200.0)
    loaded.partial_fit(second, now=200.0)
    np.testing.assert_allclose(loaded.online.centroids, fresh_detector.online.centroids, atol=1e-9)
    np.testing.assert_allclose(loaded.online.counts, fresh_detector.online.counts, atol=1e-9)
    np.testing.assert_allclose(
        loaded.score_samples(test), fresh_detector.score_samples(test), atol=1e-6
    )


def test_conv_round_trip(conv_detector, digits_split, tmp_path):
    _, rest = digits_split
    conv_detector.save(tmp_path)
    loaded = L2AEDetector.load(tmp_path, device="cpu")
    assert loaded.model.config.kind == "conv"
    np.testing.assert_allclose(
        loaded.score_samples(rest.X), conv_detector.score_samples(rest.X), atol=1e-6
    )


@pytest.fixture
def saved(fitted_detector, tmp_path) -> Path:
    """Path of a freshly saved version directory of the fitted detector."""
    return fitted_detector.save(tmp_path / "model").path


def rewrite(version_dir: Path, filename: str, data: bytes) -> None:
    """Replace a bundle file and update its checksum, as a careless tool would."""
    (version_dir / filename).write_bytes(data)
    manifest_path = version_dir / "metadata.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][filename] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest_path.write_text(json.dumps(manifest))


def edit_document(version_dir: Path, name: str, **changes) -> None:
    document = json.loads((version_dir / f"{name}.json").read_text())
    document.update(changes)
    rewrite(version_dir, f"{name}.json", json.dumps(document).encode())


@pytest.mark.parametrize(
    "filename", ["weights.safetensors", "state.safetensors", "model_config.json"]
)
def test_corrupted_bundle_file_is_refused(saved, filename):
    path = saved / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=filename):
        L2AEDetector.load(saved, device="cpu")


def test_truncated_weights_are_refused(saved):
    path = saved / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="weights.safetensors"):
        L2AEDetector.load(saved, device="cpu")


@pytest.mark.parametrize(
    "changes",
    [
        {"embedding_dim": 12},
        {"hidden_units": [32, 32]},
        {"input_shape": [10]},
        {"kind": "conv"},
        {"kind": "bogus"},
        {"embedding_dim": "ten"},
    ],
    ids=lambda changes: "-".join(f"{k}={v}" for k, v in changes.items()),
)
def test_tampered_model_config_is_refused(saved, changes):
    edit_document(saved, "model_config", **changes)
    with pytest.raises(BundleError, match="incompatible"):
        L2AEDetector.load(saved, device="cpu")


def test_tampered_documents_are_refused(saved, tmp_path):
    for name, changes in (
        ("detector", {"n_clusters": 0}),
        ("detector", {"unknown_setting": 1}),
        ("online", {"half_life": -1.0}),
        ("threshold", {"kind": "bogus"}),
    ):
        version_dir = tmp_path / f"copy-{name}-{len(changes)}-{next(iter(changes))}"
        copy_tree(saved, version_dir)
        edit_document(version_dir, name, **changes)
        with pytest.raises(BundleError):
            L2AEDetector.load(version_dir, device="cpu")


def test_weights_that_do_not_fit_the_model_are_refused(saved):
    tensors = safetensors.torch.load((saved / "weights.safetensors").read_bytes())
    tensors.pop(sorted(tensors)[0])
    rewrite(saved, "weights.safetensors", safetensors.torch.save(tensors))
    with pytest.raises(BundleError, match="incompatible"):
        L2AEDetector.load(saved, device="cpu")


def test_loading_a_missing_bundle_raises_bundle_error(tmp_path):
    with pytest.raises(BundleError):
        L2AEDetector.load(tmp_path / "nothing-here")


def copy_tree(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())


# ----- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("n_clusters", 0),
        ("n_clusters", 2.5),
        ("epochs", -1),
        ("batch_size", "64"),
        ("n_init", 0),
        ("embedding_dim", 0),
        ("min_cluster_share", 1.0),
        ("trim_fraction", -0.1),
        ("alert_rate", 0.0),
        ("alert_rate", 1.0),
        ("alert_rate", math.nan),
        ("learning_rate", 0.0),
        ("learning_rate", -1e-3),
        ("online_half_life", 0.0),
        ("online_prior_weight", -1.0),
        ("n_clusters", True),
    ],
)
def test_detector_config_errors_name_the_bad_value(name, value):
    with pytest.raises(ConfigError) as excinfo:
        DetectorConfig(**{name: value})
    message = str(excinfo.value)
    assert name in message and repr(value) in message
    with pytest.raises(ConfigError):
        L2AEDetector(progress=False, **{name: value})


def test_unknown_settings_raise_config_error():
    with pytest.raises(ConfigError, match="n_cluster"):
        L2AEDetector(n_cluster=5)
    with pytest.raises(ConfigError, match="bogus"):
        DetectorConfig.from_dict({"bogus": 1})


def test_detector_config_round_trip():
    config = DetectorConfig(hidden_units=[8, 4], conv_channels=[2, 4], n_clusters=3)
    assert config.hidden_units == (8, 4) and config.conv_channels == (2, 4)
    document = json.loads(json.dumps(config.to_dict()))
    assert DetectorConfig.from_dict(document) == config
    assert DetectorConfig.from_dict(DetectorConfig().to_dict()) == DetectorConfig()


def test_keyword_overrides_replace_config_fields():
    detector = L2AEDetector(DetectorConfig(n_clusters=3, epochs=2), epochs=7, device="cpu")
    assert (detector.config.n_clusters, detector.config.epochs) == (3, 7)


@pytest.mark.parametrize(
    "call",
    [
        lambda d: d.score_samples([{"f1": 1}]),
        lambda d: d.score_batch([{"f1": 1}]),
        lambda d: d.predict([{"f1": 1}]),
        lambda d: d.partial_fit([{"f1": 1}]),
        lambda d: d.reconstruction_error([{"f1": 1}]),
        lambda d: d.embed(np.zeros((1, 9), np.float32)),
        lambda d: d.to_contents(),
        lambda d: d.schema,
    ],
    ids=[
        "score_samples", "score_batch", "predict", "partial_fit", "reconstruction_error",
        "embed", "to_contents", "schema",
    ],
)  # fmt: skip
def test_not_fitted_error_before_fit(call, tmp_path):
    detector = L2AEDetector(progress=False, device="cpu")
    with pytest.raises(NotFittedError, match="not fitted"):
        call(detector)
    with pytest.raises(NotFittedError):
        detector.save(tmp_path)
    assert not (tmp_path / "versions").exists()
