"""The `fep` command: run the daemon or the simulator, make a test PKI, call a trade, look one up."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path

from fep import envelope


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from fep.client import Client

    if args.url:
        host, _, port = args.url.removeprefix("http://").partition(":")
        return Client.tcp(host, int(port.rstrip("/") or 8097))
    return Client.unix(args.socket)


def _print(doc: object) -> None:
    sys.stdout.write(envelope.dumps(doc).decode("utf-8") + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    if args.check:
        return check_config(Path(args.config))
    from fep import daemon

    return daemon.run(Path(args.config))


def check_config(path: Path) -> int:
    """As nginx -t: read the config (and its trade catalog) as `fep run` would, say what is wrong, start nothing."""
    from fep import config

    try:
        config.load(path)
    except config.ConfigError as e:
        print(f"fep: {e}", file=sys.stderr)
        return 2
    print(f"fep: the config {path} is valid")
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    from fep.sim import server

    return server.run(Path(args.config))


def cmd_pki(args: argparse.Namespace) -> int:
    from fep import pki

    if args.force:
        pki.generate(Path(args.dir))
        made = True
    else:
        made = pki.ensure(Path(args.dir))
    print(f"development PKI {'written to' if made else 'already in'} {args.dir}")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    try:
        text = sys.stdin.read() if args.input == "-" else Path(args.input).read_text(encoding="utf-8")
        input_ = envelope.loads(text)
    except (OSError, ValueError) as e:
        print(f"fep call: cannot read the input JSON from {args.input}: {e}", file=sys.stderr)
        return 2
    answer = _client(args).call(args.infno, input_, msgid=args.msgid, insuplc_admdvs=args.insuplc_admdvs or "")
    _print(answer)
    return 0 if envelope.succeeded(answer) else 1


def cmd_lookup(args: argparse.Namespace) -> int:
    answer = _client(args).lookup(args.msgid)
    _print(answer)
    return 0 if answer.get("fep_state") != "REFUSED" else 1


def cmd_confirm(args: argparse.Namespace) -> int:
    answer = _client(args).confirm(args.msgid)
    _print(answer)
    return 0 if answer.get("fep_state") == "CONFIRMED" else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fep", description="Medical-insurance front-end processor (医保前置机)")
    p.add_argument("--version", action="version", version=f"fep {version('fep')}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the daemon")
    r.add_argument("--config", default="conf/fep.yaml")
    r.add_argument("--check", action="store_true", help="only check the config (as nginx -t), e.g. before "
                                                        "systemctl reload; exit 2 if it is not valid")
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sim", help="run the bureau simulator")
    s.add_argument("--config", default="conf/sim.yaml")
    s.set_defaults(func=cmd_sim)

    k = sub.add_parser("pki", help="generate a development PKI (CA, bureau and hospital certificates)")
    k.add_argument("--dir", default="var/pki")
    k.add_argument("--force", action="store_true", help="replace an existing one")
    k.set_defaults(func=cmd_pki)

    def his_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--socket", default="var/run/his.sock", help="fep's HIS Unix socket")
        sp.add_argument("--url", help="fep's HIS TCP address instead, e.g. http://127.0.0.1:8097")

    c = sub.add_parser("call", help="send one trade through fep and print the answer")
    c.add_argument("infno")
    c.add_argument("--input", required=True, help="JSON file with the trade's input node ('-': stdin)")
    c.add_argument("--msgid", help="use this msgid (resubmission returns the stored answer)")
    c.add_argument("--insuplc-admdvs", dest="insuplc_admdvs")
    his_options(c)
    c.set_defaults(func=cmd_call)

    lk = sub.add_parser("lookup", help="what the HIS hears for a msgid (state and stored answer)")
    lk.add_argument("msgid")
    his_options(lk)
    lk.set_defaults(func=cmd_lookup)

    from fep import admin_cli

    admin_cli.add_commands(sub)

    cf = sub.add_parser("confirm", help="confirm a settlement that has a confirmation window")
    cf.add_argument("msgid")
    his_options(cf)
    cf.set_defaults(func=cmd_confirm)

    args = p.parse_args(argv)
    from fep.client import Unreachable

    try:
        return int(args.func(args) or 0)
    except Unreachable as e:
        print(f"fep {args.command}: {e}", file=sys.stderr)
        return 3
    except OSError as e:  # reached, then lost: fep restarted, or did not answer within the client's timeout
        print(f"fep {args.command}: the connection to fep failed: {e.strerror or e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
