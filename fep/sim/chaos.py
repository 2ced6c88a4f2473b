"""scripts/chaos: an independent judge of fep under faults and crashes.

Careful HIS clients send outpatient visits (1101, 2201, 2203, 2204, 2206, 2207, 2208) for many persons.
Meanwhile every fault mode of the simulator is switched on every trade kind in the mix (resends, 2601 and
uploads included), the bureau's sessions are expired, and fep and the simulator are both killed with
SIGKILL and restarted. At the end three views are built, each from its own source only:

- the HIS view: what each HIS client heard (its answers, and GET /fep/trades/MSGID for every msgid whose
  last answer was not final), and the order it sent its uploads in;
- the journal view: fep's journal file, opened read-only;
- the bureau view: the simulator's ledger file (settlements, and the stored answers in the order the
  bureau processed them), opened read-only.

They are compared pairwise (HIS and bureau, journal and bureau, HIS and journal), and the run prints every
must-be-zero figure with its count, and for each non-zero one the first msgids with the three views side
by side. Exit status: 0 when every must-be-zero figure is 0, 1 when one is not, 2 when the run itself
could not be carried out.

The judge (`judge`) is a pure function of the three views, so it is tested on hand-made snapshots
(tests/test_chaos.py) independently of the engine it judges.

--ha: two fep nodes share a journal on a throwaway PostgreSQL server (under var/, removed after the run); the
HIS clients know both nodes' sockets and go to the other when one is gone or stands by. The kills are of
whichever node leads (it comes back as a standby), PostgreSQL itself is restarted (--pg-restarts), and the
run also tells the longest time no node led. The journal view is PostgreSQL's, copied at the end into the
run's lib/journal.db so that --rejudge reads it as it reads a single box's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
import zlib
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Iterable

from fep import envelope, pki
from fep.client import Client
from fep.sim.postgres import Postgres
from fep.sim.server import GARBLES
from fep.sim.world import ROOT, World

# ---- the rules of the game ----------------------------------------------------------------------------------
MIX = ("1101", "2201", "2203", "2204", "2206", "2207", "2208", "2601", "9001")  # every trade kind that flows
DEFERRABLE = ("2203", "2204")   # uploads in the mix that fep may acknowledge as QUEUED (conf/trades.yaml)
STATEFUL = ("2201", "2203", "2204", "2207", "2208")  # trades that change what the bureau holds
BUSY = "系统繁忙"                                    # a transient refusal: never a reason to park
BUSINESS_FAULT = "模拟业务拒绝: 参保人本次就医受限"   # a business refusal the run injects as an `error` fault
UNKNOWN_CODE = "ZZ99ZZZ999Z999999999999"             # a national code the bureau does not know
CATALOG_REFUSAL = "医保目录编码不存在"                # ... and the bureau's refusal of an upload carrying it
PROVOKED_BUSINESS = (CATALOG_REFUSAL, BUSINESS_FAULT)
FAULT_MODES = ("drop_before", "drop_after", "late", "reset_mid", "garble", "error_busy", "error_business")

IN_FORCE = ("ANSWERED", "CONFIRMED", "AWAITING_CONFIRM")
# An answer after which the careful HIS does not look again. REFUSED: a 4xx (not journalled);
# ABSENT: a lookup's 404 (fep holds no such msgid).
FINAL = frozenset({"ANSWERED", "NOT_SENT", "REVERSED", "NOT_NEEDED", "CONFIRMED", "REFUSED", "ABSENT"})
OPEN = ("SENT", "UNKNOWN", "RESOLVING", "QUEUED")  # a trade whose fate is not settled yet

FIGURES = {  # key -> what it counts; every one must be 0
    "told_settled_bureau_disagrees": "HIS told settled or cancelled, the bureau disagrees",
    "bureau_money_his_not_told": "bureau holds money the HIS was not told about (单边账)",
    "double_charge": "double charge",
    "upload_undelivered": "promised upload undelivered",
    "upload_out_of_order": "upload processed out of the order the HIS sent it",
    "unresolved": "unresolved at the end",
    "needs_attention_no_reason": "needs attention without a business reason",
    "journal_vs_bureau": "journal disagrees with the bureau",
    "his_vs_journal": "HIS heard otherwise than the journal holds",
    "refund_order_broken": "cancel accepted out of refund order",
}


def _int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, InvalidOperation):
        return None


def _dec(v: Any) -> Decimal | None:
    try:
        return Decimal(str(v)) if v is not None else None
    except InvalidOperation:
        return None


def _short(s: Any, n: int = 110) -> str:
    s = "" if s is None else str(s)
    return s if len(s) <= n else s[: n - 1] + "…"


# ---- the three views: plain records, so the judge can be fed by hand ----------------------------------------
@dataclass
class Heard:
    """One answer the HIS heard."""

    status: int                 # HTTP status
    state: str                  # fep_state (REFUSED: not taken, whatever the status), ABSENT for a lookup's 404
    infcode: int | None
    err_msg: str = ""
    setl_id: str | None = None  # output.setlinfo.setl_id
    medfee: str | None = None   # output.setlinfo.medfee_sumamt
    mdtrt_id: str | None = None  # output.data.mdtrt_id (2201)
    fep_msgid: str | None = None
    via: str = "post"           # post | lookup

    @classmethod
    def of(cls, status: int, body: Any, via: str = "post") -> Heard:
        body = body if isinstance(body, dict) else {}
        out = body.get("output") if isinstance(body.get("output"), dict) else {}
        setl = out.get("setlinfo") if isinstance(out.get("setlinfo"), dict) else {}
        data = out.get("data") if isinstance(out.get("data"), dict) else {}
        state = str(body.get("fep_state") or ("REFUSED" if status >= 400 else "?"))
        if via == "lookup" and status == 404:
            state = "ABSENT"
        return cls(status=status, state=state, infcode=_int(body.get("infcode")), err_msg=_short(body.get("err_msg"), 200),
                   setl_id=str(setl["setl_id"]) if setl.get("setl_id") else None,
                   medfee=str(setl["medfee_sumamt"]) if setl.get("medfee_sumamt") is not None else None,
                   mdtrt_id=str(data["mdtrt_id"]) if data.get("mdtrt_id") else None,
                   fep_msgid=body.get("fep_msgid"), via=via)

    def brief(self) -> str:
        s = f"{self.via} {self.status} {self.state} infcode {self.infcode}"
        if self.setl_id:
            s += f" setl {self.setl_id} medfee {self.medfee}"
        if self.err_msg and self.infcode != 0:
            s += f" «{_short(self.err_msg, 70)}»"
        return s


@dataclass
class HisTrade:
    """One msgid the HIS sent, and everything it heard about it."""

    msgid: str
    infno: str
    purpose: str                # identify register diagnose upload bad-upload presettle settle cancel old-cancel
    psn_no: str
    client: int = 0
    mdtrt_id: str = ""
    seq: int = 0                # the order the HIS first sent it in (over all clients)
    target: str | None = None   # a cancel: the setl_id it cancels
    medfee: str | None = None   # a settlement: the amount the HIS asked for
    heard: list[Heard] = field(default_factory=list)
    request: bytes = field(default=b"", repr=False, compare=False)  # the bytes sent, for a resubmission

    @property
    def last(self) -> Heard | None:
        return self.heard[-1] if self.heard else None

    def told_ok(self) -> bool:
        """What the HIS believes: the bureau did it (for a settlement: the patient is settled)."""
        h = self.last
        return h is not None and h.status == 200 and h.infcode == 0 and h.state in IN_FORCE

    def promised(self) -> bool:
        """An upload fep acknowledged (infcode 0, or QUEUED): fep promised to deliver it."""
        return any(h.status == 200 and h.infcode == 0 for h in self.heard)

    def final(self) -> bool:
        return self.last is not None and self.last.state in FINAL


@dataclass
class JRow:
    """One journal row, as an auditor reads it."""

    id: int
    msgid: str
    infno: str
    psn_no: str | None
    state: str
    infcode: int | None = None  # of the stored answer
    err_msg: str = ""
    setl_id: str | None = None
    medfee: str | None = None
    cancels: str | None = None
    related: str | None = None
    resolver: str | None = None
    note: str = ""
    late: bool = False


@dataclass
class BAnswer:
    """An answer the bureau stored: it processed that msgid, the pos-th of all."""

    pos: int
    msgid: str
    infno: str
    infcode: int | None
    err_msg: str = ""


@dataclass
class Views:
    his: dict[str, HisTrade]
    journal: dict[str, JRow]
    settlements: list[dict[str, Any]]  # the bureau's settlement rows (fep.sim.ledger.SETTLEMENT_COLUMNS)
    answers: list[BAnswer]             # in the order the bureau processed them
    provoked: tuple[str, ...] = PROVOKED_BUSINESS

    def __post_init__(self) -> None:
        self.settle_by_msgid = {s["msgid"]: s for s in self.settlements if s["kind"] == "settle"}
        self.cancel_by_msgid = {s["msgid"]: s for s in self.settlements if s["kind"] == "cancel"}
        self.by_setl_id = {s["setl_id"]: s for s in self.settlements}
        self.cancels_of: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for s in self.settlements:
            if s["kind"] == "cancel" and s.get("refd_setl_id"):
                self.cancels_of[s["refd_setl_id"]].append(s)
        self.answer_by_msgid = {a.msgid: a for a in self.answers}

    # ---- each view's word on one msgid --------------------------------------------------------------
    def bureau_outcome(self, msgid: str, infno: str) -> str:
        """done | refused | undone (reversed) | never (no trace at the bureau)."""
        row = self.settle_by_msgid.get(msgid) if infno == "2207" else (
            self.cancel_by_msgid.get(msgid) if infno == "2208" else None)
        if row is not None:
            return "undone" if row["state"] == "reversed" else "done"
        a = self.answer_by_msgid.get(msgid)
        if a is None:
            return "never"
        return "done" if a.infcode == 0 else "refused"

    @staticmethod
    def journal_outcome(j: JRow) -> str:
        """done | refused | undone | never | not yet | open."""
        if j.state in IN_FORCE:
            return "done" if j.infcode == 0 else "refused"
        return {"REVERSED": "undone", "NOT_NEEDED": "never", "NOT_SENT": "never", "QUEUED": "not yet"}.get(
            j.state, "open")

    def bureau_says(self, msgid: str) -> str:
        parts = []
        for row in (self.settle_by_msgid.get(msgid), self.cancel_by_msgid.get(msgid)):
            if row is not None:
                extra = f" of {row['refd_setl_id']}" if row["kind"] == "cancel" else ""
                cancelled = [c["setl_id"] for c in self.cancels_of.get(row["setl_id"], [])]
                parts.append(f"{row['kind']} {row['setl_id']}{extra} {row['state']} medfee {row['medfee']} "
                             f"visit {row['mdtrt_id']}" + (f" (cancel rows {', '.join(cancelled)})" if cancelled else ""))
        a = self.answer_by_msgid.get(msgid)
        if a is not None:
            parts.append(f"answer #{a.pos} {a.infno} infcode {a.infcode}"
                         + (f" «{_short(a.err_msg, 70)}»" if a.infcode != 0 else ""))
        return "; ".join(parts) or "no trace (never processed)"

    def journal_says(self, msgid: str) -> str:
        j = self.journal.get(msgid)
        if j is None:
            return "no row"
        s = f"{j.state} infcode {j.infcode}"
        if j.setl_id or j.cancels:
            s += f" setl {j.setl_id} medfee {j.medfee}" + (f" cancels {j.cancels}" if j.cancels else "")
        if j.note:
            s += f" note «{_short(j.note, 90)}»"
        if j.resolver:
            child = self.journal.get(j.resolver)
            s += f"; resolver {j.resolver} {child.infno + ' ' + child.state if child else '(no row)'}"
        if j.late:
            s += "; late answer kept"
        return s

    def his_says(self, msgid: str) -> str:
        t = self.his.get(msgid)
        if t is None:
            return "not an HIS msgid"
        head = f"{t.infno} {t.purpose} #{t.seq} psn {t.psn_no} visit {t.mdtrt_id or '-'}"
        if t.target:
            head += f" cancels {t.target}"
        if t.medfee:
            head += f" medfee {t.medfee}"
        heard = [h.brief() for h in t.heard]
        if len(heard) > 4:
            heard = heard[:1] + [f"… {len(heard) - 3} more …"] + heard[-2:]
        return f"{head}: " + (" → ".join(heard) if heard else "heard nothing")

    def three(self, msgid: str) -> dict[str, str]:
        return {"his": self.his_says(msgid), "journal": self.journal_says(msgid), "bureau": self.bureau_says(msgid)}


@dataclass
class Finding:
    msgid: str
    why: str
    also: tuple[str, ...] = ()  # msgids whose three views help to read this one


@dataclass
class Verdict:
    figures: dict[str, list[Finding]]
    business_parks: list[Finding]       # needs attention with a business reason the run provoked: allowed
    held_behind_business: list[Finding]  # queued behind such a park of the same person: waits by design
    info: dict[str, Any]

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.figures.items()}

    def failed(self) -> list[str]:
        return [k for k, v in self.figures.items() if v]


# ---- the judge ----------------------------------------------------------------------------------------------
def judge(v: Views) -> Verdict:
    """Compare the three views. A pure function: no process, file or clock is touched."""
    f: dict[str, list[Finding]] = {k: [] for k in FIGURES}
    his = v.his

    # What the HIS believes about money: settlements it was told succeeded, cancels it was told succeeded.
    told_settled = {m: t for m, t in his.items() if t.infno == "2207" and t.told_ok()}
    told_cancels = {m: t for m, t in his.items() if t.infno == "2208" and t.told_ok()}
    cancelled_by_his = {t.target for t in told_cancels.values() if t.target}

    # 1. HIS told settled/cancelled, the bureau disagrees.
    for m, t in told_settled.items():
        h, s = t.last, v.settle_by_msgid.get(m)
        assert h is not None
        also: tuple[str, ...] = ()
        if s is None:
            why = f"told settled ({h.setl_id}); the bureau has no settlement for this msgid"
        elif s["state"] == "reversed":
            why = f"told settled ({h.setl_id}); the bureau reversed {s['setl_id']}"
        elif h.setl_id != s["setl_id"]:
            why = f"told setl_id {h.setl_id}; the bureau's is {s['setl_id']}"
        elif h.medfee is not None and _dec(h.medfee) != _dec(s["medfee"]):
            why = f"told medfee {h.medfee}; the bureau holds {s['medfee']}"
        elif s["state"] == "cancelled" and not any(
                c["msgid"] in told_cancels for c in v.cancels_of.get(s["setl_id"], []) if c["state"] != "reversed"):
            rows = v.cancels_of.get(s["setl_id"], [])
            cancels = ", ".join(f"{c['setl_id']} (msgid {c['msgid']})" for c in rows)
            why = f"the bureau holds {s['setl_id']} cancelled by {cancels or '?'}; the HIS never heard that cancel succeed"
            also = tuple(c["msgid"] for c in rows)
        else:
            continue
        f["told_settled_bureau_disagrees"].append(Finding(m, why, also))
    for m, t in told_cancels.items():
        c = v.cancel_by_msgid.get(m)
        s = v.by_setl_id.get(t.target or "")
        if c is None:
            why = f"told {t.target} cancelled; the bureau has no cancel for this msgid"
        elif c["state"] == "reversed":
            why = f"told {t.target} cancelled; the bureau reversed the cancel {c['setl_id']}"
        elif c.get("refd_setl_id") != t.target:
            why = f"told {t.target} cancelled; the bureau's cancel {c['setl_id']} cancels {c.get('refd_setl_id')}"
        elif s is None or s["state"] != "cancelled":
            why = f"told {t.target} cancelled; the bureau holds it {s['state'] if s else 'not at all'}"
        else:
            continue
        f["told_settled_bureau_disagrees"].append(Finding(m, why, (s["msgid"],) if s else ()))

    # 2. The bureau holds money the HIS was not told about.
    for m, s in v.settle_by_msgid.items():
        if s["state"] in ("live", "cancelled") and m not in told_settled:
            t = his.get(m)
            heard = t.last.brief() if t and t.last else ("nothing" if t else "nothing: not an HIS msgid")
            f["bureau_money_his_not_told"].append(Finding(
                m, f"the bureau holds settlement {s['setl_id']} ({s['state']}, medfee {s['medfee']}); the HIS was "
                   f"last told: {heard}"))

    # 3. Double charge: one visit settled twice, at the bureau or in what the HIS was told.
    live_by_visit: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in v.settle_by_msgid.values():
        if s["state"] == "live":
            live_by_visit[s["mdtrt_id"]].append(s)
    for visit, rows in live_by_visit.items():
        rows.sort(key=lambda r: _int(r["setl_id"]) or 0)
        for extra in rows[1:]:
            f["double_charge"].append(Finding(extra["msgid"], f"visit {visit} has {len(rows)} live settlements at the "
                                                              f"bureau: {', '.join(r['setl_id'] for r in rows)}",
                                              tuple(r["msgid"] for r in rows if r is not extra)))
    his_by_visit: dict[str, list[HisTrade]] = defaultdict(list)
    for t in told_settled.values():
        if t.last and t.last.setl_id not in cancelled_by_his:
            his_by_visit[t.mdtrt_id].append(t)
    for visit, ts in his_by_visit.items():
        ts.sort(key=lambda t: t.seq)
        for extra in ts[1:]:
            if not any(d.msgid == extra.msgid for d in f["double_charge"]):
                f["double_charge"].append(Finding(extra.msgid, f"the HIS was told visit {visit} is settled "
                                                               f"{len(ts)} times: {', '.join(t.msgid for t in ts)}",
                                                  tuple(t.msgid for t in ts if t is not extra)))

    # Parks: a business reason is one the run provoked (an unknown national code, the injected business
    # refusal), and only while the bureau does not hold the trade as done.
    def park_reason(m: str) -> tuple[bool, str]:
        j, t = v.journal.get(m), his.get(m)
        infno = j.infno if j else (t.infno if t else "?")
        texts = []
        if j is not None:
            texts += [j.note, j.err_msg]
            child = v.journal.get(j.resolver or "")
            if child is not None:
                texts += [child.note, child.err_msg]
        a = v.answer_by_msgid.get(m)
        if a is not None and a.infcode != 0:
            texts.append(a.err_msg)
        if t is not None and t.last is not None:
            texts.append(t.last.err_msg)
        hits = sorted({p for p in v.provoked for x in texts if x and p in x})
        said = _short(j.note if j else (t.last.err_msg if t and t.last else ""), 120)
        if v.bureau_outcome(m, infno) == "done":
            return False, f"parked ({said}), but the bureau holds it as done"
        if not hits:
            return False, f"parked: {said}"
        return True, f"parked for a provoked business refusal ({', '.join(hits)}): {said}"

    parked = {j.msgid for j in v.journal.values() if j.state == "NEEDS_ATTENTION" and (
        j.related is None or (v.journal.get(j.related) and v.journal[j.related].state != "NEEDS_ATTENTION"))}
    parked |= {m for m, t in his.items() if t.last is not None and t.last.state == "NEEDS_ATTENTION"}
    business: dict[str, str] = {}
    for m in sorted(parked, key=lambda m: (v.journal[m].id if m in v.journal else 1 << 60, m)):
        ok, why = park_reason(m)
        if ok:
            business[m] = why
        else:
            f["needs_attention_no_reason"].append(Finding(m, why))
    # The first business park of each person, in the order the HIS sent: by design (docs/trade-life.md,
    # 'ordering has a failure policy') the person's later uploads wait behind it until a person acts.
    park_seq: dict[str, int] = {}
    park_of: dict[str, str] = {}
    for m in business:
        t = his.get(m)
        if t is not None and t.infno in DEFERRABLE and t.seq < park_seq.get(t.psn_no, 1 << 60):
            park_seq[t.psn_no], park_of[t.psn_no] = t.seq, m
    held: list[Finding] = []

    def behind_business_park(t: HisTrade | None, j: JRow | None) -> bool:
        if t is None or t.infno not in DEFERRABLE or t.seq <= park_seq.get(t.psn_no, 1 << 60):
            return False
        states = {j.state if j else None, t.last.state if t.last else None} - {None}
        return bool(states) and states <= {"QUEUED"}

    # 4. Promised uploads undelivered.
    for m, t in sorted(his.items(), key=lambda kv: kv[1].seq):
        if t.infno not in DEFERRABLE or not t.promised() or v.bureau_outcome(m, t.infno) == "done":
            continue
        if m in business:
            continue  # listed with the business parks
        j = v.journal.get(m)
        if behind_business_park(t, j):
            held.append(Finding(m, f"queued behind the business park of person {t.psn_no}", (park_of[t.psn_no],)))
            continue
        b = v.bureau_outcome(m, t.infno)
        how = "queued" if any(h.state == "QUEUED" for h in t.heard) else "delivered (infcode 0)"
        f["upload_undelivered"].append(Finding(m, f"the HIS was told {how}; the bureau: {b}; the journal: "
                                                  f"{j.state if j else 'no row'}"))

    # 5. Uploads in the order the HIS sent them, per person, against the order the bureau processed them.
    per_person: dict[str, list[HisTrade]] = defaultdict(list)
    for t in his.values():
        if t.infno in DEFERRABLE:
            per_person[t.psn_no].append(t)
    for psn, ts in per_person.items():
        ts.sort(key=lambda t: t.seq)
        latest: BAnswer | None = None
        for t in ts:
            a = v.answer_by_msgid.get(t.msgid)
            if a is None:
                continue
            if latest is not None and a.pos < latest.pos:
                f["upload_out_of_order"].append(Finding(
                    t.msgid, f"person {psn}: the HIS sent it (#{t.seq}) after {latest.msgid} "
                             f"(#{his[latest.msgid].seq}); the bureau processed it first (#{a.pos} before #{latest.pos})",
                    (latest.msgid,)))
            if latest is None or a.pos > latest.pos:
                latest = a

    # 6. Unresolved at the end, in the HIS's view or the journal's.
    for m, t in sorted(his.items(), key=lambda kv: kv[1].seq):
        h = t.last
        if h is None or h.state in OPEN or h.state == "?":
            j = v.journal.get(m)
            if behind_business_park(t, j):
                if not any(x.msgid == m for x in held):
                    held.append(Finding(m, f"queued behind the business park of person {t.psn_no}",
                                        (park_of[t.psn_no],)))
                continue
            f["unresolved"].append(Finding(m, f"the HIS's last answer: {h.brief() if h else 'none (fep never answered)'}"))
    seen = {x.msgid for x in f["unresolved"]} | {x.msgid for x in held}
    for j in sorted(v.journal.values(), key=lambda j: j.id):
        if j.state in OPEN and j.msgid not in seen:
            t = his.get(j.msgid)
            if t is not None and behind_business_park(t, j):
                held.append(Finding(j.msgid, f"queued behind the business park of person {t.psn_no}",
                                    (park_of[t.psn_no],)))
                continue
            f["unresolved"].append(Finding(j.msgid, f"the journal holds it {j.state} ({j.infno}"
                                                    + (f", resolving {j.related})" if j.related else ")")))

    # 7. The journal and the bureau.
    for j in sorted(v.journal.values(), key=lambda j: j.id):
        if j.related is not None or j.infno not in STATEFUL:
            continue
        jc = v.journal_outcome(j)
        if jc == "open":
            continue  # counted as unresolved or as needs attention
        bc = v.bureau_outcome(j.msgid, j.infno)
        why = ""
        if jc == "done" and bc != "done":
            why = f"the journal holds it done ({j.state} infcode 0); the bureau: {bc}"
        elif bc == "done" and jc != "done":
            why = f"the bureau did it; the journal holds it {j.state} (infcode {j.infcode})"
        elif jc == "undone" and bc != "undone":
            why = f"the journal holds it REVERSED; the bureau: {bc}"
        elif jc == "done" and j.infno == "2207":
            s = v.settle_by_msgid.get(j.msgid)
            if s and (s["setl_id"] != j.setl_id or (j.medfee is not None and _dec(j.medfee) != _dec(s["medfee"]))):
                why = f"journal setl {j.setl_id} medfee {j.medfee}; bureau setl {s['setl_id']} medfee {s['medfee']}"
        elif jc == "done" and j.infno == "2208":
            c = v.cancel_by_msgid.get(j.msgid)
            if c and (c["setl_id"] != j.setl_id or c.get("refd_setl_id") != j.cancels):
                why = (f"journal: cancel {j.setl_id} of {j.cancels}; bureau: cancel {c['setl_id']} of "
                       f"{c.get('refd_setl_id')}")
        if why:
            f["journal_vs_bureau"].append(Finding(j.msgid, why))
    for a in v.answers:
        if a.infcode == 0 and a.msgid not in v.journal:
            f["journal_vs_bureau"].append(Finding(a.msgid, f"the bureau processed {a.infno} (infcode 0); the journal "
                                                           f"has no such msgid"))

    # 8. What the HIS heard and what the journal holds.
    for m, t in sorted(his.items(), key=lambda kv: kv[1].seq):
        j, h = v.journal.get(m), t.last
        why = ""
        other = next((x.fep_msgid for x in t.heard if x.fep_msgid and x.fep_msgid != m), None)
        if other:
            why = f"fep answered under another msgid ({other})"
        elif j is None:
            held200 = next((x for x in t.heard if x.status == 200 and x.state != "REFUSED"), None)
            if held200 is not None:
                why = f"lost: the HIS heard fep hold it ({held200.brief()}); the journal has no row"
        elif h is None:
            why = f"the journal holds it {j.state}; the HIS never heard an answer, not even to a lookup"
        elif h.state in ("REFUSED", "ABSENT"):
            why = f"the HIS was told it is not taken ({h.brief()}); the journal holds it {j.state}"
        elif h.state != j.state:
            why = f"the HIS's last answer says {h.state}; the journal holds {j.state}"
        elif h.state in IN_FORCE and (h.infcode != j.infcode or (t.infno in ("2207", "2208") and h.infcode == 0 and (
                h.setl_id != j.setl_id or (h.medfee is not None and _dec(h.medfee) != _dec(j.medfee))))):
            why = (f"the HIS heard infcode {h.infcode} setl {h.setl_id} medfee {h.medfee}; the journal holds "
                   f"infcode {j.infcode} setl {j.setl_id} medfee {j.medfee}")
        if why:
            f["his_vs_journal"].append(Finding(m, why))

    # 9. Refunds go last settlement first: no cancel of a settlement while a later one of the person was in force.
    settles_by_person: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in v.settle_by_msgid.values():
        settles_by_person[s["psn_no"]].append(s)
    for c in v.cancel_by_msgid.values():
        if c["state"] == "reversed" or not c.get("refd_setl_id"):
            continue
        cancelled = _int(c["refd_setl_id"]) or 0
        at = _int(c["setl_id"]) or 0
        for later in settles_by_person.get(c["psn_no"], []):
            n = _int(later["setl_id"]) or 0
            if not (cancelled < n < at) or later["state"] == "reversed":
                continue  # (a reversed one is taken as never in force: lenient)
            if any((_int(c2["setl_id"]) or 0) < at for c2 in v.cancels_of.get(later["setl_id"], [])
                   if c2["state"] != "reversed"):
                continue  # it was cancelled before this cancel
            cancelled_row = v.by_setl_id.get(c["refd_setl_id"])
            f["refund_order_broken"].append(Finding(c["msgid"], f"the bureau cancelled {c['refd_setl_id']} (by "
                                                                f"{c['setl_id']}) while the later {later['setl_id']} "
                                                                f"(msgid {later['msgid']}) was in force",
                                                    tuple(x for x in (cancelled_row["msgid"] if cancelled_row else "",
                                                                      later["msgid"]) if x)))
            break
    for m, t in told_cancels.items():
        if t.purpose == "old-cancel" and not any(x.msgid == m for x in f["refund_order_broken"]):
            f["refund_order_broken"].append(Finding(m, f"the HIS cancelled the older {t.target} while a later "
                                                       f"settlement was in force, and was told it succeeded"))

    info = {
        "HIS msgids": len(his),
        "HIS msgids by trade": dict(sorted(Counter(t.infno for t in his.values()).items())),
        "answers heard": sum(len(t.heard) for t in his.values()),
        "settled (HIS told)": len(told_settled),
        "cancelled (HIS told)": len(told_cancels),
        "refund-order refusals heard (provoked, correct)": sum(
            1 for t in his.values() if t.purpose == "old-cancel" and t.last and t.last.state == "REFUSED"
            and "refunds go last settlement first" in t.last.err_msg),
        "journal rows by state": dict(sorted(Counter(j.state for j in v.journal.values()).items())),
        "reversals (journal REVERSED)": sum(1 for j in v.journal.values() if j.state == "REVERSED"),
        "late answers kept": sum(1 for j in v.journal.values() if j.late),
        "bureau settlements": dict(sorted(Counter(f"{s['kind']} {s['state']}" for s in v.settlements).items())),
        "bureau answers stored": len(v.answers),
    }
    business_parks = [Finding(m, why) for m, why in business.items()]
    return Verdict(f, business_parks, held, info)


# ---- reading the journal and the ledger, read-only --------------------------------------------------------
def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _answer_fields(text: str | None) -> tuple[int | None, str, str | None, str | None]:
    if not text:
        return None, "", None, None
    try:
        doc = envelope.loads(text)
    except ValueError:
        return None, "unparsable answer", None, None
    out = doc.get("output") if isinstance(doc.get("output"), dict) else {}
    setl = out.get("setlinfo") if isinstance(out.get("setlinfo"), dict) else {}
    medfee = setl.get("medfee_sumamt")
    return (_int(doc.get("infcode")), _short(doc.get("err_msg"), 200), str(setl["setl_id"]) if setl.get("setl_id")
            else None, str(medfee) if medfee is not None else None)


def _text(stored: str | bytes | None) -> str | None:
    """A body as the journal stores it: text, or a zlib stream of its UTF-8 (long bodies)."""
    return zlib.decompress(stored).decode("utf-8") if isinstance(stored, bytes) else stored


def read_journal(path: Path) -> dict[str, JRow]:
    with _ro(path) as c:
        rows = c.execute("SELECT id, msgid, infno, psn_no, state, answer, setl_id, cancels, related, resolver, note, "
                         "late_answer FROM trades ORDER BY id").fetchall()
    out = {}
    for id_, msgid, infno, psn, state, answer, setl_id, cancels, related, resolver, note, late in rows:
        infcode, err, _, medfee = _answer_fields(_text(answer))
        out[msgid] = JRow(id=id_, msgid=msgid, infno=infno, psn_no=psn, state=state, infcode=infcode, err_msg=err,
                          setl_id=setl_id, medfee=medfee, cancels=cancels, related=related, resolver=resolver,
                          note=note or "", late=bool(late))
    return out


def read_bureau(path: Path) -> tuple[list[dict[str, Any]], list[BAnswer]]:
    from fep.sim.ledger import SETTLEMENT_COLUMNS

    with _ro(path) as c:
        settlements = [dict(zip(SETTLEMENT_COLUMNS, r)) for r in
                       c.execute(f"SELECT {', '.join(SETTLEMENT_COLUMNS)} FROM settlements ORDER BY setl_id")]
        answers = []
        for pos, (msgid, infno, response) in enumerate(
                c.execute("SELECT msgid, infno, response FROM answers ORDER BY rowid"), start=1):
            infcode, err, _, _ = _answer_fields(response)
            answers.append(BAnswer(pos, msgid, infno, infcode, err))
    return settlements, answers


HIS_VIEW = "his-view.json"  # in the run's directory: the HIS view (the other two are files there already)
RUN_INFO = "run.json"


def save_his_view(base: Path, trades: Iterable[HisTrade], run: dict[str, Any]) -> None:
    docs = []
    for t in trades:
        d = asdict(t)
        d.pop("request")
        docs.append(d)
    (base / HIS_VIEW).write_text(json.dumps(docs, ensure_ascii=False))
    (base / RUN_INFO).write_text(json.dumps(run, ensure_ascii=False, indent=1))


def load_views(base: Path) -> tuple[Views, dict[str, Any]]:
    """The three views of a finished run, from its directory: what the HIS heard (saved by the run), the
    journal and the bureau's ledger."""
    his = {}
    for d in json.loads((base / HIS_VIEW).read_text()):
        d["heard"] = [Heard(**h) for h in d["heard"]]
        his[d["msgid"]] = HisTrade(**d)
    settlements, answers = read_bureau(base / "sim" / "ledger.db")
    run = json.loads((base / RUN_INFO).read_text()) if (base / RUN_INFO).exists() else {}
    return Views(his=his, journal=read_journal(base / "lib" / "journal.db"), settlements=settlements,
                 answers=answers), run


