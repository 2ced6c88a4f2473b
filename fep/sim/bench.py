"""scripts/bench: where fep stands against the limits of its machine, measured side by side in one run.

- overhead: the same trade mix (1101, 2206) through fep (HTTP, as HIS programs call it) and straight to
  the simulator over the same kind of mutual-TLS connection; median and p99, at 1 and 50 clients;
- throughput: durable trades/s through fep at 1, 50 and 200 clients, the direct figure at 200, and the raw
  limit of this machine for the same journal writes (SQLite, the daemon's settings, the same rows);
- recovery: deferrable trades queued while the bureau is down, then drained; per-person order checked;
- memory: the daemon's resident size idle, and with 100,000 trades journalled and 10,000 queued.

Loopback only; bounded in time (default under 5 minutes, --quick under 1); stops by itself.
Timings are printed, never asserted: targets sit beside each figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import sqlite3
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fep import envelope, pki
from fep.sim.chaos import persons
from fep.sim.world import ZHANG, Visit, World, admitted, wait_for

LENGTH = re.compile(rb"content-length:\s*(\d+)", re.I)


@dataclass
class Figures:
    completed: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.completed / self.seconds

    def q(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(p * len(xs)))] * 1000 if xs else float("nan")


class Mix:
    """The trade mix, with a fresh msgid per request (the bureau keeps an answer per msgid either way)."""

    def __init__(self, people: list[dict[str, str]], visits: dict[str, Visit]) -> None:
        self.people, self.visits = people, visits
        self.n = 0

    def body(self, worker: int) -> bytes:
        self.n += 1
        person = self.people[self.n % len(self.people)]
        if self.n % 2:
            infno, input_ = "1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": person["certno"]}}
        else:
            infno, input_ = "2206", self.visits[person["psn_no"]].settlement_input()
        msgid = f"B{worker:011d}{time.strftime('%Y%m%d%H%M%S')}{self.n % 10000:04d}"
        return envelope.dumps({"infno": infno, "msgid": msgid, "opter_type": "1", "opter": "bench",
                               "opter_name": "bench", "input": input_})


async def _client(host: str, port: int, ctx: ssl.SSLContext | None, mix: Mix, worker: int, start: float,
                  stop: float, out: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx,
                                                   server_hostname="bureau.fep.test" if ctx else None)
    try:
        while (now := time.perf_counter()) < stop:
            body = mix.body(worker)
            writer.write(b"POST /fsi/api/rsfComIfsService/callService HTTP/1.1\r\nHost: fep\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            answer = await reader.readexactly(int(LENGTH.search(head).group(1)))
            if now >= start:  # after the warm-up
                out.append(time.perf_counter() - now)
                if b'"infcode":0' not in answer[:40] and b'"infcode":0,' not in answer:
                    errors.append(1)
    finally:
        writer.close()


def load(host: str, port: int, ctx: ssl.SSLContext | None, mix: Mix, clients: int, seconds: float) -> Figures:
    async def main() -> Figures:
        begin = time.perf_counter()
        start, stop = begin + min(1.0, seconds / 4), begin + min(1.0, seconds / 4) + seconds
        out: list[float] = []
        errors: list[int] = []
        await asyncio.gather(*(_client(host, port, ctx, mix, w, start, stop, out, errors) for w in range(clients)))
        return Figures(len(out), len(errors), seconds, out)

    return asyncio.run(main())


def tls_context(world: World) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(world.pki / "ca.pem"))
    ctx.load_cert_chain(str(world.pki / "hospital.pem"), str(world.pki / "hospital.key"))
    return ctx


def raw_journal_limit(directory: Path, seconds: float, request: bytes, answer: bytes) -> dict[str, float]:
    """The same two durable writes a trade costs (insert the request, store the answer), in WAL with
    synchronous=FULL: one write per commit, and 100 trades per commit."""
    out = {}
    for batch in (1, 100):
        path = directory / f"raw-{batch}.db"
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE trades (id INTEGER PRIMARY KEY, msgid TEXT UNIQUE, state TEXT, request TEXT, "
                     "answer TEXT, created REAL, updated REAL)")
        n, stop = 0, time.perf_counter() + seconds
        begin = time.perf_counter()
        while time.perf_counter() < stop:
            ids = [f"R{n + i:029d}" for i in range(batch)]
            conn.execute("BEGIN")
            for m in ids:
                conn.execute("INSERT INTO trades (msgid, state, request, created, updated) VALUES (?,?,?,?,?)",
                             (m, "SENT", request, time.time(), time.time()))
                if batch == 1:
                    conn.execute("COMMIT")
                    conn.execute("BEGIN")
            if batch > 1:
                conn.execute("COMMIT")
                conn.execute("BEGIN")
            for m in ids:
                conn.execute("UPDATE trades SET state='ANSWERED', answer=?, updated=? WHERE msgid=?",
                             (answer, time.time(), m))
                if batch == 1:
                    conn.execute("COMMIT")
                    conn.execute("BEGIN")
            conn.execute("COMMIT")
            n += batch
        out[f"{batch} per commit"] = n / (time.perf_counter() - begin)
        conn.close()
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fill_journal(world: World, answered: int, queued: int, sample: dict[str, Any]) -> None:
    """100,000 journalled trades the way fep writes them (same columns, same sizes), put in directly:
    pushing them through fep would measure throughput again, not memory."""
    path = world.dir / "lib" / "journal.db"
    conn = sqlite3.connect(path, isolation_level=None)
    now = time.time()
    req, ans = sample["request"], sample["answer"]
    conn.execute("BEGIN")
    for i in range(answered + queued):
        state = "ANSWERED" if i < answered else "QUEUED"
        infno = "2206" if state == "ANSWERED" else "2204"
        conn.execute("INSERT INTO trades (msgid, infno, psn_no, state, payload_hash, request, answer, attempts, "
                     "created, updated) VALUES (?,?,?,?,?,?,?,?,?,?)",
                     (f"M{i:029d}", infno, f"P{i % 5000:019d}", state, "x" * 64, req,
                      ans if state == "ANSWERED" else None, 1, now, now))
    conn.execute("COMMIT")
    conn.close()


def _exchange(sock: socket.socket, body: bytes) -> bytes:
    """One POST on a persistent connection; the answer's body."""
    sock.sendall(b"POST /fsi/api/rsfComIfsService/callService HTTP/1.1\r\nHost: fep\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the connection closed before the answer")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(LENGTH.search(head).group(1))
    parts, have = [rest], len(rest)
    while have < length:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the connection closed in the middle of the answer")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


