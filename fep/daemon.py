"""`fep run`: wire config, journal, bureau link, engine and listeners, in the order that keeps promises.

The journal opens and recovery runs before any listener is bound, so no HIS request can race the
picking-up of trades from the last run; systemd hears READY=1 only after that. SIGHUP (systemctl reload)
re-reads the config and certificates; an invalid new config is refused and the running one stays.

With journal.url (PostgreSQL) the node shares its journal with others and one of them leads (fep.leader). A
node starts as a standby: its listeners answer lookups from the journal and refuse trades, naming the leader.
When it wins the lease it runs the recovery a restart runs, then takes trades and starts the daily jobs. A
leader that loses its lease exits (LOST_LEAD) and is started again as a standby: nothing of a half-stopped
engine can linger, and the journal's fence has already stopped its sends.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
from datetime import date
from pathlib import Path
from typing import Any

from twisted.internet import defer, endpoints
from twisted.logger import Logger

from fep import admin, collector, envelope, heap, leader, metrics, sockets, systemd, tls
from fep import config as config_mod
from fep import logs
from fep.archive import Archive
from fep.audit import AuditTrail
from fep.backup import BackupError, Backups
from fep.bureau import BureauLink
from fep.engine import Engine
from fep.his import HisFactory, HisService
from fep.http11 import Limits
from fep.journal import SCHEMA_VERSION, Journal, JournalError
from fep.codebook import CodeBook
from fep.clearing import Clearing
from fep.reconcile import Reconciler, yesterday
from fep.schedule import Daily
from fep.transports import AtOnce

log = Logger()
LOST_LEAD = 3  # exit status of a leader that lost its lease (systemd starts it again: Restart=on-failure)


class StartupError(Exception):
    pass


class Daemon:
    def __init__(self, reactor: Any, config_path: Path, cfg: config_mod.Config) -> None:
        self.reactor = reactor
        self.config_path = config_path
        self.cfg = cfg
        self.extra_admin: dict[str, Any] = {}
        self.lease: leader.Lease | None = None
        self.stopping = False  # shutdown began: what start-up still awaits may find the journal closed

    async def start(self) -> None:
        cfg = self.cfg
        if os.geteuid() == 0 and not cfg.allow_root:
            raise StartupError("fep does not run as root: start it as the fep user (see systemd/fep.service)")
        try:
            self.link = BureauLink(self.reactor, cfg.bureau)
        except tls.TLSConfigError as e:
            raise StartupError(f"bureau TLS: {e}") from None
        self.journal = Journal(cfg.journal_path, cfg.institution.fixmedins_code, cfg.journal_max_batch,
                               url=cfg.journal_url)
        self.journal.observers.append(logs.transition)
        if cfg.lease is not None:
            self.journal.fence = leader.NO_EPOCH  # a standby journals no send
        try:
            await self.journal.open(self.reactor)
        except JournalError as e:
            raise StartupError(str(e)) from None
        # The code book (catalogs, the hospital's mapping) is in the journal's database: on PostgreSQL one
        # for the pair, so the node that takes over maps fee lines as the one it replaces did.
        self.codes = CodeBook(self.journal, self.reactor)
        await self.codes.open()
        await self.codes.take_in(cfg.journal_path)  # PostgreSQL: what an earlier release kept in this node's file
        self.archive = Archive(self.reactor, self.journal, cfg.journal_keep_days,
                               (t.infno for t in cfg.trades.defs.values() if t.moves_money))
        await self.archive.take_in(strict=True)  # PostgreSQL: an earlier release's monthly files, before any trade
        self.engine = Engine(self.reactor, cfg, self.journal, self.link, self.codes, archived=self.archive.row)
        if cfg.lease is None:
            await self.engine.start()
            self.journal.know_keys()
        else:
            self.engine.stands_by()
        self.factory = HisFactory(HisService(self.engine, self.reactor), cfg.his.max_body, cfg.his.allowed_networks,
                                  his_limits(cfg.his), *connection_caps(cfg.his))
        if cfg.his.unix:
            await _listen_unix(self.reactor, cfg.his.unix, self.factory, self.factory.max_connections)
            sockets.chown_group(cfg.his.unix, cfg.his.unix_group)  # not the admin socket's group
        # The listen backlog holds a burst of every connection the HIS side may open at once: a backlog of 50
        # silently dropped 202 of 3,000 simultaneous requests (the kernel caps it at net.core.somaxconn).
        await endpoints.TCP4ServerEndpoint(AtOnce(self.reactor), cfg.his.tcp_port,
                                           backlog=self.factory.max_connections,
                                           interface=cfg.his.tcp_host).listen(self.factory)
        self.reconciler = Reconciler(self.engine)
        self.backups = Backups(self.reactor, cfg.journal_path, cfg.backup.dir, cfg.backup.keep,
                               lambda: [path for _, path in self.archive.files()])
        self.extra_admin.update({"POST reconcile": self._reconcile, "GET reconcile": self._reconciliations,
                                 "POST catalog": self._catalog, "GET catalog": self._catalog,
                                 "POST backup": self._backup, "POST archive": self._archive,
                                 **admin.clearing_routes(Clearing(self.reconciler))})
        self.daily = [Daily(self.reactor, "reconciliation", cfg.reconcile_at, lambda: self.reconciler.run(yesterday()),
                            self.journal),
                      # Like every daily job it runs on the leader only, its last run recorded in the journal
                      # (shared on PostgreSQL): a new leader does not sync again what was synced today.
                      Daily(self.reactor, "catalog sync", cfg.catalog_sync_at, self._sync, self.journal),
                      *([] if cfg.journal_url else [Daily(self.reactor, "backup", cfg.backup.daily_at,
                                                          self.backups.daily, self.journal)]),
                      Daily(self.reactor, "archive", cfg.archive_at, self.archive.run, self.journal)]
        audit = AuditTrail(self.journal)
        service = admin.AdminService(self.engine, self.reload, self.extra_admin, self.archive, audit)
        await admin.listen(self.reactor, service, cfg.admin.unix, cfg.admin.metrics_host, cfg.admin.metrics_port,
                           cfg.admin.unix_group)
        if cfg.console.port is not None:  # the office's console: the admin side's, on a listener of its own
            from fep.console import pages, server

            await server.listen(self.reactor, cfg.console, pages.Pages(service, Clearing(self.reconciler)), audit)
        self.refresher = admin.MetricsRefresher(self.reactor, self.engine)
        self.refresher.loop.start(5.0)
        self.reactor.addSystemEventTrigger("before", "shutdown", lambda: defer.ensureDeferred(self.shutdown()))
        self.watchdog = systemd.start_watchdog(self.reactor, self.journal.ping)
        collector.started()
        if cfg.lease is None:
            for job in self.daily:
                await job.start()
            systemd.notify("READY=1\nSTATUS=recovered; listening")
        else:
            self.lease = leader.Lease(self.reactor, cfg.journal_url, cfg.lease.node, cfg.lease.check,  # type: ignore[arg-type]
                                      cfg.lease.timeout, SCHEMA_VERSION, self._won, self._lost, self._resigned,
                                      self._seen)
            self.lease.start()
            if cfg.backup.daily_at:
                log.warn("backup.daily_at does not apply to a journal in PostgreSQL: back it up with PostgreSQL's "
                         "own tools (pg_basebackup and WAL archiving)")
            systemd.notify(f"READY=1\nSTATUS=standby ({cfg.lease.node}); listening")
        log.info("fep ready: HIS on {unix} and {host}:{port}; bureau {eps}", unix=cfg.his.unix,
                 host=cfg.his.tcp_host, port=cfg.his.tcp_port, eps=", ".join(e.url for e in cfg.bureau.endpoints))

    # ---- leadership (journal.url) ------------------------------------------------------------------
    def _won(self, epoch: int) -> None:
        defer.ensureDeferred(self._take_over(epoch)).addErrback(
            lambda f: self._lost(f"taking over failed: {f.getErrorMessage()}"))

    async def _take_over(self, epoch: int) -> None:
        """The recovery a restart runs, under the new epoch; trades are taken once it is done."""
        await self.journal.lead(epoch)
        self.journal.know_keys()  # the other node journalled trades this one has not seen
        # Only the leader maps fee lines, so its copy of the code book is read afresh here, at takeover, and
        # after each change made on it (import, sync); a standby takes no changes (_catalog).
        await self.codes.refresh()
        await self.engine.start()
        self.engine.leads(self.cfg.lease.node)  # type: ignore[union-attr]
        for job in self.daily:
            await job.start()
        systemd.notify(f"STATUS=leading ({self.engine.leader}, epoch {epoch}); recovered; listening")
        log.info("took over as leader, epoch {epoch}: recovered, taking trades", epoch=epoch)

    def _seen(self, who: leader.Leader | None, why: str | None) -> None:
        """A standby's reading: who leads (None: it cannot tell) and why this node does not (None: another does)."""
        self.engine.stands_by(who.node if who else None, why)

    def _lost(self, why: str) -> None:
        """It stops as if killed: what it had in hand the new leader recovers from the journal, and the HIS,
        its connection cut, asks the other node. A graceful stop would answer requests in flight from a
        journal closing under them."""
        self.engine.stands_by()
        log.error("stopping now: this node no longer leads ({why}); it starts again as a standby", why=why)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(LOST_LEAD)

    def _resigned(self, why: str) -> None:
        """A newer fep migrated the journal while this node led: it leads it no more, yet stays up, standing by and
        saying why in `fep status` (started again, it would refuse the journal and say nothing there). The fence
        stops its sends and new trades at once; what it had in hand the newer fep recovers when it leads."""
        self.journal.fence = leader.NO_EPOCH
        self.journal.keys.forget()
        self.engine.stands_by(None, why)
        for job in self.daily:
            job.stop()
        self.engine.stop()
        systemd.notify(f"STATUS=standby ({self.cfg.lease.node}): {why}")  # type: ignore[union-attr]

    async def reload(self) -> str:
        """Config and certificates anew, without dropping trades in flight; an invalid config changes nothing."""
        systemd.reloading()
        try:
            cfg = config_mod.load(self.config_path)
            if os.geteuid() == 0 and not cfg.allow_root:
                raise config_mod.ConfigError("the new config does not allow running as root")
            self.link.reconfigure(cfg.bureau)
        except (config_mod.ConfigError, tls.TLSConfigError) as e:
            metrics.RELOADS.labels("refused").inc()
            log.error("reload refused, the running configuration stays: {err}", err=str(e))
            systemd.notify("READY=1")
            return f"refused: {e}"
        moved = [name for name, a, b in (("his tcp", (self.cfg.his.tcp_host, self.cfg.his.tcp_port),
                                          (cfg.his.tcp_host, cfg.his.tcp_port)),
                                         ("his unix", self.cfg.his.unix, cfg.his.unix),
                                         ("journal", self.cfg.journal_path, cfg.journal_path),
                                         ("journal url", self.cfg.journal_url, cfg.journal_url)) if a != b]
        self.engine.reconfigure(cfg)
        self.factory.max_body, self.factory.networks = cfg.his.max_body, cfg.his.allowed_networks
        self.factory.limits = his_limits(cfg.his)  # for connections opened from now on
        self.factory.max_connections, self.factory.max_per_peer = connection_caps(cfg.his)
        await self._reschedule(cfg)
        self.cfg = cfg
        metrics.RELOADS.labels("applied").inc()
        note = f"; a restart is needed to move: {', '.join(moved)}" if moved else ""
        log.info("configuration and certificates reloaded{note}", note=note)
        systemd.notify("READY=1")
        return f"applied{note}"

    async def _reschedule(self, cfg: config_mod.Config) -> None:
        """What the archive, the backups and the daily jobs were built with at start, as the new config says
        (journal.keep_days, backup.dir and keep, the schedule's times): a reload that said "applied" applies them."""
        self.archive.keep_days = cfg.journal_keep_days
        self.archive.money = frozenset(t.infno for t in cfg.trades.defs.values() if t.moves_money)
        self.backups.directory, self.backups.keep = cfg.backup.dir, cfg.backup.keep
        times = {"reconciliation": cfg.reconcile_at, "catalog sync": cfg.catalog_sync_at,
                 "backup": cfg.backup.daily_at, "archive": cfg.archive_at}
        for job in self.daily:  # by name: on PostgreSQL there is no backup job, so no position is a job's
            at = times[job.name]
            if job.at != at:
                job.stop()
                job.at = at
                if self.engine.role != "standby":  # a standby's jobs start when it takes over
                    await job.start()  # none when unset; a time already past today runs now, once

    async def _archive(self, req: Any) -> dict[str, Any]:
        """The leader's job (it moves trades out of the shared journal): a standby refuses it, naming the leader."""
        self.engine.must_lead("run fep archive there")
        return await self.archive.run()

    async def _reconcile(self, req: Any) -> dict[str, Any]:
        body = envelope.loads(req.body or b"{}")
        return await self.reconciler.run(_day(body.get("date")))

    async def _reconciliations(self, req: Any) -> list[dict[str, Any]]:
        day = req.path.partition("date=")[2][:10] or None
        return await self.journal.runs("reconcile", day, limit=1)

    async def _backup(self, req: Any) -> dict[str, Any]:
        """POST /backup {"path": "/absolute/file/or/directory"}."""
        if self.cfg.journal_url:
            raise ValueError("the journal is in PostgreSQL: back it up with PostgreSQL's own tools, pg_basebackup "
                             "with WAL archiving (point-in-time recovery) or pg_dump (README, \"Two boxes\")")
        path = envelope.loads(req.body or b"{}").get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"backup needs an absolute path, got {path!r}")
        try:
            return await self.backups.write(Path(path))
        except BackupError as e:
            raise ValueError(str(e)) from None

    async def _sync(self) -> dict[str, Any]:
        return await self.codes.sync(self.reconciler.call)

    async def _catalog(self, req: Any) -> Any:
        """POST /catalog/sync, POST /catalog/map (a CSV body), GET /catalog/check. A standby changes nothing
        (a sync talks to the bureau; the leader's copy would not see an import) and checks the shared tables."""
        what = req.path.strip("/").split("/")[1:2]
        if req.method == "POST" and what in (["sync"], ["map"]):
            self.engine.must_lead(f"run catalog {what[0]} there")
        if req.method == "POST" and what == ["sync"]:
            return await self._sync()
        if req.method == "POST" and what == ["map"]:
            return await self.codes.import_mapping(req.body.decode("utf-8"))
        if req.method == "GET" and what == ["check"]:
            if self.engine.role == "standby":
                await self.codes.refresh()
            return {"problems": await self.codes.on_thread(self.codes.check), "codes": len(self.codes.national),
                    "mapped": len(self.codes.mapping)}
        raise ValueError("catalog calls: POST /catalog/sync, POST /catalog/map, GET /catalog/check")

    async def shutdown(self) -> None:
        self.stopping = True
        systemd.notify("STOPPING=1")
        for job in self.daily:
            job.stop()
        if self.watchdog is not None and self.watchdog.running:
            self.watchdog.stop()
        if self.lease is not None:
            self.lease.stop()
        self.engine.stop()
        self.link.close()
        await self.refresher.stop()
        await self.journal.close()