# ---- the careful HIS ----------------------------------------------------------------------------------------
PATH = "/fsi/api/rsfComIfsService/callService"
FEE_ITEMS = [("250101001", "30.00"), ("XB02BBB002B002020200002", "38.00"), ("001102000010000", "25.00"),
             ("XA01AAA001A001010100001", "12.50")]


class Tally:
    """Everything the HIS clients heard, shared by them; nothing here comes from the journal or the bureau."""

    def __init__(self, bad_uploads: int) -> None:
        self.lock = threading.Lock()
        self.trades: dict[str, HisTrade] = {}
        self.seq = 0
        self.events: Counter[str] = Counter()
        self.bad_uploads_left = bad_uploads

    def add(self, t: HisTrade) -> None:
        with self.lock:
            self.seq += 1
            t.seq = self.seq
            self.trades[t.msgid] = t

    def note(self, event: str) -> None:
        with self.lock:
            self.events[event] += 1

    def take_bad_upload(self) -> bool:
        with self.lock:
            if self.bad_uploads_left <= 0:
                return False
            self.bad_uploads_left -= 1
            return True

    @property
    def sent(self) -> int:
        return len(self.trades)


class CarefulHis:
    """Numbers its own msgids; asks again with the same msgid while fep is unreachable or says the trade is
    in progress (SENT, also to a resubmission); looks trades up until they are final."""

    PATIENCE = 45.0  # seconds one call keeps asking while fep is unreachable or the trade is in progress

    def __init__(self, world: World, tally: Tally, client: int) -> None:
        self.world, self.tally, self.client = world, tally, client
        self.prefix = f"H43019{client:06d}"  # 12 characters, never fep's own code (H43010000001)
        self.n = 0
        # An HIS configured with every node's address (README, "Two boxes"): it uses one until it is gone
        # or stands by, then the other.
        self.nodes = [Client.unix(str(world.his_socket(n)), timeout=65) for n in (("a", "b") if world.peer else "a")]
        self.http = self.nodes[0]

    def _msgid(self) -> str:
        self.n += 1
        return f"{self.prefix}{time.strftime('%Y%m%d%H%M%S')}{self.n % 10000:04d}"

    def _request(self, method: str, path: str, body: bytes | None, via: str) -> Heard | None:
        try:
            status, doc = self.http.request(method, path, body)
        except (OSError, http.client.HTTPException, ValueError):
            self._other_node()
            return None
        if isinstance(doc, dict) and doc.get("fep_reason") == "standby":  # not taken there: ask the leader
            self.tally.note("standby refusals heard (sent to the other node)")
            self._other_node()
            return None
        return Heard.of(status, doc, via)

    def _other_node(self) -> None:
        self.nodes.append(self.nodes.pop(0))
        self.http = self.nodes[0]

    def call(self, infno: str, input_: dict[str, Any], purpose: str, psn_no: str, mdtrt_id: str = "",
             target: str | None = None, medfee: Decimal | None = None) -> HisTrade:
        t = HisTrade(msgid=self._msgid(), infno=infno, purpose=purpose, psn_no=psn_no, client=self.client,
                     mdtrt_id=mdtrt_id, target=target, medfee=str(medfee) if medfee is not None else None)
        t.request = envelope.dumps({"infno": infno, "msgid": t.msgid, "input": input_, "opter_type": "1",
                                    "opter": "his", "opter_name": "HIS"})
        self.tally.add(t)  # recorded when it is first sent: that is the order the HIS sent it in
        self.again(t)
        for _ in range(2):  # NOT_SENT: it never left fep, so the same msgid may be sent again (a little later)
            if not (t.last and t.last.state == "NOT_SENT"):
                break
            time.sleep(0.3)
            self.tally.note("NOT_SENT msgids sent again, the same msgid")
            self.again(t)
        return t

    def again(self, t: HisTrade) -> HisTrade:
        """Post t's msgid (again), the same bytes, until fep answers something other than 'in progress'."""
        deadline = time.monotonic() + self.PATIENCE
        while True:
            h = self._request("POST", PATH, t.request, "post")
            if h is not None:
                t.heard.append(h)
                if h.state != "SENT":
                    return t
            if time.monotonic() > deadline:
                return t
            time.sleep(0.2)

    def lookup(self, t: HisTrade) -> Heard | None:
        h = self._request("GET", f"/fep/trades/{t.msgid}", None, "lookup")
        if h is not None:
            last = t.last
            if last is None or (last.via, last.status, last.state, last.infcode, last.setl_id) != (
                    h.via, h.status, h.state, h.infcode, h.setl_id):
                t.heard.append(h)  # only what changed: a poll of the same answer says nothing new
        return h

    def until_final(self, t: HisTrade, patience: float) -> HisTrade:
        deadline = time.monotonic() + patience
        while not t.final() and time.monotonic() < deadline:
            time.sleep(0.25)
            self.lookup(t)
        return t


