"""The bounded memo behind the source-derived tensors (EATA's Fisher, PETAL's posterior, RMT's start)."""

from __future__ import annotations

import threading

from adapters._memo import Memo


def test_each_key_is_computed_once_and_the_least_recently_used_goes_first() -> None:
    memo: Memo[str, int] = Memo(2)
    calls: list[str] = []

    def compute(key: str) -> int:
        calls.append(key)
        return len(calls)

    assert memo.get("a", lambda: compute("a")) == 1
    assert memo.get("b", lambda: compute("b")) == 2
    assert memo.get("a", lambda: compute("a")) == 1  # a hit; "a" is now the most recent
    assert memo.get("c", lambda: compute("c")) == 3  # evicts "b", not "a"
    assert len(memo) == 2 and calls == ["a", "b", "c"]
    assert memo.get("a", lambda: compute("a")) == 1
    assert memo.get("b", lambda: compute("b")) == 4  # recomputed after its eviction
    assert calls == ["a", "b", "c", "b"]


def test_a_long_compute_does_not_block_other_keys() -> None:
    memo: Memo[str, str] = Memo(4)
    started, release = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        release.wait(5)
        return "slow"

    worker = threading.Thread(target=lambda: memo.get("slow", slow))
    worker.start()
    assert started.wait(5)
    assert memo.get("fast", lambda: "fast") == "fast"  # answered while "slow" is still computing
    release.set()
    worker.join(5)
    assert memo.get("slow", lambda: "recomputed") == "slow"
