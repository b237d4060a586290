"""The model registry: list, inspect and roll back the versions of a model directory.

A thin layer over :mod:`stream_l2ae.bundle` for people and scripts (``stream-l2ae models``)::

    >>> import tempfile
    >>> from stream_l2ae.bundle import BundleContents, save_bundle
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for name in ("v1", "v2"):
    ...         _ = save_bundle(root, BundleContents(metadata={"data": {"source": "toy", "n": 3}}),
    ...                         version=name)
    ...     print([(row["version"], row["is_latest"]) for row in describe_versions(root)])
    ...     print(rollback(root), show_version(root)["version"])
    [('v1', False), ('v2', True)]
    v1 v1

Listing reads only each version's ``metadata.json`` (fast, even for large models, and a corrupt
version is still listed, with its problem); :func:`show_version` and :func:`rollback` load and
verify the whole version.

The manifest's ``metadata`` is whatever the trainer stored. This module reads, when present:
``data`` (the :attr:`~stream_l2ae.datasets.Dataset.description` of the training data, of which
``source`` and ``n`` are shown), ``metrics`` (a flat object of numbers, e.g. ``training_auc``),
``gate`` (the retraining job's promotion decision, :meth:`trainer.gate.GateDecision.to_dict`: its
``promote`` flag is shown, and when there are no ``metrics`` the candidate's value of each
criterion in its ``rows``; a plain string, or an object with ``decision``, ``status`` or
``result``, is shown as it is) and ``training.n_records``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .bundle import (
    MANIFEST_FILE,
    VERSIONS_DIR,
    latest_version,
    list_versions,
    load_bundle,
    set_latest,
)
from .errors import BundleError

__all__ = ["describe_versions", "format_table", "rollback", "show_version"]

#: Lists longer than this, and objects nested deeper than ``_SUMMARY_DEPTH``, are abbreviated in
#: document summaries.
_SUMMARY_LIST = 8
_SUMMARY_DEPTH = 2
#: Metrics shown per row by :func:`format_table`.
_TABLE_METRICS = 2


def describe_versions(root: str | Path) -> list[dict[str, Any]]:
    """One summary per version under ``root``, oldest first.

    Each dict holds ``version``, ``created_at``, ``is_latest``, ``package_version``, ``data``
    (``{"source": ..., "n": ...}``), ``metrics`` (a dict), ``gate`` (the decision string, or
    ``None``), ``size_bytes`` (the version directory on disk) and ``error`` (``None``, or why
    the manifest could not be read).

    Raises
    ------
    BundleError
        If ``root`` is not a model directory.
    """
    root = _check_root(root)
    latest = latest_version(root)
    rows = []
    for name in list_versions(root):
        version_dir = root / VERSIONS_DIR / name
        manifest, error = _read_manifest(version_dir)
        metadata = manifest.get("metadata")
        metadata = metadata if isinstance(metadata, dict) else {}
        rows.append(
            {
                "version": name,
                "created_at": manifest.get("created_at"),
                "is_latest": name == latest,
                "package_version": manifest.get("package_version"),
                "data": _data_summary(metadata),
                "metrics": _metrics(metadata),
                "gate": _gate_decision(metadata.get("gate")),
                "size_bytes": _size_on_disk(version_dir),
                "error": error,
            }
        )
    return rows


def show_version(root: str | Path, version: str | None = None) -> dict[str, Any]:
    """The full manifest of ``version`` (default: the one ``LATEST`` names) and a summary of it.

    The version is loaded and verified. The result is the manifest plus ``is_latest``,
    ``size_bytes``, ``document_summary`` (each JSON document, long lists abbreviated),
    ``tensors`` and ``arrays`` (name to shape) and ``n_parameters``.

    Raises
    ------
    BundleError
        If there is no such version, or it does not load.
    """
    root = _check_root(root)
    latest = latest_version(root)
    if version is None:
        if latest is None:
            raise BundleError(f"model directory {root} has no LATEST version: name one")
        version = latest
    version_dir = root / VERSIONS_DIR / version
    if not version_dir.is_dir():
        raise BundleError(
            f"version {version!r} does not exist in {root}; versions: {list_versions(root)}"
        )
    bundle = load_bundle(version_dir)
    contents = bundle.contents
    return {
        **bundle.manifest,
        "is_latest": version == latest,
        "size_bytes": _size_on_disk(version_dir),
        "document_summary": {
            name: _summarize(document, 0) for name, document in contents.documents.items()
        },
        "tensors": {name: list(tensor.shape) for name, tensor in contents.tensors.items()},
        "arrays": {name: list(array.shape) for name, array in contents.arrays.items()},
        "n_parameters": int(sum(tensor.numel() for tensor in contents.tensors.values())),
    }


def rollback(root: str | Path, to: str | None = None) -> str:
    """Point ``LATEST`` at ``to``, or by default at the version saved just before it.

    The target is loaded and verified before the pointer moves (:func:`~stream_l2ae.bundle.
    set_latest`), so a corrupt version is never put in service. Newer versions are kept: a
    later ``rollback --to`` can move forward again. Rolling back to the version already in
    service changes nothing.

    Returns
    -------
    str
        The version ``LATEST`` now names.

    Raises
    ------
    BundleError
        If ``LATEST`` is missing, there is no earlier version, or the target does not exist or
        does not load.
    """
    root = _check_root(root)
    current = latest_version(root)
    versions = list_versions(root)
    if to is None:
        if current is None:
            raise BundleError(
                f"model directory {root} has no LATEST version to roll back from; "
                f"pick one with --to (versions: {versions})"
            )
        if current not in versions:
            raise BundleError(
                f"LATEST in {root} names {current!r}, which does not exist; "
                f"pick a version with --to (versions: {versions})"
            )
        position = versions.index(current)
        if position == 0:
            raise BundleError(
                f"cannot roll back: {current!r} is the oldest version in {root}"
                + (f" (newer: {versions[1:]})" if len(versions) > 1 else "")
            )
        to = versions[position - 1]
    elif to not in versions:
        raise BundleError(f"version {to!r} does not exist in {root}; versions: {versions}")
    if to == current:
        return to
    try:
        set_latest(root, to)
    except BundleError as error:
        raise BundleError(
            f"cannot roll back to {to!r}, LATEST still names {current!r}: {error}"
        ) from error
    return to


def format_table(rows: list[dict[str, Any]]) -> str:
    """The fixed-width table ``stream-l2ae models list`` prints; ``*`` marks ``LATEST``.

    Examples
    --------
    >>> print(format_table([{"version": "v1", "created_at": "2026-12-04T16:19:20.1+00:00",
    ...     "is_latest": True, "data": {"source": "shuttle", "n": 10000},
    ...     "metrics": {"training_auc": 0.99123}, "gate": "pass", "size_bytes": 2048,
    ...     "error": None}]))
    VERSION  CREATED (UTC)     LATEST  DATA     N      METRICS             GATE  SIZE
    v1       2026-12-04 16:19  *       shuttle  10000  training_auc=0.991  pass  2.0K
    """
    header = ("VERSION", "CREATED (UTC)", "LATEST", "DATA", "N", "METRICS", "GATE", "SIZE")
    lines = [header]
    for row in rows:
        data = row.get("data") or {}
        n = data.get("n")
        lines.append(
            (
                row["version"],
                _short_time(row.get("created_at")),
                "*" if row.get("is_latest") else "",
                str(data.get("source") or "-"),
                "-" if n is None else str(n),
                "ERROR: " + row["error"] if row.get("error") else _metrics_text(row.get("metrics")),
                row.get("gate") or "-",
                _human_size(row.get("size_bytes", 0)),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


# --- helpers --------------------------------------------------------------------------------


def _check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"model directory {root} does not exist")
    if not (root / VERSIONS_DIR).is_dir():
        raise BundleError(f"{root} is not a model directory (no {VERSIONS_DIR}/ in it)")
    return root


def _read_manifest(version_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The parsed manifest, or ``({}, reason)``; never raises (listing must survive damage)."""
    try:
        manifest = json.loads((version_dir / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        return {}, f"{MANIFEST_FILE} is missing"
    except OSError as error:
        return {}, f"cannot read {MANIFEST_FILE}: {error.strerror or error}"
    except ValueError:
        return {}, f"{MANIFEST_FILE} is not valid JSON"
    if not isinstance(manifest, dict):
        return {}, f"{MANIFEST_FILE} does not hold an object"
    return manifest, None


def _data_summary(metadata: dict[str, Any]) -> dict[str, Any]:
    data = metadata.get("data")
    data = data if isinstance(data, dict) else {}
    source = data.get("source")
    n = data.get("n")
    if n is None:
        training = metadata.get("training")
        if isinstance(training, dict):
            n = training.get("n_records")
    return {"source": source, "n": n}


def _gate_decision(gate: Any) -> str | None:
    if gate is None:
        return None
    if isinstance(gate, str):
        return gate
    if isinstance(gate, bool):
        return "pass" if gate else "fail"
    if isinstance(gate, dict):
        for key in ("decision", "status", "result"):
            if isinstance(gate.get(key), str):
                return gate[key]
        if isinstance(gate.get("promote"), bool):  # trainer.gate.GateDecision.to_dict()
            return "promote" if gate["promote"] else "reject"
        for key in ("passed", "accepted"):
            if isinstance(gate.get(key), bool):
                return "pass" if gate[key] else "fail"
    return "?"


def _metrics(metadata: dict[str, Any]) -> dict[str, Any]:
    """``metadata["metrics"]``, else the candidate's values in the gate's criteria rows."""
    metrics = metadata.get("metrics")
    if isinstance(metrics, dict):
        return metrics
    gate = metadata.get("gate")
    rows = gate.get("rows") if isinstance(gate, dict) else None
    if not isinstance(rows, list):
        return {}
    return {
        row["criterion"]: row["candidate"]
        for row in rows
        if isinstance(row, dict)
        and isinstance(row.get("criterion"), str)
        and isinstance(row.get("candidate"), int | float)
        and not isinstance(row.get("candidate"), bool)
    }


def _size_on_disk(directory: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            try:
                total += os.stat(os.path.join(dirpath, filename), follow_symlinks=False).st_size
            except OSError:
                continue
    return total


def _summarize(value: Any, depth: int) -> Any:
    if isinstance(value, dict):
        if depth >= _SUMMARY_DEPTH:
            return f"<object with {len(value)} keys>"
        return {key: _summarize(item, depth + 1) for key, item in value.items()}
    if isinstance(value, list):
        if len(value) > _SUMMARY_LIST or any(isinstance(item, dict | list) for item in value):
            return f"<list of {len(value)}>"
        return value
    return value


def _short_time(created_at: Any) -> str:
    if not isinstance(created_at, str) or len(created_at) < 16:
        return "-"
    return created_at[:16].replace("T", " ")


def _metrics_text(metrics: Any) -> str:
    """At most ``_TABLE_METRICS`` metrics, AUCs first; ``models list --json`` has them all."""
    if not isinstance(metrics, dict) or not metrics:
        return "-"
    parts = []
    for key in sorted(metrics, key=lambda key: "auc" not in key):
        value = metrics[key]
        if isinstance(value, float):
            parts.append(f"{key}={value:.3f}")
        elif isinstance(value, int | str | bool) or value is None:
            parts.append(f"{key}={value}")
    return " ".join(parts[:_TABLE_METRICS]) or "-"


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}G"  # pragma: no cover - unreachable
