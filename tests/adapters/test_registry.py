"""Registration: each strategy registers where it is defined; importing `adapters` registers the built-ins."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import adapters
from adapters import registry
from adapters.base import ModelHandle
from adapters.source import BatchStats

from . import _plugin_strategy, test_contract
from ._reference import make_batch

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
    "rmt",
    "petal",
    "ecotta",
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
    for name in ("dua_plugin", "dua_plugin+tent"):
        strategy = adapters.get_strategy(name)
        assert isinstance(strategy.normalizer, _plugin_strategy.DUAStats)
        assert name in test_contract.NAMES
    assert adapters.get_strategy("dua_plugin+tent").needs_grad


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


def test_the_plugin_momentum_decays_with_the_batches_seen(tiny_handle: ModelHandle) -> None:
    """DUA: the counter in the state counts adapting batches, and each batch moves the statistics with the
    decayed momentum: on a repeated batch, step t moves them by m_t (mu_B - mu_t), so the second move is the
    first times m_1 (1 - m_0) / m_0 (a constant momentum would give 1 - m)."""
    strategy = adapters.get_strategy("dua_plugin")
    cfg = _plugin_strategy.DUAConfig()
    x = make_batch(8, seed=0)
    state = strategy.init_state(tiny_handle, cfg)
    key = next(k for k in state.tensors if k.endswith(".mean"))
    moves = []
    for t in range(2):
        new = strategy.step(tiny_handle, x, state, cfg).state
        assert float(new.tensors[_plugin_strategy.STEPS]) == t + 1
        moves.append(new.tensors[key] - state.tensors[key])
        state = new
    m0, m1 = (float(cfg.momentum_at(torch.tensor(float(t)))) for t in range(2))
    assert (round(m0, 6), round(m1, 6)) == (0.099, 0.09336)
    torch.testing.assert_close(moves[1], moves[0] * m1 * (1 - m0) / m0, rtol=1e-4, atol=1e-7)
    frozen = strategy.step(tiny_handle, x, state, cfg, adapt=False).state
    assert float(frozen.tensors[_plugin_strategy.STEPS]) == 2
