"""Test-time adaptation strategies as pure steps over a shared, frozen BN model.

Each strategy registers itself in the module that defines it (`adapters.registry.register_strategy`);
importing this package imports the built-in strategies' modules and so registers them.
"""

# isort: off
# The built-in strategies: importing a module registers its strategies, so this order is the registry's.
from adapters import source, alpha_bn, unmix_tns, tent, eata, sar, ema_tbn, roid, cotta, rmt, petal, ecotta

# isort: on
from adapters._strategy import ComposedStrategy, Forward, Normalizer, StatPlan, UpdateOutcome, Updater
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

__all__ = [
    "AdaptError",
    "AdaptationState",
    "BNLayer",
    "BatchTooSmallError",
    "ComposedStrategy",
    "Forward",
    "IncompatibleModelError",
    "ModelHandle",
    "Normalizer",
    "StatPlan",
    "StateMismatchError",
    "StepResult",
    "StepStats",
    "StrategyConfig",
    "UnknownStrategyError",
    "UpdateOutcome",
    "Updater",
    "alpha_bn",
    "cotta",
    "eata",
    "ecotta",
    "ema_tbn",
    "get_strategy",
    "list_strategies",
    "petal",
    "register_strategy",
    "rmt",
    "roid",
    "sar",
    "source",
    "tent",
    "unmix_tns",
]
