from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import stream_l2ae
from stream_l2ae import bundle as bundle_module
from stream_l2ae.bundle import (
    BUNDLE_FORMAT,
    BundleContents,
    latest_version,
    list_versions,
    load_bundle,
    prune_versions,
    save_bundle,
    set_latest,
)
from stream_l2ae.errors import BundleError, ConfigError


def make_contents(marker: float = 1.0) -> BundleContents:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=generator)
    return BundleContents(
        tensors={
            "encoder.weight": weight * marker,
            "encoder.weight_t": weight.t(),  # non-contiguous view sharing storage
            "decoder.bias": torch.arange(3, dtype=torch.float64),
            "half": torch.ones(2, dtype=torch.float16),
            "bf16": torch.full((2, 2), 0.5, dtype=torch.bfloat16),
            "steps": torch.tensor(7, dtype=torch.int64),
            "mask": torch.tensor([True, False]),
            "param": torch.nn.Parameter(torch.zeros(2)),
        },
        arrays={
            "centroids": np.arange(6, dtype=np.float32).reshape(2, 3) * marker,
            "centroids_t": np.arange(6, dtype=np.float32).reshape(2, 3).T,
            "counts": np.array([3, 5], dtype=np.int64),
            "flags": np.array([True, False]),
            "bytes": np.array([0, 255], dtype=np.uint8),
            "total": np.array(2.5),
            "empty": np.zeros((0, 3), dtype=np.float32),
        },
        documents={
            "model_config": {"hidden_dims": [8, 4], "activation": "relu", "nested": {"k": None}},
            "threshold": {"value": 0.25 * marker, "quantile": 0.99},
            "features": {"names": ["f1", "f2", "é"]},
        },
        metadata={"training_data": "toy", "metrics": {"auc": 0.9}, "rows": 100},
    )


def assert_same_contents(actual: BundleContents, expected: BundleContents) -> None:
    assert actual.tensors.keys() == expected.tensors.keys()
    for name, tensor in expected.tensors.items():
        loaded = actual.tensors[name]
        assert loaded.dtype == tensor.dtype, name
        assert loaded.shape == tensor.shape, name
        assert torch.equal(loaded, tensor.detach()), name
    assert actual.arrays.keys() == expected.arrays.keys()
    for name, array in expected.arrays.items():
        loaded = actual.arrays[name]
        assert loaded.dtype == array.dtype, name
        assert loaded.shape == array.shape, name
        np.testing.assert_array_equal(loaded, array, err_msg=name)
    assert actual.documents == expected.documents
    assert actual.metadata == expected.metadata


def version_dir(root: Path, version: str) -> Path:
    return root / "versions" / version


def rewrite_manifest(directory: Path, **changes: object) -> None:
    path = directory / "metadata.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


# --- round trip and layout ------------------------------------------------------------------


def test_round_trip_is_exact_and_preserves_dtypes(tmp_path: Path) -> None:
    contents = make_contents()
    saved = save_bundle(tmp_path, contents)
    loaded = load_bundle(tmp_path)

    assert loaded.version == saved.version
    assert loaded.path == saved.path == version_dir(tmp_path, saved.version).resolve()
    assert_same_contents(loaded.contents, contents)
    assert loaded.manifest == saved.manifest
    assert all(array.flags.writeable for array in loaded.contents.arrays.values())
    assert all(tensor.device.type == "cpu" for tensor in loaded.contents.tensors.values())


def test_empty_contents_round_trip(tmp_path: Path) -> None:
    save_bundle(tmp_path, BundleContents())
    loaded = load_bundle(tmp_path).contents
    assert loaded.tensors == {} and loaded.arrays == {} and loaded.documents == {}
    assert loaded.metadata == {}


