"""A strategy = a statistics `Normalizer` (how BN layers normalise) + an optional gradient `Updater`.

Each part declares the layer kinds it adapts (`base.LayerKind`): a normaliser the kinds whose statistics
it sets (`stat_kinds`; BatchNorm2d), an updater the kinds whose affine parameters it trains
(`affine_kinds`; BN2d, LayerNorm, GroupNorm). `check_model` refuses a model that lacks what a strategy
needs: the normaliser's kinds when it `requires_stats` (`norm`, `alpha_bn`, `unmix_tns`, and UnMix-TNS
in composites), and the updater's. The test-batch statistics under `tent`, `eata`, `eta` and `sar` are
not required: on a model without BatchNorm their LayerNorm/GroupNorm layers compute their own
statistics (the normaliser is then "source") and only the affine parameters adapt.

`source`, `norm`, `alpha_bn` and `unmix_tns` are normalisers alone; `tent`, `eata`, `eta` and `sar`
are updaters over test-batch statistics; `unmix_tns+tent` etc. pair UnMix-TNS statistics with an
updater. Every step is a pure function of (handle, batch, state, config).

A strategy's config is its configured part's own config class when only one part has
hyper-parameters (`tent`: `TentConfig`), and one field per part, named after the part, when both have
them (`unmix_tns+tent`: `{"unmix_tns": {...}, "tent": {...}}`), so the parts' field names never meet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from pydantic import create_model
from torch import Tensor

from adapters import losses
from adapters._bn import GroupedPlan, NormPlan, active_plan
from adapters.base import (
    AdaptationState,
    BatchTooSmallError,
    IncompatibleModelError,
    ModelHandle,
    StateMismatchError,
    StepResult,
    StepStats,
    StrategyConfig,
)

ConfigT = TypeVar("ConfigT", bound=StrategyConfig)
NormConfigT = TypeVar("NormConfigT", bound=StrategyConfig)
UpdateConfigT = TypeVar("UpdateConfigT", bound=StrategyConfig)


class StatPlan(NormPlan, Protocol):
    """A `NormPlan` of one forward pass that also reports what it saw and what it changed."""

    @property
    def batch_stats(self) -> dict[int, tuple[Tensor, Tensor]]:
        """BN layer index -> the batch mean and biased variance the layer saw, when the plan records them."""
        ...

    def updated_tensors(self) -> dict[str, Tensor]:
        """The normaliser's state tensors this forward pass changed."""
        ...


class Forward(Protocol):
    """One forward pass of the base model under the strategy's normaliser: `(logits, plan)`.

    `affine` replaces BN affine parameters (None: the source ones). `update_stats`: whether the
    normaliser updates its statistics (never in a step with adapt=False); `record`: whether the plan
    keeps the batch statistics it saw. `identity` names what the pass computes besides its arguments
    (the normaliser and its config): a cache of results of the forward must include it in its key.
    """

    @property
    def identity(self) -> str: ...

    def __call__(
        self, x: Tensor, affine: Mapping[str, Tensor] | None = None, *, update_stats: bool, record: bool
    ) -> tuple[Tensor, StatPlan]: ...


class Normalizer(Protocol[ConfigT]):
    """How the BN layers normalise, and the statistics state that takes."""

    @property
    def name(self) -> str: ...

    @property
    def config_cls(self) -> type[ConfigT]: ...

    @property
    def min_batch_size(self) -> int: ...

    @property
    def stat_kinds(self) -> frozenset[str]:
        """The layer kinds whose statistics this normaliser sets (empty: every layer keeps its own)."""
        ...

    @property
    def requires_stats(self) -> bool:
        """Whether the strategy needs the model to have a layer of `stat_kinds` (it is pointless without)."""
        ...

    def init_tensors(self, handle: ModelHandle, cfg: ConfigT, seed: int) -> dict[str, Tensor]: ...

    def plan(
        self,
        handle: ModelHandle,
        cfg: ConfigT,
        tensors: Mapping[str, Tensor],
        affine: Mapping[str, Tensor] | None,
        *,
        update: bool,
        record: bool,
    ) -> StatPlan: ...


@dataclass
class UpdateOutcome:
    logits: Tensor
    plan: StatPlan
    tensors: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    used: int = 0
    filtered: int = 0
    updated: bool = False
    # A 0-dim tensor reaches the host with the step's other figures; a float is already there.
    loss: Tensor | float | None = None
    reset: bool = False


