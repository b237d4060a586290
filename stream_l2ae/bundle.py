"""Versioned, verifiable model bundles.

A bundle root holds every saved version of a model plus a pointer to the one in service::

    root/
        LATEST                      # text file naming the version in service (source of truth)
        latest -> versions/<name>   # convenience symlink, best effort (see below)
        .lock                       # advisory lock serialising commits (never delete it)
        versions/
            v000001-20261204T161920Z/
                weights.safetensors # BundleContents.tensors (torch)
                state.safetensors   # BundleContents.arrays (numpy)
                <document>.json     # one per BundleContents.documents entry
                metadata.json       # the manifest: format, version, checksums, caller metadata

The container is generic: the detector decides what goes into :class:`BundleContents`.

Guarantees
----------
* A save is atomic. Files are written and fsynced in ``versions/.tmp-<hex>``, which is renamed to
  its final name in one step, and only then is ``LATEST`` replaced (temporary file, fsync,
  ``os.replace``). A crash leaves either no new version or a complete one; ``.tmp-*`` entries are
  never listed and are removed by a later save once they are an hour old. A crash between the
  rename and the pointer move leaves a complete version that is not in service yet.
* Concurrent savers (threads or processes) to one root do not clobber each other: the short commit
  step (choose the sequence number, rename, move the pointer, prune) runs under an exclusive
  ``flock`` on ``root/.lock``, and a rename onto an existing version is detected and retried with
  the next sequence number. Where ``fcntl`` is missing (Windows) only the rename check remains.
* Loading never unpickles: tensors and arrays are read with safetensors, documents with ``json``.
  Every file is checked against the size and SHA-256 recorded in ``metadata.json`` before it is
  parsed, and any problem raises :class:`~stream_l2ae.errors.BundleError` naming the file.
* Loading writes nothing, so a daemon can read bundles from a read-only mount.

``LATEST`` is authoritative. The ``latest`` symlink is refreshed by an atomic symlink swap for the
benefit of people and tools, but it is skipped where symlinks are not permitted and on
case-insensitive file systems (where ``latest`` and ``LATEST`` are the same entry).

Round trips are exact for tensor and array values and dtypes, with three caveats: arrays come back
in native byte order and C order, tensors come back on the CPU, and JSON turns tuples into lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import SafetensorError

from stream_l2ae.durable import (
    fsync_directory,
    reject_non_string_keys,
    serialize_arrays,
    write_durably,
)
from stream_l2ae.errors import BundleError, ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: rely on the rename collision check alone
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "BUNDLE_FORMAT",
    "Bundle",
    "BundleContents",
    "latest_version",
    "list_versions",
    "load_bundle",
    "prune_versions",
    "save_bundle",
    "set_latest",
]

BUNDLE_FORMAT = 1
"""Layout version written into ``metadata.json``; bump it on any incompatible change."""

WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.safetensors"
MANIFEST_FILE = "metadata.json"
POINTER_FILE = "LATEST"
POINTER_LINK = "latest"
VERSIONS_DIR = "versions"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600.0
_MAX_COMMIT_ATTEMPTS = 100

# Versions, documents and manifest file names: no path separators, no leading dot (dot-names are
# reserved for temporary entries, and this also rules out "." and "..").
_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_AUTO_VERSION_PATTERN = re.compile(r"v(\d+)-\d{8}T\d{6}Z")
_RESERVED_DOCUMENT_NAMES = frozenset({Path(MANIFEST_FILE).stem})


@dataclass
class BundleContents:
    """Everything a detector stores in one bundle version.

    Parameters
    ----------
    tensors
        Torch tensors (encoder/decoder weights), saved to ``weights.safetensors``. They are
        detached and copied to contiguous CPU memory first, so tied or non-contiguous tensors
        are fine.
    arrays
        Numpy arrays (centroids, online sums and counts), saved to ``state.safetensors``.
    documents
        JSON-safe dicts, each saved to ``<name>.json`` (e.g. ``model_config``, ``threshold``).
        Keys must be strings and floats finite, so that any JSON reader can parse the files.
    metadata
        Free JSON-safe training information (data description, metrics), kept in the manifest
        under ``"metadata"``.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    documents: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bundle:
    """One verified bundle version.

    Parameters
    ----------
    path
        Absolute path of the version directory.
    version
        The version name.
    contents
        The stored tensors, arrays, documents and metadata.
    manifest
        The parsed ``metadata.json``.
    """

    path: Path
    version: str
    contents: BundleContents
    manifest: dict[str, Any]


