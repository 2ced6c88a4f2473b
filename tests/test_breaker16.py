"""Issue 16 tried from the outside: the active/standby pair on one PostgreSQL journal, as the HIS, the bureau's
ledger and an SRE who has run PostgreSQL failover meet it. Real fep processes, the simulator and a real
PostgreSQL (tests/conftest.py `postgres`); the journal is read with psycopg directly, never through fep.
A test here that fails names, in its docstring, the defect it found; one that passes checks a promise
tests/test_ha.py does not (first start of both nodes, a second failover, queued uploads and a reversal across a
takeover, PostgreSQL down longer than the lease)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from fep.client import Client
from fep.journal import SCHEMA_VERSION
from fep.sim.world import LI, WANG, ZHANG, Visit, World, said, wait_for
from tests.test_ha import TAKEOVER, EitherNode, start_pair

DAY = 86400


def pg(world: World, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """The shared journal read (or written) as a DBA does, in PostgreSQL's own SQL."""
    with psycopg.connect(world.journal_url, autocommit=True, row_factory=dict_row) as db:  # type: ignore[arg-type]
        cur = db.execute(sql, params or None)  # type: ignore[arg-type]
        return list(cur) if cur.description else []


def node_cli(world: World, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fep.cli", *args, "--admin", str(world.admin_socket(node))],
                          capture_output=True, text=True, timeout=60, cwd=world.dir)


def refusal_from(world: World, node: str) -> dict[str, Any]:
    port = world.his_port if node == "a" else world.peer.his_port  # type: ignore[union-attr]
    return Visit(Client.tcp("127.0.0.1", port, timeout=30), WANG).identify()


def test_trades_the_leader_archives_leave_the_shared_journal_for_its_own_disk_and_the_other_node_loses_them(
        world: World, pg_url: str) -> None:
    """The pair keeps 30 days in the journal (journal.keep_days) and archives older trades nightly. On PostgreSQL
    the archive files are written beside journal.path, which on a pair is each node's own catalog cache: the
    night's archive job on node a deletes the finished trades from the shared journal and puts them in a file on
    node a's local disk. Node a's disk dies (the very failure issue 16 is for): node b leads, and `fep show`
    on node b has never heard of the trades, the journal in PostgreSQL no longer holds them, and nothing
    anywhere else does. The trades must stay where both nodes (and PostgreSQL's backups) see them."""
    start_pair(world, pg_url, fep={"journal": {"keep_days": 30}})
    his = Client.tcp("127.0.0.1", world.his_port, timeout=30)
    msgids = []
    for person in (ZHANG, LI):
        answer = Visit(his, person).identify()
        assert answer["infcode"] == 0, said(answer)
        msgids.append(answer["fep_msgid"])
    # As if those identity checks were made 40 days ago.
    pg(world, "UPDATE trades SET created = created - %s, updated = updated - %s", (40 * DAY, 40 * DAY))
    pg(world, "UPDATE events SET at = at - %s", (40 * DAY,))
    moved = node_cli(world, "a", "archive")  # what the 04:00 job does on the leader
    assert moved.returncode == 0, moved.stdout + moved.stderr
    world.kill_fep()  # node a's box is gone, its disk with it
    wait_for(lambda: world.leading(among=("b",)) == "b", timeout=TAKEOVER, what="node b to take over")
    in_pg = pg(world, "SELECT msgid, state FROM trades WHERE msgid = ANY(%s)", (msgids,))
    on_b = {m: node_cli(world, "b", "show", m) for m in msgids}
    local_files = sorted(p.name for p in (world.dir / "lib").glob("*.db"))
    lost = [m for m in msgids if not any(r["msgid"] == m for r in in_pg) and on_b[m].returncode != 0]
    assert not lost, (f"trades gone from the pair: {lost}; archive said {moved.stdout.strip()!r}; in PostgreSQL "
                      f"{in_pg}; `fep show` on node b: {[(m, p.returncode, p.stdout.strip() or p.stderr.strip()) for m, p in on_b.items()]}; "
                      f"files on node a's own disk: {local_files}")