class Workstation:
    """One HIS workstation: its own persons, one visit after another."""

    def __init__(self, world: World, tally: Tally, client: int, people: list[dict[str, str]], rng: random.Random,
                 more: Any) -> None:
        self.his = CarefulHis(world, tally, client)
        self.tally, self.client, self.people, self.rng, self.more = tally, client, list(people), rng, more
        self.settled: dict[str, list[tuple[str, str]]] = defaultdict(list)  # psn -> [(setl_id, mdtrt_id)], in order
        self.visits = 0

    def run(self) -> None:
        while self.people and self.more():
            person = self.rng.choice(self.people)
            if self.settled[person["psn_no"]] and self.rng.random() < 0.08:
                self.cancel(person)
            else:
                self.visit(person)

    def retire(self, person: dict[str, str], why: str) -> None:
        """A parked item holds this person's lane: the cashier stops and calls a person."""
        if person in self.people:
            self.people.remove(person)
            self.tally.note(f"persons retired: {why}")

    # ---- one visit --------------------------------------------------------------------------------------
    def visit(self, p: dict[str, str]) -> None:
        self.visits += 1
        psn, rng = p["psn_no"], self.rng
        bch = f"B{self.client:03d}{self.visits:07d}"
        for _ in range(3):
            t = self.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": p["certno"]}}, "identify", psn)
            if self.his.until_final(t, 10).told_ok():
                break
        else:
            return
        mdtrt = ""
        for _ in range(3):
            t = self.his.call("2201", {"data": {
                "psn_no": psn, "insutype": p["insutype"], "begntime": "2026-11-23 09:00:00", "mdtrt_cert_type": "02",
                "mdtrt_cert_no": p["certno"], "ipt_otp_no": bch, "atddr_no": "D001", "dr_name": "医生",
                "dept_code": "01", "dept_name": "内科", "caty": "A03"}}, "register", psn)
            if self.his.until_final(t, 15).told_ok() and t.last and t.last.mdtrt_id:
                mdtrt = t.last.mdtrt_id
                break
        if not mdtrt:
            return
        diag = {"mdtrtinfo": {"mdtrt_id": mdtrt, "psn_no": psn, "med_type": "11", "begntime": "2026-11-23 09:00:00"},
                "diseinfo": [{"diag_type": "1", "diag_srt_no": "1", "diag_code": "J06.900",
                              "diag_name": "急性上呼吸道感染", "vali_flag": "1"}]}
        ok, _ = self.upload("2203", diag, "diagnose", p, mdtrt)
        if not ok:
            return
        medfee = Decimal("0")
        queued = False
        for batch in range(1 if rng.random() < 0.7 else 2):
            items = rng.sample(FEE_ITEMS, rng.randint(1, 3))
            lines = [self._line(mdtrt, psn, bch, f"{bch}{batch}{i}", code, str(rng.randint(1, 3)), price)
                     for i, (code, price) in enumerate(items)]
            ok, t = self.upload("2204", {"feedetail": lines}, "upload", p, mdtrt)
            if ok is None:
                return
            if ok:
                medfee += sum((Decimal(x["det_item_fee_sumamt"]) for x in lines), Decimal("0"))
                queued = queued or any(h.state == "QUEUED" for h in t.heard)
        if (queued or rng.random() < 0.02) and self.tally.take_bad_upload():
            # A deliberate business refusal: an item the bureau's catalog does not know. Queued behind the
            # visit's upload, it is refused when replayed and parked for a business reason.
            line = self._line(mdtrt, psn, bch, f"{bch}X0", UNKNOWN_CODE, "1", "9.90")
            t = self.his.call("2204", {"feedetail": [line]}, "bad-upload", psn, mdtrt)
            self.tally.note("deliberate bad uploads (unknown national code)")
            if not (t.last and t.last.state in ("ANSWERED", "REFUSED") and t.last.infcode != 0):
                self.retire(p, "a deliberately bad upload may park and hold the lane")
                return
        if medfee == 0:
            return
        if rng.random() < 0.5:
            self.his.until_final(self.his.call("2206", self._settlement(p, mdtrt, bch, medfee), "presettle", psn,
                                               mdtrt), 10)
        self.settle(p, mdtrt, bch, medfee)
        if self.settled[psn] and rng.random() < 0.3:
            self.cancel(p)

    def upload(self, infno: str, input_: dict[str, Any], purpose: str, p: dict[str, str],
               mdtrt: str) -> tuple[bool | None, HisTrade]:
        """A deferrable upload. True: fep took it (infcode 0 or QUEUED); False: it did not; None: the person's
        lane is held by a parked item. With the last msgid sent for it."""
        for _ in range(2):
            t = self.his.call(infno, input_, purpose, p["psn_no"], mdtrt)
            if t.last and t.last.state in ("SENT", "UNKNOWN", "RESOLVING"):
                self.his.until_final(t, 10)
            if t.promised():
                return True, t
            if t.last is None:
                return False, t  # fep never answered: looked up at the end
            if t.last.state == "NEEDS_ATTENTION":
                self.retire(p, "an upload of theirs needs attention")
                return None, t
            if t.last.state == "ANSWERED" and t.last.infcode != 0:
                continue  # refused: upload it again, a new msgid
            return False, t
        return False, t

    def settle(self, p: dict[str, str], mdtrt: str, bch: str, medfee: Decimal) -> None:
        psn = p["psn_no"]
        for _ in range(4):
            t = self.his.call("2207", self._settlement(p, mdtrt, bch, medfee), "settle", psn, mdtrt, medfee=medfee)
            if t.last and t.last.state in ("SENT", "UNKNOWN", "RESOLVING"):
                self.his.until_final(t, 20)
            h = t.last
            if t.told_ok():
                self.settled[psn].append((h.setl_id or "", mdtrt))
                return
            if h is None:
                return  # fep never answered: looked up at the end
            if h.state == "REFUSED":
                if "NEEDS_ATTENTION" in h.err_msg:
                    self.retire(p, "a settlement was refused behind a parked upload")
                    return
                time.sleep(0.5)
                continue
            if h.state in ("REVERSED", "NOT_NEEDED", "NOT_SENT", "ANSWERED"):
                time.sleep(0.2)
                continue  # the patient is not settled: settle again, a new msgid
            return  # still open or parked: the visit stays unsettled; looked up at the end

    def cancel(self, p: dict[str, str]) -> None:
        psn, stack = p["psn_no"], self.settled[p["psn_no"]]
        if len(stack) >= 2 and self.rng.random() < 0.15:
            setl_id, mdtrt = stack[-2]  # out of refund order, on purpose: fep must refuse it
            t = self.his.call("2208", {"data": {"setl_id": setl_id, "mdtrt_id": mdtrt, "psn_no": psn}}, "old-cancel",
                              psn, mdtrt, target=setl_id)
            if t.last and t.last.state in ("SENT", "UNKNOWN", "RESOLVING"):
                self.his.until_final(t, 20)
            if t.told_ok():
                stack.remove((setl_id, mdtrt))
        if not stack:
            return
        setl_id, mdtrt = stack[-1]
        for _ in range(2):
            t = self.his.call("2208", {"data": {"setl_id": setl_id, "mdtrt_id": mdtrt, "psn_no": psn}}, "cancel", psn,
                              mdtrt, target=setl_id)
            if t.last and t.last.state in ("SENT", "UNKNOWN", "RESOLVING"):
                self.his.until_final(t, 20)
            if t.told_ok():
                stack.pop()
                return
            if not (t.last and t.last.state == "ANSWERED"):
                return
            time.sleep(0.2)  # refused: try once more, a new msgid

    @staticmethod
    def _line(mdtrt: str, psn: str, bch: str, sn: str, code: str, cnt: str, price: str) -> dict[str, Any]:
        return {"feedetl_sn": sn, "mdtrt_id": mdtrt, "psn_no": psn, "chrg_bchno": bch, "rx_circ_flag": "0",
                "fee_ocur_time": "2026-11-23 09:30:00", "med_list_codg": code, "medins_list_codg": f"H-{code[-6:]}",
                "cnt": Decimal(cnt), "pric": Decimal(price), "det_item_fee_sumamt": Decimal(cnt) * Decimal(price),
                "bilg_dept_codg": "01", "bilg_dept_name": "内科", "bilg_dr_codg": "D001", "bilg_dr_name": "医生",
                "hosp_appr_flag": "1"}

    @staticmethod
    def _settlement(p: dict[str, str], mdtrt: str, bch: str, medfee: Decimal) -> dict[str, Any]:
        return {"data": {"psn_no": p["psn_no"], "mdtrt_cert_type": "02", "mdtrt_cert_no": p["certno"], "med_type": "11",
                         "medfee_sumamt": medfee, "psn_setlway": "01", "mdtrt_id": mdtrt, "chrg_bchno": bch,
                         "insutype": p["insutype"], "acct_used_flag": "1"}}


