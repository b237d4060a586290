"""State checkpoints of the consumer daemon: the online centroids and the alert threshold.

Each replica writes to its own subdirectory, so replicas sharing a volume never collide::

    directory/
        <replica_id>/
            checkpoint.json             # the commit point: document, checksums, arrays file name
            state-<hex>.safetensors     # Checkpoint.online_arrays (numpy, safetensors)
            .lock                       # advisory lock serialising saves (never delete it)

What a checkpoint guarantees
----------------------------
* Kafka offsets are **not** in the checkpoint: the offsets committed to Kafka are the source of
  truth for what has been processed. After a crash the daemon resumes from the last committed
  offset and re-processes the records read since, so records are handled at least once.
* The online state (centroid statistics, threshold) is only as recent as the last checkpoint:
  after a crash it may lag the stream by up to one checkpoint interval, and the re-processed
  records may be counted into it a second time. The online state is therefore approximate,
  which exponential forgetting makes harmless.
* A save is atomic. The arrays go to a new, uniquely named file (written and fsynced), then
  ``checkpoint.json``, which names that file and holds its SHA-256 and size, is written to a
  temporary file, fsynced and moved over the previous one with ``os.replace``; the directory
  is fsynced. A crash or error at any step leaves the previous checkpoint intact and loadable.
  Arrays files no longer referenced are deleted by the next successful save.
* Loading never unpickles: arrays are read with ``safetensors.numpy``, the rest with ``json``.
  The arrays file is checked against its size and SHA-256, and ``checkpoint.json`` against a
  SHA-256 of its own content, before anything is used.
* A corrupt checkpoint (unparsable, truncated, wrong checksum, missing arrays file) is **not
  fatal**: :meth:`CheckpointStore.load` logs a warning, moves the files aside as
  ``*.corrupt-<UTC time>`` for inspection and returns ``None``, and the daemon re-seeds its
  online state from the model bundle. Losing the online state costs some adaptation (the
  centroids restart from the trained ones); refusing to start would cost the whole stream.
  A checkpoint in a newer format than this code reads (a rollback) is left in place and
  ``None`` is returned.
* The checkpoint records the ``model_version`` it was taken with. The caller must check it
  against the bundle in service and discard a checkpoint of another model.

Examples
--------
>>> import tempfile
>>> import numpy as np
>>> store = CheckpointStore(tempfile.mkdtemp(), replica_id="scorer-0")
>>> store.load() is None
True
>>> path = store.save(Checkpoint("v000001", {"online.counts": np.array([1.0, 2.0])}, {}, {}))
>>> store.load().online_arrays["online.counts"].tolist()
[1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError

from stream_l2ae.durable import (
    fsync_directory,
    reject_non_string_keys,
    serialize_arrays,
    write_durably,
)
from stream_l2ae.errors import StreamL2AEError
from stream_l2ae.online import OnlineCentroids
from stream_l2ae.thresholds import Threshold, threshold_from_dict

if TYPE_CHECKING:
    import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: saves are not serialised between processes
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "CheckpointTimer",
    "should_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
"""Format of ``checkpoint.json``; bumped on incompatible changes."""

DOCUMENT_FILE = "checkpoint.json"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
_REPLICA_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_ARRAYS_PATTERN = re.compile(r"state-[0-9a-f]{32}\.safetensors")
_HEX = "0123456789abcdef"


class CheckpointError(StreamL2AEError, ValueError):
    """A checkpoint cannot be written because its content is invalid (not JSON-safe, ...)."""


class _CorruptCheckpoint(Exception):
    """Internal: what :meth:`CheckpointStore.load` turns into a warning and ``None``."""


class _UnsupportedFormat(Exception):
    """Internal: a checkpoint written by a newer version; left alone."""


@dataclass(eq=False)
class Checkpoint:
    """The online state of one replica at one moment.

    Attributes
    ----------
    model_version
        Version of the model bundle the state belongs to.
    online_arrays, online_document
        What :meth:`stream_l2ae.online.OnlineCentroids.state` returns.
    threshold
        :meth:`stream_l2ae.thresholds.Threshold.to_dict` of the alert threshold.
    created_at
        Unix time the state was captured.
    records_seen
        Records this replica had processed when the state was captured.
    extra
        Anything else JSON-safe the daemon wants back (not offsets: see the module docstring).
    """

    model_version: str
    online_arrays: dict[str, np.ndarray]
    online_document: dict[str, Any]
    threshold: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    records_seen: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def capture(
        cls,
        model_version: str,
        online: OnlineCentroids,
        threshold: Threshold,
        *,
        records_seen: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Capture an :class:`~stream_l2ae.online.OnlineCentroids` and a threshold now."""
        arrays, document = online.state()
        return cls(
            model_version=model_version,
            online_arrays={name: np.array(array, copy=True) for name, array in arrays.items()},
            online_document=document,
            threshold=threshold.to_dict(),
            records_seen=records_seen,
            extra={} if extra is None else extra,
        )

    def restore_online(self, device: str | torch.device = "cpu") -> OnlineCentroids:
        """Rebuild the :class:`~stream_l2ae.online.OnlineCentroids` (peers are not included)."""
        return OnlineCentroids.from_state(self.online_arrays, self.online_document, device=device)

    def restore_threshold(self) -> Threshold:
        """Rebuild the threshold with :func:`~stream_l2ae.thresholds.threshold_from_dict`."""
        return threshold_from_dict(self.threshold)