def test_both_nodes_started_at_the_same_instant_on_an_empty_database_make_one_schema_and_one_leader(
        world: World, pg_url: str) -> None:
    """The pair's first start: both boxes boot at once on the hospital's new, empty database. One of them
    creates the schema (the other waits for it), exactly one leads under epoch 1, the other stands by naming
    it, and the first trade goes through the leader."""
    world.share_journal(pg_url)
    world.start_sim()
    world.start_fep(wait=False)
    world.start_peer()
    wait_for(lambda: world.fep.poll() is not None or world.leading() is not None,  # type: ignore[union-attr]
             timeout=30, what="one node to lead")
    time.sleep(2.0)  # a second leader, if any, shows itself by now
    roles = {n: world.role(n).get("role") for n in ("a", "b")}
    alive = {"a": world.fep_alive(), "b": world.peer.alive()}  # type: ignore[union-attr]
    leader_row = pg(world, "SELECT epoch, node FROM leader")
    schema = pg(world, "SELECT value FROM meta WHERE key = 'schema'")
    logs = world.log("run")[-1500:] + world.log("run-b")[-1500:]
    assert alive == {"a": True, "b": True}, (alive, logs)
    assert sorted(roles.values()) == ["leader", "standby"], (roles, leader_row, logs)
    assert len(leader_row) == 1 and leader_row[0]["epoch"] == 1, leader_row
    assert len(schema) == 1, schema
    leader = next(n for n, r in roles.items() if r == "leader")
    standby = "b" if leader == "a" else "a"
    refused = refusal_from(world, standby)
    assert refused.get("fep_reason") == "standby" and leader_row[0]["node"] in refused["err_msg"], refused


def test_after_a_second_failover_each_node_names_the_right_leader_and_the_check_follows(
        world: World, pg_url: str) -> None:
    """Node a is killed, node b leads; node a comes back (systemd) and stands by; later node b is killed and
    node a leads again; node b comes back. At each step the standby's refusal names the node that leads now,
    and keepalived's check (`fep status --check --role leader`) passes on that node only, within seconds.
    Msgids go on across both takeovers, never one the bureau saw before."""
    start_pair(world, pg_url)
    his = EitherNode(world.his_port, world.peer.his_port)  # type: ignore[union-attr]
    assert Visit(his, ZHANG).identify()["infcode"] == 0  # type: ignore[arg-type]
    steps = [("a", "b"), ("b", "a")]  # (killed, then leads)
    for killed, leads in steps:
        world.kill_node(killed)
        wait_for(lambda: world.leading(among=(leads,)) == leads, timeout=TAKEOVER, what=f"node {leads} to lead")
        world.start_node(killed)
        world.wait_for_standby(killed)
        assert Visit(his, LI).identify()["infcode"] == 0  # type: ignore[arg-type]
        refused = refusal_from(world, killed)
        port = world.his_port if leads == "a" else world.peer.his_port  # type: ignore[union-attr]
        assert refused.get("fep_reason") == "standby" and f"{leads} 127.0.0.1:{port}" in refused["err_msg"], \
            (killed, leads, refused)
        checks = {n: node_cli(world, n, "status", "--check", "--role", "leader").returncode for n in ("a", "b")}
        assert checks == {leads: 0, killed: 2}, (killed, leads, checks)
    epoch = pg(world, "SELECT epoch FROM leader")[0]["epoch"]
    assert epoch == 3, epoch
    ours = [r["msgid"] for r in pg(world, "SELECT msgid FROM trades ORDER BY id")]
    assert len(ours) == len(set(ours)), ours


