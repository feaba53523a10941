"""Stream policies and incarnations: PUT, reset, DELETE, and what a predict's stream resolves to.

Every create, policy change, reset and re-creation draws a fresh incarnation id (tta_server.records);
the store accepts a state commit only under the incarnation it started from. Loss is never silent: a
committed state that vanished, a policy record that vanished, and an implicitly created stream are told
apart, counted, and reported in the predict response.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import adapters
from adapters import ComposedStrategy, ModelHandle, StrategyConfig
from tta_server.engine.observer import Observer
from tta_server.errors import (
    IncompatibleModelError,
    StateCorruptError,
    StateMismatchError,
    UnknownStrategyError,
    UnknownStreamError,
    ValidationError,
)
from tta_server.model_pool import ModelPool
from tta_server.records import (
    CorruptRecordError,
    Policy,
    PolicyRecord,
    StateRecord,
    decode_policy_record,
    decode_state_record,
    new_incarnation,
)
from tta_server.state_store import RawStream, StateStore

log = logging.getLogger(__name__)
Lost = Literal["state", "policy"]


@dataclass(frozen=True)
class Resolved:
    """A stream as one store read found it: its policy (incarnation included) and that incarnation's
    state record (None: no state yet). `created`: this read created the stream; `lost`: what vanished."""

    policy: Policy
    state: StateRecord | None
    created: bool = False
    lost: Lost | None = None

    @property
    def version(self) -> int:
        return self.state.version if self.state is not None else 0


def strategy(name: str) -> ComposedStrategy:
    try:
        return adapters.get_strategy(name)
    except adapters.UnknownStrategyError as exc:
        raise UnknownStrategyError(str(exc)) from exc


def parse_config(strat: ComposedStrategy, config: dict[str, Any] | None) -> StrategyConfig:
    try:
        return strat.parse_config(config or {})
    except ValueError as exc:  # pydantic.ValidationError: report every bad field
        errors = getattr(exc, "errors", None)
        detail = errors(include_url=False, include_context=False) if errors else str(exc)
        raise ValidationError(f"invalid config for strategy {strat.name!r}", detail=detail) from exc


def check_runs_on(strat: ComposedStrategy, cfg: StrategyConfig, handle: ModelHandle) -> None:
    """Refuse at PUT what could never step on this model, instead of failing every predict later."""
    strat.check_model(handle)  # adapters.IncompatibleModelError -> 422
    updater = strat.updater
    needs = getattr(updater, "needs_source_data", None)
    if (
        updater is not None
        and needs is not None
        and needs(strat.part_config(updater, cfg))
        and handle.source_images is None
    ):
        raise IncompatibleModelError(
            f"{strat.name} with these settings needs the model's source data, and model "
            f"{handle.model_id!r} declares none: set `source_data` for it in the models file, or use a "
            "strategy that needs none (e.g. `eta` instead of `eata`)",
            detail={"model": handle.model_id, "strategy": strat.name},
        )


def validate_policy(
    pool: ModelPool, model: str | None, strategy_name: str, config: dict[str, Any] | None, seed: int
) -> Policy:
    """The policy a PUT asks for, fully checked against its model (no incarnation yet)."""
    handle = pool.get(model)
    strat = strategy(strategy_name)
    cfg = parse_config(strat, handle.strategy_config(strategy_name, config))
    check_runs_on(strat, cfg, handle)
    return Policy(handle.model_id, strategy_name, cfg.model_dump(mode="json"), seed)


def same_settings(current: Policy, new: Policy) -> bool:
    """Whether `new` (a validated PUT) asks for the settings a stream's stored policy has. The stored config is
    read through its strategy's config class first: a field the strategy gained since the record was written
    takes its default when the stream steps, so a PUT with that default is no change (a rolling upgrade does
    not restart every stream whose client re-sends its policy)."""
    if current.settings() == new.settings():
        return True
    if (current.model, current.strategy, current.seed) != (new.model, new.strategy, new.seed):
        return False
    try:
        filled = strategy(current.strategy).parse_config(current.config).model_dump(mode="json")
    except (UnknownStrategyError, ValueError):  # pydantic.ValidationError is a ValueError
        return False
    return bool(filled == new.config)


class StreamService:
    def __init__(
        self,
        store: StateStore,
        pool: ModelPool,
        observer: Observer,
        default: Policy,
        require_configured: bool,
    ) -> None:
        self.store = store
        self.pool = pool
        self.observer = observer
        self.default = default
        self.require_configured = require_configured

    def validate(
        self, model: str | None, strategy_name: str, config: dict[str, Any] | None, seed: int
    ) -> Policy:
        return validate_policy(self.pool, model, strategy_name, config, seed)

    # ------------------------------------------------------------------ reads
    async def resolve(
        self, ns: str, stream: str, cached: tuple[str, int] | None, create: bool = True
    ) -> Resolved:
        """The stream's policy and state record in one store round trip (which also refreshes its TTL).

        A stream with no records is created under the default policy when `create` (unless streams must
        be configured first); a policy record that vanished is restored from the copy its state keeps.
        """
        for _ in range(3):  # another replica may create or replace the stream between our steps
            raw = await self.store.load(ns, stream, cached)
            prec, srec = _decode(raw, stream)
            if prec is None and srec is not None and srec.policy is not None:
                restored = await self.store.create(
                    ns, stream, srec.incarnation, srec.policy.encode(), srec.version
                )
                if restored:
                    log.warning("policy record of %s/%s was lost; restored from its state", ns, stream)
                    self.observer.lifecycle("lost_policy")
                    return Resolved(srec.policy, srec, lost="policy")
                continue
            if prec is None:
                if not create:
                    raise UnknownStreamError(f"stream {stream!r} does not exist")
                if self.require_configured:
                    raise UnknownStreamError(
                        f"stream {stream!r} is not configured; PUT /v1/streams/{stream} with a policy first"
                    )
                policy = self.default.reincarnated("implicit")
                if await self.store.create(ns, stream, policy.incarnation, policy.encode()):
                    if srec is not None:  # a state survives, but not the policy it was written under
                        self.observer.lifecycle("lost_policy")
                    self.observer.lifecycle("created_implicit")
                    return Resolved(policy, None, created=True)
                continue
            policy = prec.policy
            state = srec if srec is not None and srec.incarnation == policy.incarnation else None
            if state is None and prec.version > 0:
                # This incarnation committed states, and none is there: evicted or lost. Start over from
                # the source state under the same policy, as a new incarnation, and say so.
                fresh = policy.reincarnated()
                if await self.store.replace(
                    ns, stream, fresh.incarnation, fresh.encode(), policy.incarnation
                ):
                    log.warning("state of %s/%s (version %d) was lost", ns, stream, prec.version)
                    self.observer.lifecycle("lost_state")
                    return Resolved(fresh, None, lost="state")
                continue
            return Resolved(policy, state)
        raise StateMismatchError(f"stream {stream!r} is changing too fast to read; retry")

    # ----------------------------------------------------------------- writes
    async def put(self, ns: str, stream: str, new: Policy) -> Policy:
        """Set the stream's policy. The same settings keep the stream (and its state) as it is; any change
        starts a new incarnation from the source state. Replaces whatever the records held."""
        try:
            current = (await self.resolve(ns, stream, None, create=False)).policy
        except (UnknownStreamError, StateCorruptError, CorruptRecordError, StateMismatchError):
            current = None
        if current is not None and same_settings(current, new):
            return current
        policy = Policy(new.model, new.strategy, new.config, new.seed, new_incarnation(), "put")
        await self.store.replace(ns, stream, policy.incarnation, policy.encode())
        return policy

    async def reset(self, ns: str, stream: str) -> Policy:
        """Back to the source state under the same policy: a new incarnation, the old state dropped.
        Repairs a corrupt or mistyped state record; a corrupt policy record is recovered from the copy in
        the state where one is readable (otherwise PUT a policy or DELETE)."""
        for _ in range(3):
            raw = await self.store.load(ns, stream, None)
            policy, expected = self._policy_for_reset(raw, stream)
            fresh = policy.reincarnated()
            if await self.store.replace(ns, stream, fresh.incarnation, fresh.encode(), expected):
                self.observer.reset(fresh, "api")
                return fresh
        raise StateMismatchError(f"stream {stream!r} is changing too fast to reset; retry")

    def _policy_for_reset(self, raw: RawStream, stream: str) -> tuple[Policy, str | None]:
        """The policy to keep, and the incarnation the replace is conditional on (None: unconditional)."""
        if raw.policy is None and raw.state is None and raw.wrong_type is None:
            raise UnknownStreamError(f"stream {stream!r} does not exist")
        if raw.policy is not None:
            try:
                prec = decode_policy_record(raw.policy)
                return prec.policy, prec.policy.incarnation
            except CorruptRecordError:
                pass
        try:
            copy = decode_state_record(raw.state).policy if raw.state is not None else None
        except CorruptRecordError:
            copy = None
        if copy is None:
            raise StateCorruptError(
                f"the policy record of stream {stream!r} is unreadable and no copy survives; "
                "PUT a policy (or DELETE the stream)",
                detail={"stream": stream, "record": "policy"},
            )
        return copy, None

    async def delete(self, ns: str, stream: str) -> None:
        """Remove every record of the stream, whatever they hold."""
        if not await self.store.delete(ns, stream):
            raise UnknownStreamError(f"stream {stream!r} does not exist")


def _decode(raw: RawStream, stream: str) -> tuple[PolicyRecord | None, StateRecord | None]:
    if raw.wrong_type is not None:
        raise StateCorruptError(
            f"a record of stream {stream!r} has the wrong type; DELETE the stream",
            detail={"stream": stream, "key": raw.wrong_type},
        )
    prec = decode_policy_record(raw.policy) if raw.policy is not None else None
    try:
        srec = decode_state_record(raw.state) if raw.state is not None else None
    except CorruptRecordError:
        if (
            prec is not None
            and raw.state is not None
            and raw.state.get("inc") != prec.policy.incarnation.encode()
        ):
            return prec, None  # an older incarnation's leftover: never read, overwritten by the next commit
        raise
    return prec, srec
