"""A year of journal, built offline from real trades: scripts/bench's 'year of journal' case, and the
query-plan test at a small scale.

Real trades are harvested from a journal fep wrote (the bench's own run against the simulator): whole
scripts of them, in order, as fep journalled them (an outpatient visit 1101 -> 2201 -> 2203 -> 2204 ->
2206 -> 2207; one with its cancel; a settlement reversed by 2601; one that was not sent; one parked for
a person). Each is a template: its identifiers (msgids, the person, the visit, the settlement ids, the
bureau's reference numbers) and its times become slots. The year is then copies of the scripts, each
with a person of its own out of many, spread over the days of the year in opening hours, rows and
events in the order and format fep writes them (the journal's own schema and body encoding).

The build runs in worker processes (a day each) and one writer that inserts in journal order, with the
safety of the system of record switched off (it is a scratch file until it is finished): a few minutes
for 3 million rows on two cores.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import re
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Iterable, Iterator

from fep import envelope, journal

INSTITUTION = "H43010000001"
# Keys whose values identify a person, a visit, a settlement or a message: they become slots.
ID_KEYS = {"psn_no": "psn", "certno": "cert", "mdtrt_cert_no": "cert", "mdtrt_id": "mdtrt", "chrg_bchno": "chrg",
           "ipt_otp_no": "chrg", "setl_id": "setl", "inf_refmsgid": "ref", "medins_setl_id": "msg", "omsgid": "msg",
           "msgid": "msg"}
TIME = re.compile(r'"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d{17})"')
OPENING = (8 * 3600, 17 * 3600)  # visits start in opening hours
STEP = 75.0  # seconds between the steps of a visit (jittered)
MIX = {"visit": 0.962, "cancel": 0.02, "not_sent": 0.01, "reversed": 0.005, "not_needed": 0.003}  # of visits


@dataclass
class Row:
    """One journalled trade of a script, with its bodies split at the slots."""
    infno: str
    state: str
    psn: bool  # the row carries the person's psn_no
    request: list[str]  # parts and slot names, alternating: part, slot, part, ..., part
    answer: list[str] | None
    related: int | None  # index in the script of the trade it resolves
    resolver: int | None
    attempts: int
    endpoint: str | None
    note: str | None
    setl_id: str | None  # a slot name
    cancels: str | None
    events: list[tuple[str, str | None, str | None]]  # event, state, note
    settlement: dict[str, str] | None = None  # the bureau's figures of a settlement or cancel it answered


@dataclass
class Script:
    name: str
    rows: list[Row]
    insutype: str
    slots: set[str] = field(default_factory=set)


# ---- record and harvest -------------------------------------------------------------------------------
def record(world: Any, people: list[dict[str, str]]) -> dict[str, list[list[str]]]:
    """Run each script through fep against the simulator, once for a person of each insutype (the
    first two of `people`); their msgids, by script. These are the real trades the year copies."""
    from fep.sim.world import Visit, parked_settlement, wait_for

    out: dict[str, list[list[str]]] = {name: [] for name in ("visit", "cancel", "reversed", "not_needed",
                                                             "not_sent", "parked", "signin")}

    def opened(person: dict[str, str]) -> tuple[Visit, list[str]]:
        v = Visit(world.his, person)
        steps = [v.identify(), v.register(), v.diagnose(), v.upload_fees(), v.presettle()]
        assert all(a["infcode"] == 0 for a in steps), steps
        return v, [a["fep_msgid"] for a in steps]

    def settled(msgid: str, states: tuple[str, ...]) -> None:
        wait_for(lambda: world.trade(msgid)["state"] in states, timeout=30, what=f"{msgid} to be {states}")

    for person in people[:2]:
        v, ids = opened(person)
        out["visit"].append(ids + [v.settle()["fep_msgid"]])
        v, ids = opened(person)
        s = v.settle()
        out["cancel"].append(ids + [s["fep_msgid"], v.cancel(s["output"]["setlinfo"]["setl_id"])["fep_msgid"]])
        v, ids = opened(person)
        world.fault(mode="drop_after", infno="2207", times=1)
        s = v.settle()
        settled(s["fep_msgid"], ("REVERSED",))
        out["reversed"].append(ids + [s["fep_msgid"]])
        v, ids = opened(person)
        world.fault(mode="drop_before", infno="2207", times=1)
        s = v.settle()
        settled(s["fep_msgid"], ("NOT_NEEDED",))
        out["not_needed"].append(ids + [s["fep_msgid"]])
        v, ids = opened(person)
        world.fault(mode="refuse")
        s = v.settle()
        world.clear_faults()
        assert s["fep_state"] == "NOT_SENT", s
        out["not_sent"].append(ids + [s["fep_msgid"]])
    v, ids = opened(people[0])
    out["parked"].append(ids + [parked_settlement(world, v)["fep_msgid"]])
    out["signin"].append([world.journal("infno='9001' AND state='ANSWERED'")[0]["msgid"]])
    return out


def harvest(path: Path, scripts: dict[str, list[list[str]]]) -> list[Script]:
    """The scripts, by name, each a list of runs (msgids in order, as sent), read from a journal fep
    wrote. A run's resolving trades (2601) are taken with it."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    out = []
    try:
        for name, runs in scripts.items():
            for msgids in runs:
                out.append(_script(conn, name, msgids))
    finally:
        conn.close()
    return out


