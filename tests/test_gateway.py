"""The region gateways' framing, as the provincial documents give the formulas (reference §2): each
signature is recomputed here from its published definition, not from fep's code."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import gmalg
import pytest

from fep import envelope, gateway, pki
from fep.config import Profile
from fep.tls import Secret, TLSConfigError, load_secrets

CALL = "/fsi/api/rsfComIfsService/callService"  # the baseline's one URL
NOW = 1_764_547_200.5  # 2025-12-01 00:00:00.5 UTC
TRADE = envelope.dumps({"infno": "1101", "msgid": "H43010000001202512010000000001",
                        "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": "430102198001010011"}}})


def profile(style: str, **settings: str) -> Profile:
    return Profile(style=style, url_layout="infno_path" if style == "guangdong" else "dispatcher",
                   settings=tuple(settings.items()))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return pki.gateway_secrets(tmp_path_factory.mktemp("secrets"))


@pytest.fixture(scope="module")
def secrets(files: dict[str, Path]) -> dict[str, Secret]:
    return load_secrets(tuple(files.items()))


def test_a_test_pki_sm2_key_with_a_leading_zero_byte_is_written_whole(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One key in 256 begins with a zero byte, and gmalg gives it as 31 bytes: written so, fep would refuse it
    (64 hex digits) and the SM2 regions' tests would fail one run in 256."""
    sk = bytes(1) + bytes(range(1, 32))
    monkeypatch.setattr(gmalg.SM2, "generate_keypair", lambda self: (sk[1:], gmalg.SM2().generate_pk(sk)))
    made = load_secrets(tuple(pki.gateway_secrets(tmp_path).items()))
    signer = gateway.sm2_private(made, "1234567812345678")  # (BadSecret for a key of 62 hex digits)
    assert signer.verify(b"x", *signer.sign(b"x"))


def test_the_baseline_adds_nothing_and_sends_the_envelope_as_journalled(secrets: dict[str, Secret]) -> None:
    out = gateway.frame(Profile(content_type="text/plain"), "1101", TRADE, base_path=CALL, trade_path=None, now=NOW,
                        nonce="n", secrets=secrets)
    assert (out.path, out.headers, out.body) == (CALL, {"Content-Type": "text/plain"}, TRADE)


def test_guangdong_signs_timestamp_secret_nonce_timestamp_with_sha256(secrets: dict[str, Secret]) -> None:
    out = gateway.frame(profile("guangdong", paasid="gd_paas"), "2207", TRADE, base_path="/ebus/gdyb_inf/poc/hsa/hgs",
                        trade_path=None, now=NOW, nonce="abc123", secrets=secrets)
    ts = "1764547200"
    expected = hashlib.sha256((ts + secrets["secret_key"].value.decode() + "abc123" + ts).encode()).hexdigest()
    assert out.path == "/ebus/gdyb_inf/poc/hsa/hgs/2207"
    assert out.headers["x-tif-paasid"] == "gd_paas" and out.headers["x-tif-timestamp"] == ts
    assert out.headers["x-tif-nonce"] == "abc123" and out.headers["x-tif-signature"] == expected
    assert out.body == TRADE


@pytest.mark.parametrize("style", ["baseline", "guangdong", "hunan", "jiangsu", "jilin"])
def test_only_a_style_that_uses_a_nonce_sends_one(style: str, secrets: dict[str, Secret]) -> None:
    """The link makes a nonce (os.urandom) only where uses_nonce says the request carries it."""
    settings = {"paasid": "p", "api_version": "1.0.0", "sm2_uid": "1234567812345678"}
    sent = [gateway.frame(profile(style, **settings), "2207", TRADE, base_path=CALL, trade_path=None, now=NOW,
                          nonce=nonce, secrets=secrets, token="tok").headers for nonce in ("n1", "n2")]
    assert (sent[0] != sent[1]) is gateway.uses_nonce(profile(style)), sent


def test_hunan_signs_the_sorted_api_headers_with_hmac_sha1_and_names_the_trade(secrets: dict[str, Secret]) -> None:
    out = gateway.frame(profile("hunan", api_version="1.0.0"), "2207", TRADE, base_path=CALL, trade_path=None,
                        now=NOW, nonce="n", secrets=secrets)
    h = out.headers
    ak, sk = secrets["access_key"].value.decode(), secrets["secret_key"].value
    assert (h["_api_name"], h["_api_version"], h["_api_timestamp"], h["_api_access_key"]) == (
        "2207", "1.0.0", "1764547200500", ak)
    text = f"_api_access_key={ak}&_api_name=2207&_api_timestamp=1764547200500&_api_version=1.0.0"
    assert h["_api_signature"] == base64.b64encode(hmac.new(sk, text.encode(), hashlib.sha1).digest()).decode()


