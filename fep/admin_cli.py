"""The `fep` commands for people: status, trades, show, reverse, replay, reload, backup, archive, audit, job (and,
from other modules, reconcile and catalog). They talk to the running daemon over its admin socket; output is an
aligned table, or JSON with --json. Work that outlasts --timeout is not cut off: it goes on in fep as a job, which
`fep job ID` follows."""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, NoReturn, Sequence
from urllib.parse import quote, urlencode

from fep import envelope
from fep.client import Client

DEFAULT_CONFIGS = ("conf/fep.yaml", "/etc/fep/fep.yaml")
FIRST_WAIT = 5.0  # seconds of work before it shows progress (and becomes a job fep keeps)
STEP = 1.0  # seconds each look at a running job waits for it: progress stays fresh, --timeout is kept
STILL_RUNNING = 4  # the exit status when --timeout ended the wait and the work goes on in fep
# A check that gets no answer in time fails by itself: a frozen fep still accepts connections on its socket.
ROLE_CHECK_WAIT = 2.0  # s: keepalived runs `--check --role leader` every second or two (README, "Two boxes")
HEALTH_CHECK_WAIT = 8.0  # s: inside the 10 s a Nagios or Zabbix agent gives a check by default


def admin_client(args: argparse.Namespace, timeout: float = 70.0) -> Client:
    if args.admin:
        return Client.unix(args.admin, timeout)
    from fep import config

    if args.config and not Path(args.config).exists():
        raise SystemExit(f"fep {args.command}: --config {args.config}: there is no such file")
    path = next((Path(p) for p in ([args.config] if args.config else DEFAULT_CONFIGS) if Path(p).exists()), None)
    if path is None:
        raise SystemExit(f"fep {args.command}: no config found ({', '.join(DEFAULT_CONFIGS)}); give --config or "
                         f"--admin")
    try:
        return Client.unix(str(config.load(path).admin.unix), timeout)
    except config.ConfigError as e:
        raise SystemExit(f"fep {args.command}: {e}") from None


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The answer of an admin call (`body`: JSON, or bytes as they are), following it as a job, with
    progress, when it takes long; a refusal ends the command naming what fep said."""
    client = admin_client(args)
    data = body if isinstance(body, bytes) or body is None else envelope.dumps(body)
    deadline = time.monotonic() + args.timeout
    try:
        status, doc = client.request(method, path, data, {"X-Fep-Wait": f"{min(FIRST_WAIT, args.timeout):g}"})
    except KeyboardInterrupt:  # fep goes on with what it was given: work of over FIRST_WAIT as a job
        raise SystemExit(f"fep {args.command}: interrupted; fep goes on with what it was asked (`fep job` lists "
                         f"long work)") from None
    if status == 202:
        status, doc = follow(args, client, doc, deadline)
    if status != 200:
        raise SystemExit(f"fep {args.command}: {doc.get('error', doc) if isinstance(doc, dict) else doc}")
    return doc


def follow(args: argparse.Namespace, client: Client, job: dict[str, Any], deadline: float) -> tuple[int, Any]:
    """Wait for a job until `deadline`, showing its progress; its call's own status and answer."""
    shown = Progress(sys.stderr)
    try:
        while job["state"] == "running":
            shown.update(job)
            left = deadline - time.monotonic()
            if left <= 0:
                shown.clear()
                _goes_on(args, job, f"still running after --timeout {args.timeout:g} s")
            status, job = client.request("GET", f"/jobs/{job['id']}", headers={"X-Fep-Wait": f"{min(STEP, left):g}"})
            if status != 200:
                raise SystemExit(f"fep {args.command}: {job.get('error', job)}")
    except KeyboardInterrupt:
        shown.clear()
        _goes_on(args, job, "interrupted")
    shown.clear()
    return job["status"], job["result"]