def save_bundle(
    root: str | Path,
    contents: BundleContents,
    *,
    version: str | None = None,
    keep: int | None = None,
) -> Bundle:
    """Save ``contents`` as a new version under ``root`` and point ``LATEST`` at it.

    Parameters
    ----------
    root
        Bundle root; created if missing.
    contents
        What to store.
    version
        Explicit version name matching ``[A-Za-z0-9_-][A-Za-z0-9._-]*`` (at most 128 characters).
        By default the name is ``v<sequence>-<UTC timestamp>``, e.g. ``v000001-20261204T161920Z``,
        which sorts chronologically.
    keep
        If given, afterwards delete the oldest versions so that ``keep`` remain, never deleting
        the version ``LATEST`` points to.

    Returns
    -------
    Bundle
        The saved version (``contents`` is the object passed in).

    Raises
    ------
    BundleError
        If the contents cannot be serialized, or ``version`` is invalid or already exists.
    ConfigError
        If ``keep`` is not a positive integer.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> import torch
    >>> contents = BundleContents(
    ...     tensors={"encoder.weight": torch.ones(2, 3)},
    ...     arrays={"centroids": np.eye(2, dtype=np.float32)},
    ...     documents={"threshold": {"value": 0.25}},
    ...     metadata={"training_data": "toy"},
    ... )
    >>> with tempfile.TemporaryDirectory() as root:
    ...     first = save_bundle(root, contents)
    ...     second = save_bundle(root, contents, version="hand-picked", keep=1)
    ...     print(first.version.startswith("v000001-"), list_versions(root), latest_version(root))
    True ['hand-picked'] hand-picked
    """
    root = Path(root)
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ConfigError(f"keep must be a positive integer or None, got {keep!r}")
    if version is not None:
        _check_name(version, "version name")
    payloads = _serialize_contents(contents)

    versions_dir = root / VERSIONS_DIR
    versions_dir.mkdir(parents=True, exist_ok=True)
    if version is not None and (versions_dir / version).exists():
        raise BundleError(f"version {version!r} already exists in {root}")
    _remove_stale_temp_entries(versions_dir)
    _remove_stale_temp_entries(root)

    staging = versions_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        file_entries = {
            name: _write_durably(staging / name, data) for name, data in payloads.items()
        }
        with _commit_lock(root):
            name, manifest = _commit_staging(staging, versions_dir, contents, file_entries, version)
            _write_pointer(root, name)
            if keep is not None:
                _prune_unlocked(root, keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(
        path=(versions_dir / name).resolve(), version=name, contents=contents, manifest=manifest
    )


def load_bundle(path: str | Path) -> Bundle:
    """Load and verify one bundle version.

    Parameters
    ----------
    path
        A version directory, or a bundle root (then the version ``LATEST`` names is loaded).

    Returns
    -------
    Bundle

    Raises
    ------
    BundleError
        If the bundle is missing, incomplete, corrupt, or written in a newer format. The message
        names the offending file.

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> contents = BundleContents(arrays={"counts": np.array([3, 5])})
    >>> with tempfile.TemporaryDirectory() as root:
    ...     saved = save_bundle(root, contents, version="a")
    ...     via_root = load_bundle(root)
    ...     via_dir = load_bundle(saved.path)
    ...     print(via_root.version, via_dir.contents.arrays["counts"])
    a [3 5]
    """
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle path {path} does not exist")
    if _is_root(path):
        name = latest_version(path)
        if name is None:
            raise BundleError(
                f"bundle root {path} has no {POINTER_FILE} pointer; versions present: "
                f"{list_versions(path)} (use set_latest to choose one)"
            )
        version_dir = path / VERSIONS_DIR / name
        if not version_dir.is_dir():
            raise BundleError(
                f"{POINTER_FILE} in {path} points to version {name!r}, which does not exist"
            )
        return _load_version_dir(version_dir)
    return _load_version_dir(path)


def list_versions(root: str | Path) -> list[str]:
    """Return the version names under ``root``, oldest first.

    Versions are ordered by the sequence number recorded at save time (read from
    ``metadata.json``, or from an automatic name when the manifest is unreadable), then by name.
    Temporary ``.tmp-*`` directories are ignored.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for name in ("zeta", "alpha"):
    ...         _ = save_bundle(root, BundleContents(), version=name)
    ...     print(list_versions(root))
    ['zeta', 'alpha']
    """
    versions_dir = Path(root) / VERSIONS_DIR
    if not versions_dir.is_dir():
        return []
    names = [
        entry.name
        for entry in os.scandir(versions_dir)
        if _NAME_PATTERN.fullmatch(entry.name) and entry.is_dir()
    ]
    return sorted(names, key=lambda name: (_version_sequence(versions_dir, name), name))


def latest_version(root: str | Path) -> str | None:
    """Return the version ``LATEST`` points to, or ``None`` if nothing was saved yet.

    Raises
    ------
    BundleError
        If the pointer file holds something that is not a version name.
    """
    pointer = Path(root) / POINTER_FILE
    try:
        text = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:
        raise BundleError(f"cannot read {pointer}: {error}") from error
    if not _NAME_PATTERN.fullmatch(text):
        raise BundleError(f"{pointer} does not hold a valid version name: {text[:80]!r}")
    return text


def set_latest(root: str | Path, version: str) -> None:
    """Point ``LATEST`` at an existing ``version`` (e.g. to roll back), atomically.

    The version is loaded and verified first, so the pointer never moves to a corrupt version.

    Raises
    ------
    BundleError
        If ``version`` does not exist or does not load.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for name in ("good", "bad"):
    ...         _ = save_bundle(root, BundleContents(), version=name)
    ...     set_latest(root, "good")
    ...     print(load_bundle(root).version)
    good
    """
    root = Path(root)
    _check_name(version, "version name")
    version_dir = root / VERSIONS_DIR / version
    if not version_dir.is_dir():
        raise BundleError(f"version {version!r} does not exist in {root}")
    _load_version_dir(version_dir)
    with _commit_lock(root):
        _write_pointer(root, version)


def prune_versions(root: str | Path, keep: int) -> list[str]:
    """Delete the oldest versions so that ``keep`` remain, sparing the one ``LATEST`` names.

    Each deleted version is first renamed to a ``.tmp-*`` name, so a half-deleted directory is
    never listed. A version that cannot be deleted is skipped with a warning.

    Returns
    -------
    list of str
        The deleted version names, oldest first.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as root:
    ...     for name in ("a", "b", "c"):
    ...         _ = save_bundle(root, BundleContents(), version=name)
    ...     set_latest(root, "a")
    ...     print(prune_versions(root, keep=1), list_versions(root))
    ['b'] ['a', 'c']
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ConfigError(f"keep must be a positive integer, got {keep!r}")
    root = Path(root)
    if not (root / VERSIONS_DIR).is_dir():
        return []
    with _commit_lock(root):
        return _prune_unlocked(root, keep)


# --- saving ---------------------------------------------------------------------------------


def _serialize_contents(contents: BundleContents) -> dict[str, bytes]:
    """Serialize everything except the manifest, before anything touches the disk."""
    payloads = {
        WEIGHTS_FILE: _serialize_tensors(contents.tensors),
        STATE_FILE: serialize_arrays(contents.arrays, f"arrays for {STATE_FILE}", BundleError),
    }
    if not isinstance(contents.documents, dict):
        raise BundleError(f"documents must be a dict, got {type(contents.documents).__name__}")
    for name, document in contents.documents.items():
        _check_name(name, "document name")
        if name in _RESERVED_DOCUMENT_NAMES:
            raise BundleError(f"document name {name!r} is reserved for the manifest")
        if not isinstance(document, dict):
            raise BundleError(f"document {name!r} must be a dict, got {type(document).__name__}")
        payloads[f"{name}.json"] = _encode_json(document, f"document {name!r}")
    if not isinstance(contents.metadata, dict):
        raise BundleError(f"metadata must be a dict, got {type(contents.metadata).__name__}")
    _encode_json(contents.metadata, "metadata")
    return payloads


def _serialize_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    if not isinstance(tensors, dict):
        raise BundleError(f"tensors must be a dict, got {type(tensors).__name__}")
    prepared = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise BundleError(
                f"tensors must map str to torch.Tensor; got {type(name).__name__} -> "
                f"{type(tensor).__name__} for {name!r}"
            )
        # A private contiguous CPU copy: safetensors refuses views and tensors sharing storage.
        prepared[name] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    try:
        return safetensors.torch.save(prepared)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as error:
        raise BundleError(f"cannot serialize tensors to {WEIGHTS_FILE}: {error}") from error


def _encode_json(value: dict[str, Any], what: str) -> bytes:
    try:
        text = json.dumps(value, allow_nan=False, indent=2, ensure_ascii=False)
    except (TypeError, ValueError) as error:
        raise BundleError(
            f"{what} is not JSON-safe ({error}); use str keys, finite floats, and plain "
            "Python types (convert numpy scalars with .item())"
        ) from error
    reject_non_string_keys(value, what, BundleError)
    return (text + "\n").encode("utf-8")


def _commit_staging(
    staging: Path,
    versions_dir: Path,
    contents: BundleContents,
    file_entries: dict[str, dict[str, Any]],
    explicit_version: str | None,
) -> tuple[str, dict[str, Any]]:
    """Write the manifest and rename ``staging`` to its version name; call under the lock."""
    for _ in range(_MAX_COMMIT_ATTEMPTS):
        sequence = _next_sequence(versions_dir)
        now = datetime.now(UTC)
        name = explicit_version or f"v{sequence:06d}-{now.strftime('%Y%m%dT%H%M%SZ')}"
        manifest = {
            "format": BUNDLE_FORMAT,
            "version": name,
            "sequence": sequence,
            "created_at": now.isoformat(timespec="microseconds"),
            "package_version": _package_version(),
            "files": file_entries,
            "documents": list(contents.documents),
            "metadata": contents.metadata,
        }
        _write_durably(staging / MANIFEST_FILE, _encode_json(manifest, MANIFEST_FILE))
        fsync_directory(staging)
        final = versions_dir / name
        # os.rename replaces an *empty* target directory, hence the explicit check first.
        if not final.exists():
            try:
                os.rename(staging, final)
            except OSError:
                if not final.exists():
                    raise
            else:
                fsync_directory(versions_dir)
                return name, manifest
        if explicit_version is not None:
            raise BundleError(f"version {explicit_version!r} already exists in {versions_dir}")
    raise BundleError(
        f"could not find a free version name in {versions_dir} after {_MAX_COMMIT_ATTEMPTS} tries"
    )


def _next_sequence(versions_dir: Path) -> int:
    sequences = [
        _version_sequence(versions_dir, name) for name in list_versions(versions_dir.parent)
    ]
    return max(sequences, default=0) + 1


def _version_sequence(versions_dir: Path, name: str) -> int:
    """Sequence number of a version: from its manifest, else from an automatic name, else -1."""
    try:
        manifest = json.loads((versions_dir / name / MANIFEST_FILE).read_bytes())
    except (OSError, ValueError):
        manifest = None
    if isinstance(manifest, dict):
        sequence = manifest.get("sequence")
        if isinstance(sequence, int) and not isinstance(sequence, bool):
            return sequence
    match = _AUTO_VERSION_PATTERN.fullmatch(name)
    return int(match.group(1)) if match else -1


def _write_pointer(root: Path, version: str) -> None:
    """Atomically replace ``LATEST`` (then refresh the ``latest`` symlink); call under the lock."""
    temporary = root / f"{TEMP_PREFIX}{POINTER_FILE}-{uuid.uuid4().hex}"
    try:
        _write_durably(temporary, f"{version}\n".encode())
        os.replace(temporary, root / POINTER_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_directory(root)
    _refresh_latest_symlink(root, version)


def _refresh_latest_symlink(root: Path, version: str) -> None:
    link = root / POINTER_LINK
    if os.path.lexists(link) and not link.is_symlink():
        return  # case-insensitive file system (this is LATEST itself) or someone else's file
    temporary = root / f"{TEMP_PREFIX}{POINTER_LINK}-{uuid.uuid4().hex}"
    try:
        os.symlink(Path(VERSIONS_DIR) / version, temporary, target_is_directory=True)
        os.replace(temporary, link)
    except OSError:  # symlinks not permitted here: LATEST alone is enough
        with contextlib.suppress(OSError):
            temporary.unlink()


def _prune_unlocked(root: Path, keep: int) -> list[str]:
    versions_dir = root / VERSIONS_DIR
    names = list_versions(root)
    in_service = latest_version(root)
    doomed = [name for name in names[: max(len(names) - keep, 0)] if name != in_service]
    deleted = []
    for name in doomed:
        # Rename first so that a half-deleted version is never listed; a crash leaves a .tmp-*
        # directory that a later save removes.
        graveyard = versions_dir / f"{TEMP_PREFIX}deleted-{uuid.uuid4().hex}"
        try:
            os.rename(versions_dir / name, graveyard)
        except FileNotFoundError:
            continue
        except OSError as error:  # pruning is housekeeping: the save itself succeeded
            warnings.warn(f"could not delete old bundle version {name}: {error}", stacklevel=3)
            continue
        shutil.rmtree(graveyard, ignore_errors=True)
        deleted.append(name)
    if deleted:
        fsync_directory(versions_dir)
    return deleted


def _remove_stale_temp_entries(directory: Path) -> None:
    """Remove ``.tmp-*`` leftovers of crashed saves; recent ones may belong to a live saver."""
    cutoff = time.time() - STALE_TEMP_SECONDS
    for entry in os.scandir(directory):
        if not entry.name.startswith(TEMP_PREFIX):
            continue
        with contextlib.suppress(OSError):
            if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@contextlib.contextmanager
def _commit_lock(root: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``root/.lock``, released by the kernel if the process dies."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    with open(root / LOCK_FILE, "ab") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _write_durably(path: Path, data: bytes) -> dict[str, Any]:
    """Write ``data`` to ``path`` and fsync it; return its manifest entry."""
    write_durably(path, data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


# --- loading --------------------------------------------------------------------------------


def _is_root(path: Path) -> bool:
    return (path / POINTER_FILE).is_file() or (path / VERSIONS_DIR).is_dir()


def _load_version_dir(version_dir: Path) -> Bundle:
    if not version_dir.is_dir():
        raise BundleError(f"bundle version {version_dir} is not a directory")
    manifest = _read_manifest(version_dir)
    _check_format(manifest, version_dir)
    files = _check_manifest_fields(manifest, version_dir)
    payloads = {name: _read_verified(version_dir, name, entry) for name, entry in files.items()}

    tensors = _deserialize(
        safetensors.torch.load, payloads[WEIGHTS_FILE], WEIGHTS_FILE, version_dir
    )
    arrays = _deserialize(safetensors.numpy.load, payloads[STATE_FILE], STATE_FILE, version_dir)
    arrays = {
        name: array if array.flags.writeable else array.copy() for name, array in arrays.items()
    }
    documents = {}
    for name in manifest["documents"]:
        filename = f"{name}.json"
        try:
            document = json.loads(payloads[filename])
        except ValueError as error:
            raise BundleError(f"{filename} in {version_dir} is not valid JSON: {error}") from error
        if not isinstance(document, dict):
            raise BundleError(f"{filename} in {version_dir} does not hold a JSON object")
        documents[name] = document

    contents = BundleContents(
        tensors=tensors, arrays=arrays, documents=documents, metadata=manifest["metadata"]
    )
    return Bundle(
        path=version_dir.resolve(),
        version=manifest["version"],
        contents=contents,
        manifest=manifest,
    )


def _read_manifest(version_dir: Path) -> dict[str, Any]:
    manifest_path = version_dir / MANIFEST_FILE
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"{MANIFEST_FILE} is missing in {version_dir}: not a bundle version directory, "
            "or the bundle is corrupt"
        ) from None
    except OSError as error:
        raise BundleError(f"cannot read {manifest_path}: {error}") from error
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise BundleError(
            f"{MANIFEST_FILE} in {version_dir} is not valid JSON ({error}): bundle is corrupt"
        ) from error
    if not isinstance(manifest, dict):
        raise BundleError(f"{MANIFEST_FILE} in {version_dir} does not hold a JSON object")
    return manifest


def _check_format(manifest: dict[str, Any], version_dir: Path) -> None:
    """Refuse formats this package cannot read, before looking at any other field."""
    bundle_format = manifest.get("format")
    if isinstance(bundle_format, bool) or not isinstance(bundle_format, int):
        raise BundleError(
            f"{MANIFEST_FILE} in {version_dir} has no integer 'format' field: "
            "not a stream_l2ae bundle, or the bundle is corrupt"
        )
    if bundle_format > BUNDLE_FORMAT:
        writer = manifest.get("package_version")
        upgrade = (
            f"it was written by stream_l2ae {writer}; install stream-l2ae>={writer} to load it"
            if isinstance(writer, str)
            else "upgrade stream-l2ae to load it"
        )
        raise BundleError(
            f"bundle {version_dir} uses format {bundle_format}, but stream_l2ae "
            f"{_package_version()} reads formats up to {BUNDLE_FORMAT}: {upgrade}"
        )
    if bundle_format < 1:
        raise BundleError(f"bundle {version_dir} has unsupported format {bundle_format}")


def _check_manifest_fields(manifest: dict[str, Any], version_dir: Path) -> dict[str, Any]:
    """Validate the manifest's structure and return its ``files`` table."""

    def corrupt(problem: str) -> BundleError:
        return BundleError(f"{MANIFEST_FILE} in {version_dir}: {problem}: bundle is corrupt")

    if not isinstance(manifest.get("version"), str):
        raise corrupt("'version' is not a string")
    if not isinstance(manifest.get("metadata"), dict):
        raise corrupt("'metadata' is not an object")
    documents = manifest.get("documents")
    if not isinstance(documents, list) or not all(isinstance(name, str) for name in documents):
        raise corrupt("'documents' is not a list of names")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise corrupt("'files' is not an object")
    for filename, entry in files.items():
        if not _NAME_PATTERN.fullmatch(filename) or filename == MANIFEST_FILE:
            raise corrupt(f"invalid file name {filename[:80]!r} in 'files'")
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and isinstance(entry.get("bytes"), int)
        ):
            raise corrupt(f"entry for {filename} lacks 'sha256' or 'bytes'")
    required = [WEIGHTS_FILE, STATE_FILE, *(f"{name}.json" for name in documents)]
    for filename in required:
        if filename not in files:
            raise corrupt(f"{filename} is not listed in 'files'")
    return files


