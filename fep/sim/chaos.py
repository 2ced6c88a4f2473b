"""scripts/chaos: many HIS clients, faults switched on and off, fep killed with SIGKILL and restarted;
then the journal is compared with the bureau's ledger. Exits non-zero if a must-be-zero figure is not 0.

Every HIS client behaves as a careful HIS does: it numbers its own trades (msgid) and, when fep is
unreachable, asks again with the same msgid until fep answers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fep import pki
from fep.sim.world import Visit, World, wait_for

OPEN_STATES = ("SENT", "UNKNOWN", "RESOLVING", "QUEUED")
FAULTS = [
    {"mode": "drop_after", "infno": "2207"}, {"mode": "drop_before", "infno": "2207"},
    {"mode": "reset_mid", "infno": "2207"}, {"mode": "late", "infno": "2207", "seconds": 2},
    {"mode": "drop_after", "infno": "2204"}, {"mode": "late", "infno": "2204", "seconds": 2},
    {"mode": "drop_after", "infno": "2601"}, {"mode": "error", "infno": "2207", "message": "模拟拒付"},
    {"mode": "refuse", "seconds": 1.0}, {"mode": "drop_after", "infno": "2208"},
]


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # msgid -> last answer the HIS heard
    sent: int = 0

    def record(self, msgid: str, answer: dict[str, Any]) -> None:
        with self.lock:
            self.answers[msgid] = answer


class CarefulHis:
    def __init__(self, world: World, tally: Tally, prefix: str) -> None:
        self.world, self.tally, self.prefix = world, tally, prefix
        self.seq = 0

    def msgid(self) -> str:
        self.seq += 1
        return f"{self.prefix}{time.strftime('%Y%m%d%H%M%S')}{self.seq % 10000:04d}"

    def call(self, infno: str, input_: dict[str, Any]) -> dict[str, Any]:
        msgid = self.msgid()
        with self.tally.lock:
            self.tally.sent += 1
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                answer = self.world.his.call(infno, input_, msgid=msgid)
            except OSError:
                time.sleep(0.2)  # fep is down: ask again with the same msgid
                continue
            if answer.get("fep_state") == "SENT":  # still at the bureau
                time.sleep(0.2)
                continue
            if answer.get("fep_state") != "REFUSED":
                self.tally.record(msgid, answer)
            return answer
        raise RuntimeError(f"fep never answered {infno} {msgid}")


class HisProxy:
    """Gives Visit the same interface as fep.client.Client, through a careful HIS."""

    def __init__(self, his: CarefulHis) -> None:
        self.his = his

    def call(self, infno: str, input_: dict[str, Any], msgid: str | None = None, **_: Any) -> dict[str, Any]:
        return self.his.call(infno, input_)


def persons(n: int) -> list[dict[str, str]]:
    return [{"psn_no": f"4301000000000000{1000 + i:04d}", "psn_name": f"测试{i}", "certno": f"43010219800101{i:04d}",
             "insutype": "310" if i % 2 else "390", "psn_type": "1101", "balc": "5000.00", "deductible": "50.00",
             "ratio": "0.80", "insuplc_admdvs": "430100"} for i in range(n)]


def worker(world: World, tally: Tally, people: list[dict[str, str]], stop_at: int, rng: random.Random,
           prefix: str) -> None:
    his = HisProxy(CarefulHis(world, tally, prefix))
    while tally.sent < stop_at:
        person = rng.choice(people)
        visit = Visit(his, person, fees=[("250101001", str(rng.randint(1, 3)), "30.00"),
                                         ("XB02BBB002B002020200002", "1", "38.00")])
        if visit.identify()["infcode"] != 0 or visit.register()["infcode"] != 0:
            continue
        visit.upload_fees()
        settled = visit.settle()
        if settled.get("infcode") == 0 and rng.random() < 0.3:
            visit.cancel(settled["output"]["setlinfo"]["setl_id"])


def chaos(world: World, tally: Tally, rng: random.Random, trades: int, kills: int, done: threading.Event) -> int:
    """Faults switched every 50-250 ms; the kills spread evenly over the run, at a random moment each."""
    killed = 0
    while not done.is_set():
        time.sleep(rng.uniform(0.05, 0.25))
        try:
            if killed < kills and tally.sent >= trades * (killed + 1) / (kills + 1):
                world.kill_fep()
                killed += 1
                time.sleep(rng.uniform(0.0, 0.5))
                world.start_fep()
            elif rng.random() < 0.6:
                world.fault(**rng.choice(FAULTS), times=rng.randint(1, 3))
            else:
                world.clear_faults()
        except OSError:
            pass
    return killed


def report(world: World, tally: Tally) -> dict[str, Any]:
    journal = {r["msgid"]: r for r in world.journal()}
    ledger = world.ledger()
    at_bureau = {s["msgid"]: s for s in ledger}
    live = [s for s in ledger if s["state"] != "reversed"]
    settled_here = {m: r for m, r in journal.items() if r["setl_id"] and r["state"] in ("ANSWERED", "CONFIRMED")}
    per_visit: dict[str, int] = defaultdict(int)
    for s in ledger:
        if s["kind"] == "settle" and s["state"] == "live":
            per_visit[s["mdtrt_id"]] += 1
    told_settled = [m for m, a in tally.answers.items() if a.get("fep_infno") == "2207" and a.get("infcode") == 0]
    answers_order = [m for m, i in world.sim_answers() if i == "2204"]
    position = {m: i for i, m in enumerate(answers_order)}
    out_of_order = 0
    by_person: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in journal.values():
        if r["infno"] == "2204" and r["msgid"] in position:
            by_person[r["psn_no"]].append(r)
    for rows in by_person.values():
        order = [position[r["msgid"]] for r in sorted(rows, key=lambda r: r["id"])]
        out_of_order += sum(1 for a, b in zip(order, order[1:]) if a > b)
    acknowledged_uploads = [m for m, a in tally.answers.items() if a.get("fep_infno") == "2204"]
    figures = {
        "trades accepted": len(tally.answers),
        "lost": sum(1 for m in tally.answers if m not in journal),
        "charged twice": sum(n - 1 for n in per_visit.values() if n > 1),
        "settled at the bureau, unknown to the journal (单边账)": sum(1 for s in live if s["msgid"] not in settled_here),
        "settled in the journal, not at the bureau": sum(1 for m in settled_here if m not in at_bureau
                                                         or at_bureau[m]["state"] == "reversed"),
        "HIS told settled, not settled at the bureau": sum(1 for m in told_settled if m not in at_bureau
                                                           or at_bureau[m]["state"] == "reversed"),
        "unknown outcomes unresolved": sum(1 for r in journal.values() if r["state"] in ("SENT", "UNKNOWN",
                                                                                       "RESOLVING")),
        "deferrable trades undelivered": sum(1 for m in acknowledged_uploads
                                             if journal[m]["state"] not in ("ANSWERED", "NEEDS_ATTENTION")),
        "deferrable trades out of order per person": out_of_order,
    }
    figures["needs attention"] = [f"{r['infno']} {r['msgid']}: {r['note']}" for r in journal.values()
                                  if r["state"] == "NEEDS_ATTENTION" and not r["related"]]
    figures["kills"] = world.kills
    figures["reversals"] = sum(1 for r in journal.values() if r["state"] == "REVERSED")
    figures["late answers kept"] = sum(1 for r in journal.values() if r["late_answer"])
    return figures


MUST_BE_ZERO = ("lost", "charged twice", "settled at the bureau, unknown to the journal (单边账)",
                "settled in the journal, not at the bureau", "HIS told settled, not settled at the bureau",
                "unknown outcomes unresolved", "deferrable trades undelivered",
                "deferrable trades out of order per person")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/chaos", description=__doc__)
    p.add_argument("--trades", type=int, default=300, help="HIS calls to make in all")
    p.add_argument("--kills", type=int, default=3, help="SIGKILLs of the daemon")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--persons", type=int, default=16)
    p.add_argument("--dir", help="keep the run's state here (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fep-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    pki.ensure(base / "pki")
    world = World(base, base / "pki")
    people = persons(args.persons)
    world.configure(sim={"persons": people},
                    trades={"2207": {"timeout": 1.5}, "2204": {"timeout": 1.5}, "2208": {"timeout": 1.5}},
                    fep={"bureau": {"late_grace": 5}})
    tally = Tally()
    try:
        world.start()
        done = threading.Event()
        threads = [threading.Thread(target=worker, args=(world, tally, people[i::args.clients], args.trades,
                                                         random.Random(rng.random()), f"H43010000{i:03d}"),
                                    daemon=True) for i in range(min(args.clients, args.persons))]
        for t in threads:
            t.start()
        killer = threading.Thread(target=chaos, args=(world, tally, random.Random(rng.random()), args.trades,
                                                         args.kills, done))
        killer.start()
        for t in threads:
            t.join()
        done.set()
        killer.join()
        world.clear_faults()
        if world.fep is None or world.fep.poll() is not None:
            world.start_fep()
        wait_for(lambda: not world.journal(f"state IN {OPEN_STATES}"), timeout=120,
                 what="every open trade to be resolved")
        figures = report(world, tally)
    finally:
        world.stop()
    bad = [k for k in MUST_BE_ZERO if figures[k]]
    if args.json:
        print(json.dumps(figures, ensure_ascii=False, indent=2))
    else:
        for k, v in figures.items():
            if isinstance(v, list):
                print(f"{k:>58}: {len(v)}")
                for line in v:
                    print(f"{'':>60}{line}")
            else:
                print(f"{k:>58}: {v}{'   <-- must be 0' if k in bad else ''}")
        print(f"state kept in {base}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