def persons(n: int) -> list[dict[str, str]]:
    return [{"psn_no": f"4301000000000000{1000 + i:04d}", "psn_name": f"测试{i}", "certno": f"43010219800101{i:04d}",
             "insutype": "310" if i % 2 else "390", "psn_type": "1101", "balc": "5000.00", "deductible": "50.00",
             "ratio": "0.80", "insuplc_admdvs": "430100"} for i in range(n)]


# ---- the chaos: faults, expired sessions, kills ---------------------------------------------------------------
def fault_combos() -> list[tuple[str, str | None]]:
    """Every fault mode on every trade kind in the mix, and the bureau down."""
    return [("refuse", None)] + [(mode, infno) for mode in FAULT_MODES for infno in MIX]


class Chaos(threading.Thread):
    def __init__(self, world: World, tally: Tally, rng: random.Random, trades: int, fep_kills: int,
                 sim_kills: int, postgres: Postgres | None = None, pg_restarts: int = 0) -> None:
        super().__init__(name="chaos", daemon=True)
        self.world, self.tally, self.rng, self.trades = world, tally, rng, trades
        self.fep_kills, self.sim_kills = fep_kills, sim_kills
        self.postgres, self.pg_restarts, self.pg_restarted = postgres, pg_restarts, 0
        self.stepped_down = 0  # --ha: leaders that exited on losing their lease (as designed), started again
        self.done = threading.Event()
        self.complete = threading.Event()
        self.armed: Counter[str] = Counter()
        self.expiries = 0
        self.fep_killed = self.sim_killed = 0
        self.fep_died = self.sim_died = 0  # exits nobody asked for
        self.errors: list[str] = []
        self._cycle: list[tuple[str, str | None]] = []

    def run(self) -> None:
        while not self.done.is_set():
            time.sleep(self.rng.uniform(0.05, 0.25))
            try:
                self.step()
            except (OSError, AssertionError) as e:
                self.errors.append(f"{type(e).__name__}: {_short(e, 200)}")

    def _due(self, done: int, total: int, offset: float) -> bool:
        return done < total and self.tally.sent >= self.trades * (done + offset) / (total + offset)

    def step(self) -> None:
        w = self.world
        for node in ("a", "b") if w.peer else ("a",):
            if not w.node_alive(node):
                proc = w.fep if node == "a" else w.peer.proc  # type: ignore[union-attr]
                if w.peer and proc is not None and proc.returncode == 3:
                    self.stepped_down += 1
                else:
                    self.fep_died += 1
                w.start_node(node)
        if not w.sim_alive():
            self.sim_died += 1
            w.restart_sim()
        if self._due(self.fep_killed, self.fep_kills, 1.0):
            node = w.leading() or "a" if w.peer else "a"  # --ha: the leader dies
            w.kill_node(node)
            self.fep_killed += 1
            time.sleep(self.rng.uniform(0.0, 0.5))
            w.start_node(node)
        elif self.postgres is not None and self._due(self.pg_restarted, self.pg_restarts, 0.7):
            self.postgres.restart()  # every session ends: the leader loses its lease, both nodes reconnect
            self.pg_restarted += 1
        elif self._due(self.sim_killed, self.sim_kills, 0.5):
            w.kill_sim()
            self.sim_killed += 1
            time.sleep(self.rng.uniform(0.1, 1.0))
            w.restart_sim()
        else:
            r = self.rng.random()
            if r < 0.04:
                w.expire_sessions()
                self.expiries += 1
            elif r < 0.16:
                w.clear_faults()
            elif r < 0.22:
                self.arm(("refuse", None))
            else:
                # A short run meets every combination too: more at once while coverage lags behind progress.
                behind = len(self.armed) < len(fault_combos()) * min(1.0, self.tally.sent / (0.6 * self.trades))
                for _ in range(self.rng.randint(1, 3) + (4 if behind else 0)):
                    self.arm()
        if (self.fep_killed >= self.fep_kills and self.sim_killed >= self.sim_kills and self.expiries
                and self.pg_restarted >= self.pg_restarts
                and len(self.armed) == len(fault_combos())):
            self.complete.set()  # every kill made, every fault combination met, sessions expired

    def arm(self, combo: tuple[str, str | None] | None = None) -> None:
        """Switch on a fault: the next of a shuffled cycle through every combination, so all are met."""
        if combo is None:
            if not self._cycle:
                self._cycle = fault_combos()
                self.rng.shuffle(self._cycle)
            combo = self._cycle.pop()
        mode, infno = combo
        times = self.rng.randint(1, 3)
        if mode == "refuse":
            spec: dict[str, Any] = {"mode": "refuse", "seconds": round(self.rng.uniform(0.5, 2.5), 2)}
        elif mode == "late":
            spec = {"mode": "late", "infno": infno, "times": times, "seconds": round(self.rng.uniform(0.5, 3.0), 2)}
        elif mode.startswith("error"):
            spec = {"mode": "error", "infno": infno, "times": times,
                    "message": BUSY if mode == "error_busy" else BUSINESS_FAULT}
        elif mode == "garble":
            spec = {"mode": "garble", "infno": infno, "times": times, "form": self.rng.choice(GARBLES)}
        else:
            spec = {"mode": mode, "infno": infno, "times": times}
        self.world.fault(**spec)
        self.armed[f"{mode} {infno or 'all'}"] += 1
        # Faults on trades fep makes itself need those trades to flow: a reversal follows a settlement
        # whose answer is dropped, a sign-in follows expired sessions.
        if infno == "2601":
            self.world.fault(mode="drop_after", infno="2207", times=1)
        elif infno == "9001" and self.rng.random() < 0.3:
            self.world.expire_sessions()
            self.expiries += 1