def test_layout_and_manifest(tmp_path: Path) -> None:
    saved = save_bundle(tmp_path, make_contents())
    directory = version_dir(tmp_path, saved.version)
    expected_files = {
        "weights.safetensors",
        "state.safetensors",
        "model_config.json",
        "threshold.json",
        "features.json",
    }
    assert {path.name for path in directory.iterdir()} == expected_files | {"metadata.json"}

    manifest = json.loads((directory / "metadata.json").read_text())
    assert manifest == saved.manifest
    assert manifest["format"] == BUNDLE_FORMAT
    assert manifest["version"] == saved.version
    assert manifest["package_version"] == stream_l2ae.__version__
    assert datetime.fromisoformat(manifest["created_at"]).utcoffset().total_seconds() == 0
    assert manifest["documents"] == ["model_config", "threshold", "features"]
    assert manifest["metadata"] == {"training_data": "toy", "metrics": {"auc": 0.9}, "rows": 100}
    assert set(manifest["files"]) == expected_files
    for name, entry in manifest["files"].items():
        data = (directory / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert json.loads((directory / "threshold.json").read_text()) == {
        "value": 0.25,
        "quantile": 0.99,
    }


def test_auto_versions_sort_chronologically_and_latest_follows(tmp_path: Path) -> None:
    names = [save_bundle(tmp_path, make_contents(marker=i)).version for i in range(1, 4)]

    assert [name[:8] for name in names] == ["v000001-", "v000002-", "v000003-"]
    assert names == sorted(names)
    assert list_versions(tmp_path) == names
    assert latest_version(tmp_path) == names[-1]
    assert (tmp_path / "LATEST").read_text().strip() == names[-1]
    loaded = load_bundle(tmp_path)
    assert loaded.version == names[-1]
    assert loaded.contents.documents["threshold"]["value"] == 0.75


def test_load_via_root_version_dir_and_symlink(tmp_path: Path) -> None:
    first = save_bundle(tmp_path, make_contents(marker=1))
    second = save_bundle(tmp_path, make_contents(marker=2))

    assert load_bundle(tmp_path).version == second.version
    assert load_bundle(str(tmp_path)).version == second.version
    assert load_bundle(version_dir(tmp_path, first.version)).version == first.version
    link = tmp_path / "latest"
    if link.is_symlink():  # best effort: absent where symlinks are not allowed
        assert link.resolve() == version_dir(tmp_path, second.version).resolve()
        assert load_bundle(link).version == second.version


def test_list_versions_orders_by_save_sequence(tmp_path: Path) -> None:
    for name in ("zeta", "alpha"):
        save_bundle(tmp_path, BundleContents(), version=name)
    auto = save_bundle(tmp_path, BundleContents()).version
    save_bundle(tmp_path, BundleContents(), version="mid")

    assert auto.startswith("v000003-")
    assert list_versions(tmp_path) == ["zeta", "alpha", auto, "mid"]
    assert latest_version(tmp_path) == "mid"


def test_nothing_saved_yet(tmp_path: Path) -> None:
    assert list_versions(tmp_path / "missing") == []
    assert latest_version(tmp_path) is None
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "missing")
    with pytest.raises(BundleError, match="metadata.json"):
        load_bundle(tmp_path)


# --- pruning and rollback -------------------------------------------------------------------


def test_keep_prunes_oldest_versions(tmp_path: Path) -> None:
    names = [save_bundle(tmp_path, BundleContents(), keep=2).version for _ in range(4)]
    assert list_versions(tmp_path) == names[-2:]
    assert latest_version(tmp_path) == names[-1]
    assert sorted(os.listdir(tmp_path / "versions")) == names[-2:]  # no leftovers either


