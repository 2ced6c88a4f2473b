"""Breaker 27: the HIS connection as the transport's producer (d4efabc), tried from outside. An HIS that reads
none of its answers makes fep stop handling its further requests once max_body bytes of answers wait unread;
here the paused connection is reset, half-closed, left idle, refused, sent an Expect: 100-continue, opened many
times at once and used over the UNIX socket, and a settlement waits behind the unread answers. After each,
the three views (what the HIS heard, fep's journal, the bureau's ledger) must agree and the connection must be
gone (his.max_connections_per_peer is small here: a leaked connection would keep the next one out). And the
simulator's remembered envelopes (0431191): many big uploads, then GET /requests/MSGID for old and new."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import closing
from typing import Any

from fep import envelope
from fep.sim.world import LI, ZHANG, Visit, World, his_msgid, said, setl_id, wait_for
from tests.test_breaker24 import body_msgid, closed_by_fep, read_answers, request, reset, settlement_request, \
    uploaded_file
from tests.test_his_http import CALL, _download, _head, _identify, _Messages, _upload_envelope

MAX_BODY = 2 << 20  # his.max_body here: what fep may hold of unread answers per connection
FILE = 1 << 20  # the file downloaded: two of them fill what fep may hold
PER_PEER = 4  # his.max_connections_per_peer here


def start(world: World, **his: Any) -> World:
    world.configure(fep={"his": {"max_body": MAX_BODY, "max_connections_per_peer": PER_PEER, **his}})
    return world.start()


def hung_reader(world: World, over: str = "tcp") -> socket.socket:
    """A connection whose reader reads nothing yet, its receive window small (set before connecting)."""
    if over == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(world.his_socket()))
    else:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", world.his_port))
    s.settimeout(30)
    return s


def downloads(world: World, no: str, name: str, base: int, n: int) -> list[tuple[str, bytes]]:
    return [(m, _download(world, no, name, m)) for m in (his_msgid(base + i) for i in range(n))]


def file_downloads(world: World, base: int, n: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A FILE-sized file uploaded through fep, and `n` downloads of it: (its bytes, [(msgid, body)])."""
    content, no, name = uploaded_file(world, FILE)
    return content, downloads(world, no, name, base, n)


def pipelined(wanted: list[tuple[str, bytes]]) -> bytes:
    """The requests of `wanted`, back to back on one connection, as an HIS pipelines them."""
    return b"".join(request(b) for _, b in wanted)


def stalled(world: World, infno: str = "9102", quiet: float = 1.0) -> int:
    """How many trades of `infno` the journal holds once that number has not moved for `quiet` s."""
    def settled() -> int | None:
        before = len(world.journal("infno=?", (infno,)))
        time.sleep(quiet)
        after = len(world.journal("infno=?", (infno,)))
        return after if after == before and after else None
    return wait_for(settled, timeout=20, what=f"fep to stop handling {infno}")


def journalled(world: World, msgid: str) -> list[dict[str, Any]]:
    return world.journal("his_msgid=? OR msgid=?", (msgid, msgid))


def served_on_fresh_connections(world: World, n: int = PER_PEER) -> list[int]:
    """n TCP connections at once, each an identification: their statuses (503 when a slot is still taken)."""
    socks = [socket.create_connection(("127.0.0.1", world.his_port)) for _ in range(n)]
    try:
        statuses = []
        for i, s in enumerate(socks):
            s.settimeout(20)
            s.sendall(request(_identify(his_msgid(9000 + i))))
        for s in socks:
            got = read_answers(s, 1)
            statuses.append(got[0][0] if got else 0)
        return statuses
    finally:
        for s in socks:
            s.close()


def no_leaked_connections(world: World) -> None:
    """Every slot of his.max_connections_per_peer is free again (within a few seconds)."""
    wait_for(lambda: served_on_fresh_connections(world) == [200] * PER_PEER, timeout=15,
             what=f"{PER_PEER} fresh connections from 127.0.0.1 to be served (a paused one still holds a slot)")