class LeaderWatch(threading.Thread):
    """--ha: which node leads, several times a second; the longest stretch in which none did."""

    def __init__(self, world: World) -> None:
        super().__init__(name="leader-watch", daemon=True)
        self.world = world
        self.done = threading.Event()
        self.longest = 0.0
        self.takeovers = 0

    def run(self) -> None:
        last, lost_at = None, None
        while not self.done.is_set():
            now = self.world.leading()
            if now is None and lost_at is None:
                lost_at = time.monotonic()
            elif now is not None:
                if lost_at is not None:
                    self.longest = max(self.longest, time.monotonic() - lost_at)
                    lost_at = None
                if last is not None and now != last:
                    self.takeovers += 1
                last = now
            time.sleep(0.1)


def export_journal(world: World, path: Path) -> None:
    """--ha: the PostgreSQL journal's trades copied into a SQLite file of the run, the auditor's copy that
    read_journal (and --rejudge) reads as it reads a single box's journal."""
    rows = world.query("SELECT id, msgid, infno, psn_no, state, answer, setl_id, cancels, related, resolver, note, "
                       "late_answer FROM trades ORDER BY id")
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as c:
        c.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, msgid TEXT, infno TEXT, psn_no TEXT, state TEXT, "
                  "answer TEXT, setl_id TEXT, cancels TEXT, related TEXT, resolver TEXT, note TEXT, late_answer TEXT)")
        c.executemany("INSERT INTO trades VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", [tuple(r.values()) for r in rows])