def big_upload(world: World, person: dict[str, str], ctx: ssl.SSLContext, lines: int, rounds: int) -> dict[str, Any]:
    """A 2301 of `lines` realistic fee lines, through fep and straight to the simulator, alternately, each path
    on its own persistent connection (fep's over plain TCP as HIS programs post, direct over mutual TLS).
    Every upload has fee lines of its own (the bureau refuses a feedetl_sn twice)."""
    visit = admitted(world.his, person)
    via = socket.create_connection(("127.0.0.1", world.his_port))
    direct = ctx.wrap_socket(socket.create_connection(("127.0.0.1", world.sim_port)), server_hostname="bureau.fep.test")
    times: dict[str, list[float]] = {"fep": [], "direct": []}
    size = answer_size = 0
    cpu = 0.0  # the daemon's CPU seconds (every thread) spent on the counted uploads: steady when the machine is busy
    try:
        for r in range(rounds + 1):  # the first round warms both paths up and is not counted
            for path, sock in (("fep", via), ("direct", direct)):
                batch = f"{path[0].upper()}{r:03d}{time.time_ns() % 10**6:06d}"
                msgid = f"B{lines:011d}{time.strftime('%Y%m%d%H%M%S')}{(2 * r + (path == 'fep')) % 10000:04d}"
                body = envelope.dumps({"infno": "2301", "msgid": msgid, "opter_type": "1", "opter": "bench",
                                       "opter_name": "bench", "input": visit.inpatient_fees(lines, batch)})
                used = cpu_seconds(world.fep.pid)
                started = time.perf_counter()
                answer = _exchange(sock, body)
                seconds = time.perf_counter() - started
                if r and path == "fep":
                    cpu += cpu_seconds(world.fep.pid) - used
                if b'"infcode":0' not in answer[:200]:
                    raise AssertionError(f"{path}: the 2301 was not accepted: {answer[:300]!r}")
                if r:
                    times[path].append(seconds)
                size, answer_size = len(body), len(answer)
    finally:
        via.close()
        direct.close()
    fep, direct_ms = (sorted(times[k])[len(times[k]) // 2] * 1000 for k in ("fep", "direct"))
    return {"lines": lines, "request_mb": size / 1e6, "answer_mb": answer_size / 1e6, "rounds": rounds,
            "fep_median_ms": fep, "direct_median_ms": direct_ms, "fep_min_ms": min(times["fep"]) * 1000,
            "direct_min_ms": min(times["direct"]) * 1000, "added_ms": fep - direct_ms,
            "added_ms_per_mb": (fep - direct_ms) / (size / 1e6), "fep_cpu_ms": cpu / rounds * 1000}


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def target(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="under a minute: shorter runs, fewer trades")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dir", help="keep the run's state here")
    p.add_argument("--upload-only", action="store_true", help="only the 5,000-line 2301, through fep and direct")
    args = p.parse_args(argv)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fep-bench-"))
    pki.ensure(base / "pki")
    results: dict[str, Any] = {"quick": args.quick}
    if not args.upload_only:
        everything_else(base, args.quick, results)
    results["upload"] = upload(base / "upload", base / "pki", 5 if args.quick else 15)
    print_results(results, args.json)
    return 0


def upload(directory: Path, pki_dir: Path, rounds: int) -> dict[str, Any]:
    """The big-upload case in a world of its own: its memory does not count in the other daemon's."""
    directory.mkdir(parents=True, exist_ok=True)
    world = World(directory, pki_dir)
    try:
        world.start()
        return big_upload(world, ZHANG, tls_context(world), 5000, rounds)
    finally:
        world.stop()


def everything_else(base: Path, quick: bool, results: dict[str, Any]) -> None:
    secs = 2.0 if quick else 6.0
    drain_n = 1000 if quick else 5000
    world = World(base, base / "pki")
    people = persons(50)
    world.configure(sim={"persons": people})
    try:
        world.start()
        ctx = tls_context(world)
        visits = {}
        for person in people:
            v = Visit(world.his, person, fees=[("250101001", "1", "30.00")])
            v.up_to_settlement()
            visits[person["psn_no"]] = v
        mix = Mix(people, visits)

        overhead = {}
        for clients in (1, 50):
            via = load("127.0.0.1", world.his_port, None, mix, clients, secs)
            direct = load("127.0.0.1", world.sim_port, ctx, mix, clients, secs)
            overhead[clients] = {"fep": via, "direct": direct}
        throughput = {c: load("127.0.0.1", world.his_port, None, mix, c, secs) for c in (1, 50, 200)}
        direct200 = load("127.0.0.1", world.sim_port, ctx, mix, 200, secs)
        sample = world.journal("infno='2206' AND state='ANSWERED'")[-1]
        limit = raw_journal_limit(base, secs / 2, sample["request"].encode(), sample["answer"].encode())
        results["overhead"] = {str(c): {
            "fep_median_ms": o["fep"].q(0.5), "fep_p99_ms": o["fep"].q(0.99),
            "direct_median_ms": o["direct"].q(0.5), "direct_p99_ms": o["direct"].q(0.99),
            "added_median_ms": o["fep"].q(0.5) - o["direct"].q(0.5), "added_p99_ms": o["fep"].q(0.99) - o["direct"].q(0.99),
            "ratio_median": o["fep"].q(0.5) / o["direct"].q(0.5), "errors": o["fep"].errors + o["direct"].errors}
            for c, o in overhead.items()}
        results["throughput"] = {"fep": {str(c): round(f.rate) for c, f in throughput.items()},
                                 "fep_errors": sum(f.errors for f in throughput.values()),
                                 "direct_200": round(direct200.rate),
                                 "raw_journal_trades_per_s": {k: round(v) for k, v in limit.items()}}
        fep200 = throughput[200].rate
        results["throughput"]["fep_200_vs_direct"] = fep200 / direct200.rate
        results["throughput"]["fep_200_vs_raw_batched"] = fep200 / limit["100 per commit"]
        results["throughput"]["fep_200_vs_raw_one_per_commit"] = fep200 / limit["1 per commit"]
        results["recovery"] = drain(world, people, visits, drain_n)
        results["memory"] = memory(world, sample)
    finally:
        world.stop()


def drain(world: World, people: list[dict[str, str]], visits: dict[str, Visit], n: int) -> dict[str, Any]:
    """Queue n uploads while the bureau is down, bring it back, time the drain, check per-person order."""
    world.fault(mode="refuse")
    acks = []
    for i in range(n):
        person = people[i % len(people)]
        v = visits[person["psn_no"]]
        line = {"feedetl_sn": f"Q{i:08d}", "mdtrt_id": v.mdtrt_id, "psn_no": person["psn_no"],
                "chrg_bchno": f"Q{i:08d}", "fee_ocur_time": "2026-11-23 10:00:00", "med_list_codg": "250101001",
                "medins_list_codg": "H-CBC", "cnt": 1, "pric": "30.00", "det_item_fee_sumamt": "30.00"}
        acks.append(world.his.call("2204", {"feedetail": [line]})["fep_state"])
    assert set(acks) == {"QUEUED"}, set(acks)
    started = time.perf_counter()
    world.clear_faults()
    wait_for(lambda: not world.journal("state='QUEUED'"), timeout=600, what="the queue to drain")
    seconds = time.perf_counter() - started
    order = [m for m, i in world.sim_answers() if i == "2204"]
    position = {m: k for k, m in enumerate(order)}
    out_of_order = 0
    rows = world.journal("infno='2204'")
    for person in people:
        mine = [position[r["msgid"]] for r in rows if r["psn_no"] == person["psn_no"] and r["msgid"] in position]
        out_of_order += sum(1 for a, b in zip(mine, mine[1:]) if a > b)
    return {"queued": n, "seconds": seconds, "per_second": n / seconds, "out_of_order": out_of_order,
            "delivered": len(order)}


def memory(world: World, sample: dict[str, Any]) -> dict[str, float]:
    idle = rss_mb(world.fep.pid)
    world.fault(mode="refuse")  # the 10,000 queued stay queued while we look
    world.stop()
    world.start_sim()
    world.fault(mode="refuse")
    fill_journal(world, 100_000, 10_000, sample)
    world.start_fep()
    wait_for(lambda: world.his.request("GET", "/fep/trades/M00000000000000000000000000001")[0] == 200,
             what="fep with a full journal")
    time.sleep(2)
    return {"idle_mb": idle, "full_mb": rss_mb(world.fep.pid)}


def print_results(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r, indent=2, default=float))
        return
    u = r["upload"]
    print(f"Big upload: a 2301 of {u['lines']:,} fee lines ({u['request_mb']:.1f} MB; answer {u['answer_mb']:.1f} MB), "
          f"median of {u['rounds']}")
    print(f"  through fep {u['fep_median_ms']:.0f} ms (min {u['fep_min_ms']:.0f}), "
          f"direct {u['direct_median_ms']:.0f} ms (min {u['direct_min_ms']:.0f}): "
          f"fep adds {u['added_ms']:.0f} ms = {u['added_ms_per_mb']:.1f} ms per MB "
          f"(target <= 10 ms per MB: {target(u['added_ms_per_mb'] <= 10)})")
    print(f"  fep's own CPU (all threads): {u['fep_cpu_ms']:.0f} ms an upload")
    if "overhead" not in r:
        return
    print()
    print("Overhead: the same mix (1101, 2206) through fep over HTTP, and straight to the simulator over mTLS")
    print(f"{'clients':>8} {'fep med':>9} {'direct med':>11} {'added':>8} {'ratio':>6} {'fep p99':>9} "
          f"{'direct p99':>11} {'added':>8}   targets (1 client): added median < 1 ms, added p99 < 5 ms")
    for c, o in r["overhead"].items():
        mark = ""
        if c == "1":
            mark = f"   {target(o['added_median_ms'] < 1)} / {target(o['added_p99_ms'] < 5)}"
        print(f"{c:>8} {o['fep_median_ms']:>8.2f}ms {o['direct_median_ms']:>10.2f}ms {o['added_median_ms']:>7.2f}ms "
              f"{o['ratio_median']:>6.2f} {o['fep_p99_ms']:>8.2f}ms {o['direct_p99_ms']:>10.2f}ms "
              f"{o['added_p99_ms']:>7.2f}ms{mark}")
    t = r["throughput"]
    print("\nThroughput: durable trades per second (each: two journal commits, one bureau round trip)")
    for c, v in t["fep"].items():
        print(f"  through fep, {c:>3} clients: {v:>7}")
    print(f"  direct to the simulator, 200 clients: {t['direct_200']:>7}")
    for k, v in t["raw_journal_trades_per_s"].items():
        print(f"  raw journal limit, {k}: {v:>7} trades/s (2 durable writes each)")
    print(f"  fep at 200 / direct at 200: {t['fep_200_vs_direct']:.2f}   (target >= 0.5: "
          f"{target(t['fep_200_vs_direct'] >= 0.5)})")
    print(f"  fep at 200 / raw batched limit: {t['fep_200_vs_raw_batched']:.2f};  / raw one-per-commit limit: "
          f"{t['fep_200_vs_raw_one_per_commit']:.2f}")
    print(f"  target >= 2000/s at 200 clients: {target(t['fep']['200'] >= 2000)}   errors: {t['fep_errors']}")
    d = r["recovery"]
    print(f"\nRecovery: {d['queued']} uploads queued while the bureau was down; drained in {d['seconds']:.2f} s = "
          f"{d['per_second']:.0f}/s (target >= 1000/s: {target(d['per_second'] >= 1000)}); "
          f"out of order per person: {d['out_of_order']}")
    m = r["memory"]
    print(f"\nMemory: idle {m['idle_mb']:.1f} MB; with 100,000 trades journalled and 10,000 queued {m['full_mb']:.1f} MB "
          f"(target < 150 MB: {target(m['full_mb'] < 150)})")


if __name__ == "__main__":
    sys.exit(main())
