"""The strategy registry: the only way the rest of the service finds a strategy.

A strategy registers where it is defined, with a decorator on a function that builds it::

    @register_strategy
    def tent() -> ComposedStrategy:
        return ComposedStrategy("tent", "entropy minimisation ...", BatchStats(), TentUpdater())

Importing `adapters` imports the modules of the built-in strategies, which registers them; a strategy
defined elsewhere is registered when its module is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, overload

from adapters._strategy import ComposedStrategy
from adapters.base import UnknownStrategyError

_REGISTRY: dict[str, ComposedStrategy] = {}

StrategyFactory = Callable[[], ComposedStrategy]
_Factory = TypeVar("_Factory", bound=StrategyFactory)


@overload
def register_strategy(strategy: ComposedStrategy) -> ComposedStrategy: ...


@overload
def register_strategy(strategy: _Factory) -> _Factory: ...


def register_strategy(strategy: ComposedStrategy | _Factory) -> ComposedStrategy | _Factory:
    """Add a strategy under its name; registering a name twice is an error.

    Takes the strategy, or, as a decorator, a function without arguments that builds it: the function
    is called once, now, and returned unchanged.
    """
    built = strategy if isinstance(strategy, ComposedStrategy) else strategy()
    if not isinstance(built, ComposedStrategy):
        raise TypeError(f"a strategy factory must return a ComposedStrategy, got {type(built).__name__}")
    if built.name in _REGISTRY:
        raise ValueError(f"strategy {built.name!r} is already registered")
    if built.name != built.name.lower() or " " in built.name:
        raise ValueError(f"strategy names are lowercase without spaces, got {built.name!r}")
    _REGISTRY[built.name] = built
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