def _goes_on(args: argparse.Namespace, job: dict[str, Any], why: str) -> NoReturn:
    print(f"fep {args.command}: {why}; the work goes on in fep as job {job['id']} ({job['call']}"
          f"{', ' + job['progress'] if job['progress'] else ''}): follow it with `fep job {job['id']}`",
          file=sys.stderr)
    raise SystemExit(STILL_RUNNING)


class Progress:
    """A job's progress on stderr: one line rewritten on a terminal; otherwise (a log, cron's mail) a line
    when it changes, at most every 5 s, and one every 30 s regardless."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.tty = stream, stream.isatty()
        self.line, self.said, self.at = "", None, float("-inf")

    def update(self, job: dict[str, Any]) -> None:
        text = f"job {job['id']}: {job['progress'] or job['call']} ({job['seconds']:g} s)"
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text + " " * max(0, width(self.line) - width(text)))
            self.line = text
        elif (job["progress"] != self.said and now - self.at >= 5) or now - self.at >= 30:
            self.stream.write(text + "\n")
            self.said, self.at = job["progress"], now
        self.stream.flush()

    def clear(self) -> None:
        if self.line:
            self.stream.write("\r" + " " * width(self.line) + "\r")
            self.stream.flush()
            self.line = ""


def width(text: str) -> int:
    """The columns a terminal gives `text`: a Chinese character (East Asian wide or fullwidth) takes two, a
    combining mark none. The stdlib's Unicode tables suffice for what the journal holds; no wcwidth needed."""
    return sum(0 if unicodedata.combining(c) or unicodedata.category(c) == "Cf" else
               2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _cell(value: Any) -> str:
    return "" if value is None else " ".join(str(value).splitlines())  # a bureau's err_msg may hold newlines


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Columns aligned by display width, so 结算经办机构 lines up with the digits under it."""
    cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(width(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v + " " * (w - width(v)) for v, w in zip(row, widths)).rstrip() for row in cells)


def csv_text(columns: list[str], rows: Iterable[Sequence[Any]]) -> str:
    """A header line and the rows, as `--format csv` prints every table (trades, reconciliation, clearing)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    w.writerows(rows)
    return buf.getvalue().rstrip("\n")


def out(args: argparse.Namespace, doc: Any, human: Callable[[Any], str]) -> int:
    as_json = args.json or getattr(args, "format", None) == "json"
    sys.stdout.write((envelope.dumps(doc).decode() if as_json else human(doc)) + "\n")
    return 0


def _at_least(kind: type, least: float, what: str) -> Callable[[str], Any]:
    """An argparse type: a number of `kind`, at least `least`, else an error naming what was wanted."""
    def parse(text: str) -> Any:
        try:
            n = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if n < least:
            raise argparse.ArgumentTypeError(f"must be {least:g} or more{'' if kind is int else ' seconds'}, "
                                             f"got {text}")
        return n
    return parse


# --limit, for every command that has one: 0 (or less) is refused, never taken as "all"; fep itself refuses
# more than it lists at once (fep.admin.MAX_LIMIT), naming the bound.
limit = _at_least(int, 1, "a whole number")
timeout = _at_least(float, 0, "seconds")


def cmd_status(args: argparse.Namespace) -> int:
    def human(s: dict[str, Any]) -> str:
        lines = ["bureau endpoints:"]
        lines += [f"  {e['name']:<12} {'up' if e['up'] else ('down' if e['up'] is False else 'not tried')}"
                  f"  {e['url']}" for e in s["endpoints"]]
        link = s.get("bureau_link") or {}
        if link:
            mutual = link["link_security"] == "mutual_tls"
            lines.append(f"bureau link: {link['link_security']}"
                         + ("" if mutual else " (NOT mutual TLS: set in bureau.link_security)")
                         + f", profile {link['profile']}, URL layout {link['url_layout']}")
        standby = s.get("role") == "standby"
        if s.get("role") in ("leader", "standby"):
            lines.insert(0, role_line(s))
        lines.append(f"signed in: {'yes, sign_no ' + s['sign_no'] if s['signed_in'] else 'NO'}"
                     + (" (a standby does not sign in: the leader does)" if standby and not s["signed_in"] else ""))
        lines.append(f"queued for the bureau: {s['queued']}"
                     + (f" (oldest {s['oldest_queued_seconds']} s)" if s["oldest_queued_seconds"] else ""))
        if s.get("journal_keys"):
            lines.append(f"journal keys: {s['journal_keys']}")
        lines.append("trades by state: " + ", ".join(f"{k} {v}" for k, v in sorted(s["trades_by_state"].items())))
        certs = s.get("certificates", {})
        lines.append("certificates: " + ", ".join(f"{k} expires in {v // 86400} days" for k, v in certs.items()))
        if s.get("last_reconciliation"):
            r = s["last_reconciliation"]
            lines.append(f"last reconciliation: {r['stmt_date']} run {r['run_at']}: "
                         f"{r['balanced']} balanced, {r['unbalanced']} unbalanced")
        lines.append(f"needs attention: {len(s['needs_attention'])}")
        if s["needs_attention"]:
            lines.append(table(s["needs_attention"], ["msgid", "infno", "since", "note"]))
        return "\n".join(lines)

    if args.check:
        return check(args)
    return out(args, call(args, "GET", "/status"), human)


def role_line(s: dict[str, Any]) -> str:
    """A pair's node: which it is and who leads (None: it cannot tell), and why it does not lead when it says."""
    if s["role"] == "leader":
        return f"role: leader (this node, {s.get('leader')})"
    said = f"the leader is {s['leader']}" if s.get("leader") else "no leader is known here"
    return f"role: standby; {said}" + (f"; this node does not lead: {s['standby_note']}" if s.get("standby_note") else "")


def check(args: argparse.Namespace) -> int:
    """One line and exit 0, 1 or 2 (OK, WARNING, CRITICAL), as a Nagios or Zabbix check; fep unreachable, or not
    answering within the check's wait, is CRITICAL. `--role` asks only for the role: no journal read."""
    from fep import health

    wait = ROLE_CHECK_WAIT if args.role else HEALTH_CHECK_WAIT
    try:
        status, doc = admin_client(args, wait).request("GET", "/status?only=role" if args.role else "/status")
    except TimeoutError:
        print(f"FEP CRITICAL - fep did not answer within {wait:g} s")
        return health.Level.CRITICAL
    except OSError as e:
        print(f"FEP CRITICAL - cannot reach fep: {e.strerror or e}")
        return health.Level.CRITICAL
    except SystemExit as e:  # no config
        print(f"FEP CRITICAL - {e}")
        return health.Level.CRITICAL
    if status != 200:
        print(f"FEP CRITICAL - {doc.get('error', doc) if isinstance(doc, dict) else doc}")
        return health.Level.CRITICAL
    verdict = health.role(doc, args.role) if args.role else health.check(doc, datetime.now())
    print(verdict.line(health.summary(doc) if not args.role else f"this node leads ({doc.get('role')})"))
    return verdict.level


TRADE_COLUMNS = ["created", "msgid", "infno", "state", "psn_no", "setl_id", "resolver", "note"]


def cmd_trades(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("psn_no", args.person), ("infno", args.infno),
                               ("since", args.since), ("until", args.until), ("limit", args.limit)) if v}
    rows = call(args, "GET", "/trades?" + urlencode(query))
    if args.format == "csv" and not args.json:
        write_out(args, csv_text(TRADE_COLUMNS, ([_cell(r.get(c)) for c in TRADE_COLUMNS] for r in rows)), "csv")
        return 0
    return out(args, rows, lambda rs: table(rs, TRADE_COLUMNS))