class Updater(Protocol[ConfigT]):
    """A gradient update of the BN affine parameters, run after (and through) the normaliser."""

    @property
    def name(self) -> str: ...

    @property
    def config_cls(self) -> type[ConfigT]: ...

    @property
    def autocast_ok(self) -> bool:
        """False: the update is not validated under reduced precision, so its forwards stay float32."""
        ...

    @property
    def affine_kinds(self) -> frozenset[str]:
        """The layer kinds whose affine parameters this updater trains (the model needs one of them)."""
        ...

    def init_state(
        self, handle: ModelHandle, cfg: ConfigT, forward: Forward, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]: ...

    def step(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, cfg: ConfigT, forward: Forward
    ) -> UpdateOutcome: ...


def compose_config(name: str, parts: Mapping[str, type[StrategyConfig]]) -> type[StrategyConfig]:
    """The config class of a strategy made of `parts` (part name -> that part's config class).

    Parts without hyper-parameters are left out. One part left: its own class (a flat config). More:
    a frozen class with one field per part, named after it, that holds the part's config (validated
    by the part's class; its defaults when omitted), so two parts may use the same field names.
    """
    configured = {part: cls for part, cls in parts.items() if cls.model_fields}
    if not configured:
        return StrategyConfig
    if len(configured) == 1:
        return next(iter(configured.values()))
    for part in configured:
        if not part.isidentifier() or part.startswith(("_", "model_")):
            raise ValueError(f"part name {part!r} of {name} cannot name a config field")
    fields: dict[str, Any] = {part: (cls, cls()) for part, cls in configured.items()}
    doc = ", ".join(f"`{part}`: {cls.__name__}" for part, cls in configured.items())
    return create_model(name, __base__=StrategyConfig, __doc__=f"One config per part: {doc}.", **fields)


