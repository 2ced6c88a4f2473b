"""Issue 18 from the outside: the office's console as a curious office PC, a guesser on the LAN and an administrator
who has just changed a leaked password see it, plain HTTP against a running fep and the simulator."""

from __future__ import annotations

import http.client
import re
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from fep import config
from fep.sim.world import World, free_port
from tests.test_console import OFFICE, OPERATOR, PASSWORD, audit, user, with_console


class Office:
    """One office PC's browser, cookies and all, without the browser: the console as HTTP."""

    def __init__(self, world: World) -> None:
        self.port = config.load(world.fep_config).console.port
        self.cookies: dict[str, str] = {}

    def ask(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            text = r.read().decode("utf-8", "replace")
            for value in r.headers.get_all("Set-Cookie") or []:
                name, _, rest = value.partition("=")
                self.cookies[name] = rest.split(";")[0]
            return r.status, dict(r.headers), text
        finally:
            conn.close()

    def form_token(self) -> str:
        _, _, page = self.ask("GET", "/signin")
        return re.search(r'name="csrf" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]

    def sign_in(self, name: str, password: str) -> int:
        return self.ask("POST", "/signin", {"csrf": self.form_token(), "name": name, "password": password})[0]


def test_a_guesser_sending_wrong_passwords_at_once_gets_more_than_five_tries(world: World) -> None:
    """A PC on the office network guesses li.ops's password, twenty guesses sent at the same moment instead of one
    after another. The console promises that after five wrong passwords the name is refused, its password not even
    tried: each guess past the fifth must be answered 429 and never checked. The lock is looked at before the
    (slow, threaded) scrypt check and counted only after it, so every guess in flight is checked."""
    with_console(world)
    guesser = Office(world)
    token = guesser.form_token()
    form = {"csrf": token, "name": OPERATOR}

    def guess(n: int) -> int:
        return guesser.ask("POST", "/signin", {**form, "password": f"guess-number-{n:02d}"})[0]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(guess, range(20)))
    tried = [e for e in audit(world) if e["action"] == "console sign-in"
             and e["result"] == "refused: wrong name or password"]
    assert answers.count(401) <= 5 and len(tried) <= 5, (
        f"{answers.count(401)} of 20 guesses had their password checked ({answers.count(429)} refused as too many)")


def test_a_guesser_trying_a_new_name_each_time_is_stopped_and_cannot_fill_the_audit_trail(world: World) -> None:
    """A PC on the office network makes up a new name for each guess, so that no name reaches five wrong passwords.
    After twenty wrong tries from that computer it is refused, passwords unchecked, for the window; the forty tries
    it sends after that add one refusal to the audit trail, not forty."""
    with_console(world)
    guesser = Office(world)
    token = guesser.form_token()
    answers = [guesser.ask("POST", "/signin", {"csrf": token, "name": f"guess{n:03d}", "password": "x"})[0]
               for n in range(60)]
    assert answers[:20] == [401] * 20 and set(answers[20:]) == {429}, answers
    refused = [e["result"] for e in audit(world) if e["action"] == "console sign-in"]
    assert refused.count("refused: wrong name or password") == 20, refused
    assert refused.count("refused: too many wrong passwords") == 1, refused


def test_a_guesser_who_knows_one_password_is_stopped_after_twenty_wrong_ones_all_the_same(world: World) -> None:
    """The guesser of the story above has a clerk's own password too, and signs in with it after every nine
    guesses, hoping each success starts the computer's twenty again. It does not: the right password clears its
    own name's count only."""
    with_console(world)
    guesser = Office(world)
    token = guesser.form_token()
    answers = []
    for rounds in range(3):
        answers += [guesser.ask("POST", "/signin", {"csrf": token, "name": f"guess{rounds}{n}", "password": "x"})[0]
                    for n in range(9)]
        guesser.sign_in(OPERATOR, PASSWORD)
    assert answers[:20] == [401] * 20 and set(answers[20:]) == {429}, answers


def test_changing_a_leaked_password_signs_out_whoever_used_it(world: World) -> None:
    """wang's password leaked; someone on the office LAN signed in with it. The administrator runs `fep user passwd
    wang`, which answers "sessions of a removed or changed user end at their next page". The one who signed in with
    the old password must be sent to the sign-in page at their next page; the session only ends on a role change."""
    with_console(world)
    intruder = Office(world)
    assert intruder.sign_in(OFFICE, PASSWORD) == 303
    assert intruder.ask("GET", "/")[0] == 200

    changed = user(world, "passwd", OFFICE, password="a-new-password-2")
    assert changed.returncode == 0, changed.stderr
    assert "sessions of a removed or changed user end" in changed.stdout
    status, headers, _ = intruder.ask("GET", "/")
    assert status == 303 and headers.get("Location", "").startswith("/signin"), (
        f"the old password's session still reads Today after `fep user passwd {OFFICE}` (status {status})")


def test_after_signing_in_the_office_is_never_sent_to_another_site(world: World) -> None:
    """A phishing mail links the office to the console's own sign-in page with next=/<tab>/evil.example. The console
    promises that after signing in it goes to "a page of this console only (never //elsewhere)". A browser drops
    tabs and newlines from a URL (WHATWG URL parsing, and Python's urlsplit alike), so the Location it is given must
    still name the console, not another host."""
    with_console(world)
    office = Office(world)
    base = f"http://127.0.0.1:{office.port}/"
    for trick in ("/\t/evil.example/signin", "/\n/evil.example/signin", "/\r/evil.example/signin"):
        status, headers, _ = office.ask("POST", "/signin", {"csrf": office.form_token(), "name": OFFICE,
                                                            "password": PASSWORD, "next": trick})
        assert status == 303, status
        goes_to = urllib.parse.urljoin(base, headers.get("Location", ""))
        assert urllib.parse.urlsplit(goes_to).netloc == f"127.0.0.1:{office.port}", (
            f"next={trick!r}: signed in, the browser is sent to {goes_to!r}")


def test_a_console_port_no_listener_can_have_is_refused_naming_the_key(world: World) -> None:
    """The administrator writes console.port: 0 (or 70000) by mistake. Every other port in fep.yaml is refused
    naming its key when it is not 1..65535; the console's is accepted, and with 0 fep would open the console on
    a port nobody knows, with 70000 fail only when it listens."""
    for wrong in (0, 70000):
        world.configure(fep={"console": {"port": wrong, "users": str(world.dir / "conf" / "console-users")}})
        try:
            config.load(world.fep_config)
        except config.ConfigError as e:
            assert "console.port" in str(e)
        else:
            raise AssertionError(f"console.port: {wrong} was accepted")



def test_office_networks_the_console_cannot_be_reached_from_are_refused(world: World) -> None:
    """The administrator names the office's network but also writes console.host: 127.0.0.1 (or the office-facing
    address, and forgets office_networks). Either way no office PC can ever open the console: it listens on loopback
    only, or it closes every connection that is not loopback's. fep.yaml is to say so when it is loaded, naming the
    keys, not leave the office looking at a refused connection on Monday morning."""
    users = str(world.dir / "conf" / "console-users")
    for wrong in ({"host": "127.0.0.1", "office_networks": ["10.20.0.0/16"]}, {"host": "10.20.0.5"}):
        world.configure(fep={"console": {"port": free_port(), "users": users, **wrong}})
        try:
            side = config.load(world.fep_config).console
        except config.ConfigError as e:
            assert "console." in str(e)
        else:
            raise AssertionError(f"{wrong} was accepted: listening on {side.host}, letting in loopback and "
                                 f"{[str(n) for n in side.office_networks]}")


def test_a_patient_name_that_is_a_script_is_shown_as_text_and_masked_for_the_office(world: World) -> None:
    """The HIS sends a 1101 whose psn_name is a script (typed at the registration desk, or a hostile HIS user).
    The office opens the trade's life: the name is masked for it, the script is text for both roles, and the
    page forbids scripts and frames whatever it holds."""
    from fep.sim.world import ZHANG

    with_console(world)
    hostile = '张三丰"><script>alert(1)</script><img src=x onerror=alert(2)>'
    answer = world.his.call("1101", {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"],
                                              "certno": ZHANG["certno"], "psn_name": hostile}})
    msgid = answer["fep_msgid"]
    for name, sees_whole in ((OFFICE, False), (OPERATOR, True)):
        reader = Office(world)
        assert reader.sign_in(name, PASSWORD) == 303
        status, headers, page = reader.ask("GET", f"/trade/{msgid}")
        assert status == 200, page
        assert "<script" not in page and "<img" not in page, name
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
        if not sees_whole:
            assert "张三丰" not in page and ZHANG["certno"] not in page, "the office sees the name or ID whole"


def test_a_script_in_the_bureau_s_err_msg_is_text_on_the_trade_page(world: World) -> None:
    """The bureau refuses a fee upload with an err_msg holding a script and the patient's name and ID number. On
    the trade's page the office reads it as text, the name and ID number masked."""
    from fep.sim.world import ZHANG, Visit

    with_console(world)
    visit = Visit(world.his, ZHANG)
    visit.open()
    world.fault(mode="error", infno="2204", times=1,
                message=f'参保人张三丰({ZHANG["certno"]})费用明细有误<script>alert(1)</script>')
    refused = visit.upload_fees()
    assert refused["infcode"] != 0, refused
    office = Office(world)
    assert office.sign_in(OFFICE, PASSWORD) == 303
    status, _, page = office.ask("GET", f"/trade/{refused['fep_msgid']}")
    assert status == 200, page
    assert "<script" not in page and "张三丰" not in page and ZHANG["certno"] not in page
