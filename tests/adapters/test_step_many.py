"""`step_many`: one forward for several streams gives each stream exactly its own `step`."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters._bn import BatchStatsPlan, SourcePlan
from adapters.alpha_bn import AlphaPlan
from adapters.base import AdaptationState, ModelHandle, StepResult, StrategyConfig
from adapters.source import SourceConfig
from adapters.unmix_tns import UnMixPlan

from ._reference import make_batch, small_config

SHARED = [name for name in adapters.list_strategies() if adapters.get_strategy(name).can_step_many(True)]
GRADIENT = [
    name for name in adapters.list_strategies() if not adapters.get_strategy(name).can_step_many(True)
]


def _states(
    strategy: adapters.ComposedStrategy, handle: ModelHandle, cfg: StrategyConfig
) -> list[AdaptationState]:
    """Three streams with different histories: fresh, one step, two steps (different seeds)."""
    states = []
    for history in range(3):
        state = strategy.init_state(handle, cfg, seed=history)
        for i in range(history):
            state = strategy.step(handle, make_batch(5, seed=100 + 10 * history + i), state, cfg).state
        states.append(state)
    return states


def test_the_batch_sharing_strategies_are_the_statistics_only_ones() -> None:
    assert {"source", "norm", "alpha_bn", "unmix_tns"} <= set(SHARED)
    assert {"tent", "eata", "eta", "sar", "unmix_tns+tent"} <= set(GRADIENT)


@pytest.mark.parametrize("name", SHARED)
@pytest.mark.parametrize("adapt", [True, False])
def test_step_many_equals_one_step_per_stream(tiny_handle: ModelHandle, name: str, adapt: bool) -> None:
    strategy = adapters.get_strategy(name)
    cfg = small_config(strategy)
    states = _states(strategy, tiny_handle, cfg)
    batches = [make_batch(n, seed=n) for n in (4, 1 if strategy.min_batch_size == 1 else 2, 7)]
    shared = strategy.step_many(tiny_handle, batches, states, cfg, adapt)
    for got, batch, state in zip(shared, batches, states, strict=True):
        want = strategy.step(tiny_handle, batch, state, cfg, adapt)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        assert got.state.tensors.keys() == want.state.tensors.keys()
        for key in want.state.tensors:
            torch.testing.assert_close(got.state.tensors[key], want.state.tensors[key], rtol=1e-5, atol=1e-6)
        assert got.state.meta == want.state.meta
        assert (got.stats.samples, got.stats.used, got.stats.updated) == (
            want.stats.samples,
            want.stats.used,
            want.stats.updated,
        )
        assert got.stats.mean_entropy == pytest.approx(want.stats.mean_entropy, rel=1e-4, abs=1e-6)
        if want.stats.bn_distance is None:
            assert got.stats.bn_distance is None
        else:
            assert got.stats.bn_distance == pytest.approx(want.stats.bn_distance, rel=1e-4, abs=1e-6)


ONE_PASS = ["source", "norm", "alpha_bn", "unmix_tns", "unmix_tns+tent"]


def _assert_same(got: StepResult, want: StepResult) -> None:
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    assert got.state.tensors.keys() == want.state.tensors.keys()
    for key in want.state.tensors:
        torch.testing.assert_close(got.state.tensors[key], want.state.tensors[key], rtol=1e-5, atol=1e-6)
        # Each stream's state owns its storage (not a view of the stacked batch's tensors).
        assert (
            got.state.tensors[key].untyped_storage().nbytes()
            == want.state.tensors[key].untyped_storage().nbytes()
        )
    if want.stats.bn_distance is not None:
        assert got.stats.bn_distance == pytest.approx(want.stats.bn_distance, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ONE_PASS)
@pytest.mark.parametrize("sizes", [(1,) * 6, (3, 1, 5, 2)], ids=["six-single-images", "mixed-sizes"])
def test_statistics_strategies_normalise_all_streams_in_one_pass(
    tiny_handle: ModelHandle, name: str, sizes: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every BN layer of a shared forward serves all streams in one pass (segmented reductions over the
    stacked batch), never stream by stream, and still gives each stream its own step's result."""
    strategy = adapters.get_strategy(name)
    cfg = small_config(strategy)
    adapt = strategy.can_step_many(True)
    states = [strategy.init_state(tiny_handle, cfg, seed=i) for i in range(len(sizes))]
    states = [
        strategy.step(tiny_handle, make_batch(4, seed=50 + i), s, cfg, adapt).state
        for i, s in enumerate(states)
    ]
    batches = [make_batch(n, seed=10 + i) for i, n in enumerate(sizes)]
    want = [strategy.step(tiny_handle, b, s, cfg, adapt) for b, s in zip(batches, states, strict=True)]

    def per_stream(*args: object, **kwargs: object) -> None:
        raise AssertionError("a shared forward normalised one stream's rows on their own")

    for cls in (SourcePlan, BatchStatsPlan, AlphaPlan, UnMixPlan):
        monkeypatch.setattr(cls, "normalize", per_stream)
    got = strategy.step_many(tiny_handle, batches, states, cfg, adapt)
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