def his_unix_connections(world: World) -> int:
    """fep's connected sockets on its HIS UNIX socket (from /proc: its descriptors, /proc/net/unix)."""
    assert world.fep is not None
    inodes = set()
    for fd in os.listdir(f"/proc/{world.fep.pid}/fd"):
        try:
            link = os.readlink(f"/proc/{world.fep.pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    rows = [line.split() for line in open("/proc/net/unix").read().splitlines()[1:]]
    return sum(1 for r in rows if len(r) > 7 and r[6] in inodes and r[5] == "03" and r[7] == str(world.his_socket()))


def read_all(s: socket.socket, count: int, timeout: float = 30) -> list[tuple[int, dict[str, str], bytes]]:
    s.settimeout(timeout)
    return read_answers(s, count)


# ---- a settlement pipelined behind unread answers --------------------------------------------------------------

def test_a_settlement_behind_unread_answers_is_settled_once_the_his_reads_and_its_resend_charges_once(
        world: World) -> None:
    """The cashier's HIS pipelines 20 downloads of a 1 MB file and then Zhang's settlement, its reader hung:
    fep must stop before the settlement (nothing of it at the bureau or in the journal), and settle it once the
    HIS reads; every answer in order, the settlement's resend under its msgid the same settlement, charged once."""
    start(world)
    content, no, name = uploaded_file(world, FILE)
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    wanted = downloads(world, no, name, 4000, 20)
    msgid = his_msgid(4099)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + request(settlement_request(visit, msgid)))
        handled = stalled(world)
        assert handled <= 12, f"fep handled {handled} of 20 downloads nobody read"
        assert journalled(world, msgid) == [] and world.live() == []
        answers = read_all(s, 21)
    assert [a[0] for a in answers] == [200] * 21
    assert [body_msgid(a) for a in answers[:20]] == [journalled(world, m)[0]["msgid"] for m, _ in wanted]
    assert all(a[2] == content for a in answers[:20])
    heard = envelope.loads(answers[20][2])
    assert heard["infcode"] == 0, said(heard)
    again = visit.settle(msgid)
    assert again["infcode"] == 0 and setl_id(again) == setl_id(heard), said(again)
    assert len(journalled(world, msgid)) == 1 and world.live() == [heard["fep_msgid"]]
    world.assert_ledgers_agree()
    no_leaked_connections(world)


def test_an_his_that_resets_while_paused_drops_the_settlement_not_handed_over_and_its_resend_charges_once(
        world: World) -> None:
    """As above, but the HIS is killed (RST) while fep waits for it to read. The settlement was read (or still
    in the socket) but never handed over: nothing of it may be journalled or sent; the HIS's resend settles Li
    once, and the connection's slot is free again."""
    start(world)
    _, no, name = uploaded_file(world, FILE)
    visit = Visit(world.his, LI)
    visit.up_to_settlement()
    msgid = his_msgid(4199)
    s = hung_reader(world)
    s.sendall(pipelined(downloads(world, no, name, 4100, 6))
              + request(settlement_request(visit, msgid)))
    stalled(world)
    assert journalled(world, msgid) == []
    reset(s)
    time.sleep(1.5)
    assert world.fep_alive()
    assert journalled(world, msgid) == [] and world.live() == []
    answer = visit.settle(msgid)
    assert answer["infcode"] == 0, said(answer)
    assert len(journalled(world, msgid)) == 1 and world.live() == [answer["fep_msgid"]]
    world.assert_ledgers_agree()
    no_leaked_connections(world)


# ---- half-close, idle, refusals while paused ----------------------------------------------------------------------