def test_uploads_queued_while_the_bureau_was_down_are_delivered_in_order_by_the_new_leader(
        world: World, pg_url: str) -> None:
    """The bureau is down; the HIS uploads two batches of one patient's fees and hears QUEUED for both. The
    leader dies before the bureau is back. Node b takes over, and when the bureau is back it delivers both
    batches, the first first, each once; the HIS's lookups say so."""
    start_pair(world, pg_url)
    his = EitherNode(world.his_port, world.peer.his_port)  # type: ignore[union-attr]
    visit = Visit(his, ZHANG)  # type: ignore[arg-type]
    visit.open()
    with world.outage():
        first = visit.upload_fees()
        second = visit.another().upload_fees()
        assert first["fep_state"] == second["fep_state"] == "QUEUED", (said(first), said(second))
        world.kill_fep()
        wait_for(lambda: world.leading(among=("b",)) == "b", timeout=TAKEOVER, what="node b to take over")
    queued = [first["fep_msgid"], second["fep_msgid"]]
    for m in queued:
        world.wait_state(m, "ANSWERED", timeout=30)
    at_bureau = [m for m, infno in world.sim_answers() if m in queued]
    heard = {m: his.lookup(m)["fep_state"] for m in queued}
    assert at_bureau == queued, (f"bureau processed {at_bureau}, HIS uploaded {queued}; lookups {heard}; "
                                 f"journal {[(r['msgid'], r['state']) for r in world.journal('infno = %s' % repr('2204'))]}")
    assert heard == {m: "ANSWERED" for m in queued}, heard


def test_the_leader_killed_while_a_reversal_is_at_the_bureau_the_settlement_is_reversed_once(
        world: World, pg_url: str) -> None:
    """The HIS asks for a settlement to be reversed (2601); the bureau takes a while to answer and the leader
    dies meanwhile. Node b takes over, resolves the reversal's unknown outcome, and at the end the bureau holds
    the settlement reversed, once, and the journal and the HIS (asking node b under the same msgid) agree."""
    start_pair(world, pg_url)
    his = EitherNode(world.his_port, world.peer.his_port)  # type: ignore[union-attr]
    visit = Visit(his, ZHANG)  # type: ignore[arg-type]
    visit.up_to_settlement()
    settled = visit.settle(msgid="HIS-SETTLE-R")
    assert settled["infcode"] == 0, said(settled)
    world.fault(mode="late", infno="2601", seconds=3, times=1)
    heard: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: heard.update(
        answer=his.call("2601", visit.reversal_input("HIS-SETTLE-R"), msgid="HIS-REVERSE-R")))
    asking.start()
    wait_for(lambda: world.journal("infno = '2601' AND state = 'SENT'"), what="the reversal to be at the bureau")
    world.kill_fep()
    wait_for(lambda: world.leading(among=("b",)) == "b", timeout=TAKEOVER, what="node b to take over")
    asking.join(120)
    assert "answer" in heard, "the HIS never heard of its reversal"
    wait_for(lambda: not world.journal("state IN ('SENT', 'UNKNOWN', 'RESOLVING', 'REVOKING')"), timeout=60,
             what="every unknown outcome to be resolved")
    ledger = [s for s in world.ledger() if s["msgid"] == settled["fep_msgid"]]
    row = world.journal("msgid = ?", (settled["fep_msgid"],))[0]
    again = his.lookup("HIS-SETTLE-R")
    views = f"HIS heard {said(heard['answer'])}, lookup {again.get('fep_state')}; journal {row['state']}; " \
            f"bureau {ledger}"
    assert [s["state"] for s in ledger] == ["reversed"], views
    assert row["state"] == "REVERSED" and again["fep_state"] == "REVERSED", views
    world.assert_ledgers_agree()


def test_fep_status_on_either_node_says_which_it_is_and_who_leads(world: World, pg_url: str) -> None:
    """The night operator, paged, logs in to node b and runs `fep status` (README: "`fep status` shows `role`
    and `leader`"). It prints "signed in: NO" and nothing about standing by or who leads: the operator takes a
    healthy standby for a box that lost the bureau. Its health check (`fep status --check`, the Zabbix item)
    says the same WARNING. Both must say this node stands by and name the leader."""
    start_pair(world, pg_url)
    shown = node_cli(world, "b", "status")
    checked = node_cli(world, "b", "status", "--check")
    leader = f"a 127.0.0.1:{world.his_port}"
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "standby" in shown.stdout and leader in shown.stdout, \
        f"`fep status` on the standby (JSON says role {world.role('b').get('role')!r}, leader " \
        f"{world.role('b').get('leader')!r}):\n{shown.stdout}\n`fep status --check`: {checked.stdout.strip()}"


