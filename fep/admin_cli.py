"""The `fep` commands for people: status, trades, show, reverse, replay, reload (and, from other
modules, reconcile and catalog). They talk to the running daemon over its admin socket; output is an
aligned table, or JSON with --json."""

from __future__ import annotations

import argparse
import sys
import unicodedata
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, urlencode

from fep import envelope
from fep.client import Client

DEFAULT_CONFIGS = ("conf/fep.yaml", "/etc/fep/fep.yaml")


def admin_client(args: argparse.Namespace) -> Client:
    if args.admin:
        return Client.unix(args.admin)
    from fep import config

    path = next((Path(p) for p in ([args.config] if args.config else DEFAULT_CONFIGS) if Path(p).exists()), None)
    if path is None:
        raise SystemExit("fep: no config found (conf/fep.yaml, /etc/fep/fep.yaml); give --config or --admin")
    return Client.unix(str(config.load(path).admin.unix))


def call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    status, doc = admin_client(args).request(method, path, envelope.dumps(body) if body is not None else None)
    if status != 200:
        raise SystemExit(f"fep {args.command}: {doc.get('error', doc)}")
    return doc


def width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([width(c)] + [width(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    for row in cells:
        lines.append("  ".join(v + " " * (w - width(v)) for v, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def out(args: argparse.Namespace, doc: Any, human: Callable[[Any], str]) -> int:
    sys.stdout.write((envelope.dumps(doc).decode() if args.json else human(doc)) + "\n")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    def human(s: dict[str, Any]) -> str:
        lines = ["bureau endpoints:"]
        lines += [f"  {e['name']:<12} {'up' if e['up'] else ('down' if e['up'] is False else 'not tried')}"
                  f"  {e['url']}" for e in s["endpoints"]]
        lines.append(f"signed in: {'yes, sign_no ' + s['sign_no'] if s['signed_in'] else 'NO'}")
        lines.append(f"queued for the bureau: {s['queued']}"
                     + (f" (oldest {s['oldest_queued_seconds']} s)" if s["oldest_queued_seconds"] else ""))
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

    return out(args, call(args, "GET", "/status"), human)


def cmd_trades(args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("psn_no", args.person), ("infno", args.infno),
                               ("since", args.since), ("until", args.until), ("limit", args.limit)) if v}
    rows = call(args, "GET", "/trades?" + urlencode(query))
    return out(args, rows, lambda rs: table(rs, ["created", "msgid", "infno", "state", "psn_no", "setl_id",
                                                 "resolver", "note"]))


def cmd_show(args: argparse.Namespace) -> int:
    def human(t: dict[str, Any]) -> str:
        lines = [f"{t['msgid']}  {t['infno']}  {t['state']}  person {t['psn_no'] or '-'}"
                 f"  settlement {t['setl_id'] or '-'}  tries {t['attempts']}"]
        if t["related"]:
            lines.append(f"resolves {t['related']}")
        lines.append(table(t["history"], ["at", "event", "state", "note"]))
        if t["resolving_trades"]:
            lines.append("resolving trades:")
            lines.append(table(t["resolving_trades"], ["created", "msgid", "infno", "state", "attempts", "note"]))
        answer = t["answer"] or {}
        lines.append(f"answer: infcode {answer.get('infcode')} {answer.get('err_msg') or ''}".rstrip())
        if t["late_answer"]:
            lines.append(f"late answer kept: infcode {t['late_answer'].get('infcode')}")
        return "\n".join(lines)

    return out(args, call(args, "GET", f"/trades/{quote(args.msgid)}"), human)


def _trade_answer(doc: dict[str, Any]) -> str:
    return f"{doc.get('fep_msgid')}  {doc.get('fep_infno')}  {doc.get('fep_state')}  " \
           f"{doc.get('fep_note') or doc.get('err_msg') or ''}".rstrip()


def cmd_reverse(args: argparse.Namespace) -> int:
    body = {k: v for k, v in (("infno", args.infno), ("psn_no", args.person)) if v}
    return out(args, call(args, "POST", f"/reverse/{quote(args.msgid)}", body), _trade_answer)


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
    sys.stdout.write(render(doc, "json" if args.json else args.format) + "\n")
    return 0 if not doc["unbalanced"] and not doc["unresolved"] else 1


def cmd_catalog(args: argparse.Namespace) -> int:
    if args.action == "sync":
        doc = call(args, "POST", "/catalog/sync", {})
        return out(args, doc, lambda d: "\n".join(
            [f"{infno}: version {x['from_version']} -> {x['to_version']}, {x['rows']} row(s)"
             for infno, x in d["downloads"].items()] + [f"{d['codes']} national codes, {d['retired']} retired"]))
    if args.action == "import":
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SystemExit(f"fep catalog map import: cannot read {args.file}: {e}") from None
        status, doc = admin_client(args).request("POST", "/catalog/map", text.encode("utf-8"))
        if status != 200:
            raise SystemExit(f"fep catalog map import: {doc.get('error')}")
        out(args, doc, lambda d: f"{d['imported']} mapping(s) imported; {len(d['problems'])} problem(s)"
            + ("\n" + table(d["problems"], ["hosp_code", "national_code", "problem"]) if d["problems"] else ""))
        return 0
    doc = call(args, "GET", "/catalog/check")
    out(args, doc, lambda d: f"{d['mapped']} hospital code(s) mapped, {d['codes']} national code(s) known; "
        f"{len(d['problems'])} problem(s)" + ("\n" + table(d["problems"], ["hosp_code", "national_code", "problem"])
                                             if d["problems"] else ""))
    return 1 if doc["problems"] else 0


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
    sys.stdout.write(render(doc, fmt, what) + "\n")
    if what == "apply":
        return 0 if all(g["result"] in ("applied", "already applied") for g in doc["groups"]) else 1
    return 0 if what == "status" or doc["confirmed"] else 1


def admin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="fep's config, to find its admin socket (default: conf/fep.yaml, then "
                                    "/etc/fep/fep.yaml)")
    p.add_argument("--admin", help="the admin socket itself")
    p.add_argument("--json", action="store_true", help="JSON for scripts instead of a table")


def add_commands(sub: Any) -> None:
    st = sub.add_parser("status", help="bureau link, sign-in, queues, needs-attention, certificates")
    admin_options(st)
    st.set_defaults(func=cmd_status)

    tr = sub.add_parser("trades", help="trades in the journal, newest last")
    tr.add_argument("--state")
    tr.add_argument("--person", help="psn_no")
    tr.add_argument("--infno")
    tr.add_argument("--since", help="YYYY-MM-DD[ HH:MM:SS]")
    tr.add_argument("--until", help="YYYY-MM-DD[ HH:MM:SS]")
    tr.add_argument("--limit", type=int, default=100)
    admin_options(tr)
    tr.set_defaults(func=cmd_trades)

    sh = sub.add_parser("show", help="the whole life of one trade")
    sh.add_argument("msgid")
    admin_options(sh)
    sh.set_defaults(func=cmd_show)

    rv = sub.add_parser("reverse", help="undo a trade the bureau holds and this box does not (2601)")
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
    rc.add_argument("--format", choices=("table", "csv", "json"), default="table")
    admin_options(rc)
    rc.set_defaults(func=cmd_reconcile)

    cat = sub.add_parser("catalog", help="the bureau's catalog (医保目录) and the hospital's mapping (目录对照)")
    csub = cat.add_subparsers(dest="catalog_command", required=True)
    sy = csub.add_parser("sync", help="download what is new in the bureau's catalogs (1301/1305/1306)")
    admin_options(sy)
    sy.set_defaults(func=cmd_catalog, action="sync")
    mp = csub.add_parser("map", help="the hospital's code mapping")
    msub = mp.add_subparsers(dest="map_command", required=True)
    im = msub.add_parser("import", help="load a CSV: hosp_code,national_code[,hosp_name]")
    im.add_argument("file")
    admin_options(im)
    im.set_defaults(func=cmd_catalog, action="import")
    ck = msub.add_parser("check", help="items with no mapping, or mapped to a retired or unknown code")
    admin_options(ck)
    ck.set_defaults(func=cmd_catalog, action="check")

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
        c.add_argument("--format", choices=("table", "csv", "json"), default="table")
        admin_options(c)
        c.set_defaults(func=cmd_clearing)

    rl = sub.add_parser("reload", help="re-read config and certificates (as systemctl reload)")
    admin_options(rl)
    rl.set_defaults(func=cmd_reload)