class ComposedStrategy:
    """A strategy: runs a normaliser, then (if any) an updater, and reports stats.

    The parts are typed by their protocols with their own config classes, so mypy checks at each
    construction that a part implements its protocol and that its methods take its `config_cls`.
    """

    def __init__(
        self,
        name: str,
        summary: str,
        normalizer: Normalizer[NormConfigT],
        updater: Updater[UpdateConfigT] | None = None,
        state_version: int | None = None,
    ) -> None:
        self.name = name
        self.summary = summary
        self.normalizer: Normalizer[Any] = normalizer
        self.updater: Updater[Any] | None = updater
        self.needs_grad = updater is not None
        self.stat_kinds = normalizer.stat_kinds
        self.affine_kinds: frozenset[str] = updater.affine_kinds if updater is not None else frozenset()
        self.autocast_ok = updater is None or updater.autocast_ok
        # The state's schema is the normaliser's (an updater's tensors are keyed by parameter name).
        self.state_version: int = state_version or int(getattr(normalizer, "state_version", 1))
        parts: dict[str, type[StrategyConfig]] = {normalizer.name: normalizer.config_cls}
        if updater is not None:
            if updater.name == normalizer.name:
                raise ValueError(f"{name}: normaliser and updater are both named {updater.name!r}")
            parts[updater.name] = updater.config_cls
        cfg_name = "".join(p.title().replace("_", "") for p in parts) + "Config"
        self.config_cls = compose_config(cfg_name, parts)
        configured = {part: cls for part, cls in parts.items() if cls.model_fields}
        # The fields of a nested config and their classes, one per part with hyper-parameters; empty for
        # a flat config.
        self.config_parts: dict[str, type[StrategyConfig]] = configured if len(configured) > 1 else {}
        # The config of each part without hyper-parameters (the only instance of its class).
        self._fixed_configs = {part: cls() for part, cls in parts.items() if not cls.model_fields}

    @property
    def min_batch_size(self) -> int:
        return 2 if self.updater is not None else self.normalizer.min_batch_size

    def applies_to(self, handle: ModelHandle) -> bool:
        """Whether the model has the layer kinds this strategy adapts (`check_model` passes)."""
        kinds = handle.layer_kinds()
        if self.normalizer.requires_stats and not self.stat_kinds & kinds:
            return False
        return self.updater is None or bool(self.affine_kinds & kinds)

    def check_model(self, handle: ModelHandle) -> None:
        if self.applies_to(handle):
            return
        counts = ", ".join(f"{kind} x {n}" for kind, n in sorted(handle.layer_counts.items())) or "none"
        if self.normalizer.requires_stats and not self.stat_kinds & handle.layer_kinds():
            what = f"the statistics of {'/'.join(sorted(self.stat_kinds))} layers"
        else:
            what = f"the affine parameters of {'/'.join(sorted(self.affine_kinds))} layers"
        raise IncompatibleModelError(
            f"{self.name} adapts {what}, and model {handle.model_id!r} has none it can adapt "
            f"(its normalisation layers: {counts})"
        )

    def parse_config(self, raw: Mapping[str, Any] | StrategyConfig | None) -> StrategyConfig:
        if isinstance(raw, self.config_cls):
            return raw
        if isinstance(raw, StrategyConfig):
            raw = raw.model_dump()
        return self.config_cls.model_validate(dict(raw or {}))

    def part_config(self, part: Normalizer[Any] | Updater[Any], cfg: StrategyConfig) -> StrategyConfig:
        """One part's (the normaliser's or the updater's) own config within the strategy's `cfg`."""
        fixed = self._fixed_configs.get(part.name)
        if fixed is not None:
            return fixed
        part_cfg: StrategyConfig = getattr(cfg, part.name) if self.config_parts else cfg
        return part_cfg

    def _forward_fn(
        self, handle: ModelHandle, norm_cfg: StrategyConfig, tensors: Mapping[str, Tensor], adapt: bool
    ) -> Forward:
        return _PlanForward(self, handle, norm_cfg, tensors, adapt)

    def check_batch(self, batch: Tensor, adapt: bool) -> None:
        """Raise BatchTooSmallError for a batch this strategy cannot step on."""
        if batch.ndim != 4 or batch.shape[0] == 0:
            raise BatchTooSmallError(f"expected a non-empty NCHW batch, got shape {tuple(batch.shape)}")
        if adapt and batch.shape[0] < self.min_batch_size:
            raise BatchTooSmallError(
                f"{self.name} needs at least {self.min_batch_size} images per adapting batch "
                f"(got {batch.shape[0]}); send larger batches or use adapt=false"
            )

    def _autocast(self, handle: ModelHandle) -> contextlib.AbstractContextManager[Any]:
        return handle.autocast() if self.autocast_ok else contextlib.nullcontext()

    def init_state(self, handle: ModelHandle, config: StrategyConfig, seed: int = 0) -> AdaptationState:
        self.check_model(handle)
        cfg = self.parse_config(config)
        norm_cfg = self.part_config(self.normalizer, cfg)
        tensors = self.normalizer.init_tensors(handle, norm_cfg, seed)
        meta: dict[str, Any] = {
            "strategy": self.name,
            "schema_version": self.state_version,
            "model": handle.fingerprint,
            "seed": seed,
            "steps": 0,
            "updates": 0,
            "samples_seen": 0,
        }
        if self.updater is not None:
            forward = self._forward_fn(handle, norm_cfg, tensors, adapt=False)
            upd_cfg = self.part_config(self.updater, cfg)
            upd_tensors, upd_meta = self.updater.init_state(handle, upd_cfg, forward, seed)
            tensors.update(upd_tensors)
            meta.update(upd_meta)
        return AdaptationState({k: v.detach() for k, v in tensors.items()}, meta)

    def upgrade_state(self, handle: ModelHandle, state: AdaptationState) -> AdaptationState:
        """A stored state of an older schema version in the current one, where the normaliser can convert it
        (`upgrade_tensors`); any other state unchanged, for `check_state` to judge."""
        meta = state.meta
        version = meta.get("schema_version")
        upgrade = getattr(self.normalizer, "upgrade_tensors", None)
        if (
            upgrade is None
            or not isinstance(version, int)
            or version >= self.state_version
            or meta.get("strategy") != self.name
            or meta.get("model") != handle.fingerprint
        ):
            return state
        try:
            tensors = upgrade(handle, state.tensors, version)
        except KeyError:
            return state
        return AdaptationState(tensors, {**meta, "schema_version": self.state_version})

    def check_state(self, handle: ModelHandle, state: AdaptationState) -> None:
        meta = state.meta
        if meta.get("strategy") != self.name:
            raise StateMismatchError(
                f"state was written by strategy {meta.get('strategy')!r}, not {self.name!r}"
            )
        if meta.get("schema_version") != self.state_version:
            raise StateMismatchError(
                f"state schema version {meta.get('schema_version')} != {self.state_version} for {self.name}"
            )
        if meta.get("model") != handle.fingerprint:
            raise StateMismatchError(f"state was written for another model (fingerprint {meta.get('model')})")

    def step(
        self,
        handle: ModelHandle,
        batch: Tensor,
        state: AdaptationState,
        config: StrategyConfig,
        adapt: bool = True,
    ) -> StepResult:
        cfg = self.parse_config(config)
        norm_cfg = self.part_config(self.normalizer, cfg)
        self.check_state(handle, state)
        self.check_batch(batch, adapt)
        x = _to_input(handle, batch)
        forward = self._forward_fn(handle, norm_cfg, state.tensors, adapt)
        if self.updater is None or not adapt:
            outcome = self._predict_only(handle, x, state, forward)
        else:
            outcome = self.updater.step(handle, x, state, self.part_config(self.updater, cfg), forward)
            if outcome.reset:
                # A recovery reset restores the whole adaptive model: normalisation statistics too.
                seed = int(state.meta.get("seed", 0))
                outcome.tensors = {**self.normalizer.init_tensors(handle, norm_cfg, seed), **outcome.tensors}
        return self._finish_many(handle, [(state, outcome)], adapt)[0]

    def can_step_many(self, adapt: bool) -> bool:
        """Whether `step_many` may serve this kind of step: no gradient update (that has per-stream filters,
        optimisers and second passes), only normalisation statistics."""
        return self.updater is None or (not adapt and not hasattr(self.updater, "predict"))

    def step_many(
        self,
        handle: ModelHandle,
        batches: list[Tensor],
        states: list[AdaptationState],
        config: StrategyConfig,
        adapt: bool = True,
    ) -> list[StepResult]:
        """One forward pass for several streams' batches; result i is what `step(batches[i], states[i])` gives.

        Every BN layer normalises each stream's rows with that stream's own statistics (`GroupedPlan`),
        so nothing mixes between streams, while the convolutions run once on the whole batch.
        """
        if self.updater is not None and adapt:
            raise ValueError(f"{self.name} adapts by gradient steps; use step() for each stream")
        if self.updater is not None and (
            hasattr(self.updater, "predict")
            or any(layer.kind != "batchnorm2d" for layer in handle.trainable_layers())
        ):
            # Each stream has its own LayerNorm/GroupNorm parameters, which one shared forward cannot
            # give (BN layers can: they normalise each stream's rows separately).
            return [self.step(handle, b, s, config, adapt) for b, s in zip(batches, states, strict=True)]
        norm_cfg = self.part_config(self.normalizer, self.parse_config(config))
        for batch, state in zip(batches, states, strict=True):
            self.check_state(handle, state)
            self.check_batch(batch, adapt)
        plans = [
            self.normalizer.plan(
                handle, norm_cfg, state.tensors, self._frozen_affine(handle, state), update=adapt, record=True
            )
            for state in states
        ]
        sizes = [b.shape[0] for b in batches]
        x = _to_input(handle, torch.cat([b.to(handle.device, non_blocking=True) for b in batches]))
        with torch.inference_mode(), active_plan(GroupedPlan(plans, sizes)), self._autocast(handle):
            logits = handle.model(x).float()
        outcomes = [_prediction(rows, plan) for plan, rows in zip(plans, logits.split(sizes), strict=True)]
        return self._finish_many(handle, list(zip(states, outcomes, strict=True)), adapt)

    def _predict_only(
        self, handle: ModelHandle, x: Tensor, state: AdaptationState, forward: Forward
    ) -> UpdateOutcome:
        # An updater whose state is not (only) affine parameters predicts itself (CoTTA: its teacher).
        predict = getattr(self.updater, "predict", None)
        with torch.inference_mode():
            if predict is not None:
                return _prediction(*predict(handle, x, state, forward))
            logits, plan = forward(x, self._frozen_affine(handle, state), update_stats=True, record=True)
            return _prediction(logits, plan)

    def _frozen_affine(self, handle: ModelHandle, state: AdaptationState) -> dict[str, Tensor] | None:
        """The state's BN affine parameters when an updater trains them (else the source ones apply)."""
        if self.updater is None:
            return None
        return {k: state.tensors[k] for k in handle.affine_names()}

    def _finish_many(
        self, handle: ModelHandle, steps: list[tuple[AdaptationState, UpdateOutcome]], adapt: bool
    ) -> list[StepResult]:
        """StepResults of one or more streams' steps, whose predictions and figures reach the host together."""
        logits = [out.logits.detach().float() for _, out in steps]
        host = _to_host([(lg, _figures(handle, lg, out)) for lg, (_, out) in zip(logits, steps, strict=True)])
        return [
            self._result(state, out, host_logits, figures, adapt)
            for (state, out), (host_logits, figures) in zip(steps, host, strict=True)
        ]

    def _result(
        self,
        state: AdaptationState,
        out: UpdateOutcome,
        logits: Tensor,
        figures: dict[str, float],
        adapt: bool,
    ) -> StepResult:
        n = logits.shape[0]
        tensors = {**out.plan.updated_tensors(), **out.tensors} if adapt else {}
        meta = dict(out.meta)
        if adapt:
            meta["steps"] = int(state.meta.get("steps", 0)) + 1
            meta["samples_seen"] = int(state.meta.get("samples_seen", 0)) + n
            meta["updates"] = int(state.meta.get("updates", 0)) + int(out.updated)
        new_state = (
            state.with_updates({k: v.detach() for k, v in tensors.items()}, **meta) if adapt else state
        )
        stats = StepStats(
            samples=n,
            used=out.used if self.updater is not None else (n if out.updated else 0),
            filtered=out.filtered,
            updated=out.updated and adapt,
            mean_entropy=figures["entropy"],
            mean_confidence=figures["confidence"],
            loss=figures.get("loss", out.loss if isinstance(out.loss, float) else None),
            bn_distance=figures.get("bn_distance"),
            reset=out.reset,
        )
        return StepResult(logits=logits, state=new_state, stats=stats)


