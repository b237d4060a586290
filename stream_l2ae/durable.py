"""Durable, pickle-free files: what model bundles and daemon checkpoints both write.

Arrays go through safetensors (raw memory plus a JSON header, no code execution on load) and
documents through JSON; a file is fsynced before it is renamed into place, and the directory
after, so that a crash leaves either the old file or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError


def serialize_arrays(arrays: dict[str, np.ndarray], what: str, error: type[Exception]) -> bytes:
    """safetensors bytes of ``arrays``; anything else than ``{str: ndarray}`` raises ``error``.

    Examples
    --------
    >>> raw = serialize_arrays({"w": np.arange(6.0).reshape(2, 3).T}, "arrays", ValueError)
    >>> safetensors.numpy.load(raw)["w"].tolist()
    [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    >>> serialize_arrays({"w": 1.5}, "arrays", ValueError)
    Traceback (most recent call last):
    ...
    ValueError: arrays must map str to numpy.ndarray (put scalars in a document); got str -> float for 'w'
    """  # noqa: E501
    if not isinstance(arrays, dict):
        raise error(f"{what} must be a dict, got {type(arrays).__name__}")
    prepared = {}
    for name, array in arrays.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray):
            raise error(
                f"{what} must map str to numpy.ndarray (put scalars in a document); got "
                f"{type(name).__name__} -> {type(array).__name__} for {name!r}"
            )
        # safetensors.numpy copies raw memory from the data pointer: a non-contiguous view
        # (e.g. a transpose) would be saved silently scrambled. (Not np.ascontiguousarray:
        # it turns 0-d arrays into 1-d ones.)
        prepared[name] = array if array.flags.c_contiguous else array.copy(order="C")
    try:
        return safetensors.numpy.save(prepared)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise error(f"cannot serialize {what}: {exc}") from exc


def reject_non_string_keys(value: Any, what: str, error: type[Exception]) -> None:
    """Refuse keys that JSON would silently turn into strings (``{1: ...}`` -> ``{"1": ...}``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise error(f"{what} has a non-string key {key!r}; JSON keys must be str")
            reject_non_string_keys(item, what, error)
    elif isinstance(value, list | tuple):
        for item in value:
            reject_non_string_keys(item, what, error)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it (the caller renames it into place)."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_directory(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (POSIX only)."""
    if os.name != "posix":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