def test_the_leader_loses_postgresql_for_longer_than_its_lease_and_nothing_the_his_heard_is_lost(
        world: World, pg_url: str, postgres: Any) -> None:
    """A settlement is at the bureau (it answers late) when PostgreSQL goes down for 12 s, longer than the
    lease timeout: neither node can lead. The HIS, which knows both addresses, keeps asking under its own
    msgid. While the database is down nothing is accepted (every answer is a refusal); once it is back one node
    leads within 10 s, the settlement's outcome is resolved, and what the HIS heard, the journal and the
    bureau's ledger agree; the next patient settles."""
    start_pair(world, pg_url)
    his = EitherNode(world.his_port, world.peer.his_port)  # type: ignore[union-attr]
    visit = Visit(his, ZHANG)  # type: ignore[arg-type]
    visit.up_to_settlement()
    world.fault(mode="late", infno="2207", seconds=3, times=1)
    heard: dict[str, Any] = {}
    asking = threading.Thread(target=lambda: heard.update(answer=visit.settle(msgid="HIS-SETTLE-PG")))
    asking.start()
    wait_for(lambda: world.journal("infno = '2207' AND state = 'SENT'"), what="the settlement to be at the bureau")
    postgres.stop()
    try:
        time.sleep(8)
        during = Visit(EitherNode(world.his_port, world.peer.his_port), LI)  # type: ignore[arg-type]
        try:
            early = during.his._ask(lambda c: c.call("1101", during.identity_input()), until=3)  # type: ignore[attr-defined]
        except AssertionError:
            early = {"infcode": -1, "err_msg": "neither node answered"}
    finally:
        postgres.start()
    back = time.monotonic()
    wait_for(lambda: world.leading() is not None, timeout=TAKEOVER, what="a node to lead once PostgreSQL is back")
    led_after = time.monotonic() - back
    asking.join(120)
    assert early["infcode"] != 0, f"accepted while the journal was down: {early}"
    assert "answer" in heard, "the HIS never heard of its settlement"
    wait_for(lambda: not world.journal("state IN ('SENT', 'UNKNOWN', 'RESOLVING', 'REVOKING')"), timeout=60,
             what="every unknown outcome to be resolved")
    row = world.journal("his_msgid = ?", ("HIS-SETTLE-PG",))[0]
    final = his.lookup("HIS-SETTLE-PG")
    live = {s["msgid"] for s in world.ledger() if s["state"] == "live"}
    views = f"HIS heard {said(heard['answer'])}, lookup {final.get('fep_state')}; journal {row['state']}; " \
            f"bureau live {sorted(live)}; led {led_after:.1f} s after PostgreSQL was back"
    assert final["fep_state"] == row["state"] and (row["msgid"] in live) == (row["state"] == "ANSWERED"), views
    world.assert_ledgers_agree()
    nxt = Visit(his, LI)  # type: ignore[arg-type]
    nxt.up_to_settlement()
    assert nxt.settle()["infcode"] == 0, views