def quiesce(world: World, seconds: float, still_for: float = 12.0) -> tuple[int, float]:
    """Wait (bounded) until the journal has no open trade, or nothing has moved for `still_for` seconds.
    Only a wait: the judge does not use it. Returns the open rows left and the seconds waited."""
    started = time.monotonic()
    last, since = None, time.monotonic()
    open_states = ", ".join(f"'{s}'" for s in OPEN)
    while True:
        try:
            now = [tuple(r.values()) for r in world.query(
                f"SELECT msgid, state, attempts FROM trades WHERE state IN ({open_states})")]
        except Exception:  # noqa: BLE001 - the journal is not there yet, or PostgreSQL restarts: ask again
            now = None
        if now == []:
            return 0, time.monotonic() - started
        if now != last:
            last, since = now, time.monotonic()
        if time.monotonic() - since > still_for or time.monotonic() - started > seconds:
            return len(now or []), time.monotonic() - started
        time.sleep(0.5)


# ---- output -----------------------------------------------------------------------------------------------
def render(verdict: Verdict, views: Views, run: dict[str, Any], first: int) -> tuple[str, dict[str, Any]]:
    counts = verdict.counts()
    doc: dict[str, Any] = {
        "figures": {FIGURES[k]: n for k, n in counts.items()},
        "failed": [FIGURES[k] for k in verdict.failed()],
        "details": {FIGURES[k]: [{"msgid": x.msgid, "why": x.why, **views.three(x.msgid),
                                  "also": {m: views.three(m) for m in x.also}} for x in v[:first]]
                    for k, v in verdict.figures.items() if v},
        "needs attention with a business reason": [{"msgid": x.msgid, "why": x.why} for x in verdict.business_parks],
        "queued behind a business park (by design)": [{"msgid": x.msgid, "why": x.why, "park": x.also[0]}
                                                      for x in verdict.held_behind_business],
        "info": verdict.info,
        "run": run,
    }
    lines = [f"scripts/chaos: seed {run['seed']}, {run['HIS msgids']} HIS trades by {run['clients']} clients for "
             f"{run['persons']} persons in {run['seconds']} s; fep killed {run['fep kills']}x, the simulator "
             f"{run['sim kills']}x, sessions expired {run['session expiries']}x, "
             f"{run['fault combinations armed']} fault combinations armed {run['faults armed']}x", "",
             "must be 0:"]
    if "longest time without a leader (s)" in run:
        lines[1:1] = [f"two nodes on PostgreSQL: the leader killed {run['fep kills']}x, PostgreSQL restarted "
                      f"{run['PostgreSQL restarts']}x; longest time without a leader "
                      f"{run['longest time without a leader (s)']} s"]
    for k, n in counts.items():
        lines.append(f"  {FIGURES[k]:<58} {n:>6}{'   <-- must be 0' if n else ''}")
    for k, found in verdict.figures.items():
        if not found:
            continue
        lines += ["", f"== {FIGURES[k]}: {len(found)}" + (f" (the first {first})" if len(found) > first else "")]
        for x in found[:first]:
            three = views.three(x.msgid)
            lines += [f"  {x.msgid}: {x.why}", f"      HIS:     {three['his']}", f"      journal: {three['journal']}",
                      f"      bureau:  {three['bureau']}"]
            for m in x.also:
                three = views.three(m)
                lines += [f"    and {m}:", f"      HIS:     {three['his']}", f"      journal: {three['journal']}",
                          f"      bureau:  {three['bureau']}"]
    lines += ["", f"needs attention with a business reason (allowed): {len(verdict.business_parks)}"]
    lines += [f"  {x.msgid}: {x.why}" for x in verdict.business_parks[:first]]
    if verdict.held_behind_business:
        lines += [f"queued behind such a park, by design (a person releases it): {len(verdict.held_behind_business)}"]
        lines += [f"  {x.msgid}: {x.why} ({', '.join(x.also)})" for x in verdict.held_behind_business[:first]]
    lines += ["", "info:"]
    for k, v in {**verdict.info, **{k: v for k, v in run.items() if k not in ("faults armed by kind",)}}.items():
        lines.append(f"  {k}: {v}")
    return "\n".join(lines), doc