@pytest.mark.parametrize("name", GRADIENT)
def test_gradient_strategies_share_only_frozen_predictions(tiny_handle: ModelHandle, name: str) -> None:
    strategy = adapters.get_strategy(name)
    cfg = small_config(strategy)
    states = [strategy.init_state(tiny_handle, cfg, seed=s) for s in range(2)]
    batches = [make_batch(3, seed=1), make_batch(2, seed=2)]
    with pytest.raises(ValueError, match="gradient"):
        strategy.step_many(tiny_handle, batches, states, cfg, adapt=True)
    shared = strategy.step_many(tiny_handle, batches, states, cfg, adapt=False)
    for got, batch, state in zip(shared, batches, states, strict=True):
        want = strategy.step(tiny_handle, batch, state, cfg, adapt=False)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_streams_do_not_leak_into_each_other(tiny_handle: ModelHandle) -> None:
    """norm: a stream's predictions do not depend on which other streams share the forward."""
    strategy = adapters.get_strategy("norm")
    cfg = strategy.parse_config({})
    state = strategy.init_state(tiny_handle, cfg)
    mine = make_batch(6, seed=0)
    alone = strategy.step_many(tiny_handle, [mine], [state], cfg)[0].logits
    for other_seed in (1, 2):
        other = make_batch(9, seed=other_seed) * 0.3  # a very different batch
        together = strategy.step_many(tiny_handle, [other, mine], [state, state], cfg)[1].logits
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    # While one step over the concatenation does mix the batches' statistics:
    mixed = strategy.step(tiny_handle, torch.cat([make_batch(9, seed=1) * 0.3, mine]), state, cfg).logits[9:]
    assert not torch.allclose(mixed, alone, atol=1e-3)


@pytest.mark.parametrize("positions", [256, 16])
def test_a_shared_source_forward_samples_drift_rows_per_stream(
    tiny_handle: ModelHandle, positions: int
) -> None:
    """Each stream's drift figures come from its own first `drift_images` rows, on the same position grid,
    as in its own step."""
    strategy = adapters.get_strategy("source")
    cfg = SourceConfig(drift_images=2, drift_positions=positions)
    batches = [make_batch(n, seed=20 + n) for n in (4, 1, 3)]
    states = [strategy.init_state(tiny_handle, cfg, seed=i) for i in range(3)]
    got = strategy.step_many(tiny_handle, batches, states, cfg, True)
    for g, batch, state in zip(got, batches, states, strict=True):
        _assert_same(g, strategy.step(tiny_handle, batch, state, cfg, True))
        head = strategy.step(tiny_handle, batch[:2], state, cfg, True)
        assert g.stats.bn_distance == pytest.approx(head.stats.bn_distance, rel=1e-4)
