"""The console's HTTP side: its own listener (loopback, and the office networks configured), sign-in, the pages.

Read-only: the only POSTs are signing in and out. Each page a signed-in person views is in the audit trail
before it is shown. Cookies are HttpOnly and SameSite=Strict; the sign-in form carries a token that must match
its cookie (a page of another site cannot sign a browser in); every answer forbids scripts, frames and
anything from elsewhere (Content-Security-Policy)."""

from __future__ import annotations

import ipaddress
import re
import secrets
from datetime import date, timedelta
from importlib.resources import files
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, select_autoescape
from twisted.internet import defer, endpoints, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from fep import logs
from fep.audit import AuditTrail
from fep.clearing import ClearingError
from fep.config import ConsoleSide
from fep.console import users as users_mod
from fep.console.pages import Pages
from fep.console.sessions import Failures, Session, Sessions, same
from fep.engine import Refused

log = Logger()
SESSION, CSRF = "fep_console", "fep_console_signin"
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                      "frame-ancestors 'none'; base-uri 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
           "X-Frame-Options": "DENY"}
COMMAND = re.compile(r"\bfep [a-z]+\b[^,;]*")  # a `fep` command inside an action's words


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def templates() -> Environment:
    env = Environment(loader=PackageLoader("fep.console"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    return env


class Console(Resource):
    isLeaf = True

    def __init__(self, pages: Pages, cfg: ConsoleSide, audit: AuditTrail) -> None:
        super().__init__()
        self.pages, self.cfg, self.audit = pages, cfg, audit
        self.sessions = Sessions(cfg.session_minutes)
        self.failures = Failures()
        self.env = templates()
        self.css = (files("fep.console") / "templates" / "style.css").read_bytes()
        self.institution = pages.engine.cfg.institution.fixmedins_name

    def render(self, request: Request) -> Any:
        for k, v in HEADERS.items():
            request.setHeader(k, v)
        gone: list[bool] = []  # the browser went away (closed, or moved on) before the page was made
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = defer.ensureDeferred(self._handle(request))
        d.addErrback(self._failed, request)
        d.addBoth(self._done, request, gone)
        return NOT_DONE_YET

    def _done(self, result: Any, request: Request, gone: list[bool]) -> None:
        if isinstance(result, Failure):  # even the error page could not be made
            log.failure("console page {path}: no error page either", result, path=request.path.decode("latin-1"))
            request.setResponseCode(500)
        if not gone:
            request.finish()

    def _failed(self, failure: Any, request: Request) -> None:
        if failure.check(HttpError, Refused, ClearingError):
            status = getattr(failure.value, "status", 400)
            self._page(request, "error.html", None, code=status, message=str(failure.value))
            return
        log.failure("console page {path} failed", failure, path=request.path.decode("latin-1"))
        self._page(request, "error.html", None, code=500, message="the page could not be made: fep's log says why")

    # ---- sign-in -------------------------------------------------------------------------------------------
    async def _handle(self, request: Request) -> None:
        path = request.path.decode("utf-8", "replace")
        args = {k.decode(): v[-1].decode("utf-8", "replace") for k, v in request.args.items()}
        if path == "/style.css":
            request.setHeader("Content-Type", "text/css; charset=utf-8")
            request.setHeader("Cache-Control", "max-age=3600")
            request.write(self.css)
            return
        if path == "/signin":
            await (self._sign_in(request, args) if request.method == b"POST" else self._sign_in_form(request, args))
            return
        session = self.sessions.get(_cookie(request, SESSION))
        user = await self._user(session)
        if session is None or user is None:
            query = request.uri.decode("utf-8", "replace").partition("?")[2]
            target = path + (f"?{query}" if query else "")
            return _redirect(request, "/signin?" + urlencode({"next": target}))
        if path == "/signout":
            if request.method != b"POST" or not same(args.get("csrf"), session.csrf):
                raise HttpError(403, "signing out is the button at the top of each page")
            self.sessions.end(session.token)
            request.addCookie(SESSION, "", path="/", max_age="0", httpOnly=True, sameSite="strict")
            await self.audit.viewed(user.name, "console sign-out", {})
            return _redirect(request, "/signin")
        if request.method not in (b"GET", b"HEAD"):
            raise HttpError(405, "the console only shows: nothing is changed from it")
        await self._view(request, path, args, user, session)

    async def _user(self, session: Session | None) -> users_mod.User | None:
        """The session's user as the users file has them now: one removed, given another role, or with a changed
        password (a leaked one, say) is signed out."""
        if session is None:
            return None
        user = (await threads.deferToThread(users_mod.read, self.cfg.users)).get(session.name)
        if user is None or user.role != session.role or not same(user.hash, session.opened_with):
            self.sessions.end(session.token)
            return None
        return user

    async def _sign_in_form(self, request: Request, args: dict[str, str], message: str = "",
                            status: int = 200, name: str = "") -> None:
        token = _cookie(request, CSRF) or secrets.token_urlsafe(24)
        request.addCookie(CSRF, token, path="/signin", httpOnly=True, sameSite="strict")
        self._page(request, "signin.html", None, code=status, csrf=token, message=message, name=name,
                   next=_local(args.get("next")))

    async def _sign_in(self, request: Request, args: dict[str, str]) -> None:
        origin = request.getHeader("origin")
        host = request.getHeader("host")
        if not same(args.get("csrf"), _cookie(request, CSRF)) or (origin and origin.split("://")[-1] != host):
            raise HttpError(403, "the sign-in form has expired or came from another page: open /signin again")
        name, password = args.get("name", "").strip()[:32], args.get("password", "")
        peer = request.getClientAddress().host
        blocked = self.failures.blocked(name, peer)
        if blocked is not None:
            if self.failures.first_refusal(blocked):  # once a window: the guesser's other tries are only refused
                await self.audit.viewed(name, "console sign-in", {"peer": peer},
                                        result="refused: too many wrong passwords")
                log.warn("console: sign-in refused for {name!r} from {peer}: too many wrong passwords; further "
                         "tries are refused unrecorded for {minutes:.0f} minutes", name=name, peer=peer,
                         minutes=Failures.WINDOW / 60)
            who = f"for {name}" if blocked == name else "from this computer"
            return await self._sign_in_form(request, args, f"Too many wrong passwords {who}: wait "
                                            f"{Failures.WINDOW / 60:.0f} minutes (a restart of fep also ends "
                                            f"the wait).", status=429, name=name)
        self.failures.add(name, peer)  # counted before the check: guesses sent at once are counted as they come
        known = await threads.deferToThread(users_mod.read, self.cfg.users)
        user = known.get(name)
        ok = await threads.deferToThread(users_mod.matches, user or users_mod.decoy(), password) and user is not None
        if not ok or user is None:
            await self.audit.viewed(name, "console sign-in", {"peer": peer}, result="refused: wrong name or password")
            log.warn("console: sign-in refused for {name!r} from {peer}", name=name, peer=peer)
            return await self._sign_in_form(request, args, "Wrong name or password.", status=401, name=name)
        self.failures.clear(name, peer)
        session = self.sessions.new(user.name, user.role, user.hash)
        await self.audit.viewed(user.name, "console sign-in", {"peer": peer, "role": user.role})
        request.addCookie(SESSION, session.token, path="/", httpOnly=True, sameSite="strict")
        _redirect(request, _local(args.get("next")))

    # ---- the pages -------------------------------------------------------------------------------------------
    async def _view(self, request: Request, path: str, args: dict[str, str], user: users_mod.User,
                    session: Session) -> None:
        if path == "/trade" and args.get("msgid"):
            return _redirect(request, "/trade/" + quote(args["msgid"].strip(), safe=""))
        page, what = self._route(path, args)
        # kept before it is shown: a page that could not be audited is not shown
        await self.audit.viewed(user.name, "console view", {"page": page, **what})
        if page == "today":
            doc = await self.pages.today()
        elif page == "day":
            doc = await self.pages.day(what["date"])
        elif page == "day.csv":
            text = await self.pages.day_csv(what["date"])
            if text is None:
                raise HttpError(404, f"{what['date']} has not been reconciled: nothing to download")
            return _csv(request, f"reconcile-{what['date']}.csv", text)
        elif page == "month":
            doc = await self.pages.month(what["month"])
        elif page == "month.csv":
            return _csv(request, f"clearing-{what['month']}.csv", await self.pages.month_csv(what["month"]))
        elif page == "trade":
            doc = await self.pages.trade(what["msgid"])
        else:
            doc = {}
        self._page(request, f"{page}.html", (user, session), **doc)

    def _route(self, path: str, args: dict[str, str]) -> tuple[str, dict[str, Any]]:
        if path == "/":
            return "today", {}
        if path in ("/day", "/day.csv"):
            return path[1:], {"date": _date(args.get("date"))}
        if path in ("/month", "/month.csv"):
            month = args.get("month") or date.today().strftime("%Y-%m")
            if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", month):
                raise HttpError(400, f"a month is YYYY-MM, got {month!r}")
            return path[1:], {"month": month}
        if path == "/trade":
            return "find", {}
        if path.startswith("/trade/") and len(path) > 7:
            return "trade", {"msgid": path[7:]}
        raise HttpError(404, f"no page {path}: the pages are Today, The day, The month and A trade")

    def _page(self, request: Request, template: str, who: tuple[users_mod.User, Session] | None,
              code: int = 200, **doc: Any) -> None:
        user = who[0] if who else None
        whole = bool(user and user.sees_whole)
        context = {"user": user, "csrf": who[1].csrf if who else "", "institution": self.institution,
                   "shown": _as_is if whole else _masked, "words": _as_is if whole else _without_commands, **doc}
        html = self.env.get_template(template).render(**context)
        request.setResponseCode(code)
        request.setHeader("Content-Type", "text/html; charset=utf-8")
        request.write(html.encode("utf-8"))


def _as_is(value: Any) -> str:
    return "" if value is None else str(value)


def _masked(value: Any) -> str:
    """ID numbers, psn_no and names masked as in fep's log (fep.logs.mask): the office's view."""
    return "" if value is None else logs.mask(str(value))


def _without_commands(value: Any) -> str:
    """What to do, in words: the `fep` command is the operator's."""
    return COMMAND.sub("an operator's fep command", str(value or ""))


def _cookie(request: Request, name: str) -> str | None:
    value = request.getCookie(name.encode())
    return value.decode("ascii", "replace") if value else None


def _redirect(request: Request, to: str) -> None:
    request.setResponseCode(303)
    request.setHeader("Location", to)


def _local(target: str | None) -> str:
    """Where to go after signing in: a page of this console only: never //elsewhere, nor / tab /elsewhere, which
    browsers read as //elsewhere once they drop the tab (and any other blank or control character)."""
    if not target or any(c.isspace() or ord(c) < 32 or c == "\\" for c in target):
        return "/"
    parts = urlsplit(target)
    return target if target.startswith("/") and not target.startswith("//") and not (parts.scheme or parts.netloc) \
        else "/"


def _date(text: str | None) -> date:
    """The day asked for; unasked, yesterday: the last day the daily run has reconciled."""
    if not text:
        return date.today() - timedelta(days=1)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise HttpError(400, f"a date is YYYY-MM-DD, got {text!r}") from None


def _csv(request: Request, filename: str, text: str) -> None:
    """With a byte-order mark: Excel, which the office opens it in, reads it as UTF-8 then (its Chinese intact)."""
    request.setHeader("Content-Type", "text/csv; charset=utf-8")
    request.setHeader("Content-Disposition", f'attachment; filename="{filename}"')
    request.write(b"\xef\xbb\xbf" + text.encode("utf-8"))


class OfficeSite(Site):
    """Only loopback and the office networks may connect; other peers are closed on at once."""

    def __init__(self, resource: Resource, networks: tuple[Any, ...]) -> None:
        super().__init__(resource)
        self.networks = networks

    def buildProtocol(self, addr: Any) -> Any:  # noqa: N802 (Twisted's name)
        ip = ipaddress.ip_address(addr.host)
        if not ip.is_loopback and not any(ip in n for n in self.networks):
            log.warn("console: connection from {peer} refused: not in console.office_networks", peer=addr.host)
            return None
        return super().buildProtocol(addr)

    def log(self, request: Any) -> None:
        """No access line: every page a person views is in the audit trail."""


async def listen(reactor: Any, cfg: ConsoleSide, pages: Pages, audit: AuditTrail) -> None:
    site = OfficeSite(Console(pages, cfg, audit), cfg.office_networks)
    await endpoints.TCP4ServerEndpoint(reactor, cfg.port, interface=cfg.host).listen(site)
    log.info("console on http://{host}:{port}/ (office networks: {nets})", host=cfg.host, port=cfg.port,
             nets=", ".join(map(str, cfg.office_networks)) or "none; loopback only")
    try:
        known = await threads.deferToThread(users_mod.read, cfg.users)
    except users_mod.UsersError as e:
        log.error("console: {err}: no one can sign in until it is mended", err=str(e))
        return
    if not known:
        log.warn("console: {path} holds no users yet: add them with `fep user add NAME --role office`", path=cfg.users)