def test_jilin_encrypts_the_input_signs_it_and_decrypts_the_output(secrets: dict[str, Secret]) -> None:
    jl = profile("jilin", username="u", token_path="/auth/oauth/token", scope="server", refresh_before="60",
                 sm2_uid="1234567812345678")
    out = gateway.frame(jl, "1101", TRADE, base_path="/mbs/fmi/fsi/api/callFsiService/callService", trade_path=None,
                        now=NOW, nonce="n", secrets=secrets, token="tok")
    assert out.headers["Authorization"] == "Bearer tok"
    sent = envelope.loads(out.body)
    assert (sent["signtype"], sent["enc_type"], sent["msgid"]) == ("SM2", "SM4", "H43010000001202512010000000001")
    key = secrets["client_id"].value
    plain = gateway.sm4_decrypt(key, sent["input"])
    assert envelope.loads(plain) == envelope.loads(TRADE)["input"]
    raw = base64.b64decode(sent["cainfo"])
    public = bytes.fromhex(secrets["sm2_public_key"].value.decode())
    assert gmalg.SM2(pk=public, uid=b"1234567812345678").verify(plain, raw[:32], raw[32:])

    answer = {"infcode": 0, "output": gateway.sm4_encrypt(key, envelope.dumps({"baseinfo": {"psn_no": "1"}}))}
    assert envelope.loads(gateway.unframe(jl, 200, envelope.dumps(answer), secrets))["output"] == {
        "baseinfo": {"psn_no": "1"}}
    with pytest.raises(gateway.Unreadable, match="cannot be decrypted"):
        gateway.unframe(jl, 200, envelope.dumps({"infcode": 0, "output": base64.b64encode(b"x" * 16).decode()}),
                        secrets)
    refused = envelope.dumps({"infcode": -1, "err_msg": "参保人不存在", "output": None})
    assert gateway.unframe(jl, 200, refused, secrets) == refused  # the bureau's own refusal is its answer


@pytest.mark.parametrize("status, body, token", [
    (401, {"code": 401, "message": "签名不一致"}, False),
    (401, {"code": "401", "message": "签名时间戳超时"}, False),
    (401, {"error": "invalid_token", "error_description": "Invalid access token: x"}, True),
])
def test_a_refusal_of_the_gateway_is_told_apart_from_the_bureau_s_answer(status: int, body: dict, token: bool) -> None:
    with pytest.raises(gateway.Refused) as refused:
        gateway.unframe(Profile(), status, envelope.dumps(body), {})
    assert refused.value.token is token
    bureau = envelope.dumps({"infcode": "-1", "err_msg": "code 401", "code": 1})
    assert gateway.unframe(Profile(), 200, bureau, {}) == bureau


def test_the_token_is_asked_for_by_password_grant_and_its_lifetime_read(secrets: dict[str, Secret]) -> None:
    jl = profile("jilin", username="his01", token_path="/auth/oauth/token", scope="server")
    req = gateway.token_request(jl, secrets)
    basic = base64.b64decode(req.headers["Authorization"].removeprefix("Basic "))
    assert basic == secrets["client_id"].value + b":" + secrets["client_secret"].value
    assert req.path == "/auth/oauth/token" and b"grant_type=password" in req.body and b"username=his01" in req.body
    assert gateway.token_answer(200, b'{"access_token":"t1","token_type":"bearer","expires_in":7199}') == ("t1", 7199)
    with pytest.raises(gateway.Refused, match="invalid_grant"):
        gateway.token_answer(400, b'{"error":"invalid_grant","error_description":"Bad credentials"}')


def test_a_secret_file_others_can_read_is_refused_and_a_secret_never_shows(files: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    loose = tmp_path / "secret_key"
    loose.write_text("s3cr3t\n")
    loose.chmod(0o644)
    with pytest.raises(TLSConfigError, match=r"secret secret_key .* is readable by others \(mode 644\); chmod 600"):
        load_secrets((("secret_key", loose),))
    with pytest.raises(TLSConfigError, match="does not exist"):
        load_secrets((("secret_key", tmp_path / "missing"),))
    loaded = load_secrets((("secret_key", files["secret_key"]),))
    assert files["secret_key"].read_text().strip() not in repr(loaded)


def test_an_sm_key_of_the_wrong_size_is_refused_at_load_naming_the_secret(secrets: dict[str, Secret]) -> None:
    jl = profile("jilin", sm2_uid="1234567812345678")
    with pytest.raises(gateway.BadSecret, match="client_id is also the SM4 key and must be 16 bytes"):
        gateway.check(jl, {**secrets, "client_id": Secret("client_id", b"short")})
    with pytest.raises(gateway.BadSecret, match="sm2_private_key must be the private key as 64 hex digits"):
        gateway.check(jl, {**secrets, "sm2_private_key": Secret("sm2_private_key", b"not hex")})


def test_an_sm2_signature_is_always_64_bytes_though_r_or_s_starts_with_a_zero_byte() -> None:
    class ShortR:  # one signature in 128 has an r (or s) under 2^248: the library gives it in 31 bytes
        def sign(self, data: bytes) -> tuple[bytes, bytes]:
            return b"\x01" * 31, b"\x02" * 32

    raw = base64.b64decode(gateway.sm2_sign(ShortR(), b"{}"))  # type: ignore[arg-type]
    assert raw == b"\x00" + b"\x01" * 31 + b"\x02" * 32