def show_text(t: dict[str, Any]) -> str:
    """A trade's whole life as `fep show` prints it (the console's trade page shows the same)."""
    lines = [f"{t['msgid']}  {t['infno']}  {t['state']}  person {t['psn_no'] or '-'}"
             f"  settlement {t['setl_id'] or '-'}  tries {t['attempts']}"]
    if t.get("archive"):
        lines.append(f"archived: read from {t['archive']}")
    if t["related"]:
        lines.append(f"resolves {t['related']}")
    lines.append(table(t["history"], ["at", "event", "state", "note"]))
    if t["resolving_trades"]:
        lines.append("resolving trades:")
        lines.append(table(t["resolving_trades"], ["created", "msgid", "infno", "state", "attempts", "note"]))
    lines.append(_answer("answer", t["answer"]))
    if t["late_answer"]:
        lines.append(_answer("late answer kept", t["late_answer"]))
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    return out(args, call(args, "GET", f"/trades/{quote(args.msgid)}"), show_text)


def _answer(label: str, answer: dict[str, Any] | None) -> str:
    """An answer's infcode and err_msg; a trade with no answer (yet) says so, never `infcode None`."""
    if not answer:
        return f"{label}: none"
    code = answer.get("infcode")
    said = answer.get("err_msg") or ""
    return f"{label}: {'no infcode' if code is None else f'infcode {code}'} {said}".rstrip()


