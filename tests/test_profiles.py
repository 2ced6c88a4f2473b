"""Region profiles: the same box, moved from province to province by its bureau.profile block, speaks each
region's gateway; the HIS sends the same plain envelopes everywhere and never signs or encrypts anything."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from fep import config, envelope, gateway
from fep.sim.world import ZHANG, Visit, World, ok, said
from fep.tls import Secret, load_secrets

ROOT = Path(__file__).resolve().parents[1]
STYLES = ["baseline", "guangdong", "hunan", "jiangsu", "jilin"]
DISPATCHER = "/fsi/api/rsfComIfsService/callService"
CALL = {"baseline": DISPATCHER, "guangdong": "/ebus/gdyb_inf/poc/hsa/hgs", "hunan": DISPATCHER, "jiangsu": DISPATCHER,
        "jilin": "/mbs/fmi/fsi/api/callFsiService/callService"}


def reconcile(world: World) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fep.cli", "reconcile", "--date", date.today().isoformat(),
                           "--admin", str(world.dir / "run" / "admin.sock")], capture_output=True, text=True,
                          timeout=120)


def metrics(world: World) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{world.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def settled(world: World) -> tuple[Visit, dict[str, Any]]:
    visit = Visit(world.his, ZHANG)
    identity = visit.identify()
    assert ok(identity), said(identity)
    visit.up_to_settlement()
    answer = visit.settle()
    assert ok(answer), said(answer)
    return visit, answer


@pytest.mark.parametrize("style", STYLES)
def test_a_whole_visit_its_reconciliation_and_a_catalog_sync_go_through_the_region_s_gateway(world: World, style: str) -> None:
    world.use_profile(style)
    world.start()
    visit, answer = settled(world)
    assert isinstance(answer["output"]["setlinfo"], dict) and "enc_type" not in answer  # the HIS reads it plain

    run = reconcile(world)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "平" in run.stdout and "不平" not in run.stdout, run.stdout
    world.assert_ledgers_agree()
    sync = world.cli("catalog", "sync")  # the catalog's file comes back through the gateway as a ZIP stream
    assert sync.returncode == 0, sync.stdout + sync.stderr
    assert {r["state"] for r in world.journal("infno IN ('1301', '9102')")} == {"ANSWERED"}
    assert world.gateway() == {"style": style, "refused": 0, "link_security": "mutual_tls"}
    arrived = world.bureau_request(answer["output"]["setlinfo"]["medins_setl_id"])
    assert arrived["input"]["data"]["psn_no"] == ZHANG["psn_no"]  # as the bureau read it, after its gateway
    assert (arrived.get("signtype"), arrived.get("enc_type")) == (("SM2", "SM4") if style == "jilin" else (None, None))


def _framed(world: World, now: float, spoil: str = "") -> tuple[str, bytes, dict[str, str]]:
    """A 1101 framed as fep frames it under its config, `now` as its clock, with one part spoiled:
    secret (another key), clock (as given), path, headers (one left out), token or signature (jilin)."""
    profile = config.load(world.fep_config).bureau.profile
    secrets = load_secrets(profile.secrets)
    token = None
    if profile.style == "jilin":
        req = gateway.token_request(profile, secrets)
        token = world.to_gateway(req.path, req.body, req.headers)[1]["access_token"]
    if spoil == "token":
        token = "not-a-token"
    if spoil == "secret":  # another key than the bureau's
        secrets.update({n: Secret(n, b"0123456789abcdef") for n in ("secret_key", "client_id") if n in secrets})
    body = envelope.dumps({"infno": "1101", "msgid": f"H43010000001{time.strftime('%Y%m%d%H%M%S')}0001",
                           "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}})
    f = gateway.frame(profile, "1101", body, base_path=CALL[profile.style], trade_path=None, now=now,
                      nonce=uuid.uuid4().hex, secrets=secrets, token=token)
    path, body, headers = f.path, f.body, f.headers
    if spoil == "path":
        path = path.replace("/1101", "/2207")
    if spoil == "headers":
        headers = {k: v for k, v in headers.items() if k != "_api_signature"}
    if spoil == "signature":
        env = envelope.loads(body)
        env["cainfo"] = env["cainfo"][::-1]
        body = envelope.dumps(env)
    return path, body, headers


WRONG = [  # (style, what is spoiled, HTTP status, the gateway's own words)
    ("guangdong", "secret", 401, "签名校验失败"),
    ("guangdong", "clock", 401, "请求时间戳已过期"),
    ("guangdong", "path", 404, "no service at"),
    ("guangdong", "replay", 401, "重复的请求"),
    ("hunan", "secret", 401, "签名不一致"),
    ("hunan", "clock", 401, "签名时间戳超时"),
    ("hunan", "headers", 401, "缺少服务网关的请求头"),
    ("jilin", "token", 401, "invalid_token"),
    ("jilin", "secret", 400, "报文解密失败"),
    ("jilin", "signature", 400, "验签失败"),
]


@pytest.mark.parametrize("style, spoil, status, words", WRONG)
def test_the_simulated_gateway_refuses_a_wrong_request_as_the_region_s_does(world: World, style: str, spoil: str,
                                                                             status: int, words: str) -> None:
    world.use_profile(style)
    world.start_sim()
    request = _framed(world, time.time())
    good_status, good = world.to_gateway(*request)
    assert good_status == 200 and "infcode" in good, good  # the same request, unspoiled, reaches the bureau
    if spoil != "replay":  # a replay is that very request again
        request = _framed(world, time.time() - (31 * 60 if spoil == "clock" else 0), spoil)
    got_status, doc = world.to_gateway(*request)
    assert got_status == status and words in envelope.dumps(doc).decode(), (got_status, doc)
    assert "infcode" not in doc  # the gateway's answer, never the bureau's


HEBEI_1101 = "/fsi/api/fsiPsnInfoService/queryPsnInfo"  # reference §2.1


def test_per_service_paths_come_from_the_trade_catalog_and_a_wrong_one_gets_404(world: World) -> None:
    world.use_profile("baseline", url_layout="per_trade", paths={"1101": HEBEI_1101})
    world.configure(trades={"1101": {"path": HEBEI_1101}})
    world.start()
    assert ok(Visit(world.his, ZHANG).identify())
    body = envelope.dumps({"infno": "1101", "msgid": "H43010000001202601010000000001", "input": {"data": {}}})
    status, doc = world.to_gateway(HEBEI_1101 + "X", body, {})
    assert (status, doc["code"]) == (404, 404)


def fep_reads(world: World, name: str, value: bytes, mode: int = 0o600) -> Path:
    """fep's copy of a secret, apart from the bureau's (use_profile gives both sides the same files)."""
    path = world.dir / f"fep-{name}"
    path.write_bytes(value)
    path.chmod(mode)
    world.configure(fep={"bureau": {"profile": {"secrets": {name: str(path)}}}})
    return path


def test_a_wrong_secret_is_not_sent_and_the_trade_goes_once_the_file_is_fixed_and_reloaded(world: World) -> None:
    files = world.use_profile("hunan")
    right = files["secret_key"].read_bytes()
    ours = fep_reads(world, "secret_key", b"not-the-bureau-s-key\n")  # as a typo would leave it
    world.start_sim()
    world.start_fep()
    answer = Visit(world.his, ZHANG).identify()
    assert not ok(answer) and "签名不一致" in said(answer), answer
    assert world.gateway()["refused"] >= 1

    ours.write_bytes(right)
    assert "applied" in world.cli("reload").stdout
    assert ok(Visit(world.his, ZHANG).identify())
    assert right.decode().strip() not in world.log("run") + world.cli("status", "--json").stdout


def test_an_expired_token_is_fetched_anew_and_the_trade_sent_again_once(world: World) -> None:
    world.use_profile("jilin")
    world.start()
    visit = Visit(world.his, ZHANG)
    assert ok(visit.identify())
    world.expire_tokens()
    answer = visit.identify()
    assert ok(answer), said(answer)
    assert world.gateway()["refused"] == 1  # the old token, once; the new one took the trade


def test_a_secret_readable_by_others_stops_fep_from_starting_naming_the_file(world: World) -> None:
    files = world.use_profile("guangdong")
    ours = fep_reads(world, "secret_key", files["secret_key"].read_bytes(), mode=0o644)
    world.start_sim()
    proc = world.start_fep(wait=False)
    assert proc.wait(30) == 2
    assert f"secret secret_key {ours} is readable by others" in world.log("run")


@pytest.mark.parametrize("security", ["plain_http", "server_tls"])
def test_a_link_without_mutual_tls_is_used_only_when_set_and_shown(world: World, security: str) -> None:
    world.use_profile("hunan", link_security=security)
    world.start()
    settled(world)
    status = world.cli("status")
    assert f"bureau link: {security} (NOT mutual TLS" in status.stdout, status.stdout
    text = metrics(world)
    assert f'fep_bureau_link_security{{mode="{security}"}} 1.0' in text
    assert 'fep_bureau_link_security{mode="mutual_tls"} 0.0' in text


def test_plain_http_is_refused_unless_the_link_says_so(world: World) -> None:
    world.configure(fep={"bureau": {"endpoints": [{"name": "sim", "url": f"http://127.0.0.1:{world.sim_port}/x"}]}})
    proc = world.start_fep(wait=False)
    assert proc.wait(30) == 2
    assert "bureau.link_security is mutual_tls" in world.log("run") and "plain_http" in world.log("run")


def test_mutual_tls_is_the_default_and_shown(running: World) -> None:
    assert "bureau link: mutual_tls, profile baseline" in running.cli("status").stdout
    assert 'fep_bureau_link_security{mode="mutual_tls"} 1.0' in metrics(running)


def bureau_config(tmp_path: Path, **bureau: Any) -> config.Config:
    doc = yaml.safe_load((ROOT / "conf" / "fep.yaml").read_text())
    doc["trades"] = str(ROOT / "conf" / "trades.yaml")
    doc["bureau"].update(bureau)
    (tmp_path / "fep.yaml").write_text(yaml.safe_dump(doc, allow_unicode=True))
    return config.load(tmp_path / "fep.yaml")


@pytest.mark.parametrize("bureau, message", [
    ({"profile": {"style": "hebei"}}, "bureau.profile.style must be one of baseline, guangdong, hunan, jiangsu, jilin"),
    ({"profile": {"style": "guangdong", "secrets": {"secret_key": "/etc/fep/secrets/k"}}},
     "bureau.profile.paasid is required by the guangdong style"),
    ({"profile": {"style": "hunan"}}, "bureau.profile.secrets.access_key is required"),
    ({"profile": {"style": "hunan", "secrets": {"access_key": "/etc/fep/ak", "secret_key": "8f3a9c2e1b"}}},
     "bureau.profile.secrets.secret_key must be the path of the file holding it"),
    ({"profile": {"style": "hunan", "secret_key": "/etc/fep/sk"}}, "bureau.profile.secret_key is not a known key; did you mean bureau.profile.secrets?"),
    ({"url_style": "infno_path", "profile": {"url_layout": "dispatcher"}},
     "bureau.url_style is the old name of bureau.profile.url_layout"),
    ({"link_security": "none"}, "bureau.link_security must be mutual_tls, server_tls, plain_http"),
])
def test_a_wrong_profile_is_refused_naming_the_key(tmp_path: Path, bureau: dict, message: str) -> None:
    with pytest.raises(config.ConfigError, match=re.escape(message)):
        bureau_config(tmp_path, **bureau)


def test_the_keys_before_the_profile_still_work(tmp_path: Path) -> None:
    cfg = bureau_config(tmp_path, profile=None, url_style="infno_path", content_type="text/plain").bureau
    assert (cfg.profile.style, cfg.url_style, cfg.content_type) == ("baseline", "infno_path", "text/plain")


def test_server_tls_needs_only_the_bureau_s_ca_and_plain_http_no_tls(tmp_path: Path) -> None:
    cfg = bureau_config(tmp_path, link_security="server_tls", tls={"ca": "var/pki/ca.pem"}).bureau
    assert (cfg.tls.cert, cfg.tls.key) == (None, None)
    plain = bureau_config(tmp_path, link_security="plain_http", tls=None,
                          endpoints=[{"name": "hn", "url": f"http://10.1.2.3:8097{CALL['hunan']}"}])
    assert plain.bureau.tls is None and plain.bureau.endpoints[0].port == 8097