def test_an_his_that_half_closes_while_paused_hears_every_answer_then_fep_closes(world: World) -> None:
    start(world)
    content, wanted = file_downloads(world, 4200, 12)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + request(_identify(his_msgid(4299))))
        s.shutdown(socket.SHUT_WR)
        stalled(world)
        answers = read_all(s, 13)
        assert [a[0] for a in answers] == [200] * 13
        assert all(a[2] == content for a in answers[:12])
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_idle_timeout_does_not_cut_a_paused_connection_and_closes_it_once_read_and_idle(world: World) -> None:
    """his.idle_timeout 1 s: the HIS reads nothing for 4 s (fep paused, requests owed), then reads. Every
    answer must come (nothing owed is idle), and then fep closes the idle connection."""
    start(world, idle_timeout=1)
    content, wanted = file_downloads(world, 4300, 12)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted))
        stalled(world)
        time.sleep(3)
        answers = read_all(s, 12)
        assert [body_msgid(a) for a in answers] == [journalled(world, m)[0]["msgid"] for m, _ in wanted]
        assert all(a[2] == content for a in answers)
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_a_malformed_request_behind_unread_answers_is_refused_last_and_the_connection_closes(world: World) -> None:
    start(world)
    content, wanted = file_downloads(world, 4400, 8)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + b"NOT HTTP AT ALL\r\n\r\n")
        stalled(world)
        answers = read_all(s, 9)
        assert [a[0] for a in answers] == [200] * 8 + [400]
        assert all(a[2] == content for a in answers[:8])
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_a_header_timeout_behind_unread_answers_gets_408_last_and_the_connection_closes(world: World) -> None:
    """his.header_timeout 1 s: behind the unread answers the HIS begins a request and never ends its headers."""
    start(world, header_timeout=1)
    content, wanted = file_downloads(world, 4500, 8)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + f"POST {CALL} HTTP/1.1\r\nHost: x\r\n".encode())
        stalled(world)
        time.sleep(1.5)
        answers = read_all(s, 9)
        assert [a[0] for a in answers] == [200] * 8 + [408]
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_a_413_for_an_expect_100_continue_body_closes_the_connection_though_the_body_never_comes(
        world: World) -> None:
    """The HIS announces a body over his.max_body with Expect: 100-continue (behind unread answers), gets its
    413 (Connection: close: "need not send it") and sends nothing more, keeping the socket open. fep must not
    hold the connection for ever: within his.body_timeout / idle_timeout (2 s here) it must close it."""
    start(world, body_timeout=2, idle_timeout=2)
    content, wanted = file_downloads(world, 4600, 6)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted)
                  + _head(b"x" * (MAX_BODY + 1), extra="Expect: 100-continue\r\n"))
        stalled(world)
        time.sleep(2)  # the body deadline passes while the 413 still waits behind the unread answers
        answers = read_all(s, 7)
        assert [a[0] for a in answers] == [200] * 6 + [413]
        assert answers[6][1].get("connection") == "close"
        time.sleep(4)
        assert closed_by_fep(s), "fep holds the refused connection open, waiting for a body it told the HIS not to send"
    no_leaked_connections(world)


# ---- 100-continue while paused -------------------------------------------------------------------------------------

def test_expect_100_continue_behind_unread_answers_gets_its_100_after_them_then_its_answer(world: World) -> None:
    start(world)
    content, wanted = file_downloads(world, 4700, 8)
    last = _identify(his_msgid(4799))
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + _head(last, extra="Expect: 100-continue\r\n"))
        stalled(world)
        s.settimeout(30)
        messages = _Messages()
        while len(messages.got) < 9:
            chunk = s.recv(1 << 20)
            assert chunk, "closed before the 100"
            messages.feed(chunk)
        assert [st for st, _, _ in messages.got] == [200] * 8 + [100]
        s.sendall(last)
        while len(messages.got) < 10:
            chunk = s.recv(1 << 20)
            assert chunk, "closed before the answer"
            messages.feed(chunk)
        final = messages.got[9]
        assert final[0] == 200 and envelope.loads(final[2])["infcode"] == 0
    no_leaked_connections(world)


# ---- many paused connections, the UNIX socket -------------------------------------------------------------------

