"""The contract every registered strategy obeys; new strategies are covered by being registered."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save as save_safetensors

import adapters
from adapters import BatchTooSmallError, StateMismatchError, UnknownStrategyError
from adapters.base import AdaptationState, ModelHandle
from adapters.serialization import CorruptStateError, state_from_bytes, state_to_bytes

from ._reference import (
    assert_snapshot_equal,
    assert_states_equal,
    entropy,
    make_batch,
    model_snapshot,
    small_config,
)

NAMES = adapters.list_strategies()
BATCH = 6


@pytest.fixture(params=NAMES)
def strategy(request: pytest.FixtureRequest) -> adapters.ComposedStrategy:
    return adapters.get_strategy(request.param)


def _run(
    strategy: adapters.ComposedStrategy, handle: ModelHandle, steps: int = 3, batch: int = BATCH
) -> list[adapters.StepResult]:
    cfg = small_config(strategy)
    state = strategy.init_state(handle, cfg)
    results = []
    for seed in range(steps):
        result = strategy.step(handle, make_batch(batch, seed=seed), state, cfg)
        state = result.state
        results.append(result)
    return results


def _round_trip(state: AdaptationState) -> AdaptationState:
    restored = state_from_bytes(state_to_bytes(state))
    assert_states_equal(state, restored)
    return restored


def test_registry_lists_the_built_in_strategies() -> None:
    for name in ("source", "norm", "alpha_bn", "unmix_tns", "tent", "eata", "eta", "sar"):
        assert name in NAMES
    assert len(set(NAMES)) == len(NAMES)


def test_registry_entry_describes_itself(strategy: adapters.ComposedStrategy) -> None:
    assert strategy.name == strategy.name.lower() and " " not in strategy.name
    assert strategy.summary
    assert isinstance(strategy.state_version, int)
    assert isinstance(strategy.needs_grad, bool)
    json.dumps(strategy.config_cls.model_json_schema())
    cfg = strategy.config_cls()
    for field in strategy.config_cls.model_fields:
        with pytest.raises(ValidationError, match="frozen"):
            setattr(cfg, field, getattr(cfg, field))


def test_gradient_strategies_refuse_single_images(strategy: adapters.ComposedStrategy) -> None:
    """One image gives one-sample entropy gradients over instance statistics: refused (docs/ALGORITHMS.md §10)."""
    if strategy.needs_grad:
        assert strategy.min_batch_size >= 2
    else:
        assert strategy.min_batch_size >= 1


def test_state_round_trips_through_bytes(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    cfg = small_config(strategy)
    state = _round_trip(strategy.init_state(tiny_handle, cfg))
    x = make_batch(BATCH, seed=0)
    direct = strategy.step(tiny_handle, x, strategy.init_state(tiny_handle, cfg), cfg)
    after = strategy.step(tiny_handle, x, state, cfg)
    # A state restored from bytes behaves exactly like the original.
    assert torch.equal(direct.logits, after.logits)
    assert_states_equal(direct.state, after.state)
    restored = _round_trip(after.state)
    again = strategy.step(tiny_handle, make_batch(BATCH, seed=1), restored, cfg)
    _round_trip(again.state)


def test_shared_model_is_never_mutated(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    before = model_snapshot(tiny_handle.model)
    layers = [
        (layer.running_mean.clone(), layer.running_var.clone(), layer.weight.clone(), layer.bias.clone())
        for layer in tiny_handle.bn_layers
    ]
    results = _run(strategy, tiny_handle, steps=3)
    cfg = small_config(strategy)
    strategy.step(tiny_handle, make_batch(2, seed=9), results[-1].state, cfg, adapt=False)
    assert_snapshot_equal(before, model_snapshot(tiny_handle.model))
    for saved, layer in zip(layers, tiny_handle.bn_layers, strict=True):
        current = (layer.running_mean, layer.running_var, layer.weight, layer.bias)
        assert all(torch.equal(a, b) for a, b in zip(saved, current, strict=True))
    assert all(p.grad is None for p in tiny_handle.model.parameters())


def test_step_is_deterministic(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    cfg = small_config(strategy)
    state = _run(strategy, tiny_handle, steps=1)[0].state
    x = make_batch(BATCH, seed=5)
    first = strategy.step(tiny_handle, x, state, cfg)
    second = strategy.step(tiny_handle, x, state, cfg)
    assert torch.equal(first.logits, second.logits)
    assert_states_equal(first.state, second.state)
    assert first.stats == second.stats


def test_init_state_is_reproducible(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    cfg = small_config(strategy)
    assert_states_equal(
        strategy.init_state(tiny_handle, cfg, seed=3), strategy.init_state(tiny_handle, cfg, seed=3)
    )
    init = strategy.init_state(tiny_handle, cfg)
    # A reset (init again) after adapting gives back the initial state.
    _run(strategy, tiny_handle, steps=2)
    assert_states_equal(init, strategy.init_state(tiny_handle, cfg))
    assert init.meta["strategy"] == strategy.name
    assert init.meta["model"] == tiny_handle.fingerprint
    assert init.meta["steps"] == 0 and init.meta["samples_seen"] == 0


def test_logits_shape_and_stats(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    for result in _run(strategy, tiny_handle, steps=2):
        assert result.logits.shape == (BATCH, tiny_handle.num_classes)
        assert result.logits.dtype == torch.float32
        assert torch.isfinite(result.logits).all()
        stats = result.stats
        assert stats.samples == BATCH
        assert 0 <= stats.used <= BATCH and 0 <= stats.filtered <= BATCH
        assert stats.used + stats.filtered <= BATCH
        assert stats.mean_entropy == pytest.approx(float(entropy(result.logits).mean()), rel=1e-5)
        assert stats.mean_confidence == pytest.approx(
            float(result.logits.softmax(1).amax(1).mean()), rel=1e-5
        )
        assert stats.loss is None or stats.loss == stats.loss  # not NaN
    final = result.state.meta
    assert final["steps"] == 2 and final["samples_seen"] == 2 * BATCH


def test_single_image_batches(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    cfg = small_config(strategy)
    state = strategy.init_state(tiny_handle, cfg)
    x = make_batch(1, seed=4)
    frozen = strategy.step(tiny_handle, x, state, cfg, adapt=False)
    assert frozen.logits.shape == (1, tiny_handle.num_classes) and torch.isfinite(frozen.logits).all()
    if strategy.min_batch_size <= 1:
        result = strategy.step(tiny_handle, x, state, cfg)
        assert result.logits.shape == (1, tiny_handle.num_classes) and torch.isfinite(result.logits).all()
        assert result.stats.samples == 1
    else:
        with pytest.raises(
            BatchTooSmallError,
            match=rf"{re.escape(strategy.name)}.*at least {strategy.min_batch_size}.*adapt",
        ):
            strategy.step(tiny_handle, x, state, cfg)


def test_no_adapt_leaves_state_unchanged(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    cfg = small_config(strategy)
    state = _run(strategy, tiny_handle, steps=1)[0].state
    snapshot = AdaptationState({k: v.clone() for k, v in state.tensors.items()}, dict(state.meta))
    result = strategy.step(tiny_handle, make_batch(BATCH, seed=7), state, cfg, adapt=False)
    assert_states_equal(result.state, snapshot)
    assert_states_equal(state, snapshot)
    assert not result.stats.updated
    assert result.stats.samples == BATCH


def test_step_does_not_modify_its_input_state(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    cfg = small_config(strategy)
    state = strategy.init_state(tiny_handle, cfg)
    snapshot = AdaptationState({k: v.clone() for k, v in state.tensors.items()}, dict(state.meta))
    for seed in range(2):
        strategy.step(tiny_handle, make_batch(BATCH, seed=seed), state, cfg)
    assert_states_equal(state, snapshot)


def test_unknown_config_field_is_refused(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    with pytest.raises(ValidationError):
        strategy.config_cls(not_a_field=1)  # type: ignore[call-arg]  # the refused field is the point
    with pytest.raises(ValidationError):
        strategy.parse_config({"not_a_field": 1})
    with pytest.raises(ValidationError):
        strategy.init_state(tiny_handle, {"not_a_field": 1})  # type: ignore[arg-type]


def test_state_of_another_strategy_is_refused(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    other = adapters.get_strategy("norm" if strategy.name != "norm" else "source")
    foreign = other.init_state(tiny_handle, other.config_cls())
    with pytest.raises(StateMismatchError, match=re.escape(repr(strategy.name))):
        strategy.step(tiny_handle, make_batch(2, seed=0), foreign, small_config(strategy))


def test_state_of_another_model_or_version_is_refused(
    strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle
) -> None:
    cfg = small_config(strategy)
    state = strategy.init_state(tiny_handle, cfg)
    x = make_batch(2, seed=0)
    with pytest.raises(StateMismatchError, match="model"):
        strategy.step(tiny_handle, x, state.with_updates(model="0123456789abcdef"), cfg)
    with pytest.raises(StateMismatchError, match="version"):
        strategy.step(tiny_handle, x, state.with_updates(schema_version=strategy.state_version + 1), cfg)


def test_corrupt_bytes_are_refused(strategy: adapters.ComposedStrategy, tiny_handle: ModelHandle) -> None:
    blob = state_to_bytes(strategy.init_state(tiny_handle, small_config(strategy)))
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    header["__metadata__"]["format"] = "something-else"
    other_format = json.dumps(header).encode()
    wrong_format = len(other_format).to_bytes(8, "little") + other_format + blob[8 + header_len :]
    for bad in (
        b"",
        b"not a state",
        blob[: len(blob) // 2],
        b"\xff" * 64,
        blob[:8] + b"}" + blob[9:],
        wrong_format,
    ):
        with pytest.raises(CorruptStateError):
            state_from_bytes(bad)
    assert issubclass(CorruptStateError, StateMismatchError)


@pytest.mark.parametrize("meta", ["[1, 2]", "null", '"text"', "{not json", None])
def test_state_with_unusable_meta_is_refused(meta: str | None) -> None:
    metadata = {"format": "tta-state-1"} if meta is None else {"format": "tta-state-1", "tta_meta": meta}
    blob = save_safetensors({"x": torch.zeros(2)}, metadata=metadata)
    with pytest.raises(CorruptStateError):
        state_from_bytes(blob)


def test_unknown_strategy_lists_valid_names() -> None:
    with pytest.raises(UnknownStrategyError) as info:
        adapters.get_strategy("nope")
    message = str(info.value)
    assert "nope" in message
    assert all(name in message for name in NAMES)


def test_registering_a_name_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        adapters.register_strategy(adapters.get_strategy("tent"))


def test_concurrent_streams_are_isolated(tiny_handle: ModelHandle) -> None:
    """Plans live in a context variable: threads running different strategies do not see each other's."""

    def job(name: str) -> tuple[torch.Tensor, AdaptationState]:
        results = _run(adapters.get_strategy(name), tiny_handle, steps=2)
        return results[-1].logits, results[-1].state

    jobs = NAMES * 2
    sequential = [job(name) for name in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(job, jobs))
    for name, (logits, state), (logits_c, state_c) in zip(jobs, sequential, concurrent, strict=True):
        torch.testing.assert_close(logits_c, logits, rtol=0, atol=0, msg=name)
        assert_states_equal(state_c, state)