class _PlanForward:
    """The `Forward` of a strategy's steps: the base model under a plan of the strategy's normaliser."""

    def __init__(
        self,
        strategy: ComposedStrategy,
        handle: ModelHandle,
        norm_cfg: StrategyConfig,
        tensors: Mapping[str, Tensor],
        adapt: bool,
    ) -> None:
        self.strategy = strategy
        self.handle = handle
        self.norm_cfg = norm_cfg
        self.tensors = tensors
        self.adapt = adapt

    @property
    def identity(self) -> str:
        return f"{self.strategy.normalizer.name} {self.norm_cfg.model_dump_json()}"

    def __call__(
        self, x: Tensor, affine: Mapping[str, Tensor] | None = None, *, update_stats: bool, record: bool
    ) -> tuple[Tensor, StatPlan]:
        strategy, handle = self.strategy, self.handle
        plan = strategy.normalizer.plan(
            handle, self.norm_cfg, self.tensors, affine, update=update_stats and self.adapt, record=record
        )
        with active_plan(plan), strategy._autocast(handle):
            logits = handle.model(x)
        return logits.float(), plan


def _figures(handle: ModelHandle, logits: Tensor, out: UpdateOutcome) -> dict[str, Tensor]:
    """The step's summary figures as 0-dim tensors on the model's device."""
    figures = {"entropy": losses.softmax_entropy(logits).mean(), "confidence": losses.mean_confidence(logits)}
    dist = bn_distance(handle, out.plan.batch_stats)
    if dist is not None:
        figures["bn_distance"] = dist
    if isinstance(out.loss, Tensor):
        figures["loss"] = out.loss.detach().float()
    return figures


