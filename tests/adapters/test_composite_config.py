"""Configs: a strategy of two configured parts nests one config per part; single-part strategies stay flat."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError

import adapters
from adapters._strategy import compose_config
from adapters.base import ModelHandle, StrategyConfig
from adapters.eata import FISHER_PREFIX, EATAConfig, ETAConfig
from adapters.sar import SARConfig
from adapters.source import SourceConfig
from adapters.tent import TentConfig
from adapters.unmix_tns import UnMixTNSConfig

from ._plugin_strategy import PREFIX, DUAConfig
from ._reference import make_batch, small_config

COMPOSITES = {
    "unmix_tns+tent": ("tent", TentConfig),
    "unmix_tns+eata": ("eata", EATAConfig),
    "unmix_tns+eta": ("eta", ETAConfig),
    "unmix_tns+sar": ("sar", SARConfig),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_a_composite_config_has_one_field_per_part(name: str) -> None:
    strategy = adapters.get_strategy(name)
    part, part_cls = COMPOSITES[name]
    assert strategy.config_parts == {"unmix_tns": UnMixTNSConfig, part: part_cls}
    assert list(strategy.config_cls.model_fields) == ["unmix_tns", part]
    cfg = strategy.parse_config({"unmix_tns": {"k": 4}, part: {"lr": 0.01}})
    assert strategy.part_config(strategy.normalizer, cfg) == UnMixTNSConfig(k=4)
    assert strategy.updater is not None
    assert strategy.part_config(strategy.updater, cfg) == part_cls(lr=0.01)
    # An omitted part takes its defaults; so does an omitted config.
    assert strategy.parse_config({"unmix_tns": {"k": 4}}).model_dump() == {
        "unmix_tns": UnMixTNSConfig(k=4).model_dump(),
        part: part_cls().model_dump(),
    }
    assert strategy.parse_config(None) == strategy.parse_config({}) == strategy.config_cls()


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("source", SourceConfig),
        ("norm", StrategyConfig),
        ("alpha_bn", adapters.get_strategy("alpha_bn").normalizer.config_cls),
        ("unmix_tns", UnMixTNSConfig),
        ("tent", TentConfig),
        ("eata", EATAConfig),
        ("eta", ETAConfig),
        ("sar", SARConfig),
    ],
)
def test_single_part_strategies_keep_a_flat_config(name: str, cls: type[StrategyConfig]) -> None:
    strategy = adapters.get_strategy(name)
    assert strategy.config_cls is cls
    assert strategy.config_parts == {}


@pytest.mark.parametrize(
    ("raw", "loc"),
    [
        ({"k": 4}, ("k",)),  # a part's field at the top level (the old flat form)
        ({"unmix_tns": {"k": 4}, "lr": 0.01}, ("lr",)),
        ({"unmix_tns": {"kk": 4}}, ("unmix_tns", "kk")),
        ({"tent": {"k": 4}}, ("tent", "k")),  # a field of the other part
        ({"unmix_tns": {"k": 0}}, ("unmix_tns", "k")),
        ({"tent": {"optimizer": "rmsprop"}}, ("tent", "optimizer")),
        ({"sar": {}}, ("sar",)),
        ({"tent": 1e-3}, ("tent",)),
    ],
)
def test_each_part_validates_its_own_object(raw: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        adapters.get_strategy("unmix_tns+tent").parse_config(raw)
    assert [tuple(e["loc"]) for e in info.value.errors()] == [loc]


def test_a_composite_config_is_frozen_all_the_way_down() -> None:
    cfg = adapters.get_strategy("unmix_tns+tent").config_cls()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.tent = TentConfig(lr=0.1)  # type: ignore[attr-defined]
    with pytest.raises(ValidationError, match="frozen"):
        cfg.tent.lr = 0.1  # type: ignore[attr-defined]


def test_the_json_schema_nests_per_part() -> None:
    schema = adapters.get_strategy("unmix_tns+tent").config_cls.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {"unmix_tns", "tent"}
    for part, cls in (("unmix_tns", UnMixTNSConfig), ("tent", TentConfig)):
        prop = schema["properties"][part]
        ref = prop["$ref"].rsplit("/", 1)[-1]
        assert schema["$defs"][ref] == cls.model_json_schema()
        assert prop["default"] == cls().model_dump(mode="json")


def test_parts_may_use_the_same_field_names(tiny_handle: ModelHandle) -> None:
    """DUA's `momentum` and Tent's optimiser `momentum` are two fields; each part sees its own."""
    strategy = adapters.get_strategy("dua_plugin+tent")
    assert set(DUAConfig.model_fields) & set(TentConfig.model_fields) == {"momentum"}
    cfg = strategy.parse_config(
        {"dua_plugin": {"momentum": 0.3}, "tent": {"optimizer": "sgd", "momentum": 0.5}}
    )
    dumped = cfg.model_dump()
    assert (dumped["dua_plugin"]["momentum"], dumped["tent"]["momentum"]) == (0.3, 0.5)
    alone = adapters.get_strategy("dua_plugin")
    x = make_batch(6, seed=0)
    # The first step trains from the source affine parameters, so its statistics match EMA-TBN alone's.
    got = strategy.step(tiny_handle, x, strategy.init_state(tiny_handle, cfg), cfg).state.tensors
    ref_cfg = DUAConfig(momentum=0.3)
    want = alone.step(tiny_handle, x, alone.init_state(tiny_handle, ref_cfg), ref_cfg).state.tensors
    keys = [k for k in want if k.startswith(PREFIX)]
    assert keys and all(
        not torch.equal(want[k], alone.init_state(tiny_handle, ref_cfg).tensors[k]) for k in keys
    )
    for key in keys:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)


def test_field_names_clash_no_more() -> None:
    class A(StrategyConfig):
        momentum: float = 0.1

    class B(StrategyConfig):
        momentum: float = 0.9

    cls = compose_config("ABConfig", {"a": A, "b": B})
    assert cls.model_validate({"a": {"momentum": 0.2}}).model_dump() == {
        "a": {"momentum": 0.2},
        "b": {"momentum": 0.9},
    }
    assert compose_config("X", {"a": A, "none": StrategyConfig}) is A
    assert compose_config("X", {"none": StrategyConfig}) is StrategyConfig
    with pytest.raises(ValueError, match="cannot name a config field"):
        compose_config("X", {"a-1": A, "b": B})


def test_the_fisher_depends_on_the_statistics_of_the_forward(tiny_handle: ModelHandle) -> None:
    """EATA's per-process Fisher cache: the same EATA config over other statistics is another Fisher."""
    eata, composite = adapters.get_strategy("eata"), adapters.get_strategy("unmix_tns+eata")
    cfg, composite_cfg = small_config(eata), small_config(composite)
    assert composite_cfg.model_dump()["eata"] == cfg.model_dump()
    plain = eata.init_state(tiny_handle, cfg).tensors
    over_unmix = composite.init_state(tiny_handle, composite_cfg).tensors
    fisher = [k for k in plain if k.startswith(FISHER_PREFIX)]
    assert fisher and all(k in over_unmix for k in fisher)
    assert any(not torch.equal(plain[k], over_unmix[k]) for k in fisher)