def test_many_paused_connections_leave_other_his_clients_status_and_metrics_responsive(world: World) -> None:
    """Twelve hung readers over the UNIX socket (no per-peer cap there), each paused with requests owed: a
    settlement over TCP, `fep status` and /metrics must still answer promptly; once the hung readers are
    killed, their connections are gone."""
    start(world)
    _, no, name = uploaded_file(world, FILE)
    hung = []
    for k in range(12):
        s = hung_reader(world, "unix")
        s.sendall(pipelined(downloads(world, no, name, 5000 + 20 * k, 6)))
        hung.append(s)
    stalled(world)
    assert his_unix_connections(world) == 12
    t0 = time.monotonic()
    visit = Visit(world.his_tcp, ZHANG)
    visit.up_to_settlement()
    answer = visit.settle()
    assert answer["infcode"] == 0, said(answer)
    done = subprocess.run([sys.executable, "-m", "fep.cli", "status", "--json", "--admin", str(world.admin_socket())],
                          capture_output=True, text=True, timeout=30, cwd=world.dir)
    assert done.returncode == 0, done.stderr
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10).read()
    assert metrics
    assert time.monotonic() - t0 < 15
    for s in hung:
        s.close()  # (a UNIX socket has no RST: the close with unread data is its reset)
    world.assert_ledgers_agree()
    no_leaked_connections(world)
    wait_for(lambda: his_unix_connections(world) == 0, timeout=10,
             what=f"fep's UNIX HIS connections to close (still {his_unix_connections(world)})")


def test_over_the_unix_socket_a_hung_reader_pauses_fep_and_then_hears_every_answer_in_order(world: World) -> None:
    start(world)
    content, wanted = file_downloads(world, 5500, 30)
    with closing(hung_reader(world, "unix")) as s:
        s.sendall(pipelined(wanted))
        handled = stalled(world)
        assert handled <= 12, f"fep handled {handled} of 30 downloads nobody read"
        answers = read_all(s, 30)
    assert [body_msgid(a) for a in answers] == [journalled(world, m)[0]["msgid"] for m, _ in wanted]
    assert all(a[2] == content for a in answers)


# ---- the simulator's remembered envelopes ---------------------------------------------------------------------------

def test_the_bureau_remembers_the_newest_big_uploads_within_64_mb_and_forgets_the_oldest(world: World) -> None:
    """24 uploads of a 3 MB file (4 MB of JSON each, 96 MB in all) after a small identification: GET /requests
    must give the newest uploads byte for byte, and 404 for the oldest, which no longer fit in 64 MB."""
    world.start()
    small = world.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}},
                           msgid=his_msgid(6000))
    first = small["fep_msgid"]
    assert small["infcode"] == 0 and world.bureau_request(first)["infno"] == "1101"
    contents = {}
    for i in range(24):
        content = bytes([i]) * (3 << 20)
        env = _upload_envelope(his_msgid(6001 + i), f"f{i}.zip")
        env["input"]["fsUploadIn"]["in"] = base64.b64encode(content).decode()
        answer = world.his.call("9101", env["input"], msgid=env["msgid"])
        assert answer["infcode"] == 0, said(answer)
        contents[answer["fep_msgid"]] = content
    msgids = list(contents)
    for m in msgids[-10:]:
        got = world.bureau_request(m)
        assert base64.b64decode(got["input"]["fsUploadIn"]["in"]) == contents[m]
    for m in [first] + msgids[:4]:
        try:
            world.bureau_request(m)
        except urllib.error.HTTPError as e:
            assert e.code == 404
        else:
            raise AssertionError(f"{m} is still remembered: more than 64 MB are kept")


def test_a_413_for_an_expect_100_continue_body_on_a_quiet_connection_is_closed_though_the_body_never_comes(
        world: World) -> None:
    """The same 413 with nothing before it on the connection: fep must close within his.body_timeout /
    idle_timeout (2 s here), not wait for ever for a body it told the HIS it need not send."""
    start(world, body_timeout=2, idle_timeout=2)
    with closing(socket.create_connection(("127.0.0.1", world.his_port))) as s:
        s.settimeout(10)
        s.sendall(_head(b"x" * (MAX_BODY + 1), extra="Expect: 100-continue\r\n"))
        answers = read_all(s, 1)
        assert [a[0] for a in answers] == [413] and answers[0][1].get("connection") == "close"
        time.sleep(4)
        assert closed_by_fep(s), "fep holds the refused connection open, waiting for a body it told the HIS not to send"
    no_leaked_connections(world)


