"""Tests of consumers.checkpoint: atomic, verified checkpoints of the daemon's online state."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from consumers.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    CheckpointTimer,
    should_checkpoint,
)
from stream_l2ae.online import OnlineCentroids
from stream_l2ae.thresholds import (
    QuantileThreshold,
    SPOTThreshold,
    StreamingQuantileThreshold,
    threshold_from_dict,
)


def trained_online(seed: int = 0) -> OnlineCentroids:
    rng = np.random.default_rng(seed)
    initial = rng.normal(size=(4, 8))
    initial /= np.linalg.norm(initial, axis=1, keepdims=True)
    online = OnlineCentroids(initial, half_life=500.0, prior_weight=10.0)
    for step in range(5):
        online.partial_fit(rng.normal(size=(64, 8)), now=100.0 * (step + 1))
    return online


def sample_checkpoint(seed: int = 0) -> Checkpoint:
    rng = np.random.default_rng(seed)
    threshold = StreamingQuantileThreshold(alert_rate=0.01, half_life=10_000)
    threshold.update(rng.exponential(0.01, size=5_000))
    return Checkpoint.capture(
        "v000001-20261204T161920Z",
        trained_online(seed),
        threshold,
        records_seen=np.int64(320),  # numpy scalars are accepted
        extra={"note": "é", "sizes": [1, 2]},
    )


def files(store: CheckpointStore) -> list[str]:
    return sorted(p.name for p in store.path.iterdir() if p.name != ".lock")


def test_round_trip_with_real_online_state(tmp_path):
    online = trained_online()
    checkpoint = sample_checkpoint()
    store = CheckpointStore(tmp_path, replica_id="scorer-0")
    path = store.save(checkpoint)
    assert path == tmp_path / "scorer-0" / "checkpoint.json"

    loaded = store.load()
    assert loaded is not None
    assert loaded.model_version == checkpoint.model_version
    assert loaded.created_at == checkpoint.created_at
    assert loaded.records_seen == 320 and isinstance(loaded.records_seen, int)
    assert loaded.extra == {"note": "é", "sizes": [1, 2]}
    assert loaded.online_document == checkpoint.online_document
    assert loaded.online_arrays.keys() == checkpoint.online_arrays.keys()
    for name, array in checkpoint.online_arrays.items():
        np.testing.assert_array_equal(loaded.online_arrays[name], array)  # exact
        assert loaded.online_arrays[name].dtype == array.dtype
        assert loaded.online_arrays[name].flags.writeable

    restored = loaded.restore_online()
    np.testing.assert_array_equal(restored.centroids, online.centroids)
    np.testing.assert_array_equal(restored.counts, online.counts)
    assert restored.clock == online.clock
    assert restored.n_updates_ == online.n_updates_
    # The restored state keeps learning like the original.
    z = np.random.default_rng(1).normal(size=(32, 8))
    online.partial_fit(z, now=600.0)
    restored.partial_fit(z, now=600.0)
    np.testing.assert_array_equal(restored.centroids, online.centroids)


@pytest.mark.parametrize(
    "threshold",
    [
        QuantileThreshold(alert_rate=0.05).fit(np.linspace(0, 1, 101)),
        StreamingQuantileThreshold(alert_rate=0.01).fit(
            np.random.default_rng(0).exponential(0.01, size=10_000)
        ),
        SPOTThreshold(risk=1e-3).fit(np.random.default_rng(0).exponential(0.05, size=5_000)),
        SPOTThreshold(risk=1e-3),  # not fitted yet
    ],
    ids=["quantile", "streaming", "spot", "unfitted"],
)
def test_threshold_round_trip(tmp_path, threshold):
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint.capture("v1", trained_online(), threshold))
    loaded = store.load()
    assert loaded.threshold == threshold.to_dict()
    restored = loaded.restore_threshold()
    assert restored.to_dict() == threshold.to_dict()
    assert restored.is_fitted == threshold.is_fitted
    if threshold.is_fitted:
        assert restored.value == threshold.value
        assert threshold_from_dict(loaded.threshold).value == threshold.value


def test_overwrite_replaces_and_cleans_up(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint("v1", {"a": np.zeros(3)}, {}, {}, records_seen=1))
    store.save(Checkpoint("v1", {"a": np.ones(3)}, {}, {}, records_seen=2))
    loaded = store.load()
    assert loaded.records_seen == 2
    np.testing.assert_array_equal(loaded.online_arrays["a"], np.ones(3))
    names = files(store)
    assert len(names) == 2 and "checkpoint.json" in names  # the old arrays file is gone


def test_failed_replace_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint("v1", {"a": np.zeros(3)}, {}, {}, records_seen=1))
    before = files(store)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(Checkpoint("v1", {"a": np.ones(3)}, {}, {}, records_seen=2))
    monkeypatch.undo()

    assert files(store) == before  # no temporary or new arrays file left behind
    loaded = store.load()
    assert loaded.records_seen == 1
    np.testing.assert_array_equal(loaded.online_arrays["a"], np.zeros(3))


def test_failed_arrays_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path)
    store.save(Checkpoint("v1", {"a": np.zeros(3)}, {}, {}, records_seen=1))
    before = files(store)
    real_fsync = os.fsync
    calls = []

    def failing_fsync(descriptor):
        calls.append(descriptor)
        if len(calls) == 2:  # the arrays file is written, the document is not
            raise OSError("I/O error")
        return real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        store.save(Checkpoint("v1", {"a": np.ones(3)}, {}, {}, records_seen=2))
    monkeypatch.undo()
    assert files(store) == before
    assert store.load().records_seen == 1


def test_missing_checkpoint_is_none(tmp_path):
    assert CheckpointStore(tmp_path / "does-not-exist").load() is None
    assert CheckpointStore(tmp_path).load() is None


def corrupt_document(store: CheckpointStore) -> None:
    store.document_path.write_bytes(store.document_path.read_bytes()[:-40])  # truncated


def corrupt_arrays(store: CheckpointStore) -> None:
    name = json.loads(store.document_path.read_bytes())["arrays"]["file"]
    path = store.path / name
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a flipped bit in an array value: same size, wrong checksum
    path.write_bytes(bytes(data))


def truncate_arrays(store: CheckpointStore) -> None:
    name = json.loads(store.document_path.read_bytes())["arrays"]["file"]
    path = store.path / name
    path.write_bytes(path.read_bytes()[:-8])


def delete_arrays(store: CheckpointStore) -> None:
    name = json.loads(store.document_path.read_bytes())["arrays"]["file"]
    (store.path / name).unlink()


def edit_document(store: CheckpointStore) -> None:
    body = json.loads(store.document_path.read_bytes())
    body["records_seen"] = 10**6  # valid JSON, but no longer what was written
    store.document_path.write_text(json.dumps(body))


def garbage_document(store: CheckpointStore) -> None:
    store.document_path.write_bytes(b"\x00\xff not json")


@pytest.mark.parametrize(
    "damage",
    [
        corrupt_document,
        corrupt_arrays,
        truncate_arrays,
        delete_arrays,
        edit_document,
        garbage_document,
    ],
)
def test_corrupt_checkpoint_is_moved_aside(tmp_path, caplog, damage):
    store = CheckpointStore(tmp_path)
    store.save(sample_checkpoint())
    damage(store)

    with caplog.at_level(logging.WARNING, logger="consumers.checkpoint"):
        assert store.load() is None
    assert "corrupt" in caplog.text
    names = files(store)
    assert "checkpoint.json" not in names
    assert any(name.startswith("checkpoint.json.corrupt-") for name in names)
    if damage is not delete_arrays:
        assert any(name.startswith("state-") and ".corrupt-" in name for name in names)
    assert store.load() is None  # nothing left to load: the daemon re-seeds from the bundle

    # The next save works, and keeps the corrupt files for inspection.
    store.save(sample_checkpoint())
    assert store.load() is not None
    assert sum(".corrupt-" in name for name in files(store)) == sum(
        ".corrupt-" in name for name in names
    )


def test_newer_format_is_left_in_place(tmp_path, caplog):
    store = CheckpointStore(tmp_path)
    store.save(sample_checkpoint())
    body = json.loads(store.document_path.read_bytes())
    body["format"] = 99
    store.document_path.write_text(json.dumps(body))
    with caplog.at_level(logging.WARNING, logger="consumers.checkpoint"):
        assert store.load() is None
    assert "newer" in caplog.text
    assert store.document_path.exists()


def test_replicas_do_not_collide(tmp_path):
    first = CheckpointStore(tmp_path, replica_id="scorer-0")
    second = CheckpointStore(tmp_path, replica_id="scorer-0-b")  # a prefix of one another
    first.save(Checkpoint("v1", {"a": np.zeros(2)}, {}, {}, records_seen=1))
    second.save(Checkpoint("v1", {"a": np.ones(2)}, {}, {}, records_seen=2))
    first.save(Checkpoint("v1", {"a": np.full(2, 5.0)}, {}, {}, records_seen=3))
    assert first.load().records_seen == 3
    assert second.load().records_seen == 2
    np.testing.assert_array_equal(second.load().online_arrays["a"], np.ones(2))
    assert CheckpointStore(tmp_path).load() is None  # the default replica has none


@pytest.mark.parametrize("replica_id", ["", ".hidden", "a/b", "../up", "x" * 129, None])
def test_invalid_replica_ids_are_refused(tmp_path, replica_id):
    with pytest.raises(CheckpointError, match="replica_id"):
        CheckpointStore(tmp_path, replica_id=replica_id)


def test_invalid_content_is_refused_before_writing(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="JSON-safe"):
        store.save(Checkpoint("v1", {}, {"x": float("nan")}, {}))
    with pytest.raises(CheckpointError, match="non-string key"):
        store.save(Checkpoint("v1", {}, {}, {}, extra={"a": {1: 2}}))
    with pytest.raises(CheckpointError, match="numpy.ndarray"):
        store.save(Checkpoint("v1", {"a": [1.0, 2.0]}, {}, {}))
    with pytest.raises(CheckpointError, match="records_seen"):
        store.save(Checkpoint("v1", {}, {}, {}, records_seen=1.5))
    assert not store.path.exists() or files(store) == []


def test_non_contiguous_arrays_are_saved_correctly(tmp_path):
    store = CheckpointStore(tmp_path)
    matrix = np.arange(12.0).reshape(3, 4)
    store.save(Checkpoint("v1", {"t": matrix.T, "scalar": np.array(3.5)}, {}, {}))
    loaded = store.load()
    np.testing.assert_array_equal(loaded.online_arrays["t"], matrix.T)
    assert loaded.online_arrays["scalar"].shape == ()


def test_should_checkpoint():
    assert should_checkpoint(0.0, None, 60.0)
    assert not should_checkpoint(59.9, 0.0, 60.0)
    assert should_checkpoint(60.0, 0.0, 60.0)
    assert should_checkpoint(10.0, 50.0, 60.0)  # the clock went back


def test_checkpoint_timer():
    now = [100.0]
    timer = CheckpointTimer(30.0, clock=lambda: now[0])
    assert timer.due()
    timer.mark()
    now[0] = 129.0
    assert not timer.due()
    now[0] = 130.0
    assert timer.due()
    with pytest.raises(ValueError, match="interval_s"):
        CheckpointTimer(0)