def _trade_answer(doc: dict[str, Any]) -> str:
    return f"{doc.get('fep_msgid')}  {doc.get('fep_infno')}  {doc.get('fep_state')}  " \
           f"{doc.get('fep_note') or doc.get('err_msg') or ''}".rstrip()


def cmd_reverse(args: argparse.Namespace) -> int:
    """Exit 1 when the bureau refused the 2601: nothing was undone, the trade stands."""
    body = {k: v for k, v in (("infno", args.infno), ("psn_no", args.person)) if v}
    doc = call(args, "POST", f"/reverse/{quote(args.msgid)}", body)
    out(args, doc, _trade_answer)
    return reversed_exit(doc)


def reversed_exit(doc: dict[str, Any]) -> int:
    """`fep reverse`'s exit, and `fep job`'s for one: 1 when the bureau refused the 2601."""
    from fep.replies import outcome

    return 1 if outcome(doc) == "refused" else 0


def cmd_replay(args: argparse.Namespace) -> int:
    return out(args, call(args, "POST", f"/replay/{quote(args.msgid)}", {}), _trade_answer)


def cmd_drop(args: argparse.Namespace) -> int:
    return out(args, call(args, "POST", f"/drop/{quote(args.msgid)}", {"reason": args.reason}), _trade_answer)


def cmd_reload(args: argparse.Namespace) -> int:
    doc = call(args, "POST", "/reload", {})
    out(args, doc, lambda d: f"reload {d['result']}")
    return 0 if doc["result"].startswith("applied") else 1


def cmd_reconcile(args: argparse.Namespace) -> int:
    from fep.reconcile import render

    if args.show:
        runs = call(args, "GET", "/reconcile" + (f"?date={args.date}" if args.date else ""))
        if not runs:
            raise SystemExit(f"fep reconcile: no stored run{' for ' + args.date if args.date else ''}")
        doc = runs[0]
    else:
        doc = call(args, "POST", "/reconcile", {"date": args.date} if args.date else {})
    fmt = "json" if args.json else args.format
    write_out(args, render(doc, fmt), fmt)
    return reconciled_exit(doc)


def reconciled_exit(doc: dict[str, Any]) -> int:
    """`fep reconcile`'s exit, and `fep job`'s for a reconciliation: 1 when the day does not balance."""
    return 0 if not doc["unbalanced"] and not doc["unresolved"] else 1


SYNC_WAIT = 3600.0  # seconds `fep catalog sync` waits by default: some thirty catalogs, the national ones large, over the VPN


def _synced(infno: str, x: dict[str, Any]) -> str:
    if "error" in x:
        return f"{infno}: FAILED: {x['error']}"
    if "pages" in x:
        return f"{infno}: updated since {x['from_update']}, {x['pages']} page(s), {x['rows']} row(s)"
    return f"{infno}: version {x['from_version']} -> {x['to_version']}, {x['rows']} row(s)"