def test_a_settlement_resent_on_a_new_connection_while_its_first_copy_waits_paused_is_charged_once(
        world: World) -> None:
    """The HIS's reader hangs with Zhang's settlement pipelined behind unread downloads; its timeout fires and it
    sends the settlement again, same msgid, on a new connection, which settles him. Then the old connection's
    reader wakes and reads everything: fep now hands the first copy over, and it must be the same settlement
    (same setl_id), not a second charge."""
    start(world)
    content, no, name = uploaded_file(world, FILE)
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    msgid = his_msgid(4899)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(downloads(world, no, name, 4800, 10))
                  + request(settlement_request(visit, msgid)))
        stalled(world)
        assert journalled(world, msgid) == []
        resent = Visit(world.his_tcp, ZHANG)
        resent.mdtrt_id, resent.chrg_bchno = visit.mdtrt_id, visit.chrg_bchno
        first = resent.settle(msgid)
        assert first["infcode"] == 0, said(first)
        answers = read_all(s, 11)
    assert [a[0] for a in answers] == [200] * 11 and all(a[2] == content for a in answers[:10])
    late = envelope.loads(answers[10][2])
    assert late["infcode"] == 0 and setl_id(late) == setl_id(first), said(late)
    assert len(journalled(world, msgid)) == 1 and world.live() == [first["fep_msgid"]]
    world.assert_ledgers_agree()
    no_leaked_connections(world)


def test_an_his_that_half_closes_with_more_requests_than_fep_reads_ahead_while_paused_hears_them_all(
        world: World) -> None:
    """30 downloads (more than his.max_pipelined, so fep also stops reading) and SHUT_WR, the reader hung: once it
    reads, every answer in order, then fep closes."""
    start(world)
    content, wanted = file_downloads(world, 4900, 30)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted))
        s.shutdown(socket.SHUT_WR)
        stalled(world)
        answers = read_all(s, 30)
        assert [body_msgid(a) for a in answers] == [journalled(world, m)[0]["msgid"] for m, _ in wanted]
        assert all(a[2] == content for a in answers)
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_connection_close_behind_unread_answers_ends_the_connection_after_its_answer(world: World) -> None:
    """Downloads, then an identification with Connection: close, then another download, the reader hung: once
    read, the downloads and the identification are answered, the last request is not, and fep closes."""
    start(world)
    _, no, name = uploaded_file(world, FILE)
    wanted = downloads(world, no, name, 5100, 6)
    after = his_msgid(5199)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted)
                  + _head(ident := _identify(his_msgid(5198)), extra="Connection: close\r\n") + ident
                  + request(_download(world, no, name, after)))
        stalled(world)
        answers = read_all(s, 8)
        assert [a[0] for a in answers] == [200] * 7
        assert answers[6][1].get("connection") == "close"
        assert closed_by_fep(s)
    assert journalled(world, after) == []
    no_leaked_connections(world)


def test_a_body_over_the_limit_sent_whole_behind_unread_answers_gets_413_last_and_the_connection_closes(
        world: World) -> None:
    start(world)
    content, wanted = file_downloads(world, 5200, 6)
    big = b"x" * (MAX_BODY + 1)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + _head(big))
        stalled(world)
        sender = __import__("threading").Thread(target=s.sendall, args=(big,))
        sender.start()
        answers = read_all(s, 7)
        sender.join(20)
        assert [a[0] for a in answers] == [200] * 6 + [413]
        assert all(a[2] == content for a in answers[:6])
        assert closed_by_fep(s)
    no_leaked_connections(world)