def _script(conn: sqlite3.Connection, name: str, msgids: list[str]) -> Script:
    rows = []
    for m in msgids:
        r = dict(conn.execute("SELECT * FROM trades WHERE msgid=?", (m,)).fetchone())
        rows.append(r)
        if r["resolver"] and r["resolver"] not in msgids:
            rows.append(dict(conn.execute("SELECT * FROM trades WHERE msgid=?", (r["resolver"],)).fetchone()))
    for r in rows:
        for k in ("request", "answer", "late_answer"):
            r[k] = journal.body_text(r[k]) if r[k] is not None else None
    index = {r["msgid"]: i for i, r in enumerate(rows)}
    tokens: dict[str, str] = {}  # a JSON string as it appears in the bodies -> its slot
    for i, r in enumerate(rows):
        tokens[f'"{r["msgid"]}"'] = f"m{i}"
    counters: dict[str, int] = {}

    def slot(kind: str, value: str) -> str:
        token = f'"{value}"'
        if token not in tokens:
            n = counters.get(kind, 0)
            counters[kind] = n + 1
            tokens[token] = f"{kind}{n}"
        return tokens[token]

    insutype = ""
    for r in rows:
        for body in (r["request"], r["answer"]):
            if body:
                for key, value in _pairs(envelope.loads(body)):
                    if key in ID_KEYS and isinstance(value, str) and value and f'"{value}"' not in tokens:
                        if ID_KEYS[key] == "msg":
                            continue  # msgids of the script are slots already; others (9001's) stay
                        slot(ID_KEYS[key], value)
                    if key == "insutype" and isinstance(value, str):
                        insutype = insutype or value
    # fee lines are numbered after their batch: "<chrg_bchno><n>"
    chrg = [t for t, s in tokens.items() if s.startswith("chrg")]
    out_rows = []
    for r in rows:
        setl = tokens.get(f'"{r["setl_id"]}"') if r["setl_id"] else None
        answer = envelope.loads(r["answer"]) if r["answer"] else None
        info = ((answer or {}).get("output") or {}).get("setlinfo") if isinstance(answer, dict) else None
        events = [tuple(e) for e in conn.execute("SELECT event, state, note FROM events WHERE msgid=? ORDER BY id",
                                                  (r["msgid"],))]
        out_rows.append(Row(
            r["infno"], r["state"], r["psn_no"] is not None, _split(r["request"], tokens, chrg),
            _split(r["answer"], tokens, chrg) if r["answer"] else None,
            index.get(r["related"]) if r["related"] else None, index.get(r["resolver"]) if r["resolver"] else None,
            r["attempts"], r["endpoint"], r["note"], setl,
            tokens.get(f'"{r["cancels"]}"') if r["cancels"] else None, events,  # type: ignore[arg-type]
            {k: str(info[k]) for k in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay",
                                       "hosp_part_amt", "act_pay_dedc", "insutype", "clr_type", "clr_optins")
             if k in info} if isinstance(info, dict) and r["setl_id"] and r["state"] in ("ANSWERED", "CONFIRMED")
            else None))
    script = Script(name, out_rows, insutype)
    for r in out_rows:
        script.slots.update(r.request[1::2])
        script.slots.update((r.answer or [])[1::2])
    return script