def synced_exit(doc: dict[str, Any]) -> int:
    """`fep catalog sync`'s exit, and `fep job`'s for one: 1 when a catalog failed."""
    return 1 if doc["failed"] else 0


def cmd_catalog(args: argparse.Namespace) -> int:
    if args.action == "sync":
        doc = call(args, "POST", "/catalog/sync", {})
        out(args, doc, lambda d: "\n".join([_synced(infno, x) for infno, x in d["downloads"].items()]
                                           + [f"{d['codes']} national codes, {d['retired']} retired"]))
        return synced_exit(doc)
    if args.action == "import":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"fep catalog map import: cannot read {args.file}: {e}") from None
        doc = call(args, "POST", "/catalog/map", text.encode("utf-8"))
        out(args, doc, lambda d: f"{d['imported']} mapping(s) imported; {len(d['problems'])} problem(s)"
            + ("\n" + table(d["problems"], ["hosp_code", "national_code", "problem"]) if d["problems"] else ""))
        return 0
    doc = call(args, "GET", "/catalog/check")
    out(args, doc, lambda d: f"{d['mapped']} hospital code(s) mapped, {d['codes']} national code(s) known; "
        f"{len(d['problems'])} problem(s)" + ("\n" + table(d["problems"], ["hosp_code", "national_code", "problem"])
                                             if d["problems"] else ""))
    return 1 if doc["problems"] else 0


def cmd_backup(args: argparse.Namespace) -> int:
    # fep writes the copy, as its own user: the path is made absolute here, where the operator gave it.
    doc = call(args, "POST", "/backup", {"path": str(Path(args.path).absolute())})
    return out(args, doc, lambda d: f"backup written to {d['path']}: {d['trades']} trades, {d['bytes']} bytes, "
                                    f"PRAGMA integrity_check {d['integrity_check']} ({d['seconds']} s)")


def cmd_archive(args: argparse.Namespace) -> int:
    doc = call(args, "POST", "/archive", {})
    return out(args, doc, lambda d: ("another archive run was under way: waited for it; then " if d.get("waited")
                                     else "") + (d.get("note") or f"{d['moved']} finished trade(s) older than "
                                                 f"{d['keep_days']} days moved to "
                                                 f"{d.get('into', 'the archive files')} of "
                                                 f"{', '.join(d['months']) or '-'}"))


def cmd_audit(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("since", args.since), ("until", args.until), ("limit", args.limit)) if v}
    rows = call(args, "GET", "/audit?" + urlencode(query))
    return out(args, rows, lambda rs: table([{**r, "args": envelope.dumps(r["args"]).decode()} for r in rs],
                                            ["at", "uid", "user", "action", "args", "result"]))


def cmd_job(args: argparse.Namespace) -> int:
    if args.id is None:
        return out(args, call(args, "GET", "/jobs"), lambda jobs: table(jobs, ["id", "call", "state", "started",
                                                                               "seconds", "progress", "status"]))
    client = admin_client(args)
    status, job = client.request("GET", f"/jobs/{args.id}")
    if status != 200:
        raise SystemExit(f"fep job: {job.get('error', job)}")
    job["status"], job["result"] = follow(args, client, job, time.monotonic() + args.timeout)
    job["state"] = "finished"
    out(args, job, _finished_job)
    return job_exit(job)


def job_exit(job: dict[str, Any]) -> int:
    """A finished job exits as the command it follows would: a refusal 1, and an answer by that command's rule
    (an unbalanced reconciliation, a failed catalog, a reversal the bureau refused: 1)."""
    if job["status"] != 200:
        return 1
    call_, result = job["call"], job["result"]
    if call_ == "POST /reconcile":
        return reconciled_exit(result)
    if call_ == "POST /catalog/sync":
        return synced_exit(result)
    if call_.startswith("POST /reverse/"):
        return reversed_exit(result)
    return 0