def _read_verified(version_dir: Path, filename: str, entry: dict[str, Any]) -> bytes:
    path = version_dir / filename
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise BundleError(
                f"size mismatch for {filename} in {version_dir}: expected {entry['bytes']} "
                f"bytes, found {size}: bundle is corrupt (truncated or overwritten?)"
            )
        data = path.read_bytes()
    except FileNotFoundError:
        raise BundleError(
            f"missing file {filename} in {version_dir}: bundle is incomplete"
        ) from None
    except OSError as error:
        raise BundleError(f"cannot read {filename} in {version_dir}: {error}") from error
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"checksum mismatch for {filename} in {version_dir}: bundle is corrupt")
    return data


def _deserialize(
    loader: Callable[[bytes], dict[str, Any]], data: bytes, filename: str, version_dir: Path
) -> dict[str, Any]:
    try:
        return loader(data)
    except (SafetensorError, ValueError, KeyError, TypeError) as error:
        raise BundleError(
            f"{filename} in {version_dir} is not a valid safetensors file ({error}); refusing to "
            "load it"
        ) from error


# --- helpers --------------------------------------------------------------------------------


def _check_name(name: object, what: str) -> None:
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name):
        raise BundleError(
            f"invalid {what} {name!r}: use 1-128 characters from [A-Za-z0-9._-], "
            "not starting with '.'"
        )


def _package_version() -> str:
    # Read lazily: importing it at module level would be circular once the package
    # __init__ imports this module.
    import stream_l2ae

    return stream_l2ae.__version__