def test_the_bureaus_control_port_serves_big_remembered_envelopes_to_a_hung_pipelining_reader_and_others(
        world: World) -> None:
    """12 uploads of a 3 MB file; a script pipelines 12 GETs of them to the simulator's control port (48 MB of
    answers, past its 32 MiB) and does not read: another GET must still be answered, and once the script reads,
    every envelope comes whole, in order."""
    world.start()
    msgids = []
    for i in range(12):
        env = _upload_envelope(his_msgid(7001 + i), f"f{i}.zip")
        env["input"]["fsUploadIn"]["in"] = base64.b64encode(bytes([i]) * (3 << 20)).decode()
        answer = world.his.call("9101", env["input"], msgid=env["msgid"])
        assert answer["infcode"] == 0, said(answer)
        msgids.append(answer["fep_msgid"])
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with closing(s):
        s.connect(("127.0.0.1", world.control_port))
        s.sendall(b"".join(f"GET /requests/{m} HTTP/1.1\r\nHost: sim\r\n\r\n".encode() for m in msgids))
        time.sleep(2)
        assert world.bureau_request(msgids[0])["msgid"] == msgids[0]
        answers = read_all(s, 12)
    assert [envelope.loads(a[2])["msgid"] for a in answers] == msgids
    assert [base64.b64decode(envelope.loads(a[2])["input"]["fsUploadIn"]["in"])[:1] for a in answers] == \
        [bytes([i]) for i in range(12)]


def test_fep_stops_at_once_on_sigterm_with_paused_connections_owed_requests(world: World) -> None:
    """Three hung readers, each paused with requests owed: `systemctl stop` (SIGTERM) must stop fep promptly,
    and cleanly, not wait on connections that will never drain."""
    start(world)
    _, no, name = uploaded_file(world, FILE)
    hung = [hung_reader(world) for _ in range(3)]
    for k, s in enumerate(hung):
        s.sendall(pipelined(downloads(world, no, name, 7500 + 20 * k, 8)))
    stalled(world)
    assert world.fep is not None
    t0 = time.monotonic()
    world.fep.terminate()
    code = world.fep.wait(15)
    took = time.monotonic() - t0
    for s in hung:
        s.close()
    assert code == 0 and took < 5, f"fep exited {code} after {took:.1f} s"


def test_the_bureau_remembers_the_last_200_envelopes_and_forgets_the_201st_oldest(world: World) -> None:
    """Three big uploads (4 MB of JSON each), then 201 identifications: by count, the big ones and the first
    identification are forgotten and the last 200 kept (what the big ones weighed no longer counts)."""
    world.start()
    big = []
    for i in range(3):
        env = _upload_envelope(his_msgid(8001 + i), f"f{i}.zip")
        env["input"]["fsUploadIn"]["in"] = base64.b64encode(bytes([i]) * (3 << 20)).decode()
        answer = world.his.call("9101", env["input"], msgid=env["msgid"])
        assert answer["infcode"] == 0, said(answer)
        big.append(answer["fep_msgid"])
    small = []
    with closing(socket.create_connection(("127.0.0.1", world.his_port))) as s:
        s.settimeout(30)
        for start_at in range(0, 201, 16):
            n = min(16, 201 - start_at)
            s.sendall(b"".join(request(_identify(his_msgid(8100 + start_at + i))) for i in range(n)))
            small += [body_msgid(a) for a in read_answers(s, n)]
    assert len(small) == 201
    for m in big + small[:1]:
        try:
            world.bureau_request(m)
        except urllib.error.HTTPError as e:
            assert e.code == 404
        else:
            raise AssertionError(f"{m} is still remembered: more than 200 are kept")
    for m in small[1:3] + small[-2:]:
        assert world.bureau_request(m)["msgid"] == m


def read_until_closed(s: socket.socket, pause: float = 0.0) -> tuple[list[tuple[int, dict[str, str], bytes]], str]:
    """Every answer until fep closes: (the answers, "eof" or the error that ended the reading); with `pause`,
    8 KB at a time, sleeping that long between reads."""
    messages = _Messages()
    s.settimeout(20)
    try:
        while chunk := s.recv(8192 if pause else 1 << 16):
            messages.feed(chunk)
            time.sleep(pause)
    except OSError as e:
        return messages.got, type(e).__name__
    return messages.got, "eof"


