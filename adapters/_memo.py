"""A small bounded memo for what a strategy derives from a model's source data (EATA's Fisher, PETAL's
posterior, RMT's warm start and source pool).

These are deterministic functions of the (immutable) model and their key, and each costs hundreds to
thousands of forward and backward passes, so a process computes each once instead of at every stream reset.
Steps run on several executor threads: two that miss the same key at once both compute it (the same value;
rare and bounded), and neither can corrupt the memo.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most `size` values, the least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._values: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[[], V]) -> V:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
        value = compute()  # outside the lock: other keys must not wait for minutes of compute
        with self._lock:
            self._values[key] = value
            self._values.move_to_end(key)
            while len(self._values) > self.size:
                self._values.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._values)


# Per owner object (a model handle) and name: memos that live as long as the owner does.
_PER_OWNER: weakref.WeakKeyDictionary[object, dict[str, Memo[Any, Any]]] = weakref.WeakKeyDictionary()
_PER_OWNER_LOCK = threading.Lock()


def memo_of(owner: object, name: str, size: int) -> Memo[Any, Any]:
    """The memo `name` of `owner`, made on first use and dropped with the owner (for values derived from one
    model handle, which must not outlive it)."""
    with _PER_OWNER_LOCK:
        memos = _PER_OWNER.setdefault(owner, {})
        return memos.setdefault(name, Memo(size))
