"""A step leaves the device once, for its result: host synchronisations counted on the CPU.

On a GPU every `.item()`, `int(tensor)`, `bool(tensor)`, `.tolist()` and boolean-mask index stalls the
host until the device has caught up; `counting_ops` counts them on the CPU. The step's result is one
`.tolist()` (its figures) of a tensor that came over in one copy with the predictions.
"""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters.base import ModelHandle
from tta_bench.opcount import OpCount, counting_ops

from ._reference import make_batch, small_config

# Synchronisations a step may make before its result: one per data-dependent decision of the algorithm.
ALLOWED = {
    "source": 0,
    "norm": 0,
    "alpha_bn": 0,
    "unmix_tns": 0,
    "tent": 0,
    "unmix_tns+tent": 0,
    "eata": 1,  # did any sample pass the filters (no update otherwise)
    "eta": 1,
    "sar": 2,  # one per filter; the second also brings the loss that drives the recovery
}


def _step_ops(handle: ModelHandle, name: str, adapt: bool = True) -> OpCount:
    strategy = adapters.get_strategy(name)
    cfg = small_config(strategy)
    state = strategy.init_state(handle, cfg)
    x = make_batch(8, seed=3)
    state = strategy.step(handle, x, state, cfg).state  # EATA's first step has no prediction average yet
    with counting_ops() as ops:
        result = strategy.step(handle, x, state, cfg, adapt=adapt)
    assert result.logits.shape == (8, handle.num_classes)
    assert result.logits.device.type == "cpu"
    return ops


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_step_synchronises_only_for_its_decisions_and_result(tiny_handle: ModelHandle, name: str) -> None:
    ops = _step_ops(tiny_handle, name)
    assert ops.by_op["aten::nonzero"] == 0, f"{name}: boolean-mask indexing in a step"
    assert ops.host_syncs == 1 + ALLOWED[name], name


@pytest.mark.parametrize("name", ["eata", "sar"])
def test_prediction_only_steps_synchronise_once(tiny_handle: ModelHandle, name: str) -> None:
    assert _step_ops(tiny_handle, name, adapt=False).host_syncs == 1


@pytest.mark.parametrize(
    "read", [lambda t: t.sum().item(), lambda t: int(t.sum()), lambda t: t[t > 0], lambda t: t.tolist()]
)
def test_the_counter_sees_every_kind_of_host_read(read) -> None:
    """The tests above can fail: each kind of read is counted on the CPU, once."""
    x = torch.ones(3)
    with counting_ops() as ops:
        read(x)
    assert ops.host_syncs == 1


def test_the_counter_restores_tolist() -> None:
    with counting_ops():
        pass
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist


@pytest.mark.parametrize("name", ["norm", "unmix_tns"])
def test_a_shared_forward_synchronises_once_for_all_streams(tiny_handle: ModelHandle, name: str) -> None:
    strategy = adapters.get_strategy(name)
    cfg = small_config(strategy)
    states = [strategy.init_state(tiny_handle, cfg, seed=s) for s in range(3)]
    batches = [make_batch(4, seed=s) for s in range(3)]
    with counting_ops() as ops:
        results = strategy.step_many(tiny_handle, batches, states, cfg)
    assert [r.logits.shape[0] for r in results] == [4, 4, 4]
    assert ops.host_syncs == 1
