"""sd_notify: tell systemd we are ready, reloading or stopping, and keep its watchdog fed.

The protocol is one datagram to $NOTIFY_SOCKET; no library is needed for it. The watchdog is fed only
after a no-op has gone through the journal writer, so a wedged writer thread (or reactor) stops the
keep-alives and systemd restarts fep.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any, Callable

from twisted.internet import defer, task


def notify(message: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())
    return True


def stop_on(reactor: Any, *signals: signal.Signals) -> None:
    """Each of these signals stops the reactor, once: a second (a shell's after the service manager's) finds
    it stopping, where a second reactor.stop would log a traceback."""
    stopping: list[bool] = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()

    for sig in signals:
        signal.signal(sig, lambda *_: reactor.callFromThread(stop))


def reloading() -> None:
    notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval() -> float | None:
    """Half of WatchdogSec, as systemd recommends; None when the watchdog is off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return int(usec) / 2e6


def start_watchdog(reactor: Any, writer_alive: Callable[[], defer.Deferred[Any]]) -> task.LoopingCall | None:
    interval = watchdog_interval()
    if interval is None:
        return None

    async def beat() -> None:
        await writer_alive()  # the reactor ran this, and the journal writer answered
        notify("WATCHDOG=1")

    loop = task.LoopingCall(lambda: defer.ensureDeferred(beat()))
    loop.clock = reactor
    loop.start(interval, now=True)
    return loop
