"""Registration of the built-in strategies."""

from __future__ import annotations

from adapters._strategy import ComposedStrategy
from adapters.alpha_bn import AlphaStats
from adapters.eata import EATAConfig, EATAUpdater, ETAConfig
from adapters.registry import register_strategy
from adapters.sar import SARUpdater
from adapters.source import BatchStats, SourceStats
from adapters.tent import TentUpdater
from adapters.unmix_tns import UnMixStats


def register_builtins() -> None:
    updaters = {
        "tent": (TentUpdater(), "entropy minimisation of BN affine parameters"),
        "eata": (
            EATAUpdater("eata", EATAConfig),
            "filtered, reweighted entropy minimisation with Fisher penalty",
        ),
        "eta": (EATAUpdater("eta", ETAConfig), "EATA without the Fisher penalty (no source data needed)"),
        "sar": (SARUpdater(), "sharpness-aware reliable entropy minimisation with model recovery"),
    }
    register_strategy(ComposedStrategy("source", "no adaptation (source statistics)", SourceStats(), None))
    register_strategy(ComposedStrategy("norm", "test-batch BN statistics", BatchStats(), None))
    register_strategy(
        ComposedStrategy("alpha_bn", "mix of source and test-batch BN statistics", AlphaStats(), None)
    )
    register_strategy(
        ComposedStrategy(
            "unmix_tns", "per-instance mixture of K BN statistics components", UnMixStats(), None
        )
    )
    for name, (updater, summary) in updaters.items():
        register_strategy(ComposedStrategy(name, f"{summary} (test-batch statistics)", BatchStats(), updater))
    for name, (updater, summary) in updaters.items():
        register_strategy(
            ComposedStrategy(
                f"unmix_tns+{name}", f"{summary} over UnMix-TNS statistics", UnMixStats(), updater
            )
        )