def _day(text: str | None) -> date:
    if not text:
        return yesterday()
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"cannot read the date {text!r}: use YYYY-MM-DD") from None


def _listen_unix(reactor: Any, path: Path, factory: HisFactory, backlog: int) -> defer.Deferred[Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()  # left by a previous run
    return endpoints.UNIXServerEndpoint(AtOnce(reactor), str(path), backlog=backlog, mode=0o660).listen(factory)


def his_limits(his: config_mod.HisSide) -> Limits:
    return Limits(max_url=his.max_url, max_header_bytes=his.max_header_bytes, max_headers=his.max_headers,
                  max_pipelined=his.max_pipelined, max_pipelined_bytes=his.max_body,
                  header_timeout=his.header_timeout, body_timeout=his.body_timeout, idle_timeout=his.idle_timeout)


# Descriptors kept out of the HIS side's reach: the admin socket and metrics listener and their clients, the
# journal and its reader threads, the bureau connections, logs. With the HIS side at its cap these stay usable.
FD_RESERVE = 256


def connection_caps(his: config_mod.HisSide) -> tuple[int, int]:
    """(global, per peer) caps on HIS connections, the global one kept FD_RESERVE under RLIMIT_NOFILE (raised
    to its hard limit first): over the descriptor limit accept() fails for every listener, the admin's too."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    cap = his.max_connections
    if soft != resource.RLIM_INFINITY and cap > soft - FD_RESERVE:
        cap = max(1, soft - FD_RESERVE)
        log.warn("his.max_connections {want} lowered to {cap}: the descriptor limit is {soft} and {reserve} stay "
                 "for the admin side, the journal and the bureau (raise LimitNOFILE)", want=his.max_connections,
                 cap=cap, soft=soft, reserve=FD_RESERVE)
    return cap, min(his.max_connections_per_peer, cap)


def run(config_path: Path) -> int:
    logs.start()
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        print(f"fep: refusing to start: {e}", file=sys.stderr)
        return 2
    from twisted.internet import reactor

    heap.keep_freed_memory()
    daemon = Daemon(reactor, config_path, cfg)
    outcome: dict[str, int] = {}

    def failed(f: Any) -> None:
        if daemon.stopping:  # told to stop while starting (systemctl stop): it stops, as told
            log.info("stopped while starting ({why})", why=f.getErrorMessage())
            return
        if f.check(StartupError):
            print(f"fep: refusing to start: {f.value}", file=sys.stderr)
        else:
            log.failure("fep failed to start", f)
        outcome["code"] = 2
        reactor.stop()

    reactor.callWhenRunning(lambda: defer.ensureDeferred(daemon.start()).addErrback(failed))
    systemd.stop_on(reactor, signal.SIGTERM)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(lambda: defer.ensureDeferred(daemon.reload())))
    reactor.run(installSignalHandlers=False)
    return outcome.get("code", 0)
