"""Typed errors raised by stream_l2ae.

Every error the library raises on bad input derives from :class:`StreamL2AEError`, so a
caller (the daemon, the CLI) can tell a data or configuration problem from a bug.
"""

from __future__ import annotations


class StreamL2AEError(Exception):
    """Base class of every error stream_l2ae raises on purpose."""


class RecordError(StreamL2AEError, ValueError):
    """A record cannot be mapped to a feature vector.

    Parameters
    ----------
    field
        Name of the offending field (``None`` when the record itself is wrong, e.g. not a dict).
    reason
        A short machine-readable code: ``missing``, ``type``, ``nan``, ``shape``, ``not_a_record``,
        ``decode``, ``too_large``. The daemon uses it as a metric label, so the set stays small.
    detail
        Human-readable explanation.

    Examples
    --------
    >>> err = RecordError("f3", "nan", "value is NaN")
    >>> str(err)
    "field 'f3': value is NaN [nan]"
    >>> err.reason
    'nan'
    """

    REASONS = ("missing", "type", "nan", "shape", "not_a_record", "decode", "too_large")

    def __init__(self, field: str | None, reason: str, detail: str) -> None:
        if reason not in self.REASONS:
            raise ValueError(
                f"unknown RecordError reason {reason!r}; expected one of {self.REASONS}"
            )
        self.field = field
        self.reason = reason
        self.detail = detail
        where = f"field {field!r}" if field is not None else "record"
        super().__init__(f"{where}: {detail} [{reason}]")

    def __reduce__(self):  # keep the error picklable for multiprocessing users
        return (type(self), (self.field, self.reason, self.detail))


class BundleError(StreamL2AEError):
    """A model bundle is missing, corrupt, or incompatible with this version of the package."""


class ConfigError(StreamL2AEError, ValueError):
    """A parameter or configuration value is invalid. The message names the value."""


class NotFittedError(StreamL2AEError, RuntimeError):
    """A method that needs a fitted estimator was called before ``fit``."""
