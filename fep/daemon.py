"""`fep run`: wire config, journal, bureau link, engine and listeners, in the order that keeps promises.

The journal opens and recovery runs before any listener is bound, so no HIS request can race the
picking-up of trades from the last run.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.logger import Logger

from fep import config as config_mod
from fep import logs, tls
from fep.bureau import BureauLink
from fep.engine import Engine
from fep.his import HisFactory, HisService
from fep.journal import Journal

log = Logger()


class StartupError(Exception):
    pass


def _listen_unix(reactor: Any, path: Path, factory: HisFactory) -> defer.Deferred[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # left by a previous run
    return endpoints.UNIXServerEndpoint(reactor, str(path), mode=0o660).listen(factory)


async def start(reactor: Any, cfg: config_mod.Config) -> tuple[Engine, Journal, BureauLink]:
    try:
        link = BureauLink(reactor, cfg.bureau)
    except tls.TLSConfigError as e:
        raise StartupError(f"bureau TLS: {e}") from None
    journal = Journal(cfg.journal_path, cfg.institution.fixmedins_code, cfg.journal_max_batch)
    await journal.open(reactor)
    engine = Engine(reactor, cfg, journal, link)
    await engine.start()
    service = HisService(engine)
    factory = HisFactory(service, cfg.his.max_body, cfg.his.allowed_networks)
    if cfg.his.unix:
        await _listen_unix(reactor, cfg.his.unix, factory)
    await endpoints.TCP4ServerEndpoint(reactor, cfg.his.tcp_port, interface=cfg.his.tcp_host).listen(factory)
    log.info("fep ready: HIS on {unix} and {host}:{port}; bureau {eps}", unix=cfg.his.unix,
             host=cfg.his.tcp_host, port=cfg.his.tcp_port, eps=", ".join(e.url for e in cfg.bureau.endpoints))

    async def shutdown() -> None:
        engine.stop()
        link.close()
        await journal.close()

    reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(shutdown()))
    return engine, journal, link


def run(config_path: Path) -> int:
    logs.start()
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        print(f"fep: refusing to start: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    outcome: dict[str, int] = {}

    def failed(f: Any) -> None:
        if f.check(StartupError):
            print(f"fep: refusing to start: {f.value}", file=sys.stderr)
        else:
            log.failure("fep failed to start", f)
        outcome["code"] = 2
        reactor.stop()

    def go() -> None:
        defer.ensureDeferred(start(reactor, cfg)).addErrback(failed)

    reactor.callWhenRunning(go)
    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    reactor.run(installSignalHandlers=False)
    return outcome.get("code", 0)
