"""The strategy registry: the only way the rest of the service finds a strategy."""

from __future__ import annotations

from adapters._strategy import ComposedStrategy
from adapters.base import UnknownStrategyError

_REGISTRY: dict[str, ComposedStrategy] = {}


def register_strategy(strategy: ComposedStrategy) -> ComposedStrategy:
    """Add a strategy under its name; registering a name twice is an error."""
    if strategy.name in _REGISTRY:
        raise ValueError(f"strategy {strategy.name!r} is already registered")
    if strategy.name != strategy.name.lower() or " " in strategy.name:
        raise ValueError(f"strategy names are lowercase without spaces, got {strategy.name!r}")
    _REGISTRY[strategy.name] = strategy
    return strategy


def get_strategy(name: str) -> ComposedStrategy:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategyError(
            f"unknown strategy {name!r}; valid strategies: {', '.join(list_strategies())}"
        ) from None


def list_strategies() -> list[str]:
    return list(_REGISTRY)
