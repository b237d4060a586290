"""Shared fixtures: small data slices and one session-scoped fitted detector.

Session-scoped objects are shared by many tests: tests that mutate a detector (``partial_fit``)
must work on ``copy.deepcopy`` of it (see the ``fresh_detector`` fixture).
"""

from __future__ import annotations

import copy

import pytest
import torch

from stream_l2ae.datasets import Dataset, load_dataset
from stream_l2ae.detector import L2AEDetector

#: Small settings for the shuttle detector (~2-3 s to fit on two CPU cores).
SHUTTLE_SETTINGS = {"epochs": 5, "n_clusters": 10, "n_init": 2, "device": "cpu"}

#: A tiny convolutional network for the 8x8 digits.
TINY_CONV_SETTINGS = {
    "epochs": 2,
    "n_clusters": 5,
    "n_init": 1,
    "batch_size": 128,
    "conv_channels": (4, 8, 8),
    "device": "cpu",
}


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread():
    """Run torch on one thread: the test models are tiny, and on a busy two-core machine
    intra-op threads spin against each other (a 0.2 s training run can then take 20 s)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shuttle_split() -> tuple[Dataset, Dataset]:
    """The first 10,000 Shuttle records for training and the next 2,000 for testing."""
    return load_dataset("shuttle", limit=12000).split(10000)


@pytest.fixture(scope="session")
def fitted_detector(shuttle_split) -> L2AEDetector:
    """A robust detector fitted on the Shuttle training slice. Do not mutate it."""
    train, _ = shuttle_split
    return L2AEDetector(progress=False, **SHUTTLE_SETTINGS).fit(train)


@pytest.fixture
def fresh_detector(fitted_detector) -> L2AEDetector:
    """A private copy of the fitted detector, safe to ``partial_fit``."""
    return copy.deepcopy(fitted_detector)


@pytest.fixture(scope="session")
def digits_split() -> tuple[Dataset, Dataset]:
    """The first 1,000 sklearn digits (1x8x8 images) for training and the remaining 797."""
    return load_dataset("digits").split(1000)


@pytest.fixture(scope="session")
def conv_detector(digits_split) -> L2AEDetector:
    """A detector with a tiny conv auto-encoder fitted on the digits images. Do not mutate it."""
    train, _ = digits_split
    return L2AEDetector(progress=False, **TINY_CONV_SETTINGS).fit(train.X)


pytest_plugins = ["tests.kafka_fixtures"]