def _finished_job(job: dict[str, Any]) -> str:
    from fep.reconcile import render

    head = f"job {job['id']}: {job['call']} finished"
    if job["status"] != 200:
        return f"{head}, refused: {job['result'].get('error', job['result'])}"
    if job["call"] == "POST /reconcile":
        return f"{head}:\n{render(job['result'], 'table')}"
    return f"{head}:\n{envelope.dumps(job['result']).decode()}"


def cmd_clearing(args: argparse.Namespace) -> int:
    from fep.clearing import render

    what, fmt = args.clearing_command, "json" if args.json else args.format
    if what == "status":
        doc = call(args, "GET", f"/clearing/status?month={args.month}")
    elif what in ("apply", "remote"):
        doc = call(args, "POST", f"/clearing/{what}", {"month": args.month})
    else:
        body = {"month": args.month, "group": args.group}
        if what == "paid":
            body.update(amount=args.amount, note=args.note)
        doc = call(args, "POST", f"/clearing/{what}", body)
        sys.stdout.write((envelope.dumps(doc).decode() if args.json else
                          f"{doc['month']} {doc['insutype']}/{doc['setl_optins']}/{doc['clr_type']}: {doc['state']}, "
                          f"paid {doc['paid']} (clr_appy_evt_id {doc['clr_appy_evt_id']})") + "\n")
        return 0
    write_out(args, render(doc, fmt, what), fmt)
    if what == "apply":
        return 0 if all(g["result"] in ("applied", "already applied") for g in doc["groups"]) else 1
    return 0 if what == "status" or doc["confirmed"] else 1


def users_file(args: argparse.Namespace) -> Path:
    """--users, else console.users of the config fep runs with."""
    if args.users:
        return Path(args.users)
    from fep import config

    path = next((Path(p) for p in ([args.config] if args.config else DEFAULT_CONFIGS) if Path(p).exists()), None)
    if path is None:
        raise SystemExit(f"fep user: no config found ({', '.join(DEFAULT_CONFIGS)}); give --config or --users")
    try:
        return config.load(path).console.users
    except config.ConfigError as e:
        raise SystemExit(f"fep user: {e}") from None


def new_password(name: str) -> str:
    """Asked twice on a terminal; from a script, the first line of stdin."""
    import getpass

    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"new password for {name}: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("fep user: the two passwords differ; nothing changed")
    return first


def cmd_user(args: argparse.Namespace) -> int:
    """The console's users (fep.console.users): the file is changed here; fep reads it at each sign-in."""
    from fep.console import users as u

    path, what = users_file(args), args.user_command
    try:
        known = u.read(path)
        if what == "list":
            sys.stdout.write(table([{"name": x.name, "role": x.role} for x in known.values()], ["name", "role"]) + "\n")
            return 0
        if what == "add" and args.name in known:
            raise u.UsersError(f"{args.name} is a user already (fep user passwd {args.name} changes the password)")
        if what in ("passwd", "remove") and args.name not in known:
            raise u.UsersError(f"no user {args.name} in {path}")
        if what == "remove":
            del known[args.name]
        else:
            role = args.role or known[args.name].role
            password = new_password(args.name)
            u.check_new(args.name, role, password)
            known[args.name] = u.User(args.name, role, u.hashed(password))
        u.write(path, known)
    except u.UsersError as e:
        raise SystemExit(f"fep user {what}: {e}") from None
    print(f"{args.name}: {'removed' if what == 'remove' else ('added' if what == 'add' else 'changed')} "
          f"(sessions of a removed or changed user end at their next page)")
    return 0


def format_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--bom", action="store_true", help="begin CSV with a UTF-8 byte order mark, so Excel on Chinese "
                                                      "Windows reads its 中文 as UTF-8 (not GBK)")


def write_out(args: argparse.Namespace, text: str, fmt: str) -> None:
    """A table, CSV or JSON on stdout; CSV with the byte order mark Excel needs when --bom is given (not by
    default: scripts, psql's COPY and Python's csv module would read the mark into the first column's name)."""
    sys.stdout.write(("\ufeff" if fmt == "csv" and args.bom else "") + text + "\n")


