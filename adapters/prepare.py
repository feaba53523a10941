"""What source-dependent strategies need from a model's source data, made once into a source artefact.

`prepare_source(handle)` computes EATA's Fisher for the default configs of the strategies that use it
(`eata`, `unmix_tns+eata`) and the given stream seeds, keyed as `fisher_diagonal` looks them up in
`ModelHandle.prepared`; asked for `rmt`, it also makes RMT's warmed-up start and source prototypes
(`adapters.rmt.warm_start`, minutes at the default 50000 warm-up samples, so not by default), and for
`petal` its source posterior's variance (`adapters.petal.posterior_variance`), for `ecotta` its warmed-up
meta networks (`adapters.ecotta.warm_meta`); `tta-bench prepare-source` writes them to the file the model's `source_artifact`
names (safetensors, with the model's fingerprint in its metadata), and the server loads it at start.
A stream whose Fisher is not in the artefact (another config or seed) computes it at first use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from adapters.base import ModelHandle
from adapters.eata import EATAConfig, EATAUpdater, fisher_cache_key, fisher_diagonal, prepared_prefix
from adapters.ecotta import EcoTTAUpdater, warm_meta
from adapters.ecotta import prepared_prefix as ecotta_prefix
from adapters.petal import PETALUpdater, posterior_variance
from adapters.petal import prepared_prefix as petal_prefix
from adapters.registry import get_strategy
from adapters.rmt import RMTUpdater, warm_start
from adapters.rmt import prepared_prefix as rmt_prefix

SOURCE_STRATEGIES = ("eata", "unmix_tns+eata")


# Updaters whose source-derived start is a function of (handle, config, seed), stored under a prefix of the
# same arguments: the updater class, then (tensors of a seed, their key prefix).
_PREPARED: list[
    tuple[type[Any], Callable[[ModelHandle, Any, int], dict[str, Tensor]], Callable[[Any, int], str]]
] = [
    (RMTUpdater, warm_start, rmt_prefix),
    (EcoTTAUpdater, warm_meta, ecotta_prefix),
    (PETALUpdater, posterior_variance, petal_prefix),
]


def prepare_source(
    handle: ModelHandle, strategies: Sequence[str] = SOURCE_STRATEGIES, seeds: Sequence[int] = (0,)
) -> dict[str, Tensor]:
    """The artefact's tensors: each strategy's Fisher at its default config, per seed."""
    out: dict[str, Tensor] = {}
    for name in strategies:
        strategy = get_strategy(name)
        updater = strategy.updater
        made = next(((make, prefix) for cls, make, prefix in _PREPARED if isinstance(updater, cls)), None)
        if made is not None:
            make, prefix = made
            assert updater is not None
            upd_cfg = strategy.part_config(updater, strategy.parse_config({}))
            for seed in seeds:
                tensors = make(handle, upd_cfg, seed)
                out.update({prefix(upd_cfg, seed) + k: v.cpu().contiguous() for k, v in tensors.items()})
            continue
        if not isinstance(updater, EATAUpdater):
            raise ValueError(f"{name} needs nothing prepared from source data")
        cfg = strategy.parse_config({})
        upd_cfg = strategy.part_config(updater, cfg)
        assert isinstance(upd_cfg, EATAConfig)
        norm_cfg = strategy.part_config(strategy.normalizer, cfg)
        for seed in seeds:
            tensors = strategy.normalizer.init_tensors(handle, norm_cfg, seed)
            forward = strategy._forward_fn(handle, norm_cfg, tensors, adapt=False)
            key = fisher_cache_key(forward, upd_cfg, seed)
            fisher = fisher_diagonal(
                handle, forward, upd_cfg.fisher_size, upd_cfg.fisher_batch_size, seed, key
            )
            fisher_prefix = prepared_prefix(key)
            out.update({fisher_prefix + k: v.detach().cpu().contiguous() for k, v in fisher.items()})
    return out
