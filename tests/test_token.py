"""The gateway token (Jilin's OAuth2): one fetch for a burst of trades, a new one before the old expires."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet import defer, task

from fep.token import TokenCache


class TokenEndpoint:
    """The token endpoint as the cache sees it: each fetch waits until the test answers it."""

    def __init__(self) -> None:
        self.asked: list[defer.Deferred[tuple[str, float]]] = []

    def fetch(self) -> defer.Deferred[tuple[str, float]]:
        d: defer.Deferred[tuple[str, float]] = defer.Deferred()
        self.asked.append(d)
        return d

    def answer(self, token: str, lifetime: float) -> None:
        self.asked[-1].callback((token, lifetime))


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


@pytest.fixture
def endpoint() -> TokenEndpoint:
    return TokenEndpoint()


@pytest.fixture
def cache(clock: task.Clock, endpoint: TokenEndpoint) -> TokenCache:
    return TokenCache(endpoint.fetch, clock.seconds, refresh_before=60)


def got(d: Any) -> list[Any]:
    out: list[Any] = []
    defer.ensureDeferred(d).addBoth(out.append)
    return out


def test_a_burst_of_trades_waits_for_one_fetch(cache: TokenCache, endpoint: TokenEndpoint) -> None:
    waiting = [got(cache.get()) for _ in range(5)]
    assert len(endpoint.asked) == 1 and not any(waiting)
    endpoint.answer("t1", 7200)
    assert [w[0] for w in waiting] == ["t1"] * 5
    assert got(cache.get()) == ["t1"] and len(endpoint.asked) == 1


def test_the_token_is_fetched_anew_before_it_expires(cache: TokenCache, endpoint: TokenEndpoint,
                                                     clock: task.Clock) -> None:
    first = got(cache.get())
    endpoint.answer("t1", 7200)
    clock.advance(7200 - 61)
    assert got(cache.get()) == first == ["t1"]
    clock.advance(2)  # 59 s before it expires: inside the margin
    second = got(cache.get())
    assert len(endpoint.asked) == 2
    endpoint.answer("t2", 7200)
    assert second == ["t2"]


def test_a_token_the_gateway_refused_is_replaced_once(cache: TokenCache, endpoint: TokenEndpoint) -> None:
    got(cache.get())
    endpoint.answer("t1", 7200)
    cache.invalidate("t1")
    cache.invalidate("t1")
    again = got(cache.get())
    assert len(endpoint.asked) == 2
    endpoint.answer("t2", 7200)
    cache.invalidate("t1")  # a trade that still held the old one: the new one stays
    assert again == ["t2"] and got(cache.get()) == ["t2"] and len(endpoint.asked) == 2


def test_a_failed_fetch_fails_every_waiter_and_the_next_trade_tries_again(cache: TokenCache,
                                                                         endpoint: TokenEndpoint) -> None:
    waiting = [got(cache.get()) for _ in range(3)]
    endpoint.asked[-1].errback(RuntimeError("token endpoint down"))
    assert all(w[0].check(RuntimeError) for w in waiting)
    later = got(cache.get())
    assert len(endpoint.asked) == 2
    endpoint.answer("t1", 7200)
    assert later == ["t1"]
