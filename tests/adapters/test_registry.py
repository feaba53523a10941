"""Registration: each strategy registers where it is defined; importing `adapters` registers the built-ins."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapters
from adapters import registry
from adapters.source import BatchStats

from . import _plugin_strategy, test_contract

REPO = Path(__file__).resolve().parents[2]
BUILT_IN = [
    "source",
    "norm",
    "alpha_bn",
    "unmix_tns",
    "tent",
    "unmix_tns+tent",
    "eata",
    "eta",
    "unmix_tns+eata",
    "unmix_tns+eta",
    "sar",
    "unmix_tns+sar",
    "ema_tbn",
    "roid",
    "cotta",
]


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations in the test are undone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    yield


def test_importing_adapters_registers_exactly_the_built_ins() -> None:
    code = "import adapters; print(','.join(adapters.list_strategies()))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip().split(",") == BUILT_IN


def test_a_strategy_defined_in_one_file_is_registered_and_under_contract() -> None:
    """`_plugin_strategy` is the whole of two new strategies; the contract suite runs on them."""
    for name in ("ema_plugin", "ema_plugin+tent"):
        strategy = adapters.get_strategy(name)
        assert isinstance(strategy.normalizer, _plugin_strategy.EMAStats)
        assert name in test_contract.NAMES
    assert adapters.get_strategy("ema_plugin+tent").needs_grad


@pytest.mark.usefixtures("scratch_registry")
def test_the_decorator_registers_what_the_factory_builds() -> None:
    def scratch() -> adapters.ComposedStrategy:
        return adapters.ComposedStrategy("scratch", "test-batch statistics again", BatchStats())

    assert adapters.register_strategy(scratch) is scratch
    assert adapters.get_strategy("scratch").summary == "test-batch statistics again"
    assert adapters.list_strategies()[-1] == "scratch"
    with pytest.raises(ValueError, match="already registered"):
        adapters.register_strategy(scratch)


@pytest.mark.usefixtures("scratch_registry")
def test_a_factory_must_build_a_strategy() -> None:
    with pytest.raises(TypeError, match="ComposedStrategy"):
        adapters.register_strategy(lambda: "tent")  # type: ignore[type-var]
    assert "tent" in adapters.list_strategies()


@pytest.mark.usefixtures("scratch_registry")
@pytest.mark.parametrize("name", ["Norm2", "my norm"])
def test_names_are_lowercase_without_spaces(name: str) -> None:
    with pytest.raises(ValueError, match="lowercase"):
        adapters.register_strategy(adapters.ComposedStrategy(name, "x", BatchStats()))
    assert name not in adapters.list_strategies()
