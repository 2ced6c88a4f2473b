"""Which keys a journal may hold: a Bloom filter of every msgid and HIS msgid in it and in its archive.

Before a trade is taken, fep asks the journal whether its key is known (a resubmission hears its stored
answer). Nearly every key is new, and the question costs a reader thread's round trip, about a tenth of
fep's CPU a trade. The filter answers "new" at once; "maybe" goes to the journal as before. It is never
wrong about "new": every key journalled is in it, false "maybe"s only cost the round trip.

Stored keys are read once, at start or takeover, on a thread of their own; keys the writer commits while
they are read are kept aside and added when the reading is in (KnownKeys)."""

from __future__ import annotations

import threading
from collections.abc import Iterable

# 2^27 bits (16 MB, resident only where written) and two probes a key: 0.7% false "maybe" at 6 million keys
# (a year of a big hospital's trades), 7% at 20 million. Past that the filter still never says "new" wrongly.
SIZE_BITS = 27
_MASK = (1 << SIZE_BITS) - 1
_BIT = bytes(1 << i for i in range(8))


class KeyFilter:
    """A fixed-size Bloom filter of strings, for one process: Python's own str hash (seeded per process)."""

    def __init__(self) -> None:
        self._bits = bytearray(1 << (SIZE_BITS - 3))

    def update(self, keys: Iterable[str]) -> None:
        bits = self._bits
        for h in map(hash, keys):
            a, b = h & _MASK, h >> 32 & _MASK
            bits[a >> 3] |= _BIT[a & 7]
            bits[b >> 3] |= _BIT[b & 7]

    def __contains__(self, key: str) -> bool:
        h = hash(key)
        a, b = h & _MASK, h >> 32 & _MASK
        return bool(self._bits[a >> 3] & _BIT[a & 7] and self._bits[b >> 3] & _BIT[b & 7])


class KnownKeys:
    """The journal's keys, as a filter filled by one reading of the journal while the writer goes on.

    `reading()` comes before the reading's snapshot begins; from then on every key the writer commits is kept
    (`committed`, after its commit), so a key committed before the snapshot is in the reading and one after it
    was kept: none falls between. Until `read(filter)`, every key "may" be held."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the writer's adds against the reading's hand-over: no bit lost
        self._filter: KeyFilter | None = None
        self._kept: list[str] | None = None
        self._readings = 0  # a reading begun later than another makes the earlier one's result stale
        self._unread = "not read"

    def may_hold(self, key: str) -> bool:
        f = self._filter
        return f is None or key in f

    def reading(self) -> int:
        """A reading is about to begin; returns its number, for `read`."""
        with self._lock:
            self._filter, self._kept = None, []
            self._readings += 1
            return self._readings

    def committed(self, keys: list[str]) -> None:
        """Writer thread, after the commit that journalled them."""
        with self._lock:
            if self._filter is not None:
                self._filter.update(keys)
            elif self._kept is not None:
                self._kept.extend(keys)

    def read(self, reading: int, stored: KeyFilter) -> None:
        """Reading number `reading` is in: `stored` holds every key of its snapshot."""
        with self._lock:
            if reading != self._readings or self._kept is None:  # another began, or forgotten, meanwhile
                return
            stored.update(self._kept)
            self._filter, self._kept = stored, None

    def failed(self, reading: int, why: str) -> None:
        """Reading number `reading` could not be done; a later one under way goes on."""
        with self._lock:
            if reading == self._readings:
                self._unread_because(why)

    def forget(self) -> None:
        """Every key may be held again (another node may have written since)."""
        with self._lock:
            self._unread_because("not read")

    def _unread_because(self, why: str) -> None:
        self._filter = self._kept = None
        self._unread = why

    @property
    def state(self) -> str:
        """For `fep status`: whether new keys are spared their lookup, and if not, why."""
        if self._filter is not None:
            return "read: a new key is looked up only when it may be held"
        if self._kept is not None:
            return "being read: every key is looked up meanwhile"
        return f"{self._unread}: every key is looked up"
