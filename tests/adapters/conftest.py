"""Tiny models run fastest (and without oversubscription on shared CI cores) on one intra-op thread.

The suites here that are parametrised over the registry also cover a strategy that is not built in:
importing `_plugin_strategy` registers it (`dua_plugin`, `dua_plugin+tent`).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from . import _plugin_strategy  # noqa: F401  (registers the plug-in strategies)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The real models are large enough to use both cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


# The marks of the modules that run a real shipped model on the shipped CIFAR-10 test images.
REAL_DATA_MARKS = [pytest.mark.slow, pytest.mark.usefixtures("two_threads")]
