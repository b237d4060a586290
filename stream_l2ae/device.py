"""Device selection: CUDA when present, else the CPU."""

from __future__ import annotations

import torch

from .errors import ConfigError


def select_device(preference: str | torch.device | None = "auto") -> torch.device:
    """Return the torch device to train and score on.

    ``"auto"`` (or ``None``) picks CUDA when a GPU is visible, else the CPU. An explicit
    ``"cuda"`` without a GPU is an error rather than a silent fallback.

    Examples
    --------
    >>> select_device("cpu")
    device(type='cpu')
    """
    if isinstance(preference, torch.device):
        return preference
    if preference in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {preference!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {preference!r} requested but no CUDA GPU is visible")
    return device


def configure_threads(n_threads: int | None) -> None:
    """Set torch's intra-op thread count (``None`` keeps torch's default).

    Small dense models score fastest on one thread per process: their matrix products are too
    small to split, and a second thread that cannot get a core stalls the first. Scale out with
    processes (consumer-group replicas) instead.
    """
    if n_threads is None:
        return
    if n_threads < 1:
        raise ConfigError(f"threads must be >= 1, got {n_threads!r}")
    torch.set_num_threads(int(n_threads))
