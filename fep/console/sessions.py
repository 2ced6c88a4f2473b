"""Signed-in sessions of the console, in memory: a restart of fep signs everyone out, which is as it should be.

A session ends when unused for console.session_minutes; it is looked at only when its cookie comes back (and
the ended ones are swept at each sign-in), so an idle console costs nothing."""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Session:
    name: str
    role: str
    last: float
    opened_with: str = ""  # the password hash it was opened with: a changed password ends it
    token: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # the sign-out form's


class Sessions:
    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.idle = minutes * 60
        self.clock = clock
        self._by_token: dict[str, Session] = {}

    def new(self, name: str, role: str, opened_with: str = "") -> Session:
        now = self.clock()
        for token in [t for t, s in self._by_token.items() if now - s.last > self.idle]:
            del self._by_token[token]
        s = Session(name, role, now, opened_with)
        self._by_token[s.token] = s
        return s

    def get(self, token: str | None) -> Session | None:
        """The session of a cookie, its idle time restarted; None when there is none or it has ended."""
        s = self._by_token.get(token or "")
        if s is None:
            return None
        now = self.clock()
        if now - s.last > self.idle:
            del self._by_token[s.token]
            return None
        s.last = now
        return s

    def end(self, token: str) -> None:
        self._by_token.pop(token, None)


class Failures:
    """Wrong passwords per name: after LIMIT within WINDOW seconds the name is refused, its password not even
    tried, until the window has passed since the last one (a guesser on the office network is slowed to a crawl)."""
    LIMIT, WINDOW = 5, 900.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._times: dict[str, list[float]] = {}

    def _recent(self, name: str) -> list[float]:
        now = self.clock()
        for n in [n for n, ts in self._times.items() if now - ts[-1] > self.WINDOW]:
            del self._times[n]  # the old ones go: a list of every name ever tried would only grow
        return [t for t in self._times.get(name, []) if now - t <= self.WINDOW]

    def blocked(self, name: str) -> bool:
        return len(self._recent(name)) >= self.LIMIT

    def add(self, name: str) -> None:
        self._times[name] = self._recent(name) + [self.clock()]

    def clear(self, name: str) -> None:
        self._times.pop(name, None)


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
