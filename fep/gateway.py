"""The provincial gateway in front of the bureau (reference §2): how one trade's envelope is framed for it
(URL path, headers, signature, token, payload encryption) and how its answer is unframed.

Pure: the clock, the nonce, the secrets and the token are given, nothing here does IO, so the bureau
link only calls it and the simulator checks requests with the same formulas. The HIS never sees any
of it: it sends and receives the plain national envelope whatever the region.

- baseline: nothing added (HN appendix A).
- guangdong: x-tif-paasid, x-tif-timestamp (Unix s), x-tif-nonce, x-tif-signature =
  sha256_hex(timestamp + secret + nonce + timestamp), lower-case (SZ, ZB, HB).
- hunan / jiangsu: _api_name (the trade number, as HN's published spec has it), _api_version,
  _api_timestamp (ms), _api_access_key, _api_signature = Base64(HmacSHA1(SK, the four sorted k=v joined by &)).
- jilin: Authorization: Bearer (OAuth2 password grant), cainfo = Base64(SM3withSM2 r||s over the input
  JSON), signtype SM2, enc_type SM4, input and output = Base64(SM4/ECB/PKCS7, key = the 16-byte client id) (JL).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping
from urllib.parse import urlencode

import gmalg
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fep import envelope
from fep.config import Profile
from fep.tls import Secret

Secrets = Mapping[str, Secret]


@dataclass(frozen=True)
class Framed:
    path: str
    headers: dict[str, str]
    body: bytes


class Refused(Exception):
    """The gateway refused the request before the bureau saw it: not sent, safe to send again once the
    cause is fixed. `token` is set when the refusal is of the bearer token (expired or revoked)."""

    def __init__(self, message: str, token: bool = False) -> None:
        super().__init__(message)
        self.token = token


class Unreadable(Exception):
    """The answer came but its framing is wrong (it cannot be decrypted): it may have been processed."""


class BadSecret(ValueError):
    """A secret file holds something the style cannot use (names the secret, never shows it)."""


# ---- the formulas, shared with the simulator ------------------------------------------------------------
def tif_signature(timestamp: str, secret: bytes, nonce: str) -> str:
    return hashlib.sha256(timestamp.encode() + secret + nonce.encode() + timestamp.encode()).hexdigest()


def api_signature(secret: bytes, headers: Mapping[str, str]) -> str:
    fields = ("_api_access_key", "_api_name", "_api_timestamp", "_api_version")
    text = "&".join(f"{k}={headers[k]}" for k in sorted(fields))
    return base64.b64encode(hmac.new(secret, text.encode("utf-8"), hashlib.sha1).digest()).decode("ascii")


def sm4_key(secrets: Secrets) -> bytes:
    key = secrets["client_id"].value
    if len(key) != 16:
        raise BadSecret(f"secret client_id is also the SM4 key and must be 16 bytes, it has {len(key)}")
    return key


def sm4_encrypt(key: bytes, plain: bytes) -> str:
    padder = padding.PKCS7(128).padder()
    enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    return base64.b64encode(enc.update(padder.update(plain) + padder.finalize()) + enc.finalize()).decode("ascii")


def sm4_decrypt(key: bytes, text: str) -> bytes:
    """Raises ValueError when `text` is not Base64 SM4 ciphertext made with `key`."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as e:
        raise ValueError(f"not Base64: {e}") from None
    if not raw or len(raw) % 16:
        raise ValueError("not whole SM4 blocks")
    dec = Cipher(algorithms.SM4(key), modes.ECB()).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(dec.update(raw) + dec.finalize()) + unpadder.finalize()


