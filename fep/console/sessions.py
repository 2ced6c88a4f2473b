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
    """Wrong passwords per name and per computer: after LIMIT for a name, or PEER_LIMIT from one address (a guesser
    trying many names), within WINDOW seconds, the sign-in is refused, its password not even tried, until the
    window has passed since the last one (a guesser on the office network is slowed to a crawl)."""
    LIMIT, PEER_LIMIT, WINDOW = 5, 20, 900.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._times: dict[str, list[float]] = {}
        self._told: set[str] = set()  # blocked keys whose refusal is recorded: a guesser cannot fill the audit trail

    def _recent(self, key: str) -> list[float]:
        now = self.clock()
        for k in [k for k, ts in self._times.items() if now - ts[-1] > self.WINDOW]:
            del self._times[k]  # the old ones go: a list of every name ever tried would only grow
            self._told.discard(k)
        return [t for t in self._times.get(key, []) if now - t <= self.WINDOW]

    def blocked(self, name: str, peer: str) -> str | None:
        """Which is refused, the name or the computer (None: neither)."""
        if len(self._recent(name)) >= self.LIMIT:
            return name
        return _peer(peer) if len(self._recent(_peer(peer))) >= self.PEER_LIMIT else None

    def first_refusal(self, key: str) -> bool:
        """Whether this is the first refusal of the blocked `key` in its window (the one worth recording)."""
        told = key in self._told
        self._told.add(key)
        return not told

    def add(self, name: str, peer: str) -> None:
        for key in (name, _peer(peer)):
            self._times[key] = self._recent(key) + [self.clock()]

    def clear(self, name: str, peer: str) -> None:
        """A right password: its name's count ends, and the try is taken off the computer's, whose wrong ones
        age out (a guesser who knows one password would otherwise start its twenty again at each sign-in)."""
        self._times.pop(name, None)
        self._told.discard(name)
        tries = self._times.pop(_peer(peer), [])[:-1]
        if tries:
            self._times[_peer(peer)] = tries


def _peer(address: str) -> str:
    return f"from {address}"  # no user name has spaces: a key of its own


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a), str(b))
