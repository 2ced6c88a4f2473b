"""The simulated bureau's gateway: the region profile's checks on a request before the bureau sees it,
the OAuth2 token endpoint (jilin), and the encryption of answers. It refuses as the region's gateway
does (reference §2: the Hunan CSB's {"code":401,"message":…}; Spring OAuth2's {"error":"invalid_token"}),
so fep can be tested against every profile. The formulas are fep.gateway's.
"""

from __future__ import annotations

import base64
import hmac
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from fep import envelope, gateway
from fep.http11 import Request, Response
from fep.tls import Secret, load_secrets

# What each style's gateway needs to know of the hospital (files, as on fep's side).
SECRETS = {"baseline": (), "guangdong": ("secret_key",), "hunan": ("access_key", "secret_key"),
           "jiangsu": ("access_key", "secret_key"),
           "jilin": ("client_id", "client_secret", "password", "sm2_public_key")}
WINDOW = {"guangdong": 300.0, "hunan": 1800.0, "jiangsu": 1800.0}  # seconds a timestamp is good for, either way
TIF_HEADERS = ("x-tif-paasid", "x-tif-timestamp", "x-tif-nonce", "x-tif-signature")
API_HEADERS = ("_api_name", "_api_version", "_api_timestamp", "_api_access_key", "_api_signature")


@dataclass
class SimProfile:
    style: str = "baseline"
    url_layout: str = "dispatcher"
    path: str = ""  # the dispatcher (or infno_path base) path; empty: any path is the dispatcher
    paths: dict[str, str] = field(default_factory=dict)  # per_trade: infno -> its service's path
    window: float | None = None  # default WINDOW[style]
    paasid: str = ""
    username: str = ""
    token_path: str = "/auth/oauth/token"
    token_seconds: float = 7200.0
    sm2_uid: str = "1234567812345678"
    secrets: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def parse(cls, doc: dict[str, Any], resolve: Callable[[str], Path]) -> SimProfile:
        style = str(doc.get("style", "baseline"))
        if style not in SECRETS:
            raise ValueError(f"profile.style must be one of {', '.join(SECRETS)}, got {style!r}")
        missing = [n for n in SECRETS[style] if n not in (doc.get("secrets") or {})]
        if missing:
            raise ValueError(f"profile.secrets: the {style} style needs {', '.join(missing)}")
        return cls(style=style, url_layout=str(doc.get("url_layout", gateway_layout(style))),
                   path=str(doc.get("path", "")), paths={str(k): str(v) for k, v in (doc.get("paths") or {}).items()},
                   window=float(doc["window"]) if "window" in doc else None, paasid=str(doc.get("paasid", "")),
                   username=str(doc.get("username", "")), token_path=str(doc.get("token_path", cls.token_path)),
                   token_seconds=float(doc.get("token_seconds", cls.token_seconds)),
                   sm2_uid=str(doc.get("sm2_uid", cls.sm2_uid)),
                   secrets={k: resolve(str(v)) for k, v in (doc.get("secrets") or {}).items()})


def gateway_layout(style: str) -> str:
    return "infno_path" if style == "guangdong" else "dispatcher"


def _refusal(status: int, code: Any, message: str) -> Response:
    return Response(status, envelope.dumps({"code": code, "message": message}))


def _oauth(status: int, error: str, description: str) -> Response:
    return Response(status, envelope.dumps({"error": error, "error_description": description}))