def _to_host(steps: list[tuple[Tensor, dict[str, Tensor]]]) -> list[tuple[Tensor, dict[str, float]]]:
    """The predictions and figures of one or more steps in one device-to-host copy: every separate copy
    (`.item()`, `.tolist()`, `.cpu()`) would be a host synchronisation of its own on a GPU."""
    sizes = [logits.numel() for logits, _ in steps]
    pieces = [logits.reshape(-1) for logits, _ in steps] + [torch.stack(list(f.values())) for _, f in steps]
    flat = torch.cat(pieces).cpu()
    values = iter(flat[sum(sizes) :].tolist())
    return [
        (host.view(logits.shape), {name: next(values) for name in figures})
        for (logits, figures), host in zip(steps, flat[: sum(sizes)].split(sizes), strict=True)
    ]


def _to_input(handle: ModelHandle, batch: Tensor) -> Tensor:
    """The batch on the model's device, in the model's memory layout."""
    x = batch.to(handle.device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if handle.channels_last else x


def _prediction(logits: Tensor, plan: StatPlan) -> UpdateOutcome:
    """A forward without a gradient update: the plan's statistics updates are the only new tensors."""
    updated = plan.updated_tensors()
    return UpdateOutcome(logits=logits, plan=plan, tensors=updated, updated=bool(updated))


def bn_distance(handle: ModelHandle, batch_stats: Mapping[int, tuple[Tensor, Tensor]]) -> Tensor | None:
    """Mean over layers and channels of the symmetric KL between batch and source BN Gaussians (0-dim).

    All layers in one pass over their concatenated statistics: a loop over layers would launch ten
    small kernels per layer, which on a GPU costs more than the statistics themselves.
    """
    if not batch_stats:
        return None
    src_mean, src_var, weight = handle.source_moments(tuple(batch_stats))
    mean = torch.cat([m for m, _ in batch_stats.values()])
    var = torch.cat([v for _, v in batch_stats.values()])
    return (losses.gaussian_symmetric_kl(mean, var, src_mean, src_var) * weight).sum()