def _pairs(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _pairs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pairs(v)


def _split(text: str, tokens: dict[str, str], chrg: list[str]) -> list[str]:
    """The body as parts and slot names, alternating; slots keep their quotes in the parts."""
    pattern = "|".join(re.escape(t[:-1]) + r'(\d*)"' if t in chrg else re.escape(t)
                       for t in sorted(tokens, key=len, reverse=True))
    out: list[str] = []
    pos = 0
    regex = re.compile(f"({pattern})|{TIME.pattern}")
    for m in regex.finditer(text):
        whole = m.group(0)
        if m.group(1) is None:  # a time
            kind = "T" if "-" in whole else "S"
            out += [text[pos:m.start()] + '"', kind]
            pos = m.end() - 1
            continue
        name = tokens.get(whole)
        suffix = ""
        if name is None:  # a numbered fee line: "<chrg_bchno><n>"
            base = next(t for t in chrg if whole.startswith(t[:-1]))
            name, suffix = tokens[base], whole[len(base) - 1:-1]
        out += [text[pos:m.start()] + '"', name]
        pos = m.end() - 1 - len(suffix)
    out.append(text[pos:])
    return out


# ---- build -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    rows: int
    days: int
    end: date  # the year ends the day before this
    persons: int
    person_base: int = 0  # person numbers start here (a second build adds other people's history)
    parked: int = 3  # parked settlements in the last days (and as many dropped), for a person to decide
    seed: int = 1


@dataclass
class Built:
    trades: int
    events: int
    seconds: float
    settlements: dict[str, list[tuple[Any, ...]]]  # the bureau's settlement rows, by day (ISO), for the ledger


_SCRIPTS: list[Script] = []
_PLAN: Plan | None = None


def build(path: Path, scripts: list[Script], plan: Plan, workers: int = 0, ledger_days: Iterable[date] = (),
          append: bool = False) -> Built:
    """Write `plan.rows` trades (and their events) over `plan.days` days ending the day before `plan.end`,
    in a journal of this fep's schema at `path` (created; or added to, older history first, with
    `append`). `ledger_days`: the bureau's settlement rows of those days are returned too."""
    global _SCRIPTS, _PLAN
    started = time.perf_counter()
    _SCRIPTS, _PLAN = scripts, plan
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF" if not append else "PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-1000000")
    conn.execute("BEGIN")
    journal.migrate(conn, str(path))
    conn.execute("COMMIT")
    if not append:
        conn.execute("PRAGMA journal_mode=OFF")
    wanted = {d.isoformat() for d in ledger_days}
    settlements: dict[str, list[tuple[Any, ...]]] = {}
    trades = events = 0
    days = list(range(plan.days))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        chunks = pool.imap(_day, days, chunksize=1) if pool else map(_day, days)
        conn.execute("BEGIN")
        for n, (rows, evs, setl) in enumerate(chunks):
            conn.executemany(f"INSERT INTO trades ({', '.join(journal.COLUMNS[1:])}) VALUES "
                             f"({', '.join('?' * (len(journal.COLUMNS) - 1))})", rows)
            conn.executemany("INSERT INTO events (msgid, at, event, state, note) VALUES (?,?,?,?,?)", evs)
            trades += len(rows)
            events += len(evs)
            for day, items in setl.items():
                if day in wanted:
                    settlements.setdefault(day, []).extend(items)
            if n % 30 == 29:
                conn.execute("COMMIT")
                conn.execute("BEGIN")
        conn.execute("COMMIT")
    finally:
        if pool:
            pool.close()
            pool.join()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    return Built(trades, events, time.perf_counter() - started, settlements)


def _day(d: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]], dict[str, list[tuple[Any, ...]]]]:
    """One day of the year: its trades in journal order, their events, the bureau's settlements."""
    plan, scripts = _PLAN, _SCRIPTS
    assert plan is not None
    day = plan.end - timedelta(days=plan.days - d)
    rng = random.Random(plan.seed * 100_003 + d)
    midnight = datetime.combine(day, datetime.min.time()).timestamp()
    by_name: dict[str, list[Script]] = {}
    for s in scripts:
        by_name.setdefault(s.name, []).append(s)
    quota = plan.rows // plan.days + (1 if d < plan.rows % plan.days else 0)
    first = [s for s in scripts if s.name == "signin"]
    items: list[tuple[float, int, int, dict[str, str]]] = []  # (time, visit, row index, visit slots)
    visits: list[Script] = []
    n = 0
    if first and quota:
        visits.append(first[0])
        items.append((midnight + 7 * 3600 + rng.random() * 60, 0, 0, _visit_values(plan.person_base, d, 0, plan.seed)))
        n += 1
    tail = d == plan.days - 1
    names = list(MIX)
    weights = [MIX[k] for k in names]
    while n < quota:
        name = rng.choices(names, weights)[0]
        if tail and plan.parked and len([v for v in visits if v.name == "parked"]) < 2 * plan.parked \
                and "parked" in by_name:
            name = "parked"
        who = plan.person_base + rng.randrange(plan.persons)
        choices = by_name.get(name) or by_name["visit"]
        script = next((s for s in choices if s.insutype == ("310" if who % 2 else "390")), choices[0])
        if n + len(script.rows) > quota:  # the day's last visit: an ordinary one, cut where the day ends
            choices = by_name["visit"]
            script = next((s for s in choices if s.insutype == ("310" if who % 2 else "390")), choices[0])
        v = len(visits)
        visits.append(script)
        start = midnight + rng.uniform(*OPENING)
        values = _visit_values(who, d, v, plan.seed)
        at = start
        for i in range(len(script.rows)):
            if n >= quota:
                break
            at += 0.5 if script.rows[i].related is not None else STEP * rng.uniform(0.5, 1.5)
            items.append((at, v, i, values))
            n += 1
    items.sort(key=lambda x: x[0])
    msgids: dict[tuple[int, int], str] = {}
    for seq, (t, v, i, _) in enumerate(items):
        msgids[(v, i)] = f"{INSTITUTION}{time.strftime('%Y%m%d%H%M%S', time.localtime(t))}{seq % 10000:04d}"
    rows, evs = [], []
    setl: dict[str, list[tuple[Any, ...]]] = {}
    dropped = 0
    for t, v, i, values in items:
        script = visits[v]
        r = script.rows[i]
        msgid = msgids[(v, i)]
        slot = dict(values)
        for k in range(len(script.rows)):
            slot[f"m{k}"] = msgids.get((v, k), f"{INSTITUTION}00000000000000{k:04d}")
        stamp = datetime.fromtimestamp(t)
        slot["T"] = stamp.strftime("%Y-%m-%d %H:%M:%S")
        slot["S"] = stamp.strftime("%Y%m%d%H%M%S%f")[:17]
        state, note, evlist = r.state, r.note, r.events
        if script.name == "parked" and r.related is None and state == "NEEDS_ATTENTION" and dropped < plan.parked:
            dropped += 1
            state, note = "DROPPED", "dropped by a person: settled again at the counter"
            evlist = evlist + [("drop", "DROPPED", note)]
        request = journal.stored_body(_render(r.request, slot))
        answer = journal.stored_body(_render(r.answer, slot)) if r.answer else None
        updated = t + 0.05 * len(evlist)
        rows.append((msgid, r.infno, values["psn"] if r.psn else None, state,
                     hashlib.sha256(msgid.encode()).hexdigest(), request, answer, None,
                     msgids.get((v, r.related)) if r.related is not None else None,
                     msgids.get((v, r.resolver)) if r.resolver is not None else None,
                     r.attempts, None, None, r.endpoint, note, slot.get(r.setl_id) if r.setl_id else None,
                     slot.get(r.cancels) if r.cancels else None, t, updated,
                     msgid if r.related is None and r.infno not in ("9001", "9002") else None))  # his_msgid
        for k, (event, st, nt) in enumerate(evlist):
            evs.append((msgid, t + 0.05 * k, event, st, nt))
        if r.settlement and state in ("ANSWERED", "CONFIRMED"):
            s = r.settlement
            setl.setdefault(day.isoformat(), []).append((
                slot[r.setl_id or ""], msgid, r.infno, values["psn"], values["mdtrt0"], s.get("insutype", ""),
                s.get("clr_type", ""), s.get("clr_optins", ""), s.get("medfee_sumamt", "0"),
                s.get("fund_pay_sumamt", "0"), s.get("acct_pay", "0"), s.get("psn_cash_pay", "0"),
                s.get("hosp_part_amt", "0"), s.get("act_pay_dedc", "0"), slot["T"],
                "cancel" if r.cancels else "settle", "live", slot.get(r.cancels) if r.cancels else None))
    return rows, evs, setl


