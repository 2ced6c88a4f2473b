"""The bearer token of a gateway with an OAuth2 token flow (Jilin): fetched once, shared by every trade,
fetched anew a little before it expires or when the gateway says it is no longer valid.

Single flight: while a token is being fetched, every caller waits for that one fetch, so a burst of
trades after a restart (or an expiry) costs the token endpoint one request, not one per trade.
"""

from __future__ import annotations

from typing import Awaitable, Callable

from twisted.internet import defer

Fetch = Callable[[], Awaitable[tuple[str, float]]]  # -> (token, seconds it lives)


class TokenCache:
    def __init__(self, fetch: Fetch, clock: Callable[[], float], refresh_before: float) -> None:
        self._fetch = fetch
        self._clock = clock
        self.refresh_before = refresh_before  # fetch anew this long before the token expires
        self._token: str | None = None
        self._until = 0.0  # when the token is to be replaced (its expiry less refresh_before)
        self._pending: list[defer.Deferred[str]] | None = None  # callers waiting for the fetch under way

    async def get(self) -> str:
        if self._token is not None and self._clock() < self._until:
            return self._token
        if self._pending is not None:
            d: defer.Deferred[str] = defer.Deferred()
            self._pending.append(d)
            return await d
        self._pending = []
        try:
            token, lifetime = await self._fetch()
        except Exception as e:
            waiting, self._pending = self._pending, None
            for d in waiting:
                d.errback(e)
            raise
        # A token that lives less than the margin is used once fetched, and fetched anew for the next trade.
        self._token, self._until = token, self._clock() + max(lifetime - self.refresh_before, 0.0)
        waiting, self._pending = self._pending, None
        for d in waiting:
            d.callback(token)
        return token

    def invalidate(self, token: str) -> None:
        """The gateway refused `token`: the next get() fetches a new one (unless another already has)."""
        if self._token == token:
            self._token = None