class CheckpointStore:
    """Saves and loads the checkpoints of one replica under ``directory/replica_id/``.

    Parameters
    ----------
    directory
        Shared checkpoint directory; created on the first save.
    replica_id
        Name of this replica (1-128 characters from ``[A-Za-z0-9._-]``, not starting with
        ``.``). Replicas with different ids never touch each other's files; two live processes
        with the same id are a misconfiguration (their saves are serialised by a lock, but each
        overwrites the other's state).
    """

    def __init__(self, directory: str | os.PathLike[str], replica_id: str = "default") -> None:
        if not isinstance(replica_id, str) or not _REPLICA_PATTERN.fullmatch(replica_id):
            raise CheckpointError(
                f"invalid replica_id {replica_id!r}: use 1-128 characters from [A-Za-z0-9._-], "
                "not starting with '.'"
            )
        self.directory = Path(directory)
        self.replica_id = replica_id
        self.path = self.directory / replica_id

    @property
    def document_path(self) -> Path:
        return self.path / DOCUMENT_FILE

    # --- saving ------------------------------------------------------------------------------

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write ``checkpoint`` atomically, replacing the previous one; return its JSON path.

        Raises
        ------
        CheckpointError
            If the content is invalid (non-array values, arrays safetensors cannot hold,
            values that are not JSON-safe). Nothing is written then.
        OSError
            If the disk fails; the previous checkpoint is left intact.
        """
        arrays_bytes = serialize_arrays(checkpoint.online_arrays, "online_arrays", CheckpointError)
        arrays_name = f"state-{uuid.uuid4().hex}.safetensors"
        body = {
            "format": CHECKPOINT_FORMAT,
            "replica_id": self.replica_id,
            "model_version": checkpoint.model_version,
            "created_at": _plain(checkpoint.created_at),
            "records_seen": _plain(checkpoint.records_seen),
            "online_document": checkpoint.online_document,
            "threshold": checkpoint.threshold,
            "extra": checkpoint.extra,
            "arrays": {
                "file": arrays_name,
                "sha256": hashlib.sha256(arrays_bytes).hexdigest(),
                "bytes": len(arrays_bytes),
            },
        }
        _check_body_types(body, error=CheckpointError)
        document_bytes = _encode_document(body)

        self.path.mkdir(parents=True, exist_ok=True)
        with self._lock(exclusive=True):
            arrays_path = self.path / arrays_name
            temporary = self.path / f"{TEMP_PREFIX}{DOCUMENT_FILE}-{uuid.uuid4().hex}"
            try:
                write_durably(arrays_path, arrays_bytes)
                write_durably(temporary, document_bytes)
                os.replace(temporary, self.document_path)
            except BaseException:
                for leftover in (temporary, arrays_path):
                    with contextlib.suppress(OSError):
                        leftover.unlink()
                raise
            fsync_directory(self.path)
            self._remove_unreferenced(keep=arrays_name)
        return self.document_path

    def _remove_unreferenced(self, keep: str) -> None:
        """Delete old arrays files and temporary files of crashed saves (under the lock)."""
        for entry in os.scandir(self.path):
            unreferenced = _ARRAYS_PATTERN.fullmatch(entry.name) and entry.name != keep
            if unreferenced or entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)

    # --- loading -----------------------------------------------------------------------------

    def load(self) -> Checkpoint | None:
        """The last saved checkpoint, or ``None`` if there is none or it is unusable.

        A corrupt checkpoint is logged, moved aside as ``*.corrupt-<time>`` and reported as
        ``None`` (see the module docstring). Errors reading a file that exists (permissions,
        I/O) are raised: they are problems of the volume, not of the checkpoint.
        """
        if not self.document_path.is_file():
            return None
        with self._lock(exclusive=False):
            try:
                raw = self.document_path.read_bytes()
            except FileNotFoundError:
                return None
            try:
                return self._parse(raw)
            except _UnsupportedFormat as error:
                logger.warning("ignoring checkpoint %s: %s", self.document_path, error)
                return None
            except _CorruptCheckpoint as error:
                moved = self._move_aside(raw)
                logger.warning(
                    "checkpoint %s is corrupt (%s); moved it aside to %s and starting from the "
                    "model bundle's state",
                    self.document_path,
                    error,
                    ", ".join(str(path) for path in moved) or "nowhere",
                )
                return None

    def _parse(self, raw: bytes) -> Checkpoint:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as error:
            raise _CorruptCheckpoint(f"{DOCUMENT_FILE} is not valid JSON: {error}") from error
        if not isinstance(body, dict):
            raise _CorruptCheckpoint(f"{DOCUMENT_FILE} does not hold a JSON object")
        found_format = body.get("format")
        if not isinstance(found_format, int) or isinstance(found_format, bool):
            raise _CorruptCheckpoint("'format' is not an integer")
        if found_format > CHECKPOINT_FORMAT:
            raise _UnsupportedFormat(
                f"format {found_format} is newer than the {CHECKPOINT_FORMAT} this code reads"
            )
        stored_digest = body.pop("sha256", None)
        if stored_digest != hashlib.sha256(_canonical(body)).hexdigest():
            raise _CorruptCheckpoint(f"checksum mismatch for {DOCUMENT_FILE}")
        _check_body_types(body, error=_CorruptCheckpoint)
        entry = body["arrays"]
        arrays_path = self.path / entry["file"]
        try:
            data = arrays_path.read_bytes()
        except FileNotFoundError:
            raise _CorruptCheckpoint(f"arrays file {entry['file']} is missing") from None
        if len(data) != entry["bytes"]:
            raise _CorruptCheckpoint(
                f"{entry['file']} has {len(data)} bytes, expected {entry['bytes']} (truncated?)"
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise _CorruptCheckpoint(f"checksum mismatch for {entry['file']}")
        try:
            arrays = safetensors.numpy.load(data)
        except (SafetensorError, ValueError, KeyError, TypeError) as error:
            raise _CorruptCheckpoint(f"{entry['file']} is not safetensors: {error}") from error
        return Checkpoint(
            model_version=body["model_version"],
            online_arrays={
                name: array if array.flags.writeable else array.copy()
                for name, array in arrays.items()
            },
            online_document=body["online_document"],
            threshold=body["threshold"],
            created_at=float(body["created_at"]),
            records_seen=body["records_seen"],
            extra=body["extra"],
        )

    def _move_aside(self, raw: bytes) -> list[Path]:
        """Rename the corrupt document and its arrays file to ``*.corrupt-<time>``.

        When the document does not name its arrays file, every arrays file is moved aside
        (normally there is just the one).
        """
        suffix = ".corrupt-" + datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        name = None
        with contextlib.suppress(ValueError, TypeError, LookupError, UnicodeDecodeError):
            name = json.loads(raw)["arrays"]["file"]
        if isinstance(name, str) and _ARRAYS_PATTERN.fullmatch(name):
            arrays = [self.path / name]
        else:
            arrays = [
                self.path / entry.name
                for entry in os.scandir(self.path)
                if _ARRAYS_PATTERN.fullmatch(entry.name)
            ]
        victims = [self.document_path, *arrays]
        moved = []
        for victim in victims:
            target = victim.with_name(victim.name + suffix)
            try:
                os.rename(victim, target)
            except FileNotFoundError:
                continue
            moved.append(target)
        fsync_directory(self.path)
        return moved

    @contextlib.contextmanager
    def _lock(self, *, exclusive: bool) -> Iterator[None]:
        """Advisory ``flock`` on ``.lock``: exclusive for saves, shared for loads."""
        if fcntl is None:  # pragma: no cover - Windows
            yield
            return
        with open(self.path / LOCK_FILE, "ab") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- timing ----------------------------------------------------------------------------------


def should_checkpoint(now: float, last: float | None, interval_s: float) -> bool:
    """Whether a checkpoint is due: never taken, ``interval_s`` elapsed, or the clock went back.

    Examples
    --------
    >>> should_checkpoint(100.0, None, 60.0), should_checkpoint(100.0, 50.0, 60.0)
    (True, False)
    >>> should_checkpoint(110.0, 50.0, 60.0), should_checkpoint(40.0, 50.0, 60.0)
    (True, True)
    """
    return last is None or now < last or now - last >= interval_s


class CheckpointTimer:
    """Tells when the next checkpoint is due, on a monotonic clock (immune to clock changes).

    Examples
    --------
    >>> clock = iter([0.0, 0.0, 30.0, 61.0, 61.0]).__next__
    >>> timer = CheckpointTimer(60.0, clock=clock)
    >>> timer.due()  # never checkpointed yet
    True
    >>> timer.mark()
    >>> timer.due(), timer.due()
    (False, True)
    """

    def __init__(self, interval_s: float, *, clock: Any = time.monotonic) -> None:
        if not (isinstance(interval_s, int | float) and 0 < interval_s < math.inf):
            raise ValueError(f"interval_s must be a positive finite number, got {interval_s!r}")
        self.interval_s = float(interval_s)
        self._clock = clock
        self.last: float | None = None

    def due(self) -> bool:
        return should_checkpoint(self._clock(), self.last, self.interval_s)

    def mark(self) -> None:
        """Record that a checkpoint was just taken."""
        self.last = self._clock()


# --- helpers ---------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """A numpy scalar as a Python number; anything else is left for the type check to judge."""
    return value.item() if isinstance(value, np.generic) else value


def _check_body_types(body: dict[str, Any], error: type[Exception]) -> None:
    expected = {
        "model_version": str,
        "created_at": (int, float),
        "records_seen": int,
        "online_document": dict,
        "threshold": dict,
        "extra": dict,
        "arrays": dict,
    }
    for key, kind in expected.items():
        value = body.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise error(f"{key!r} must be {getattr(kind, '__name__', 'a number')}, got {value!r}")
    if not math.isfinite(body["created_at"]):
        raise error(f"'created_at' must be finite, got {body['created_at']!r}")
    entry = body["arrays"]
    if not (
        isinstance(entry.get("file"), str)
        and _ARRAYS_PATTERN.fullmatch(entry["file"])
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
        and all(character in _HEX for character in entry["sha256"])
        and isinstance(entry.get("bytes"), int)
    ):
        raise error("'arrays' must name a state-<hex>.safetensors file with its sha256 and bytes")


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, allow_nan=False, ensure_ascii=False).encode("utf-8")


def _encode_document(body: dict[str, Any]) -> bytes:
    """``body`` plus the SHA-256 of its canonical form, as one line of JSON (use ``jq``)."""
    reject_non_string_keys(body, "checkpoint", CheckpointError)
    try:
        digest = hashlib.sha256(_canonical(body)).hexdigest()
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint is not JSON-safe ({error}); use str keys, finite floats and plain "
            "Python types (convert numpy scalars with .item())"
        ) from error
    text = json.dumps({**body, "sha256": digest}, allow_nan=False, ensure_ascii=False)
    return (text + "\n").encode("utf-8")
