"""``stream-l2ae serve`` as a child process, from a config file written on the fly.

The streaming demo, the scale-out benchmark and the end-to-end tests run the daemon the way
users do: a process reading a TOML file, stopped with a signal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def toml_value(value: Any) -> str:
    """A TOML literal for a str, number, bool, path or list of those.

    Examples
    --------
    >>> [toml_value(v) for v in ("a\\"b", 3, 0.5, True, Path("/m"), ("x", "y"))]
    ['"a\\\\"b"', '3', '0.5', 'true', '"/m"', '["x", "y"]']
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | os.PathLike):
        return json.dumps(os.fspath(value))  # JSON escapes are valid in TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}: {value!r}")


def write_serve_config(
    path: str | os.PathLike[str],
    serve: Mapping[str, Any],
    kafka: Mapping[str, Any],
    consumer: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``[serve]``, ``[kafka]`` and (when given) ``[kafka.consumer]`` to ``path``.

    Examples
    --------
    >>> import tempfile
    >>> from consumers.settings import load_serve_settings
    >>> path = Path(tempfile.mkdtemp()) / "serve.toml"
    >>> _ = write_serve_config(path, {"input_topics": ["events"], "batch_size": 512},
    ...                        {"bootstrap_servers": "127.0.0.1:9092"})
    >>> settings = load_serve_settings(path, environ={})
    >>> settings.input_topics, settings.batch_size, settings.bootstrap_servers
    (('events',), 512, '127.0.0.1:9092')
    """
    tables = [("serve", serve), ("kafka", kafka)]
    if consumer:
        tables.append(("kafka.consumer", consumer))
    text = "\n".join(
        f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
        for name, table in tables
    )
    path = Path(path)
    path.write_text(text)
    return path


def start_serve(
    config: str | os.PathLike[str], log_path: str | os.PathLike[str], *, threads: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``stream-l2ae [--threads N] serve --config CONFIG``, its output appended to a log."""
    command = [sys.executable, "-m", "stream_l2ae.cli"]
    if threads is not None:
        command += ["--threads", str(threads)]
    command += ["serve", "--config", os.fspath(config)]
    with open(log_path, "ab") as log:  # the child keeps its own handle
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