def test_idle_timeout_over_unread_answers_then_a_pipelined_request_does_not_reset_away_the_answers(
        world: World) -> None:
    """his.idle_timeout 1 s. The HIS pipelines two 1 MB downloads, its reader hung; fep answers both (nothing
    owed: the idle deadline runs) and closes at the deadline, while 2 MB wait unread. The HIS, pipelining,
    sends its next request and then reads. It must get both files whole and then the close (the third
    request may go unanswered): fep must not leave the request unread and close with a reset, which throws
    away the answers still in its socket's send queue."""
    start(world, idle_timeout=1)
    content, wanted = file_downloads(world, 8500, 2)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted))
        stalled(world)
        time.sleep(1.5)  # the idle deadline has passed: fep has stopped reading and closes once written
        s.sendall(request(_identify(his_msgid(8599))))
        time.sleep(0.5)
        answers, end = read_until_closed(s)
    assert [a[0] for a in answers[:2]] == [200, 200] and all(a[2] == content for a in answers[:2]), \
        f"heard {len(answers)} answers, then {end}"
    assert end == "eof", f"the connection ended with {end} after {len(answers)} answers"
    no_leaked_connections(world)


def test_a_malformed_request_behind_unread_answers_with_more_sent_after_it_loses_no_answer(world: World) -> None:
    """Downloads, a request that is not HTTP, and then the HIS goes on sending (its next requests, 1 MB of them,
    after fep has decided to close), the reader hung. Once it reads (slowly): every download whole, then the 400,
    then the close, not a reset that throws the answers away."""
    start(world)
    content, wanted = file_downloads(world, 8700, 4)
    with closing(hung_reader(world)) as s:
        s.sendall(pipelined(wanted) + b"NOT HTTP AT ALL\r\n\r\n")
        stalled(world)
        answers: list[Any] = []
        end = ""

        def read() -> None:
            nonlocal answers, end
            answers, end = read_until_closed(s, pause=0.005)
        reader = __import__("threading").Thread(target=read)
        reader.start()
        try:
            for _ in range(64):  # the HIS's next requests, while it reads
                s.sendall(request(_identify(his_msgid(8799))) * 40)
                time.sleep(0.05)
        except OSError:
            pass
        reader.join(30)
    assert [a[0] for a in answers] == [200] * 4 + [400] and all(a[2] == content for a in answers[:4]), \
        f"heard {[a[0] for a in answers]}, then {end}"
    assert end == "eof", f"the connection ended with {end}"
    no_leaked_connections(world)


def test_with_the_default_max_body_a_hung_reader_of_3_mb_files_is_paused_near_32_mib_not_sooner_nor_later(
        world: World) -> None:
    """his.max_body as shipped (32 MiB): an HIS pipelines 30 downloads of a 3 MB file, its reader hung. fep must
    handle about 32 MiB of them (plus what the kernel takes), not one or two (Twisted's own 64 KiB cap) nor
    all 30, and then give every file whole, in order."""
    world.configure(fep={"his": {"max_connections_per_peer": PER_PEER}})
    world.start()
    content, no, name = uploaded_file(world, 3 << 20)
    wanted = downloads(world, no, name, 8800, 30)
    with closing(hung_reader(world)) as s:
        sender = __import__("threading").Thread(target=s.sendall, args=(pipelined(wanted),))
        sender.start()
        handled = stalled(world)
        assert 10 <= handled <= 15, f"fep handled {handled} of 30 3 MB downloads nobody read"
        answers = read_all(s, 30)
        sender.join(10)
    assert [body_msgid(a) for a in answers] == [journalled(world, m)[0]["msgid"] for m, _ in wanted]
    assert all(a[2] == content for a in answers)
    no_leaked_connections(world)
