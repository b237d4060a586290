"""Configuration: one TOML file, overridden by environment variables, overridden by flags.

The file has one table per component; ``[detector]`` holds the fields of
:class:`~stream_l2ae.detector.DetectorConfig` and ``[model]`` where bundles live::

    [model]
    dir = "models"
    keep = 5

    [detector]
    n_clusters = 10
    epochs = 20

An environment variable ``STREAM_L2AE_<TABLE>__<KEY>`` overrides a key, e.g.
``STREAM_L2AE_DETECTOR__EPOCHS=5``; nested tables take more parts,
``STREAM_L2AE_KAFKA__CONSUMER__SESSION_TIMEOUT_MS=10000``. Values are parsed as TOML values
(``5``, ``0.01``, ``true``, ``[64, 64]``), falling back to a plain string.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "STREAM_L2AE_"

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"dir": "models", "keep": 5},
    "detector": {},
    "serve": {},
    "kafka": {},
}


#: Keys whose environment values are always taken as strings: a password of digits is no number.
_STRING_KEY_PARTS = ("password", "username", "secret", "token", "principal")


def _parse_env_value(text: str, key: str = "") -> Any:
    if any(part in key for part in _STRING_KEY_PARTS):
        return text
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text


def coerce_to_fields(values: dict[str, Any], dataclass_type: type) -> dict[str, Any]:
    """Turn numbers back into strings for the fields of ``dataclass_type`` typed ``str``.

    An environment value is parsed as TOML, so ``STREAM_L2AE_SERVE__GROUP_ID=2024`` arrives as an
    integer; a string field gets the text back.

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class Example:
    ...     group_id: str = "g"
    ...     batch_size: int = 1
    >>> coerce_to_fields({"group_id": 2024, "batch_size": 8}, Example)
    {'group_id': '2024', 'batch_size': 8}
    """
    string_fields = {f.name for f in fields(dataclass_type) if str(f.type) in ("str", "str | None")}
    return {
        key: str(value)
        if key in string_fields and isinstance(value, (int, float)) and not isinstance(value, bool)
        else value
        for key, value in values.items()
    }


def load_config(
    path: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The merged configuration: defaults, then the file, then the environment.

    Examples
    --------
    >>> config = load_config(environ={"STREAM_L2AE_DETECTOR__EPOCHS": "5"})
    >>> config["detector"]["epochs"], config["model"]["dir"]
    (5, 'models')
    >>> load_config(environ={"STREAM_L2AE_KAFKA__SASL_PLAIN_PASSWORD": "1234"})["kafka"]
    {'sasl_plain_password': '1234'}
    """
    config = {table: dict(values) for table, values in DEFAULTS.items()}
    if path is not None:
        path = Path(path)
        try:
            loaded = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        for table, values in loaded.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {table!r} must be a table")
            config.setdefault(table, {}).update(values)
    environ = os.environ if environ is None else environ
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name[len(ENV_PREFIX) :]:
            continue
        table, *path = name[len(ENV_PREFIX) :].lower().split("__")
        node = config.setdefault(table, {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(text, path[-1])
    return config