# ---- main -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trades", type=int, default=300, help="HIS msgids to send in all (default 300)")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of fep (default 3)")
    p.add_argument("--sim-kills", type=int, default=1, help="SIGKILLs of the bureau simulator (default 1)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=8, help="concurrent HIS clients")
    p.add_argument("--persons", type=int, default=0, help="insured persons (default: 4 per client)")
    p.add_argument("--bad-uploads", type=int, default=-1,
                   help="deliberate business refusals (uploads with an unknown code); default: one per 8 persons")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop sending after this long (default: 60 + trades/5)")
    p.add_argument("--drain-seconds", type=float, default=90, help="at most this long for open trades to settle")
    p.add_argument("--first", type=int, default=5, help="msgids shown per non-zero figure")
    p.add_argument("--dir", help="keep the run's state here (default: a temporary directory)")
    p.add_argument("--json", action="store_true", help="print the figures and details as JSON")
    p.add_argument("--rejudge", metavar="DIR", help="judge a finished run's directory again (no new run)")
    p.add_argument("--ha", action="store_true", help="two nodes on a PostgreSQL journal; the leader is the one killed")
    p.add_argument("--pg-restarts", type=int, default=1, help="with --ha: restarts of PostgreSQL (default 1)")
    args = p.parse_args(argv)
    if args.rejudge:
        return verdict(Path(args.rejudge), args)
    n_persons = args.persons or 4 * args.clients
    bad = args.bad_uploads if args.bad_uploads >= 0 else max(1, n_persons // 8)
    max_seconds = args.max_seconds or 60 + args.trades / 5
    rng = random.Random(args.seed)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fep-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    if (base / "lib").exists() or (base / "sim").exists():
        print(f"scripts/chaos: {base} holds an earlier run's journal or ledger; give an empty --dir", file=sys.stderr)
        return 2
    pki.ensure(base / "pki")
    world = World(base, base / "pki")
    postgres = Postgres(ROOT / "var" / f"chaos-pg-{os.getpid()}").start() if args.ha else None
    if postgres is not None:
        world.share_journal(postgres.new_database("fep"))
    people = persons(n_persons)
    # Tries spread over some 25 s, as production's are over half an hour: faults are switched every 50-250 ms
    # here, and a resend given up after the test default's 4 s would be parked for the storm, not the bureau.
    world.configure(sim={"persons": people}, trades={i: {"timeout": 1.5} for i in MIX},
                    fep={"bureau": {"late_grace": 5},
                         "resolution": {"max_tries": 10, "backoff": [0, 0.5, 1, 2, 4]}})
    tally = Tally(bad)
    started = time.monotonic()
    chaos = Chaos(world, tally, random.Random(rng.random()), args.trades, args.kills, args.sim_kills, postgres,
                  args.pg_restarts if postgres else 0)
    watch = LeaderWatch(world)
    try:
        world.start()
        if postgres is not None:
            world.start_peer()
            watch.start()
        stop_at = time.monotonic() + max_seconds

        def more() -> bool:
            return time.monotonic() < stop_at and (tally.sent < args.trades or not chaos.complete.is_set())

        clients = min(args.clients, n_persons)
        workers = [threading.Thread(target=Workstation(world, tally, i, people[i::clients], random.Random(rng.random()),
                                                    more).run, name=f"his-{i}", daemon=True) for i in range(clients)]
        chaos.start()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        chaos.done.set()
        chaos.join()
        # The end: everything up, faults off; what is still open may settle; then the careful HIS looks up
        # every msgid whose last answer was not final.
        if not world.sim_alive():
            world.restart_sim()
        world.clear_faults()
        for node in ("a", "b") if postgres else ("a",):
            if not world.node_alive(node):
                world.start_node(node)
        left, waited = quiesce(world, args.drain_seconds)
        looker = CarefulHis(world, tally, 999)
        lookups, give_up_at = 0, time.monotonic() + 60
        for t in list(tally.trades.values()):
            while not t.final() and time.monotonic() < give_up_at:  # fep unreachable: ask again, for a while
                lookups += 1
                if looker.lookup(t) is not None:
                    break
                time.sleep(0.5)
        watch.done.set()
    except Exception:
        world.stop()
        if postgres is not None:
            postgres.remove()
        print(traceback.format_exc(), file=sys.stderr)
        print(f"scripts/chaos: the run could not be carried out; state kept in {base}", file=sys.stderr)
        return 2
    world.stop()
    if postgres is not None:  # read once every node has stopped, as a single box's journal file is
        export_journal(world, base / "lib" / "journal.db")
        postgres.remove()
    run = {"seed": args.seed, "HIS msgids": tally.sent, "clients": clients, "persons": n_persons,
           "seconds": round(time.monotonic() - started, 1), "fep kills": chaos.fep_killed,
           "sim kills": chaos.sim_killed, "session expiries": chaos.expiries,
           "faults armed": sum(chaos.armed.values()),
           "fault combinations armed": f"{len(chaos.armed)}/{len(fault_combos())}",
           "faults armed by kind": dict(sorted(chaos.armed.items())),
           "fep exits nobody asked for": chaos.fep_died, "simulator exits nobody asked for": chaos.sim_died,
           "chaos control errors": len(chaos.errors), "open rows when the wait ended": left,
           "seconds waited for open trades": round(waited, 1), "final lookups": lookups,
           "HIS events": dict(sorted(tally.events.items())), "state dir": str(base)}
    if postgres is not None:
        run.update({"PostgreSQL restarts": chaos.pg_restarted, "leaders that stepped down (lost the lease)":
                    chaos.stepped_down, "takeovers seen": watch.takeovers,
                    "longest time without a leader (s)": round(watch.longest, 1)})
    save_his_view(base, list(tally.trades.values()), run)
    return verdict(base, args)


def verdict(base: Path, args: argparse.Namespace) -> int:
    views, run = load_views(base)
    found = judge(views)
    text, doc = render(found, views, run, args.first)
    print(json.dumps(doc, ensure_ascii=False, indent=2, default=str) if args.json else text)
    return 1 if found.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