class SimGateway:
    def __init__(self, profile: SimProfile, clock: Callable[[], float]) -> None:
        self.profile = profile
        self.clock = clock
        self.secrets: dict[str, Secret] = load_secrets(tuple(profile.secrets.items()))
        self.window = profile.window if profile.window is not None else WINDOW.get(profile.style, 0.0)
        self.tokens: dict[str, float] = {}  # bearer token -> when it expires
        self.nonces: dict[str, float] = {}  # x-tif-nonce seen -> until when a second use is a replay
        self.refused = 0  # requests refused at the gateway (GET /gateway)

    # ---- jilin's token endpoint -------------------------------------------------------------------------
    def is_token_request(self, req: Request) -> bool:
        return self.profile.style == "jilin" and req.path.partition("?")[0] == self.profile.token_path

    def token(self, req: Request) -> Response:
        client = self.secrets["client_id"].value + b":" + self.secrets["client_secret"].value
        given = req.headers.get("authorization", "")
        if not given.startswith("Basic ") or not hmac.compare_digest(given[6:].encode(), base64.b64encode(client)):
            return self._count(_oauth(401, "invalid_client", "Bad client credentials"))
        form = {k: v[-1] for k, v in parse_qs(req.body.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "password":
            return self._count(_oauth(400, "unsupported_grant_type",
                                      f"Unsupported grant type: {form.get('grant_type')}"))
        if form.get("username") != self.profile.username or not hmac.compare_digest(
                form.get("password", "").encode(), self.secrets["password"].value):
            return self._count(_oauth(400, "invalid_grant", "Bad credentials"))
        token = str(uuid.uuid4())
        self.tokens[token] = self.clock() + self.profile.token_seconds
        return Response(200, envelope.dumps({"access_token": token, "token_type": "bearer",
                                             "expires_in": int(self.profile.token_seconds),
                                             "scope": form.get("scope", "")}))

    def expire_tokens(self) -> int:
        """Every token issued is expired now (POST /tokens/expire), as after the gateway's restart."""
        n, self.tokens = len(self.tokens), {}
        return n

    # ---- a trade's way in ---------------------------------------------------------------------------------
    def refusal(self, req: Request) -> Response | None:
        """The gateway's refusal of the request's headers (signature, timestamp, token), or None."""
        check = {"guangdong": self._tif, "hunan": self._api, "jiangsu": self._api, "jilin": self._bearer}.get(
            self.profile.style)
        refused = check(req.headers) if check else None
        return self._count(refused) if refused else None

    def _tif(self, h: dict[str, str]) -> Response | None:
        if any(not h.get(k) for k in TIF_HEADERS):
            return _refusal(401, 401, "缺少网关请求头x-tif-paasid/x-tif-timestamp/x-tif-nonce/x-tif-signature")
        if h["x-tif-paasid"] != self.profile.paasid:
            return _refusal(401, 401, "非法的应用账户编码(paasid)")
        if not self._in_window(h["x-tif-timestamp"], 1):
            return _refusal(401, 401, "请求时间戳已过期")
        want = gateway.tif_signature(h["x-tif-timestamp"], self.secrets["secret_key"].value, h["x-tif-nonce"])
        if not hmac.compare_digest(h["x-tif-signature"].lower(), want):
            return _refusal(401, 401, "签名校验失败")
        if not self._first_use(h["x-tif-nonce"]):
            return _refusal(401, 401, "重复的请求(x-tif-nonce已使用)")
        return None

    def _first_use(self, nonce: str) -> bool:
        """A nonce is good once within the timestamp window: a captured request cannot be replayed."""
        now = self.clock()
        if len(self.nonces) > 10_000:
            self.nonces = {n: until for n, until in self.nonces.items() if until > now}
        if self.nonces.get(nonce, 0) > now:
            return False
        self.nonces[nonce] = now + 2 * self.window
        return True

    def _api(self, h: dict[str, str]) -> Response | None:
        if any(not h.get(k) for k in API_HEADERS):
            return _refusal(401, 401, "缺少服务网关的请求头")
        if not self._in_window(h["_api_timestamp"], 1000):
            return _refusal(401, 401, "签名时间戳超时")
        if h["_api_access_key"].encode() != self.secrets["access_key"].value:
            return _refusal(401, 401, "非法用户")
        if not hmac.compare_digest(h["_api_signature"], gateway.api_signature(self.secrets["secret_key"].value, h)):
            return _refusal(401, 401, "签名不一致")
        return None

    def _bearer(self, h: dict[str, str]) -> Response | None:
        auth = h.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _oauth(401, "unauthorized", "Full authentication is required to access this resource")
        token = auth[7:].strip()
        if self.tokens.get(token, 0) <= self.clock():
            self.tokens.pop(token, None)
            return _oauth(401, "invalid_token", f"Invalid access token: {token}")
        return None

    def _in_window(self, stamp: str, per_second: int) -> bool:
        try:
            at = int(stamp) / per_second
        except ValueError:
            return False
        return abs(self.clock() - at) <= self.window

    def opened(self, path: str, env: Any) -> Any:
        """The envelope as the bureau reads it (jilin: input decrypted and its signature verified), or the
        refusal: a 404 for a path the URL layout does not have for the trade."""
        infno = str(env.get("infno", "")) if isinstance(env, dict) else ""
        if not self._path_ok(path.partition("?")[0], infno):
            return self._count(Response(404, envelope.dumps({"code": 404, "message": f"no service at {path}"})))
        if self.profile.style == "jilin" and isinstance(env, dict):
            return self._decrypted(env)
        return env

    def _path_ok(self, path: str, infno: str) -> bool:
        p = self.profile
        if p.url_layout == "infno_path":
            return path == f"{p.path.rstrip('/')}/{infno}" if p.path else path.rsplit("/", 1)[-1] == infno
        if p.url_layout == "per_trade" and infno in p.paths:
            return path == p.paths[infno]
        return not p.path or path == p.path

    def _decrypted(self, env: dict[str, Any]) -> Any:
        if env.get("enc_type") != "SM4" or not isinstance(env.get("input"), str):
            return self._count(_refusal(400, -1, "报文未按要求加密(enc_type SM4)"))
        try:
            plain = gateway.sm4_decrypt(gateway.sm4_key(self.secrets), env["input"])
            env["input"] = envelope.loads(plain)
        except ValueError:
            return self._count(_refusal(400, -1, "报文解密失败"))
        try:
            public = bytes.fromhex(self.secrets["sm2_public_key"].value.decode("ascii"))
        except ValueError:
            public = b""
        if env.get("signtype") != "SM2" or not gateway.sm2_verify(public, self.profile.sm2_uid, plain,
                                                                  str(env.get("cainfo", ""))):
            return self._count(_refusal(400, -1, "验签失败"))
        return env

    def sealed(self, answer: Any) -> Any:
        """The answer as the gateway sends it back: jilin encrypts a non-empty output."""
        if self.profile.style != "jilin" or not isinstance(answer, dict) or not answer.get("output"):
            return answer
        return {**answer, "output": gateway.sm4_encrypt(gateway.sm4_key(self.secrets),
                                                        envelope.dumps(answer["output"])), "enc_type": "SM4"}

    def _count(self, resp: Response) -> Response:
        self.refused += 1
        return resp

