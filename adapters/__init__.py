"""Test-time adaptation strategies as pure steps over a shared, frozen BN model."""

from adapters._builtin import register_builtins
from adapters._strategy import ComposedStrategy
from adapters.base import (
    AdaptationState,
    AdaptError,
    BatchTooSmallError,
    BNLayer,
    IncompatibleModelError,
    ModelHandle,
    StateMismatchError,
    StepResult,
    StepStats,
    StrategyConfig,
    UnknownStrategyError,
)
from adapters.registry import get_strategy, list_strategies, register_strategy

register_builtins()

__all__ = [
    "AdaptError",
    "AdaptationState",
    "BNLayer",
    "BatchTooSmallError",
    "ComposedStrategy",
    "IncompatibleModelError",
    "ModelHandle",
    "StateMismatchError",
    "StepResult",
    "StepStats",
    "StrategyConfig",
    "UnknownStrategyError",
    "get_strategy",
    "list_strategies",
    "register_strategy",
]