def test_a_standby_of_an_older_fep_does_not_take_over_a_journal_a_newer_fep_migrated(
        world: World, pg_url: str) -> None:
    """A rolling upgrade, as an SRE does one: node a is stopped and upgraded first; its new fep migrates the
    shared journal to the next schema at its start (here: the schema row set as that migration sets it) and then
    fails to come up. Node b, still the old fep (this schema), checked the schema only when it started, and takes over
    a journal it does not know, writing trades into it. It must refuse to lead, as it refuses to start on one,
    naming the schema ("newer than this fep")."""
    start_pair(world, pg_url)
    world.fep.terminate()  # type: ignore[union-attr]
    world.fep.wait(10)  # type: ignore[union-attr]
    pg(world, f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema'")
    time.sleep(3.0)  # node b's lease check has long come round
    leads = world.leading(among=("b",))
    answer = refusal_from(world, "b")
    log = world.log("run-b")
    assert leads != "b" and answer["infcode"] != 0, \
        f"node b (schema {SCHEMA_VERSION}) leads a journal of schema {SCHEMA_VERSION + 1}: role {world.role('b').get('role')}, the HIS heard " \
        f"{said(answer)}; log: {log[-800:]}"


def test_a_leader_that_freezes_in_the_middle_of_journalling_a_send_still_loses_the_lead(
        world: World, pg_url: str) -> None:
    """The leader freezes (swapping, a VM paused: here SIGSTOP) in the middle of the transaction that journals a
    send. Its lease session is idle and PostgreSQL ends it (idle_session_timeout), so node b gets the advisory
    lock; but the frozen node's writer session is "idle in transaction" holding the leader row FOR SHARE, no
    timeout ends such a session, and the frozen box's kernel still answers the keepalives. Node b's epoch bump
    waits on that row lock for as long as node a is frozen: nobody leads, every patient is refused. (To freeze
    node a inside the transaction at will, a DBA's session holds the msgid counter's row while node a numbers a
    trade; the DBA lets go once node a is frozen.) The README promises the hung leader loses the lead."""
    import signal

    start_pair(world, pg_url)
    his = Client.tcp("127.0.0.1", world.his_port, timeout=60)
    assert Visit(his, ZHANG).identify()["infcode"] == 0
    dba = psycopg.connect(world.journal_url)  # type: ignore[arg-type]
    dba.execute("SELECT value FROM meta WHERE key = 'msgid_counter' FOR UPDATE")
    threading.Thread(target=lambda: _quietly(lambda: Visit(his, LI).identify()), daemon=True).start()
    wait_for(lambda: pg(world, "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE "
                               "'%%msgid_counter%%'"), what="node a's writer to wait inside its transaction")
    world.fep.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        dba.rollback()
        dba.close()
        try:
            wait_for(lambda: world.leading(among=("b",)) == "b", timeout=TAKEOVER,
                     what="node b to take over from the frozen leader")
            took_over = True
        except AssertionError:
            took_over = False
        sessions = pg(world, "SELECT application_name, state, wait_event_type, left(query, 60) AS query "
                             "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
        refused = refusal_from(world, "b")
    finally:
        world.fep.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    assert took_over, (f"no leader {TAKEOVER} s after node a froze; the HIS hears from node b: {said(refused)}; "
                       f"the journal's sessions: {sessions}")


def _quietly(call: Any) -> None:
    try:
        call()
    except OSError:
        pass


def test_keepalived_check_on_a_frozen_leader_fails_within_seconds(world: World, pg_url: str) -> None:
    """keepalived runs `fep status --check --role leader` every second (README: interval 1, fall 2). The
    leader freezes (SIGSTOP: its admin socket still accepts connections, nobody answers). Node b takes over
    within seconds, but the check on node a does not come back: the admin client waits 70 s for an answer
    (--timeout 60 is only for jobs). The README's vrrp_script sets no `timeout`, so whether and when the
    virtual address leaves the frozen node is left to keepalived's own defaults, while every HIS request goes
    to a box that cannot answer. The check must fail (non-zero) within a few seconds by itself, as a check
    script keepalived runs each second has to."""
    import signal

    start_pair(world, pg_url)
    world.fep.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    began = time.monotonic()
    try:
        try:
            done = node_cli_within(world, "a", 6.0, "status", "--check", "--role", "leader")
            outcome = f"exit {done.returncode} after {time.monotonic() - began:.1f} s: {done.stdout.strip()}"
            failed_fast = done.returncode != 0
        except subprocess.TimeoutExpired:
            outcome, failed_fast = "no answer after 6 s (killed)", False
        b_leads = world.leading(among=("b",)) == "b"
    finally:
        world.fep.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    assert failed_fast, f"the check on the frozen leader: {outcome}; node b leads meanwhile: {b_leads}"


def node_cli_within(world: World, node: str, seconds: float, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fep.cli", *args, "--admin", str(world.admin_socket(node))],
                          capture_output=True, text=True, timeout=seconds, cwd=world.dir)


def test_a_reload_of_the_standby_does_not_start_the_leaders_nightly_jobs_there(world: World, pg_url: str) -> None:
    """The nightly archive runs at 23:59 on the pair (journal.archive_daily_at). The operator moves it to 00:00
    in both nodes' configs and reloads them, the standby first (`fep reload` on node b). The reload
    reschedules the daily jobs, and on the standby that starts them: node b, standing by, finds today's run
    not done and runs the archive now, deleting the finished trades from the shared journal into a file on its
    own disk. A standby must not run the leader's jobs (they start only on takeover)."""
    import yaml

    start_pair(world, pg_url, fep={"journal": {"keep_days": 30, "archive_daily_at": "23:59"}})
    his = Client.tcp("127.0.0.1", world.his_port, timeout=30)
    answer = Visit(his, ZHANG).identify()
    assert answer["infcode"] == 0, said(answer)
    pg(world, "UPDATE trades SET created = created - %s, updated = updated - %s", (40 * DAY, 40 * DAY))
    pg(world, "UPDATE events SET at = at - %s", (40 * DAY,))
    doc = yaml.safe_load(world.peer.config.read_text())  # type: ignore[union-attr]
    doc["journal"]["archive_daily_at"] = "00:00"
    world.peer.config.write_text(yaml.safe_dump(doc, allow_unicode=True))  # type: ignore[union-attr]
    reloaded = node_cli(world, "b", "reload")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    time.sleep(3.0)
    role = world.role("b").get("role")
    in_pg = pg(world, "SELECT msgid, state FROM trades WHERE msgid = %s", (answer["fep_msgid"],))
    on_b = sorted(p.name for p in (world.peer.dir / "lib").glob("*.db"))  # type: ignore[union-attr]
    runs = pg(world, "SELECT key, doc FROM runs WHERE kind = 'daily' ORDER BY id")
    assert in_pg, (f"node b ({role}) archived {answer['fep_msgid']} out of the shared journal after its reload: "
                   f"files on node b's disk {on_b}; daily runs {runs}; node b's log: {world.log('run-b')[-600:]}")


def test_fep_archive_on_the_standby_is_refused_naming_the_leader(world: World, pg_url: str) -> None:
    """An operator on the wrong box runs `fep archive` on node b, the standby. fep replay, drop and reverse are
    refused there naming the leader; `fep archive` instead runs on the standby and moves the shared journal's
    finished trades into a file on node b's own disk, out of node a's sight."""
    start_pair(world, pg_url, fep={"journal": {"keep_days": 30}})
    answer = Visit(Client.tcp("127.0.0.1", world.his_port, timeout=30), ZHANG).identify()
    assert answer["infcode"] == 0, said(answer)
    pg(world, "UPDATE trades SET created = created - %s, updated = updated - %s", (40 * DAY, 40 * DAY))
    pg(world, "UPDATE events SET at = at - %s", (40 * DAY,))
    done = node_cli(world, "b", "archive")
    in_pg = pg(world, "SELECT msgid FROM trades WHERE msgid = %s", (answer["fep_msgid"],))
    on_a = node_cli(world, "a", "show", answer["fep_msgid"])
    assert done.returncode != 0 and in_pg, \
        (f"`fep archive` on the standby: exit {done.returncode}, {done.stdout.strip() or done.stderr.strip()}; "
         f"in PostgreSQL {in_pg}; `fep show` on the leader: {on_a.stdout.strip() or on_a.stderr.strip()}")



def test_an_upload_a_deposed_leader_queued_is_still_delivered(world: World, pg_url: str) -> None:
    """The bureau is down and a ward's HIS keeps uploading fees: each upload is journalled QUEUED and the HIS
    hears "QUEUED" (fep promises to deliver it). Node a leads with journal.lease_check 2 (allowed: less than
    lease_timeout 3), node b checks every 0.25 s. A DBA's pg_terminate_backend ends node a's lease session;
    node b takes the lease and recovers at once, while node a has not noticed yet. Only moves to SENT are
    fenced with the epoch: node a still journals the uploads it is handed as QUEUED, after the new leader's
    recovery read the queues, and then exits. Nothing ever loads them into node b's queues: when the bureau is
    back they stay QUEUED and are never delivered, though the HIS was told they would be."""
    import yaml

    start_pair(world, pg_url, fep={"journal": {"lease_check": 2}})
    doc = yaml.safe_load(world.peer.config.read_text())  # type: ignore[union-attr]
    doc["journal"]["lease_check"] = 0.25
    world.peer.config.write_text(yaml.safe_dump(doc, allow_unicode=True))  # type: ignore[union-attr]
    world.kill_peer()
    world.start_peer()
    world.wait_for_standby("b")
    visit = Visit(Client.tcp("127.0.0.1", world.his_port, timeout=30), ZHANG)
    visit.open()
    heard: list[str] = []  # the uploads node a answered QUEUED
    late: list[dict[str, Any]] = []
    with world.outage():
        for _ in range(3):  # a race, won most times: node a's next lease check is up to 2 s away
            if world.leading(among=("a",)) != "a":  # node a leads again, node b stands by
                world.kill_peer()
                wait_for(lambda: world.leading(among=("a",)) == "a", timeout=TAKEOVER, what="node a to lead")
                world.start_peer()
            since = _depose_a_while_uploading(world, visit, heard)
            late = pg(world, "SELECT msgid FROM trades WHERE infno = '2204' AND created > %s", (since,))
            world.start_fep()  # systemd starts node a again, as a standby
            if late:
                break
    time.sleep(10)  # the bureau is back: node b replays its queues
    left = pg(world, "SELECT msgid, created FROM trades WHERE infno = '2204' AND state = 'QUEUED'")
    delivered = {m for m, infno in world.sim_answers() if infno == "2204"}
    undelivered = [r for r in left if r["msgid"] in heard and r["msgid"] not in delivered]
    early_left = [r["msgid"] for r in left if r["msgid"] not in {x["msgid"] for x in late}]
    assert not undelivered, (f"the HIS heard QUEUED for {len(heard)} uploads from node a; {len(undelivered)} are "
                             f"still QUEUED 10 s after the bureau came back, never at the bureau (first: "
                             f"{undelivered[:3]}); {len(late)} uploads were journalled after node b's epoch began "
                             f"at {since}; of the uploads journalled before it, still QUEUED: {early_left}")


def _depose_a_while_uploading(world: World, visit: Visit, heard: list[str]) -> float:
    """The HIS uploads to node a back to back while a DBA ends node a's lease session; when node b leads, the
    time its epoch began."""
    stop = threading.Event()

    def hammer() -> None:
        his = Client.tcp("127.0.0.1", world.his_port, timeout=30)
        while not stop.is_set():
            batch = visit.another()
            batch.his = his
            try:
                answer = batch.upload_fees()
            except OSError:
                return  # node a is gone
            if answer.get("fep_state") == "QUEUED":
                heard.append(answer["fep_msgid"])

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    first = len(heard)
    wait_for(lambda: len(heard) >= first + 3, what="the first uploads to be queued")
    pg(world, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
       (f"fep lease a 127.0.0.1:{world.his_port}",))
    wait_for(lambda: not world.fep_alive(), timeout=TAKEOVER, what="node a to stop")
    stop.set()
    worker.join(30)
    wait_for(lambda: world.leading(among=("b",)) == "b", timeout=TAKEOVER, what="node b to lead")
    return float(pg(world, "SELECT since FROM leader")[0]["since"])


def test_while_postgresql_is_down_the_standby_does_not_send_the_his_to_a_leader_that_is_gone(
        world: World, pg_url: str, postgres: Any) -> None:
    """PostgreSQL is down: node a, the leader, lost its lease and stopped; nobody leads until the database is
    back. An HIS that asks node b hears "this fep node stands by; the leader is a ...: send trades there"
    naming a node that no longer leads (nor runs): the cashier's desk sends the patient's trade to a dead
    address and the operator looks for a fault on node a. While no node leads, the refusal must say so."""
    start_pair(world, pg_url)
    postgres.stop()
    try:
        wait_for(lambda: not world.fep_alive(), timeout=TAKEOVER, what="node a to give up its lease")
        time.sleep(1.0)
        refused = refusal_from(world, "b")
        a_alive = world.fep_alive()
    finally:
        postgres.start()
    assert not (refused.get("fep_reason") == "standby" and f"a 127.0.0.1:{world.his_port}" in refused["err_msg"]), \
        f"node a alive: {a_alive}, PostgreSQL down; node b told the HIS: {said(refused)}"