def test_prune_spares_the_version_in_service(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        save_bundle(tmp_path, BundleContents(), version=name)
    set_latest(tmp_path, "a")

    assert prune_versions(tmp_path, keep=2) == ["b"]
    assert list_versions(tmp_path) == ["a", "c", "d"]
    assert load_bundle(tmp_path).version == "a"


@pytest.mark.parametrize("keep", [0, -1, 1.5, True])
def test_keep_must_be_a_positive_integer(tmp_path: Path, keep: object) -> None:
    with pytest.raises(ConfigError, match="keep"):
        save_bundle(tmp_path, BundleContents(), keep=keep)  # type: ignore[arg-type]
    assert list_versions(tmp_path) == []


def test_set_latest_rolls_back(tmp_path: Path) -> None:
    old = save_bundle(tmp_path, make_contents(marker=1)).version
    new = save_bundle(tmp_path, make_contents(marker=2)).version
    assert load_bundle(tmp_path).version == new

    set_latest(tmp_path, old)
    assert latest_version(tmp_path) == old
    loaded = load_bundle(tmp_path)
    assert loaded.version == old
    assert loaded.contents.documents["threshold"]["value"] == 0.25

    set_latest(tmp_path, new)
    assert load_bundle(tmp_path).version == new


def test_set_latest_refuses_missing_or_corrupt_versions(tmp_path: Path) -> None:
    good = save_bundle(tmp_path, make_contents()).version
    bad = save_bundle(tmp_path, make_contents(), version="bad").version
    set_latest(tmp_path, good)
    with open(version_dir(tmp_path, bad) / "state.safetensors", "r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        handle.write(b"\x7f")

    with pytest.raises(BundleError, match="does not exist"):
        set_latest(tmp_path, "nope")
    with pytest.raises(BundleError, match="checksum mismatch for state.safetensors"):
        set_latest(tmp_path, bad)
    with pytest.raises(BundleError, match="invalid version name"):
        set_latest(tmp_path, "../versions/bad")
    assert latest_version(tmp_path) == good


def test_save_after_rollback_becomes_latest(tmp_path: Path) -> None:
    first = save_bundle(tmp_path, BundleContents()).version
    save_bundle(tmp_path, BundleContents())
    set_latest(tmp_path, first)
    third = save_bundle(tmp_path, BundleContents()).version
    assert third.startswith("v000003-")
    assert latest_version(tmp_path) == third


# --- verification ---------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A bundle root with one version; returns that version's directory."""
    return save_bundle(tmp_path, make_contents()).path


def test_corrupt_byte_is_a_checksum_error(saved: Path) -> None:
    path = saved / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum mismatch for weights.safetensors.*corrupt"):
        load_bundle(saved)
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(saved.parent.parent)


def test_truncated_file_is_a_size_error(saved: Path) -> None:
    path = saved / "state.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="size mismatch for state.safetensors"):
        load_bundle(saved)


def test_missing_file(saved: Path) -> None:
    (saved / "threshold.json").unlink()
    with pytest.raises(BundleError, match="missing file threshold.json"):
        load_bundle(saved)


def test_missing_metadata(saved: Path) -> None:
    (saved / "metadata.json").unlink()
    with pytest.raises(BundleError, match="metadata.json is missing"):
        load_bundle(saved)
    with pytest.raises(BundleError, match="metadata.json is missing"):
        load_bundle(saved.parent.parent)


def test_metadata_not_json(saved: Path) -> None:
    (saved / "metadata.json").write_text("{not json")
    with pytest.raises(BundleError, match="metadata.json .*not valid JSON"):
        load_bundle(saved)


def test_future_format_is_refused_with_upgrade_hint(saved: Path) -> None:
    rewrite_manifest(saved, format=BUNDLE_FORMAT + 98, package_version="9.9.9", files="new")
    with pytest.raises(BundleError, match=r"format 99.*stream-l2ae>=9\.9\.9"):
        load_bundle(saved)


@pytest.mark.parametrize("bad_format", [None, "1", True, 0])
def test_invalid_format_is_refused(saved: Path, bad_format: object) -> None:
    rewrite_manifest(saved, format=bad_format)
    with pytest.raises(BundleError, match="format"):
        load_bundle(saved)


def test_document_not_listed_in_files(saved: Path) -> None:
    manifest = json.loads((saved / "metadata.json").read_text())
    del manifest["files"]["features.json"]
    (saved / "metadata.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="features.json is not listed"):
        load_bundle(saved)


@pytest.mark.parametrize("evil_name", ["../LATEST", "/etc/passwd", ".lock", "a/b"])
def test_manifest_file_names_cannot_escape_the_version_dir(saved: Path, evil_name: str) -> None:
    manifest = json.loads((saved / "metadata.json").read_text())
    manifest["files"][evil_name] = {"sha256": "0" * 64, "bytes": 1}
    (saved / "metadata.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="invalid file name"):
        load_bundle(saved)


class _Exploit:
    """Unpickling this creates a directory: proof that a payload was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_payload_is_refused_not_executed(saved: Path, tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "exploit-ran"
    payload_path = saved / "weights.safetensors"
    if writer == "pickle":
        payload_path.write_bytes(pickle.dumps({"w": _Exploit(marker)}))
    else:
        torch.save({"w": _Exploit(marker)}, payload_path)
    # Make the checksums agree, as an attacker who can write the directory would.
    data = payload_path.read_bytes()
    manifest = json.loads((saved / "metadata.json").read_text())
    manifest["files"]["weights.safetensors"] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    (saved / "metadata.json").write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="weights.safetensors .*not a valid safetensors file"):
        load_bundle(saved)
    assert not marker.exists()


def test_latest_pointing_nowhere(tmp_path: Path) -> None:
    save_bundle(tmp_path, BundleContents())
    (tmp_path / "LATEST").write_text("gone\n")
    with pytest.raises(BundleError, match="points to version 'gone'"):
        load_bundle(tmp_path)
    (tmp_path / "LATEST").write_text("../../etc\n")
    with pytest.raises(BundleError, match="valid version name"):
        load_bundle(tmp_path)


# --- saving errors and atomicity ------------------------------------------------------------


def test_explicit_version_collision(tmp_path: Path) -> None:
    save_bundle(tmp_path, make_contents(marker=1), version="prod-1")
    with pytest.raises(BundleError, match="'prod-1' already exists"):
        save_bundle(tmp_path, make_contents(marker=2), version="prod-1")
    assert list_versions(tmp_path) == ["prod-1"]
    assert load_bundle(tmp_path).contents.documents["threshold"]["value"] == 0.25
    assert not [name for name in os.listdir(tmp_path / "versions") if name.startswith(".")]


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "a b", "x" * 129])
def test_invalid_version_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(BundleError, match="invalid version name"):
        save_bundle(tmp_path, BundleContents(), version=name)


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (BundleContents(documents={"t": {"v": np.float32(1.0)}}), "not JSON-safe"),
        (BundleContents(documents={"t": {"v": float("nan")}}), "not JSON-safe"),
        (BundleContents(documents={"t": {"v": {1, 2}}}), "not JSON-safe"),
        (BundleContents(documents={"t": {"by_cluster": {0: 1}}}), "non-string key 0"),
        (BundleContents(documents={"t": [1, 2]}), "must be a dict"),  # type: ignore[dict-item]
        (BundleContents(documents={"metadata": {}}), "reserved"),
        (BundleContents(documents={"../x": {}}), "invalid document name"),
        (BundleContents(metadata={"when": datetime(2026, 1, 1)}), "metadata is not JSON-safe"),
        (BundleContents(arrays={"o": np.array([object()])}), "cannot serialize arrays"),
        (BundleContents(arrays={"n": 3}), "numpy.ndarray"),  # type: ignore[dict-item]
        (BundleContents(tensors={"t": np.zeros(2)}), "torch.Tensor"),  # type: ignore[dict-item]
    ],
)
def test_unserializable_contents_write_nothing(
    tmp_path: Path, contents: BundleContents, message: str
) -> None:
    with pytest.raises(BundleError, match=message):
        save_bundle(tmp_path, contents)
    assert list_versions(tmp_path) == []
    assert latest_version(tmp_path) is None


def test_failure_mid_save_leaves_no_partial_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = save_bundle(tmp_path, make_contents()).version
    real_write = bundle_module._write_durably
    calls = 0

    def failing_write(path: Path, data: bytes) -> dict[str, object]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(bundle_module, "_write_durably", failing_write)
    with pytest.raises(OSError, match="No space left"):
        save_bundle(tmp_path, make_contents(marker=2))

    assert list_versions(tmp_path) == [first]
    assert latest_version(tmp_path) == first
    assert os.listdir(tmp_path / "versions") == [first]


def test_leftover_temp_dirs_are_ignored_and_stale_ones_cleaned(tmp_path: Path) -> None:
    versions = tmp_path / "versions"
    stale = versions / ".tmp-crashed"
    fresh = versions / ".tmp-in-progress"
    for directory in (stale, fresh):
        directory.mkdir(parents=True)
        (directory / "weights.safetensors").write_bytes(b"partial")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    assert list_versions(tmp_path) == []
    name = save_bundle(tmp_path, BundleContents()).version
    assert list_versions(tmp_path) == [name]
    assert not stale.exists()
    assert fresh.exists()  # may belong to a saver that is still running


# --- concurrency ----------------------------------------------------------------------------


def assert_consistent_after_concurrent_saves(root: Path, expected_count: int) -> None:
    names = list_versions(root)
    assert len(names) == expected_count
    sequences = [load_bundle(version_dir(root, name)).manifest["sequence"] for name in names]
    assert sequences == list(range(1, expected_count + 1))
    assert latest_version(root) == names[-1]
    assert not [name for name in os.listdir(root / "versions") if name.startswith(".")]


def test_concurrent_threads_do_not_clobber(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    start = threading.Barrier(6)

    def saver(index: int) -> None:
        try:
            start.wait()
            for step in range(4):
                save_bundle(tmp_path, make_contents(marker=index * 10 + step))
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=saver, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_consistent_after_concurrent_saves(tmp_path, 24)


def test_concurrent_processes_do_not_clobber(tmp_path: Path) -> None:
    root = tmp_path / "bundle"
    script = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        import numpy as np
        from stream_l2ae.bundle import BundleContents, save_bundle

        root, index = Path(sys.argv[1]), sys.argv[2]
        (root.parent / f"ready-{index}").touch()
        while not (root.parent / "go").exists():
            time.sleep(0.005)
        for step in range(int(sys.argv[3])):
            save_bundle(root, BundleContents(arrays={"x": np.full(1000, step)}))
        """
    )
    process_count, saves_per_process = 3, 3
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(root), str(index), str(saves_per_process)]
        )
        for index in range(process_count)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < len(processes) and time.monotonic() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()
    assert [process.wait(timeout=120) for process in processes] == [0] * len(processes)
    assert_consistent_after_concurrent_saves(root, process_count * saves_per_process)