def admin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="fep's config, to find its admin socket (default: conf/fep.yaml, then "
                                    "/etc/fep/fep.yaml)")
    p.add_argument("--admin", help="the admin socket itself")
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")
    p.add_argument("--timeout", type=timeout, default=60.0,
                   help=f"seconds to wait for fep (default 60); longer work goes on in fep as a job: the command "
                        f"exits {STILL_RUNNING} naming it, and `fep job ID` follows it")


def add_commands(sub: Any) -> None:
    st = sub.add_parser("status", help="bureau link, sign-in, queues, needs-attention, certificates")
    st.add_argument("--check", action="store_true", help="one line and exit 0 OK, 1 WARNING, 2 CRITICAL (Nagios, "
                                                         "Zabbix; README, \"Monitoring\")")
    st.add_argument("--role", choices=["leader"], help="with --check: exit 0 only on the node that leads (the "
                                                       "check script of a keepalived virtual address; README, \"Two "
                                                       "boxes (PostgreSQL)\")")
    admin_options(st)
    st.set_defaults(func=cmd_status)

    tr = sub.add_parser("trades", help="trades in the journal, newest last")
    tr.add_argument("--state")
    tr.add_argument("--person", help="psn_no")
    tr.add_argument("--infno")
    tr.add_argument("--since", help="YYYY-MM-DD[ HH:MM:SS]")
    tr.add_argument("--until", help="YYYY-MM-DD[ HH:MM:SS] (a day alone: to its end)")
    tr.add_argument("--limit", type=limit, default=100, help="at most this many (default 100)")
    format_options(tr)
    admin_options(tr)
    tr.set_defaults(func=cmd_trades)

    sh = sub.add_parser("show", help="the whole life of one trade")
    sh.add_argument("msgid")
    admin_options(sh)
    sh.set_defaults(func=cmd_show)

    rv = sub.add_parser("reverse", help="undo a trade the bureau holds and this box does not (2601); exit 1 when "
                                        "the bureau refuses it")
    rv.add_argument("msgid")
    rv.add_argument("--infno", help="its trade number, when the journal does not have it")
    rv.add_argument("--person", help="its psn_no, when the journal does not have it")
    admin_options(rv)
    rv.set_defaults(func=cmd_reverse)

    rp = sub.add_parser("replay", help="send a parked (NEEDS_ATTENTION) trade on")
    rp.add_argument("msgid")
    admin_options(rp)
    rp.set_defaults(func=cmd_replay)

    dp = sub.add_parser("drop", help="give a parked (NEEDS_ATTENTION) trade up, saying why; the person's later "
                                     "uploads then go on")
    dp.add_argument("msgid")
    dp.add_argument("--reason", required=True, help="why: kept in the trade's history")
    admin_options(dp)
    dp.set_defaults(func=cmd_drop)

    rc = sub.add_parser("reconcile", help="reconcile a day with the bureau (3201, and 3202 where it does not "
                                          "balance); exit 1 when it does not balance")
    rc.add_argument("--date", help="YYYY-MM-DD (default: yesterday)")
    rc.add_argument("--show", action="store_true", help="show the stored run instead of running again")
    format_options(rc)
    admin_options(rc)
    rc.set_defaults(func=cmd_reconcile)

    cat = sub.add_parser("catalog", help="the bureau's catalog (医保目录) and the hospital's mapping (目录对照)")
    csub = cat.add_subparsers(dest="catalog_command", required=True)
    sy = csub.add_parser("sync", help="bring the bureau's catalogs current (1301–1327 files, 1312/1316–1319 pages)")
    admin_options(sy)
    sy.set_defaults(func=cmd_catalog, action="sync", timeout=SYNC_WAIT)
    mp = csub.add_parser("map", help="the hospital's code mapping")
    msub = mp.add_subparsers(dest="map_command", required=True)
    im = msub.add_parser("import", help="load a CSV: hosp_code,national_code[,hosp_name]")
    im.add_argument("file")
    admin_options(im)
    im.set_defaults(func=cmd_catalog, action="import")
    ck = msub.add_parser("check", help="items with no mapping, or mapped to a retired or unknown code")
    admin_options(ck)
    ck.set_defaults(func=cmd_catalog, action="check")

    bk = sub.add_parser("backup", help="a consistent copy of the live journal, checked with PRAGMA integrity_check")
    bk.add_argument("path", help="the file to write (it must not exist), or a directory to write a dated file in; "
                                 "fep's user must be able to write there")
    admin_options(bk)
    bk.set_defaults(func=cmd_backup)

    ar = sub.add_parser("archive", help="move finished trades older than journal.keep_days to the monthly archive "
                                        "files now (the schedule does it daily)")
    admin_options(ar)
    ar.set_defaults(func=cmd_archive)

    au = sub.add_parser("audit", help="what operators did through the admin socket: who (uid), what, with what "
                                      "result")
    au.add_argument("--since", help="YYYY-MM-DD[ HH:MM:SS]")
    au.add_argument("--until", help="YYYY-MM-DD[ HH:MM:SS] (a day alone: to its end)")
    au.add_argument("--limit", type=limit, default=100)
    admin_options(au)
    au.set_defaults(func=cmd_audit)
    cl = sub.add_parser("clearing", help="month-end clearing (清算): apply, cancel, the 异地 detail, status, payments")
    clsub = cl.add_subparsers(dest="clearing_command", required=True)
    for name, text in (("apply", "apply (3203) for each group of the month whose every day balanced; exit 1 if "
                                 "one could not be"),
                       ("cancel", "cancel a group's application (3204)"),
                       ("remote", "pull the month's 异地 clearing detail (3260), compare it with the journal, and "
                                  "confirm it (3261) when nothing differs; exit 1 otherwise"),
                       ("status", "per group: settlements, applied, approved, refused (拒付), paid (拨付)"),
                       ("paid", "record a disbursement (拨付) from the bank's notice")):
        c = clsub.add_parser(name, help=text)
        c.add_argument("--month", required=True, help="YYYY-MM")
        if name in ("cancel", "paid"):
            c.add_argument("--group", required=True, help="INSUTYPE/SETL_OPTINS/CLR_TYPE, e.g. 310/430199/11")
        if name == "paid":
            c.add_argument("--amount", required=True, help="yuan, as the bank's notice says")
            c.add_argument("--note", required=True, help="which notice (its number and date)")
        format_options(c)
        admin_options(c)
        c.set_defaults(func=cmd_clearing)

    us = sub.add_parser("user", help="who may sign in to the office's console (README, \"The office's console\")")
    usub = us.add_subparsers(dest="user_command", required=True)
    for name, text in (("add", "add a user: the password is asked twice (or read from stdin)"),
                       ("passwd", "set a user's password (and, with --role, role) anew"),
                       ("remove", "remove a user: their sessions end"), ("list", "the users and their roles")):
        u = usub.add_parser(name, help=text)
        if name != "list":
            u.add_argument("name")
        if name in ("add", "passwd"):
            u.add_argument("--role", choices=("office", "operator"), required=name == "add",
                           help="office: views the pages; operator: also sees the fep command of each action, and "
                                "ID numbers and names unmasked")
        u.add_argument("--config", help="fep's config, for console.users (default: conf/fep.yaml, then "
                                        "/etc/fep/fep.yaml)")
        u.add_argument("--users", help="the users file itself")
        u.set_defaults(func=cmd_user)

    rl = sub.add_parser("reload", help="re-read config and certificates (as systemctl reload)")
    admin_options(rl)
    rl.set_defaults(func=cmd_reload)

    jb = sub.add_parser("job", help="follow admin work that outlasted its command's --timeout (a long "
                                    "reconciliation, a large catalog sync); without ID: the jobs fep keeps")
    jb.add_argument("id", nargs="?", type=int)
    admin_options(jb)
    jb.set_defaults(func=cmd_job)
