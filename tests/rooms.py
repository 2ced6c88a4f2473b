"""The bench the rooms are tested on, one room at a time, in milliseconds.

- `Bench`: a REAL journal on a temp file, given a reactor-like object whose callFromThread queues the
  writer thread's results, so they run on the test thread when `run` pumps them; a twisted Clock for
  every callLater; `run(deferred or coroutine, advance=...)` pumps and moves the clock until the result
  is there, and fails, saying what was still pending, when nothing more can happen (a hang).
- `Tracked`: the real journal, counted (how many of its operations are still out, so `run` knows when
  only the clock can move things on), and able to fail ONE chosen call once: a fault, not a mock.
- `FakeLink`: BureauLink.send's signature; what each call gets is scripted per trade number (answer this
  envelope, now or later; not sent; unknown at an endpoint; unknown now and the answer comes late);
  every call is recorded. Unscripted: a 9001 signs in with a fresh sign_no, anything else is answered ok.
- `Desk`: the resolver room standalone: a real Sender over the FakeLink, a Session that signs in by a
  9001 through the link, Lanes, the trade book of conf/trades.yaml, and the steps of the engine's normal
  path the stories need (`his_sends`).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterator

import pytest
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from fep import envelope
from fep.bureau import Delivery, NotSent, Unknown
from fep.config import Resolution
from fep.journal import Journal, NewTrade, TradeRow
from fep.lanes import Lanes, Step
from fep.resolver import Markers, Resolver
from fep.sender import Sender, recorded
from fep.session import Session, SignInFailed
from fep.sim.world import ROOT
from fep.states import State
from fep.trades import TradeBook

S = State
FIXMEDINS = "H43010000001"
START = datetime(2026, 11, 23, 9, 0, 0).timestamp()  # the bench's clock starts on a Monday morning
NOT_SIGNED_IN = ("未签到", "签到信息不存在", "not signed in")  # the config's defaults (fep/config.py)
NOT_FOUND = ("原交易不存在", "not found")
TRANSIENT = ("系统繁忙", "数据库连接超时", "超时", "请稍后", "busy")
REAL_LIMIT = 10.0  # seconds of real time any one `run` may take before it is called a hang


class Hang(AssertionError):
    """What was awaited did not come; the message says what was still pending."""


# ---- the reactor and the journal ---------------------------------------------------------------------
class _InlinePool:
    """Journal.close() joins its writer through the reactor's thread pool: here, at once."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], None], f: Callable[..., Any],
                                 *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class Tracked:
    """The real journal, with a count of its operations still out, and one-shot faults."""

    def __init__(self, journal: Journal, reactor: Bench) -> None:
        self.real = journal
        self.out = 0
        self._reactor = reactor
        self._faults: list[tuple[str, Callable[..., bool], Exception]] = []
        self.faults_raised: list[str] = []

    def fail_once(self, method: str, when: Callable[..., bool] = lambda *a, **kw: True,
                  error: Exception | None = None) -> None:
        """The next call of `method` whose arguments satisfy `when` fails (as the writer thread delivers a
        failure); the call does not reach SQLite. Once."""
        self._faults.append((method, when, error or RuntimeError(f"injected fault in journal.{method}")))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            for fault in self._faults:
                method, when, error = fault
                if method == name and when(*args, **kwargs):
                    self._faults.remove(fault)
                    self.faults_raised.append(f"{name}{args!r}")
                    d: defer.Deferred[Any] = defer.Deferred()
                    self._reactor.callFromThread(d.errback, Failure(error))
                    return self._count(d)
            result = attr(*args, **kwargs)
            return self._count(result) if isinstance(result, defer.Deferred) else result

        return call

    def _count(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        self.out += 1

        def settled(result: Any) -> Any:
            self.out -= 1
            return result

        return d.addBoth(settled)


class Bench:
    """The reactor the journal is given (callFromThread queues; time is the Clock) and the test's pump."""

    def __init__(self, path: Path, url: str | None = None) -> None:
        self.clock = task.Clock()
        self.clock.advance(START)
        self._calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = \
            queue.SimpleQueue()
        self.failures: list[str] = []  # what the code under test logged as failures, formatted
        globalLogPublisher.addObserver(self._observe)
        self.journal = Tracked(Journal(path, FIXMEDINS, url=url), self)
        self.run(self.journal.open(self))

    # -- what the journal and the rooms see of a reactor --
    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self._calls.put((f, args, kwargs))

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, f, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def getThreadPool(self) -> _InlinePool:
        return _InlinePool()

    def now(self) -> float:
        return self.clock.seconds()

    # -- driving --
    def run(self, work: defer.Deferred[Any] | Coroutine[Any, Any, Any], advance: float | None = None,
            limit: float = 86400.0, what: str | None = None) -> Any:
        """The result of `work`: the journal's answers are run here as they come; when nothing but the
        clock can move things on, it moves by at most `advance` seconds (None: never). Fails with Hang
        when nothing is left that could finish it, after `limit` simulated or REAL_LIMIT real seconds."""
        what = what or getattr(work, "__qualname__", None) or repr(work)
        d = work if isinstance(work, defer.Deferred) else defer.ensureDeferred(work)
        box: list[Any] = []
        d.addBoth(box.append)
        self._loop(lambda: bool(box), advance, limit, what)
        result = box[0]
        if isinstance(result, Failure):
            result.raiseException()
        return result

    def settle(self, advance: float | None = None, limit: float = 86400.0) -> None:
        """Run everything that is under way to its end: nothing queued, no journal operation out and, with
        `advance`, nothing left on the clock (the clock moves by at most `advance` at a time)."""
        def quiet() -> bool:
            return self._calls.empty() and not self.journal.out and (
                advance is None or not self.clock.getDelayedCalls())
        self._loop(quiet, advance, limit, "everything under way")

    def wait(self, seconds: float) -> None:
        """Let `seconds` pass on the clock, running what falls due (and the journal's answers) on the way."""
        until = self.clock.seconds() + seconds
        self.settle()
        while True:
            due = [c.getTime() for c in self.clock.getDelayedCalls() if c.getTime() <= until]
            step = (min(due) if due else until) - self.clock.seconds()
            self.clock.advance(max(step, 0.0))
            self.settle()
            if not due:
                return

    def wait_until(self, when: datetime) -> None:
        self.wait(when.timestamp() - self.clock.seconds())

    def _loop(self, done: Callable[[], bool], advance: float | None, limit: float, what: str) -> None:
        real_deadline = time.monotonic() + REAL_LIMIT
        started = self.clock.seconds()
        while True:
            if done():  # checked before each queued call: what comes after the result stays queued
                return
            if self._pump_one(0):
                continue
            left = real_deadline - time.monotonic()
            if left <= 0:
                raise self._hang(what, f"still waiting after {REAL_LIMIT:g} s of real time", started)
            if self.journal.out:  # the writer thread is at it: its answer comes
                if not self._pump_one(min(left, 1.0)) and time.monotonic() >= real_deadline:
                    raise self._hang(what, "the journal did not answer", started)
                continue
            calls = self.clock.getDelayedCalls()
            if advance is None or not calls:
                raise self._hang(what, "nothing is left that could finish it" + (
                    "" if advance is not None or not calls else " without moving the clock"), started)
            step = min(advance, min(c.getTime() for c in calls) - self.clock.seconds())
            if self.clock.seconds() + step - started > limit:
                raise self._hang(what, f"still waiting after {limit:g} simulated seconds", started)
            self.clock.advance(max(step, 0.0))

    def _pump_one(self, wait: float) -> bool:
        try:
            f, args, kwargs = self._calls.get(timeout=wait) if wait else self._calls.get_nowait()
        except queue.Empty:
            return False
        f(*args, **kwargs)
        return True

    def _hang(self, what: str, why: str, started: float) -> Hang:
        calls = "; ".join(f"in {c.getTime() - self.clock.seconds():g} s: {getattr(c.func, '__qualname__', c.func)}"
                          for c in self.clock.getDelayedCalls()) or "none"
        logged = "\n".join(self.failures[-3:]) or "none"
        return Hang(f"{what}: {why} ({self.clock.seconds() - started:g} simulated s; journal operations out: "
                    f"{self.journal.out}; on the clock: {calls}); last failures logged:\n{logged}")

    def _observe(self, event: dict[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is not None:
            self.failures.append(f"{event.get('log_format', '')}: {failure.getErrorMessage()}")

    def close(self) -> None:
        globalLogPublisher.removeObserver(self._observe)
        for call in self.clock.getDelayedCalls():
            call.cancel()
        self.run(self.journal.close())

    # -- reading the journal --
    def row(self, msgid: str) -> TradeRow:
        row = self.run(self.journal.get(msgid))
        assert row is not None, f"no trade {msgid} in the journal"
        return row

    def events(self, msgid: str) -> list[str]:
        return [event for _, event, _, _ in self.run(self.journal.history(msgid))]

    def accept(self, infno: str, data: dict[str, Any], state: State = S.SENT, **extra: Any) -> TradeRow:
        """A trade as the engine journals it (the journal numbers it)."""
        env = {"infno": infno, "fixmedins_code": FIXMEDINS, "sign_no": "", "input": {"data": data}}
        acc = self.run(self.journal.accept(NewTrade(infno, None, data.get("psn_no"), state,
                                                    envelope.payload_hash(env), env, **extra)))
        return acc.row


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path / "journal.db")
    try:
        yield b
    finally:
        b.close()


# ---- the bureau -------------------------------------------------------------------------------------
def bureau_envelope(infcode: int = 0, err_msg: str | None = None, output: Any = None) -> dict[str, Any]:
    return {"infcode": infcode, "inf_refmsgid": "", "refmsg_time": "", "respond_time": "",
            "err_msg": err_msg, "output": output if output is not None else {}, "warn_msg": None}


@dataclass
class Call:
    """One send the bureau link was asked for."""
    infno: str
    msgid: str
    sign_no: str
    endpoint: str | None  # what the send was pinned to (None: any endpoint)
    went_to: str  # the endpoint it went to
    envelope: dict[str, Any]
    at: float  # the clock's time

    @property
    def data(self) -> dict[str, Any]:
        return self.envelope["input"].get("data") or {}


class Behaviour:
    def act(self, link: FakeLink, call: Call, on_late: Callable[[bytes], None] | None) -> Any:
        raise NotImplementedError


@dataclass
class Answer(Behaviour):
    """The bureau answers this envelope, `after` seconds on the clock (0: at once)."""
    env: dict[str, Any]
    after: float = 0.0

    def act(self, link: FakeLink, call: Call, on_late: Callable[[bytes], None] | None) -> Any:
        link.down = False
        delivery = link.delivery(call, self.env)
        if not self.after:
            return delivery
        return task.deferLater(link.clock, self.after, lambda: delivery)


@dataclass
class Refused(Behaviour):
    """No byte left: connection refused (NotSent)."""
    why: str = "connection refused"

    def act(self, link: FakeLink, call: Call, on_late: Callable[[bytes], None] | None) -> Any:
        link.down = True
        raise NotSent(f"{call.went_to}: {self.why}")


@dataclass
class Lost(Behaviour):
    """It may have arrived at `endpoint` (default: where it went); no answer came (Unknown)."""
    endpoint: str | None = None
    why: str = "no answer within the timeout"

    def act(self, link: FakeLink, call: Call, on_late: Callable[[bytes], None] | None) -> Any:
        link.down = False
        at = self.endpoint or call.went_to
        raise Unknown(f"{at}: {self.why}", at)


@dataclass
class Late(Behaviour):
    """Unknown now; the bureau's answer `env` arrives `after` seconds later, to the send's on_late."""
    env: dict[str, Any]
    after: float = 5.0

    def act(self, link: FakeLink, call: Call, on_late: Callable[[bytes], None] | None) -> Any:
        link.down = False
        if on_late is not None:
            body = link.delivery(call, self.env).body
            link.clock.callLater(self.after, on_late, body)
        raise Unknown(f"{call.went_to}: no answer within the timeout", call.went_to)


def ok(output: Any = None, after: float = 0.0) -> Answer:
    return Answer(bureau_envelope(0, None, output), after)


def refused(err_msg: str, after: float = 0.0) -> Answer:
    """The bureau answers with a refusal (infcode -1)."""
    return Answer(bureau_envelope(-1, err_msg), after)


def settled(setl_id: str, setl_time: str = "2026-11-23 09:00:00", after: float = 0.0) -> Answer:
    return Answer(bureau_envelope(0, None, {"setlinfo": {"setl_id": setl_id, "setl_time": setl_time,
                                                         "medfee_sumamt": "100.00"}}), after)


def not_sent(why: str = "connection refused") -> Refused:
    return Refused(why)


def lost(endpoint: str | None = None) -> Lost:
    return Lost(endpoint)


def late(answer: Answer, after: float = 5.0) -> Late:
    return Late(answer.env, after)


class FakeLink:
    """BureauLink.send, scripted. Endpoints bureau-a and bureau-b; an unpinned send goes to the first one
    not in `unreachable`; a send to an unreachable endpoint is NotSent."""

    endpoints = ("bureau-a", "bureau-b")
    endpoint_names = endpoints

    def __init__(self, clock: task.Clock) -> None:
        self.clock = clock
        self.calls: list[Call] = []
        self.unreachable: set[str] = set()
        self._scripts: dict[str, list[Behaviour]] = {}
        self._down = False
        self._sign_nos = 0

    def script(self, infno: str, *behaviours: Behaviour) -> None:
        """The next sends of `infno` get these, in order (after what is scripted already)."""
        self._scripts.setdefault(infno, []).extend(behaviours)

    @property
    def down(self) -> bool:
        """Like BureauLink.down: the last attempt found the bureau unreachable."""
        return self._down or set(self.endpoints) <= self.unreachable

    @down.setter
    def down(self, value: bool) -> None:
        self._down = value

    def sent(self, infno: str | None = None) -> list[Call]:
        return [c for c in self.calls if infno is None or c.infno == infno]

    async def send(self, infno: str, body: bytes, timeout: float, trade_path: str | None = None,
                   on_late: Callable[[bytes], None] | None = None, endpoint: str | None = None,
                   base_path: str | None = None) -> Delivery:
        env = envelope.loads(body)
        reachable = [e for e in self.endpoints if e not in self.unreachable]
        went_to = endpoint or (reachable[0] if reachable else self.endpoints[0])
        call = Call(infno, str(env.get("msgid", "")), str(env.get("sign_no", "")), endpoint, went_to, env,
                    self.clock.seconds())
        self.calls.append(call)
        if went_to in self.unreachable:
            self.down = not reachable
            raise NotSent(f"{went_to}: connection refused")
        script = self._scripts.get(infno)
        behaviour = script.pop(0) if script else self._otherwise(infno)
        result = behaviour.act(self, call, on_late)
        return await result if isinstance(result, defer.Deferred) else result

    def _otherwise(self, infno: str) -> Behaviour:
        if infno == "9001":
            self._sign_nos += 1
            return ok({"signinoutb": {"sign_no": f"SIGN{self._sign_nos:04d}"}})
        return ok()

    def delivery(self, call: Call, env: dict[str, Any]) -> Delivery:
        body = envelope.dumps(dict(env, inf_refmsgid=call.msgid))
        return Delivery(envelope.parse_bureau_answer(body), body, call.went_to, 0.01)


# ---- the resolver room, standalone -------------------------------------------------------------------
@dataclass
class Policy:
    max_tries: int = 3
    backoff: tuple[float, ...] = (0.0, 1.0, 2.0)

    def __call__(self) -> Resolution:
        return Resolution(self.max_tries, self.backoff)


class Desk:
    """The resolver's room with everything it works with: real journal, Sender, Session, Lanes."""

    def __init__(self, bench: Bench, policy: Policy | None = None) -> None:
        self.bench = bench
        self.journal = bench.journal
        self.link = FakeLink(bench.clock)
        self.book = TradeBook.load(ROOT / "conf" / "trades.yaml")
        self.policy = policy or Policy()
        self.session = Session(bench.now, self._sign_in, NOT_SIGNED_IN)
        self.sender = Sender(self.link, self.session, self.journal, bench.now, self._late)  # type: ignore[arg-type]
        self.replayed: list[str] = []
        self.lanes = Lanes(bench.clock, self._replay)
        self.resolver = Resolver(bench.clock, self.journal, self.sender, self.lanes, lambda: self.book,  # type: ignore[arg-type]
                                 self.policy, lambda: Markers(NOT_FOUND, TRANSIENT), self.complete)

    def run(self, work: Any, advance: float | None = None) -> Any:
        return self.bench.run(work, advance)

    def complete(self, his_envelope: dict[str, Any]) -> dict[str, Any]:
        """The box's envelope fields, as the engine fills them."""
        env = dict(his_envelope)
        env.pop("msgid", None)
        env.update(fixmedins_code=FIXMEDINS, fixmedins_name="bench hospital", sign_no=self.session.sign_no,
                   inf_time=envelope.inf_time(self.bench.now()))
        for key, value in (("mdtrtarea_admvs", "430100"), ("recer_sys_code", "FEP"), ("infver", "V1.0"),
                           ("insuplc_admdvs", ""), ("opter_type", "1"), ("opter", "fep"), ("opter_name", "fep")):
            env[key] = env.get(key) or value
        return env

    async def _sign_in(self) -> str:
        """A 9001 through the link (journalled first, as the engine does: one journal round trip)."""
        await self.journal.ping()
        env = self.complete({"infno": "9001", "input": {"signIn": {"opter_no": "fep", "mac": "-", "ip": "-"}}})
        env["msgid"] = f"{FIXMEDINS}SIGNIN{len(self.link.sent('9001')):012d}"
        try:
            delivery = await self.link.send("9001", envelope.dumps(env), 10.0)
        except (NotSent, Unknown) as e:
            raise SignInFailed(str(e)) from None
        sign_no = ((delivery.answer.output or {}).get("signinoutb") or {}).get("sign_no")
        if not delivery.answer.ok or not sign_no:
            raise SignInFailed(delivery.answer.err_msg)
        return str(sign_no)

    def _late(self, row: TradeRow, body: bytes) -> None:
        """As the engine: the late answer is kept, and the resolver hears of it."""
        async def keep() -> None:
            stored = await self.journal.store_late_answer(row.msgid, body.decode("utf-8"))
            await self.resolver.late_answer(stored)

        defer.ensureDeferred(keep())

    async def _replay(self, msgid: str) -> Step:
        self.replayed.append(msgid)
        return Step.NEXT

    async def his_sends(self, infno: str, **data: Any) -> TradeRow:
        """The engine's normal path for a trade the HIS sends now: the person's lane held, the session
        ensured, journalled SENT, sent; answered, not sent, or lost (then the resolver's)."""
        trade = self.book.get(infno)
        input_ = {"data": data}
        psn = envelope.find_psn_no(input_)
        async with self.lanes.sending(psn if trade.person_ordered else None, f"{infno} {trade.name}"):
            await self.session.ensure()
            env = self.complete({"infno": infno, "input": input_})
            acc = await self.journal.accept(NewTrade(infno, None, psn, S.SENT, envelope.payload_hash(env), env))
            row = acc.row
            try:
                delivery = await self.sender.deliver(trade, row)
            except NotSent as e:
                return await self.journal.transition(row.msgid, "not_sent", note=str(e))
            except Unknown as e:
                row = await self.journal.transition(row.msgid, "lost", note=str(e), attempts=row.attempts + 1,
                                                    endpoint=e.endpoint)
                return await self.resolver.lost(trade, row)
            return await self.journal.transition(row.msgid, "answer", **recorded(trade, row, delivery))

    def resolving(self, msgid: str) -> list[TradeRow]:
        """The resolving trades (2601s, cancels) journalled for `msgid`, oldest first."""
        return self.bench.run(self.journal.resolving_trades(msgid))


def visit(n: int = 1, psn: str = "P0001") -> dict[str, str]:
    """A 2207's input data: the n-th visit of `psn`."""
    return {"psn_no": psn, "mdtrt_id": f"MDTRT{psn}{n:02d}", "chrg_bchno": f"CB{n:02d}", "medfee_sumamt": "100.00",
            "insutype": "310"}


