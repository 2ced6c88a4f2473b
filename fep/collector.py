"""How a long-running fep process sets Python's garbage collector once it has started.

What start-up made lives as long as the process: it is frozen out of the collector's full passes, which walk
every object and hold up every trade meanwhile (64-300 ms measured in the daemon under the 1,000-client bench,
none freed; 29-54 ms in the simulator and in the bench's own client). The youngest generation is walked after
10,000 more allocations than frees (Python's 700): under load most of a trade's objects are still in flight
at 700 and are walked, and promoted, for nothing.
"""

from __future__ import annotations

import gc

THRESHOLDS = (10_000, 10, 10)


def started() -> None:
    """Called once start-up is done: the daemon's, the simulator's."""
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