def person(n: int) -> str:
    """The psn_no of the year's person n."""
    return f"43019{n:015d}"


def _visit_values(n: int, d: int, v: int, seed: int) -> dict[str, str]:
    """The identifiers of one copy of a script: its person's, and its own."""
    unique = (seed % 10 * 10_000 + d) * 100_000 + v
    out = {"psn": person(n), "cert": f"430199{n:012d}", "chrg": f"Y{unique:012d}"}
    for k in range(4):
        out[f"psn{k}"] = out["psn"]
        out[f"cert{k}"] = out["cert"]
        out[f"chrg{k}"] = out["chrg"]
        out[f"mdtrt{k}"] = f"7{unique:011d}{k}"
        out[f"setl{k}"] = f"8{unique:011d}{k}"
    for k in range(16):
        out[f"ref{k}"] = f"430100{unique:016d}{k:02d}"
    return out


def _render(parts: list[str] | None, slot: dict[str, str]) -> str:
    assert parts is not None
    out = [parts[0]]
    for k in range(1, len(parts), 2):
        out.append(slot[parts[k]])
        out.append(parts[k + 1])
    return "".join(out)


def seed_ledger(ledger: Path, rows: list[tuple[Any, ...]]) -> None:
    """Give the simulated bureau the settlements of a day of the year, so that day balances."""
    conn = sqlite3.connect(ledger, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(f"INSERT OR REPLACE INTO settlements VALUES ({', '.join('?' * 18)})", rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
