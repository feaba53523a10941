"""When a PUT asks for the policy a stream already has (no new incarnation, its state kept)."""

from __future__ import annotations

from tta_server.engine.streams import same_settings
from tta_server.records import Policy


def _policy(strategy: str, config: dict[str, object], seed: int = 0) -> Policy:
    return Policy("cifar10_wrn40_2", strategy, config, seed, "inc-1", "put")


def test_a_field_added_to_a_strategy_since_the_record_was_written_is_no_change() -> None:
    # A `source` policy stored before `drift_positions` existed, and the same PUT validated today.
    stored = _policy("source", {"drift_images": 16})
    put = _policy("source", {"drift_images": 16, "drift_positions": 256})
    assert stored.settings() != put.settings() and same_settings(stored, put)


def test_any_real_difference_is_a_change() -> None:
    stored = _policy("source", {"drift_images": 16})
    assert not same_settings(stored, _policy("source", {"drift_images": 16, "drift_positions": 64}))
    assert not same_settings(stored, _policy("source", {"drift_images": 8, "drift_positions": 256}))
    assert not same_settings(stored, _policy("source", {"drift_images": 16, "drift_positions": 256}, seed=1))
    assert not same_settings(stored, _policy("norm", {}))
    # A stored record its strategy no longer reads (unknown strategy, invalid config) never matches.
    assert not same_settings(_policy("gone", {}), _policy("gone", {"x": 1}))
    assert not same_settings(_policy("source", {"drift_images": 0}), _policy("source", {"drift_images": 16}))