def sm2_private(secrets: Secrets, uid: str) -> gmalg.SM2:
    try:
        sk = bytes.fromhex(secrets["sm2_private_key"].value.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise BadSecret("secret sm2_private_key must be the private key as 64 hex digits") from None
    if len(sk) != 32:
        raise BadSecret(f"secret sm2_private_key must be 32 bytes (64 hex digits), it has {len(sk)}")
    return _signer(sk, uid)


@lru_cache(maxsize=4)
def _signer(sk: bytes, uid: str) -> gmalg.SM2:
    """The signer of a key (its public key, which the Z value needs, is a point multiplication: once per key)."""
    return gmalg.SM2(sk=sk, uid=uid.encode(), pk=gmalg.SM2().generate_pk(sk))


def sm2_sign(signer: gmalg.SM2, data: bytes) -> str:
    """r||s, each 32 bytes: gmalg gives the shortest big-endian form, and 1 signature in 128 has a leading zero."""
    r, s = signer.sign(data)
    return base64.b64encode(r.rjust(32, b"\0") + s.rjust(32, b"\0")).decode("ascii")


def sm2_verify(public_key: bytes, uid: str, data: bytes, cainfo: str) -> bool:
    try:
        raw = base64.b64decode(cainfo, validate=True)
    except binascii.Error:
        return False
    return len(raw) == 64 and gmalg.SM2(pk=public_key, uid=uid.encode()).verify(data, raw[:32], raw[32:])


def check(profile: Profile, secrets: Secrets) -> None:
    """Raises BadSecret when a secret is unusable for the profile: at (re)load, not at the first trade."""
    if profile.style == "jilin":
        sm4_key(secrets)
        sm2_private(secrets, profile.setting("sm2_uid"))


# ---- fep's side --------------------------------------------------------------------------------------------
def path_for(profile: Profile, base_path: str, infno: str, trade_path: str | None) -> str:
    if profile.url_layout == "infno_path":
        return f"{base_path.rstrip('/')}/{infno}"
    if profile.url_layout == "per_trade" and trade_path:
        return trade_path
    return base_path


def uses_nonce(profile: Profile) -> bool:
    """Only the x-tif signature has a nonce: the link makes one (os.urandom) only for the style that sends it."""
    return profile.style == "guangdong"


def frame(profile: Profile, infno: str, body: bytes, *, base_path: str, trade_path: str | None, now: float,
          nonce: str, secrets: Secrets, token: str | None = None) -> Framed:
    """The request as the region's gateway wants it. `body` is the envelope as journalled; `nonce` is read
    only where `uses_nonce`."""
    headers = {"Content-Type": profile.content_type}
    style = profile.style
    if style == "guangdong":
        ts = str(int(now))
        headers.update({"x-tif-paasid": profile.setting("paasid"), "x-tif-timestamp": ts, "x-tif-nonce": nonce,
                        "x-tif-signature": tif_signature(ts, secrets["secret_key"].value, nonce)})
    elif style in ("hunan", "jiangsu"):
        api = {"_api_name": infno, "_api_version": profile.setting("api_version"),
               "_api_timestamp": str(int(now * 1000)),
               "_api_access_key": secrets["access_key"].value.decode("utf-8")}
        headers.update(api, _api_signature=api_signature(secrets["secret_key"].value, api))
    elif style == "jilin":
        assert token is not None, "the jilin style sends under a token"
        headers["Authorization"] = f"Bearer {token}"
        body = _sealed_request(profile, body, secrets)
    return Framed(path_for(profile, base_path, infno, trade_path), headers, body)


def _sealed_request(profile: Profile, body: bytes, secrets: Secrets) -> bytes:
    env = envelope.loads(body)
    plain = envelope.dumps(env.get("input", {}))
    env.update(cainfo=sm2_sign(sm2_private(secrets, profile.setting("sm2_uid")), plain), signtype="SM2",
               enc_type="SM4", input=sm4_encrypt(sm4_key(secrets), plain))
    return envelope.dumps(env)


def unframe(profile: Profile, status: int, body: bytes, secrets: Secrets) -> bytes:
    """The answer's envelope as the national interface has it (output decrypted). Raises Refused for a
    refusal of the gateway itself, Unreadable for an answer that cannot be decrypted."""
    refusal = _gateway_refusal(status, body)
    if refusal is not None:
        raise refusal
    if profile.style != "jilin" or status != 200:
        return body
    try:
        env = envelope.loads(body)
    except ValueError:
        return body  # not an envelope: the link says so, as for any region
    if not isinstance(env, dict) or not isinstance(env.get("output"), str) or not env["output"]:
        return body  # a refusal of the bureau has no (encrypted) output
    try:
        env["output"] = envelope.loads(sm4_decrypt(sm4_key(secrets), env["output"]))
    except ValueError as e:
        raise Unreadable(f"the answer's output cannot be decrypted with the SM4 key: {e}") from None
    env.pop("enc_type", None)
    return envelope.dumps(env)


# What a gateway answers when it refused a request before forwarding it (reference §2: 缺少服务网关的请求头,
# 签名时间戳超时, 非法用户, 签名不一致 are 401): a bad request or header, authentication, a path it has no service
# at, throttling. Anything else of its own (500, 502, 503, 504 调用后端服务超时...) is of its backend, which may
# have taken the trade: an unknown outcome, never "not sent".
REFUSED_BEFORE = frozenset({400, 401, 403, 404, 405, 429})

_NONE = object()
# A gateway's refusal is a few fields: a body past this is the bureau's answer (or nothing a gateway would say),
# and is not read for one (the 2 MB answer to a big upload: 1.5 ms of the reactor's, and read again after)
REFUSAL_MAX = 64 << 10


def _gateway_refusal(status: int, body: bytes) -> Refused | None:
    """A gateway's own refusal before forwarding: {"code":401,"message":…} (Hunan CSB, x-tif) or an OAuth2
    error ({"error":"invalid_token"}), under a status of REFUSED_BEFORE (the body's code where HTTP says 200);
    never an envelope, which always has infcode."""
    if len(body) > REFUSAL_MAX:
        return None
    try:
        if envelope.top_field(body, "infcode", _NONE) is not _NONE:  # an envelope (a 2 MB one is not parsed)
            return None
        doc = envelope.loads(body)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if isinstance(doc.get("error"), str) and status in (400, 401, 403):
        return Refused(f"the gateway refused the token: {doc['error']} ({doc.get('error_description', '')})",
                       token=doc["error"] == "invalid_token")
    if "code" in doc and "message" in doc and _code(status, doc["code"]) in REFUSED_BEFORE:
        return Refused(f"the gateway refused it before the bureau: {doc.get('code')} {doc.get('message')}")
    return None


def _code(status: int, code: Any) -> int:
    """The HTTP status says what the gateway did; its body's code only where it answers every call with 200."""
    if status != 200:
        return status
    try:
        return int(code)
    except (TypeError, ValueError):
        return status


# ---- the token (jilin) ---------------------------------------------------------------------------------
def token_request(profile: Profile, secrets: Secrets) -> Framed:
    """OAuth2 password grant (RFC 6749 §4.3) with the client's Basic credentials."""
    client = secrets["client_id"].value + b":" + secrets["client_secret"].value
    form = urlencode({"grant_type": "password", "username": profile.setting("username"),
                      "password": secrets["password"].value.decode("utf-8"), "scope": profile.setting("scope")})
    return Framed(profile.setting("token_path"),
                  {"Content-Type": "application/x-www-form-urlencoded",
                   "Authorization": "Basic " + base64.b64encode(client).decode("ascii")}, form.encode("ascii"))


def token_answer(status: int, body: bytes) -> tuple[str, float]:
    """(access token, seconds it lives) from the token endpoint's answer; Refused for anything else."""
    try:
        doc: Any = envelope.loads(body)
    except ValueError:
        doc = None
    if status == 200 and isinstance(doc, dict) and isinstance(doc.get("access_token"), str):
        try:
            return doc["access_token"], float(doc.get("expires_in", 0))
        except (TypeError, ValueError):
            raise Refused(f"the token endpoint gave expires_in {doc.get('expires_in')!r}, not seconds") from None
    what = (f"{doc.get('error')} ({doc.get('error_description', '')})" if isinstance(doc, dict)
            else body[:80].decode("utf-8", "replace"))
    raise Refused(f"the token endpoint refused the password grant: HTTP {status} {what}")
