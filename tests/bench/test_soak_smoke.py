"""A short churn soak through two real agents: memory returns to its baseline (``make soak``
runs the long one)."""

from __future__ import annotations

from bench import soak


def test_connection_churn_leaves_no_memory_behind() -> None:
    res = soak.soak(seconds=20, rate=100, warmup=8, settle=3)
    print(res.summary())
    assert res.failures == 0, res.summary()
    assert res.connections >= 1500, res.summary()
    assert res.ok, res.summary()
