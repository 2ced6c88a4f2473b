"""Four public HIS clients of the national interface, rebuilt from their published code (issue 9).

Each model writes the bytes its client writes (request line, headers in the client's order, body in the
client's JSON dialect) over a raw socket, and reads the answer exactly as the client's code does: what
its transport hands its caller, what its parser makes of that, whether it calls the trade a success,
and what its code does next with a successful answer (where it would throw). Nothing here is fep's own
client; nothing here is the clients' code either (none of it is copied): the source of each behaviour is
named where it is modelled.

    zebone   S-117-John/nhis-web  …/pro/zsba/compay/ins/qgyb/utils/YbHttpClass.java (HttpRequestYbQg),
             …/qgyb/vo/PutClass/PublicParamIn.java, …/qgyb/utils/YbFunUtils.java, …/qgyb/service/*.java
    powersi  fengzaiqishi11/hsa-his  hsa-com/…/util/HttpConnectUtil.java (unifiedPayPostUtil, sendToCall),
             hsa-insure/…/unifiedpay/bo/impl/InsureItfBOImpl.java (executeInsur),
             …/unifiedpay/util/InsureCommonUtil.java (getInsurCommonParam), hsa-com/…/InsureInterfaceParamDTO,
             …/unifiedpay/bo/impl/InsureUnifiedPayOutptBOImpl.java, InsureUnifiedPayInptBOImpl.java (2204/2301),
             …/unifiedpay/bo/impl/InsureUnifiedPayReversalTradeBOImpl.java (2601), hsa-com/…/StringUtils.createMsgId
    openhis  newtouch-cloud/openhis @ffa7e660  WinServiceAPI/YiBaoInterface/ClassHelper.cs (SaveToInterface1,
             SettingsBase, DoSigin, BytesToFile, ReadToFile), Models/Input/InputPost1.cs, Models/Output/OutputReturn.cs
    sdk      hzg19700304/medical-insurance-interface-SDK  medical_insurance_sdk/sdk.py (call),
             core/http_client.py, core/protocol_processor.py, core/gateway_auth.py, models/request.py, response.py
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import random
import select
import socket
import string
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Callable

import simplejson

from fep import envelope

Addr = tuple[str, int]


# ---- HTTP on a raw socket ------------------------------------------------------------------------------------
class Closed(OSError):
    """The server closed the connection before a whole answer."""


@dataclass
class Head:
    version: str
    status: int
    reason: str
    headers: list[tuple[str, str]]

    def get(self, name: str, default: str = "") -> str:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return default

    @property
    def keep_alive(self) -> bool:
        conn = self.get("connection").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


class Wire:
    """One TCP connection, read as an HTTP client stack reads it (interim 1xx answers, Content-Length,
    chunked, close-delimited). `timeout` is a read timeout, as Java's SO_TIMEOUT and .NET's ReadWriteTimeout."""

    def __init__(self, addr: Addr, connect_timeout: float) -> None:
        self.sock = socket.create_connection(addr, timeout=connect_timeout)
        self.buf = b""
        self.requests = 0  # requests written on this connection

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def dropped(self) -> bool:
        """The server closed this idle connection (what a pool checks before reusing it)."""
        if self.buf:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
            return bool(readable) and self.sock.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _fill(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise Closed("connection closed by the server")
        self.buf += chunk

    def head(self, timeout: float | None) -> Head:
        while b"\r\n\r\n" not in self.buf:
            self._fill(timeout)
        raw, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = raw.decode("latin-1").split("\r\n")
        version, status, *reason = lines[0].split(" ", 2)
        headers = [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines[1:])]
        return Head(version, int(status), reason[0] if reason else "", headers)

    def interim(self, wait: float) -> Head | None:
        """A status line within `wait` seconds (the 100 Continue a client waits for), or None."""
        deadline = time.monotonic() + wait
        while b"\r\n\r\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                self._fill(left)
            except socket.timeout:
                return None
        return self.head(wait)

    def body(self, head: Head, timeout: float | None) -> bytes:
        if head.status in (204, 304) or 100 <= head.status < 200:
            return b""
        if head.get("transfer-encoding").lower() == "chunked":
            out = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._fill(timeout)
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buf) < size + 2:
                    self._fill(timeout)
                out, self.buf = out + self.buf[:size], self.buf[size + 2:]
                if size == 0:
                    return out
        length = head.get("content-length")
        if length:
            while len(self.buf) < int(length):
                self._fill(timeout)
            data, self.buf = self.buf[:int(length)], self.buf[int(length):]
            return data
        while True:  # delimited by the close
            try:
                self._fill(timeout)
            except Closed:
                data, self.buf = self.buf, b""
                return data

    def response(self, timeout: float | None) -> tuple[Head, bytes, list[int]]:
        """The final answer, after any 1xx; the interim statuses seen on the way."""
        interims = []
        while True:
            head = self.head(timeout)
            if 100 <= head.status < 200:
                interims.append(head.status)
                continue
            return head, self.body(head, timeout), interims


# ---- what one call was, on the wire and to the client ----------------------------------------------------------
@dataclass
class Exchange:
    client: str
    infno: str
    msgid: str  # the msgid in the body the client wrote
    request: bytes  # every byte of the request as written (head and body)
    path: str = ""
    out_headers: list[tuple[str, str]] = field(default_factory=list)  # the request's headers as built
    head: bytes = b""
    body: bytes = b""  # the request body
    status: int | None = None
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    answer_bytes: bytes = b""
    interims: list[int] = field(default_factory=list)  # 1xx statuses the client saw
    continue_wait: float | None = None  # seconds a client that sent Expect waited before it sent the body
    transport_error: str | None = None  # what the client's HTTP stack raised (timeout, refused, reset)
    attempts: int = 1  # how many times the transport wrote the request (a retry resends the same bytes)
    text: str | None = None  # what the client's transport hands its caller, as a string
    view: Any = None  # what the client's parser made of it (typed objects as dicts, as its code sees them)
    ok: bool = False  # the client's own verdict: success
    error: str | None = None  # what the client's code throws, as it would throw it
    file: bytes | None = None  # a downloaded file, as the client stored it
    file_rows: list[list[str]] | None = None  # the result.txt rows the client read from it

    @property
    def answer(self) -> dict[str, Any]:
        """What fep wrote, as JSON (empty when it was not JSON: a file, or nothing)."""
        try:
            doc = envelope.loads(self.answer_bytes)
        except (ValueError, UnicodeDecodeError):
            return {}
        return doc if isinstance(doc, dict) else {}

    def header(self, name: str) -> str:
        return next((v for k, v in self.headers if k.lower() == name.lower()), "")

    @property
    def fep_state(self) -> str:
        return str(self.answer.get("fep_state") or self.header("X-Fep-State") or "")

    def said(self) -> str:
        """One line for an assertion: what the wire carried and what the client made of it."""
        a = self.answer
        bits = [f"{self.client} {self.infno} msgid {self.msgid}:",
                f"HTTP {self.status} {self.header('content-type')}" if self.status else "no HTTP answer",
                f"fep_state {a.get('fep_state')} fep_reason {a.get('fep_reason')}" if a else "",
                f"infcode {a.get('infcode')!r} err_msg {a.get('err_msg')!r}" if a else "",
                f"transport: {self.transport_error}" if self.transport_error else "",
                f"client verdict ok={self.ok}", f"client threw: {self.error}" if self.error else "",
                f"100-continue: {self.interims} after {self.continue_wait}" if self.continue_wait is not None else ""]
        return " ".join(b for b in bits if b)


# ---- JSON dialects -------------------------------------------------------------------------------------------------
def compact(obj: Any) -> str:
    return simplejson.dumps(obj, use_decimal=True, ensure_ascii=False, separators=(",", ":"))


def java_hash(s: str) -> int:
    h = 0
    data = s.encode("utf-16-be")
    for i in range(0, len(data), 2):
        h = (31 * h + int.from_bytes(data[i:i + 2], "big")) & 0xFFFFFFFF
    return h


def hashmap(d: dict[str, Any], capacity: int = 16) -> dict[str, Any]:
    """The keys of a java.util.HashMap in its iteration order (bucket, then insertion), as fastjson and
    json-lib write a HashMap: String.hashCode spread by h ^ h>>>16, the table doubling past 0.75 full."""
    cap, size = capacity, 0
    for _ in d:
        size += 1
        if size > cap * 3 // 4:
            cap *= 2
    pos = {k: i for i, k in enumerate(d)}

    def bucket(k: str) -> int:
        h = java_hash(k)
        return (h ^ (h >> 16)) & (cap - 1)

    return {k: d[k] for k in sorted(d, key=lambda k: (bucket(k), pos[k]))}


def java_maps(obj: Any) -> Any:
    """Every dict a HashMap (Powersi builds its envelopes and inputs from HashMaps and MyBatis rows)."""
    if isinstance(obj, dict):
        return hashmap({k: java_maps(v) for k, v in obj.items()})
    if isinstance(obj, list):
        return [java_maps(v) for v in obj]
    return obj


def java_beans(obj: Any) -> Any:
    """json-lib (net.sf.json) JSONObject.fromObject of a bean: properties in the Introspector's order (by
    name), a null String written as "" (its default-value processor)."""
    if isinstance(obj, dict):
        return {k: java_beans(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list):
        return [java_beans(v) for v in obj]
    return "" if obj is None else obj


def newtonsoft(obj: Any, indent: int = 0) -> str:
    """Newtonsoft JObject.ToString(): Formatting.Indented, two spaces, CRLF, `"key": value`, non-ASCII as is.
    openhis serialises its model, parses it into a JObject and writes that: JObject.Parse reads decimals as
    double (FloatParseHandling.Double), so 12.50m is written 12.5 and 25.00m 25.0; a decimal without
    fraction digits stays an integer."""
    nl, pad = "\r\n", "  "
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{pad * (indent + 1)}{json.dumps(k, ensure_ascii=False)}: {newtonsoft(v, indent + 1)}"
                 for k, v in obj.items()]
        return "{" + nl + ("," + nl).join(items) + nl + pad * indent + "}"
    if isinstance(obj, list):
        if not obj:
            return "[]"
        items = [pad * (indent + 1) + newtonsoft(v, indent + 1) for v in obj]
        return "[" + nl + ("," + nl).join(items) + nl + pad * indent + "]"
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, Decimal):
        return str(int(obj)) if obj.as_tuple().exponent >= 0 else repr(float(obj))
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, int):
        return str(obj)
    return json.dumps(str(obj), ensure_ascii=False)


def floats(obj: Any) -> Any:
    """What a Python HIS hands the SDK: json.dumps cannot write a Decimal, so amounts are floats."""
    if isinstance(obj, dict):
        return {k: floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [floats(v) for v in obj]
    return float(obj) if isinstance(obj, Decimal) else obj


def java_string(value: Any) -> str | None:
    """Jackson / Newtonsoft reading a JSON scalar into a String property: a number becomes its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# ---- what an HIS does with a successful answer -----------------------------------------------------------------------
# The node each client's code reads right after a success (a typed getter chain, or a map lookup), and
# which it then iterates or stores. A missing node is where the client throws.
NEEDS = {
    "1101": ("baseinfo", "psn_no"), "2201": ("data", "mdtrt_id"), "2204": ("result", list), "2301": ("result", list),
    "2206": ("setlinfo", "medfee_sumamt"), "2207": ("setlinfo", "setl_id"), "2208": ("setlinfo", "setl_id"),
    "2303": ("setlinfo", "medfee_sumamt"), "2304": ("setlinfo", "setl_id"), "2305": ("setlinfo", "setl_id"),
    "2401": ("result", "mdtrt_id"), "9101": ("file_qury_no", None), "3202": ("fileinfo", "file_qury_no"),
}


def _reads(output: Any, infno: str, null: str) -> None:
    """Raise as the client's code would when the node it reads is not there."""
    node, leaf = NEEDS.get(infno, (None, None))
    if node is None:
        return
    if not isinstance(output, dict):
        raise RuntimeError(f"{null}: output is {output!r}, the code reads output.{node}")
    value = output.get(node)
    if value is None:
        raise RuntimeError(f"{null}: output.{node} is missing (the code reads it after infcode 0)")
    if leaf is list:
        if not isinstance(value, list):
            raise RuntimeError(f"{null}: output.{node} is {type(value).__name__}, the code iterates it")
    elif leaf is not None:
        if not isinstance(value, dict) or value.get(leaf) in (None, ""):
            raise RuntimeError(f"{null}: output.{node}.{leaf} is missing")


# ---- the clients ---------------------------------------------------------------------------------------------------
class HisClient:
    """A client as its code calls: envelope, encoding, path, headers, transport, parser, verdict."""

    name = ""
    infcode_type = "number"  # what the client's verdict needs: the bureau (and fep's own envelopes) must write it
    file_answers = "file"  # how it reads a download: the file itself, or only JSON (his.file_answers)
    institution = ""
    timeout: float | None = None  # the client's read timeout (None: it sets none)

    def __init__(self, addr: Addr, now: Callable[[], datetime] = datetime.now,
                 rng: random.Random | None = None) -> None:
        self.addr = addr
        self.now = now
        self.rng = rng or random.Random()
        self.log: list[Exchange] = []

    # -- what each client defines
    def new_msgid(self) -> str:
        raise NotImplementedError

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        """(path, headers in the client's order without Host/length where its stack adds them, body)."""
        raise NotImplementedError

    def transmit(self, ex: Exchange) -> None:
        raise NotImplementedError

    def read(self, ex: Exchange) -> None:
        raise NotImplementedError

    # -- the calls
    def call(self, infno: str, input_: dict[str, Any], msgid: str | None = None, **_: Any) -> dict[str, Any]:
        """One trade as the client makes it; `msgid` only where the test makes the HIS choose one (a README-
        compliant HIS that keeps the msgid to resubmit it). Returns fep's answer as JSON for the World's
        Visit and Stay helpers; `self.last` is the whole exchange."""
        msgid = msgid or self.new_msgid()
        path, headers, body = self.build(infno, input_, msgid)
        ex = Exchange(self.name, infno, msgid, b"", path=path, out_headers=headers, body=body)
        ex.head = self.render(path, headers, body)
        ex.request = ex.head + body
        return self._run(ex)

    def resend(self, ex: Exchange) -> Exchange:
        """The same bytes again (same msgid): what the README asks of an HIS after a timeout."""
        again = Exchange(self.name, ex.infno, ex.msgid, ex.request, path=ex.path, out_headers=ex.out_headers,
                         head=ex.head, body=ex.body)
        self._run(again)
        return again

    def _run(self, ex: Exchange) -> dict[str, Any]:
        self.transmit(ex)
        self.read(ex)
        if ex.ok and ex.error is None:
            try:
                self.uses(ex)
            except RuntimeError as e:
                ex.error = str(e)
        self.log.append(ex)
        self.last = ex
        return ex.answer or (ex.view if isinstance(ex.view, dict) else {})

    def render(self, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
        lines = [f"POST {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @property
    def host(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"

    def stamp(self) -> str:
        return self.now().strftime("%Y%m%d%H%M%S")

    def output_of(self, ex: Exchange) -> Any:
        return (ex.view or {}).get("output") if isinstance(ex.view, dict) else None

    def uses(self, ex: Exchange) -> None:
        """What the client's code does next with a successful answer; raises where it would throw."""
        _reads(self.output_of(ex), ex.infno, self.null_error)

    null_error = "NullPointerException"

    def downloaded(self, ex: Exchange) -> bytes | None:
        """The file a 9102 brought, as the client holds it."""
        return ex.file

    # -- simple one-connection transport with a read timeout
    def _exchange(self, ex: Exchange, connect_timeout: float | None, read_timeout: float | None) -> None:
        wire = None
        try:
            wire = Wire(self.addr, connect_timeout or 60)
            wire.send(ex.request)
            head, data, ex.interims = wire.response(read_timeout)
            ex.status, ex.reason, ex.headers, ex.answer_bytes = head.status, head.reason, head.headers, data
        except socket.timeout:
            ex.transport_error = "Read timed out"
        except ConnectionRefusedError:
            ex.transport_error = "Connection refused"
        except (Closed, ConnectionResetError, BrokenPipeError) as e:
            ex.transport_error = f"Connection reset: {e}"
        finally:
            if wire is not None:
                wire.close()


class Zebone(HisClient):
    """Zebone NHIS, qgyb module (Zhongshan, Guangdong). YbHttpClass.HttpRequestYbQg: a new Apache HttpClient 4
    per call (HttpClients.createDefault), POST url + funNo where url ends in /hsa/hgs/; x-tif-* gateway
    headers; the body String.getBytes(UTF_8) in a ByteArrayEntity of type text/plain; 180 s connect and
    socket timeouts; no retry. The envelope is a PublicParamIn bean (Assignment()) written by json-lib.
    Answers are read by JsonUtil.readValue into OutputDataXXXX beans (infcode a String; the caller tests
    "0".equals(infcode)); octet-stream is saved as the downloaded ZIP."""

    name = "zebone"
    institution = "H44200100009"  # PublicParamIn.Assignment (中山市博爱医院)
    timeout = 180.0
    paasid, secret = "zs_sc_rmyy", "Z5osNCopSWdqErKicwNIVd8lAzZ8SY9W"  # as published in YbHttpClass
    user_agent = "Apache-HttpClient/4.5.13 (Java/1.8.0_281)"
    content_type = "text/plain"  # HttpRequestYbQg; HttpRequestYbQgJson sends application/json

    def new_msgid(self) -> str:
        # "H44200100009" + DateUtils.getDateTimeStr(new Date()) + YbHttpClass.getRandomString(4): letters too
        alphabet = string.ascii_lowercase + string.ascii_uppercase + string.digits
        return self.institution + self.stamp() + "".join(self.rng.choice(alphabet) for _ in range(4))

    def envelope(self, infno: str, input_: dict[str, Any], msgid: str) -> dict[str, Any]:
        return {"infno": infno, "msgid": msgid, "insuplc_admdvs": "442000", "mdtrtarea_admvs": "442000",
                "recer_sys_code": "01", "dev_no": None, "dev_safe_info": None, "cainfo": None, "signtype": None,
                "infver": "1.0", "opter_type": "1", "opter": "0316", "opter_name": "收费员",
                "inf_time": self.now().strftime("%Y-%m-%d %H:%M:%S"), "fixmedins_code": self.institution,
                "fixmedins_name": "中山市博爱医院", "sign_no": None, "input": input_}

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        body = compact(java_beans(self.envelope(infno, input_, msgid))).encode("utf-8")
        nonce = "".join(self.rng.choice(string.ascii_letters + string.digits) for _ in range(32))
        ts = str(int(self.now().timestamp()))
        signature = hashlib.sha256((ts + self.secret + nonce + ts).encode("utf-8")).hexdigest()
        # addHeader/setHeader first, then the protocol interceptors of HttpClientBuilder in their order:
        # RequestContent (length, type), RequestTargetHost, RequestClientConnControl, RequestUserAgent,
        # RequestAcceptEncoding.
        headers = [("x-tif-paasid", self.paasid), ("x-tif-signature", signature), ("x-tif-timestamp", ts),
                   ("x-tif-nonce", nonce), ("Content-Length", str(len(body))), ("Content-Type", self.content_type),
                   ("Host", self.host), ("Connection", "Keep-Alive"), ("User-Agent", self.user_agent),
                   ("Accept-Encoding", "gzip,deflate")]
        return f"/hsa/hgs/{infno}", headers, body

    def transmit(self, ex: Exchange) -> None:
        self._exchange(ex, self.timeout, self.timeout)

    def read(self, ex: Exchange) -> None:
        if ex.transport_error:  # catch (IOException e): a made-up answer, the server's text lost
            if "refused" in ex.transport_error:
                msg = f"Connect to {self.host} [/{self.addr[0]}] failed: Connection refused (Connection refused)"
            else:
                msg = ex.transport_error
            ex.text = compact(hashmap({"infcode": "-1", "err_msg": "向服务器承保接口发起 http 请求,执行 post 请求异常" + msg}))
        elif ex.status != 200:
            ex.text = compact(hashmap({"infcode": "-1", "err_msg": f"HttpClient,error status code :{ex.status}"}))
        elif "application/octet-stream" in ex.header("content-type"):  # getContentType().getValue(): NPE if absent
            path = f"D:\\logs\\ybxzdzlog/{self.now():%Y}/{self.now():%m}/{self.stamp()}.zip"
            ex.file = ex.answer_bytes
            ex.text = compact(hashmap({"infcode": "0", "err_msg": "下载成功，文件地址：" + path, "fileAddr": path}))
        else:
            ex.text = ex.answer_bytes.decode("utf-8")  # EntityUtils.toString(entity, "UTF-8")
        try:
            doc = envelope.loads(ex.text)
        except ValueError as e:  # Jackson on a body that is not JSON
            ex.error = f"JsonParseException: {e}"
            return
        # JsonUtil.readValue(jsonStr, OutputDataXXXX.class): infcode, err_msg... are String properties;
        # unknown properties (warn_msg, cainfo, fep_*) are not kept (the real bureau's answers carry them too)
        ex.view = {"infcode": java_string(doc.get("infcode")), "err_msg": java_string(doc.get("err_msg")),
                   "inf_refmsgid": java_string(doc.get("inf_refmsgid")), "fileAddr": doc.get("fileAddr"),
                   "output": doc.get("output")}
        ex.ok = ex.view["infcode"] is not None and ex.view["infcode"] == "0"

    def uses(self, ex: Exchange) -> None:
        if ex.infno == "9102":  # InsQgRecService.saveDownloadDetailed: unZipFiles(out9102.getFileAddr(), ...)
            if not ex.view.get("fileAddr"):
                raise RuntimeError("NullPointerException: out9102.getFileAddr() is null (the answer was not a file)")
            ex.file_rows = result_rows(ex.file or b"", "result.txt")
            return
        super().uses(ex)


class Powersi(HisClient):
    """Powersi (创智和宇) hsa-his (Hunan, Hainan). It posts to one configured URL (its 云助手 gateway, the
    address fep takes over) with HttpURLConnection, three ways:
    - itf: InsureItfBOImpl.executeInsur, the request an InsureInterfaceParamDTO written by fastjson (its
      properties by name, nulls left out) whose `input` is a String holding the input's JSON; read by
      HttpConnectUtil.unifiedPayPostUtil (UTF-8 lines joined; a status >= 400 throws); a success only when
      infcode is the String "0" (and code is not "999"). Used for 1101, 2201, 2203, 2206-2208, 2401, 2303,
      2304, 2402.
    - map: the envelope a HashMap (infno, msgid, insuplc_admdvs, medins_code, insur_code, mdtrtarea_admvs,
      input), through unifiedPayPostUtil; MapUtils.get(resultMap,"infcode").equals("0"). 2204 and 2301.
    - reversal: InsureUnifiedPayReversalTradeBOImpl.invokingUpay, the same HashMap envelope through
      HttpConnectUtil.sendToCall (no-cache, 60 s connect, 90 s read; a status other than 200 gives an empty
      result that becomes {"infcode":"-1"}); failure only when infcode is "-1", success when
      String.valueOf(infcode) is "0". 2601.
    The msgid: orgCode + yyyyMMddHHmmss + (int)(Math.random()*9000+1000). No operator fields on map and
    reversal, no inf_time, no fixmedins_code (medins_code instead)."""

    name = "powersi"
    infcode_type = "string"
    institution = "H43010500123"
    timeout = None  # unifiedPayPostUtil sets no timeout
    url_path = "/hsa-hgs/unifiedPay"  # insureConfigurationDTO.getUrl(): one URL for every trade
    ITF = {"1101", "2201", "2203", "2206", "2207", "2208", "2401", "2303", "2304", "2402", "2305", "2404", "2405"}

    def new_msgid(self) -> str:
        return self.institution + self.stamp() + str(int(self.rng.random() * 9000 + 1000))

    def way(self, infno: str) -> str:
        return "itf" if infno in self.ITF else "reversal" if infno == "2601" else "map"

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        way = self.way(infno)
        if way == "itf":
            dto = {"infno": infno, "insuplc_admdvs": "430100", "medins_code": self.institution, "insur_code": "430199",
                   "mdtrtarea_admvs": "430100", "msgid": msgid, "opter": "0023", "opter_name": "张收费",
                   "url": f"http://{self.host}{self.url_path}", "input": compact(java_maps(input_)),
                   "hospCode": "1000001", "isHospital": "0" if infno.startswith("22") else "1",
                   "visitId": "V20261123001"}
            doc: dict[str, Any] = {k: dto[k] for k in sorted(dto) if dto[k] is not None}  # fastjson: by name
        else:
            doc = java_maps({"infno": infno, "msgid": msgid, "insuplc_admdvs": "430100",
                             "medins_code": self.institution, "insur_code": "430199", "mdtrtarea_admvs": "430100",
                             "input": input_})
        body = compact(doc).encode("utf-8")  # OutputStreamWriter(conn.getOutputStream(), "UTF8")
        if way == "reversal":  # sendToCall: setUseCaches(false), Charset and Content-Type, no User-Agent
            headers = [("Charset", "utf-8"), ("Content-Type", "application/json"), ("Cache-Control", "no-cache"),
                       ("Pragma", "no-cache"), ("User-Agent", "Java/1.8.0_281"), ("Host", self.host),
                       ("Accept", "text/html, image/gif, image/jpeg, *; q=.2, */*; q=.2"), ("Connection", "keep-alive"),
                       ("Content-Length", str(len(body)))]
        else:  # unifiedPayPostUtil: setRequestProperty("connection", "Keep-Alive") is a restricted header and
            #   dropped; writeRequests adds Host, Connection: keep-alive and Content-Length after the caller's own
            headers = [("accept", "*/*"), ("user-agent", "Mozilla/4.0 (compatible; MSIE 6.0; Windows NT 5.1; SV1)"),
                       ("Content-Type", "application/json"), ("Host", self.host), ("Connection", "keep-alive"),
                       ("Content-Length", str(len(body)))]
        return self.url_path, headers, body

    def transmit(self, ex: Exchange) -> None:
        if self.way(ex.infno) == "reversal":
            self._exchange(ex, 60, self.timeout or 90)
        else:
            self._exchange(ex, self.timeout, self.timeout or 120)  # none set: the test caps it at 120 s

    def read(self, ex: Exchange) -> None:
        way = self.way(ex.infno)
        if way == "reversal":
            if ex.transport_error:
                ex.text = '{"infcode":"-1", "err_msg":"调用接口失败,原因：' + ex.transport_error + '"}'
            elif ex.status != 200 or not ex.answer_bytes:
                ex.text = '{"infcode":"-1", "err_msg":"调用接口失败,原因："}'
            else:
                ex.text = "".join(ex.answer_bytes.decode("utf-8").splitlines())
        elif ex.transport_error:
            ex.error = f"AppException: doPost异常：{ex.transport_error}"
            return
        elif ex.status is not None and ex.status >= 400:  # conn.getInputStream() throws
            ex.error = (f"AppException: doPost异常：Server returned HTTP response code: {ex.status} "
                        f"for URL: http://{self.host}{self.url_path}")
            return
        else:  # BufferedReader(InputStreamReader(is, "UTF8")).readLine() appended without the line ends
            ex.text = "".join(ex.answer_bytes.decode("utf-8", "replace").splitlines())
        if not ex.text:
            ex.error = "BizRtException: INSURE_RETURN_DATA_EMPTY" if way == "itf" else "AppException: 无法访问统一支付平台"
            return
        try:
            doc = envelope.loads(ex.text)  # fastjson JSON.parseObject: numbers stay numbers (Integer, BigDecimal)
        except ValueError as e:
            ex.error = f"JSONException: {e}"
            return
        ex.view = doc
        infcode = doc.get("infcode")
        if way == "reversal":
            if infcode == "-1":  # "-1".equals(MapUtils.get(resultMap, "infcode"))
                ex.error = f"AppException: 调用医保接口失败:{doc.get('err_msg')}"
            elif ("null" if infcode is None else java_string(infcode)) == "0":  # String.valueOf(infcode)
                ex.ok = True
            else:
                ex.error = f"AppException: 错误信息：{doc.get('err_msg')}"
            return
        if doc.get("code") == "999":
            ex.error = f"AppException: {doc.get('msg')}"
        elif infcode is None and way == "map":  # MapUtils.get(resultMap,"infcode").equals("0")
            ex.error = "NullPointerException: infcode is null"
        elif infcode != "0":  # ("0").equals(...): an Integer 0 is not the String "0"
            ex.error = f"{'BizRtException' if way == 'itf' else 'RuntimeException'}: {doc.get('err_msg')}"
        else:
            ex.ok = True

    def downloaded(self, ex: Exchange) -> bytes | None:
        return None  # no 9101/9102 in hsa-his: its 云助手 gateway handles files


class OpenHis(HisClient):
    """newtouch openhis, CommonYiBaoApp (Hebei, Chongqing). ClassHelper.SaveToInterface1: an InputPost1
    (envelope in declaration order, nulls written) serialised by Newtonsoft, parsed into a JObject and written
    with ToString() (indented), UTF-8, POST to ybRequestPath (one configured URL: "国家医保前置机器请求地址")
    with .NET Framework HttpWebRequest: ContentType application/json, a browser UserAgent, KeepAlive, an
    apikey header; Expect: 100-continue by default (ServicePointManager.Expect100Continue), the body sent
    when 100 Continue comes or after 350 ms; connections kept per ServicePoint. GetResponse() throws on a
    status other than 2xx, and any exception becomes {"infcode":"-1", "err_msg":"本地模拟医保返回异常: ..."}.
    The answer is read into OutputReturn (infcode a string) and code == "0" is success. A 9102 answer's bytes
    are written to fsDownloadIn.filename, unzipped, and result.txt read (BytesToFile, ReadToFile)."""

    name = "openhis"
    institution = "H13110200026"
    timeout = 100.0  # HttpWebRequest.Timeout default
    url_path = "/ebus/rio_fsi"  # ybRequestPath (qqurl); the per-trade paths in GetPubWay are commented out
    continue_timeout = 0.35  # .NET Framework's wait for 100 Continue
    user_agent = ("Mozilla/5.0 (Windows NT 10.0; WOW64) AppleWebKit/537.36 (KHTML, like Gecko) "
                  "Chrome/45.0.2454.101 Safari/537.36")

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.wire: Wire | None = None  # the ServicePoint's kept connection
        self.seen_http11 = False  # ServicePoint.HttpBehaviour learnt from an answer

    def new_msgid(self) -> str:
        # fixmedins_code + yyyyMMddHHmmss + new Random().Next(1, 9999).ToString().PadLeft(4, '0'). Two draws in one
        # second collide now and then (the client's own rare bug, which fep rightly refuses as msgid_reused); the
        # model draws again so the stories stay deterministic.
        used = self.__dict__.setdefault("_used_msgids", set())
        while (msgid := self.institution + self.stamp() + str(self.rng.randint(1, 9998)).zfill(4)) in used:
            pass
        used.add(msgid)
        return msgid

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        env = {"infno": infno, "msgid": msgid, "mdtrtarea_admvs": "130300", "insuplc_admdvs": "130399",
               "recer_sys_code": "YBXT", "dev_no": None, "dev_safe_info": None, "cainfo": "", "signtype": "MOCK",
               "infver": "V1.0", "opter_type": "1", "opter": "0001", "opter_name": "收费员",
               "inf_time": self.now().strftime("%Y-%m-%d %H:%M:%S"), "fixmedins_code": self.institution,
               "fixmedins_name": "秦皇岛市第一医院", "sign_no": None, "input": input_}
        body = newtonsoft(env).encode("utf-8")  # System.Text.Encoding.UTF8.GetBytes(strJson)
        return self.url_path, [("Content-Type", "application/json"), ("User-Agent", self.user_agent),
                               ("apikey", "123456")], body

    def _head(self, ex: Exchange, first: bool) -> bytes:
        """HttpWebRequest's head (SerializeHeaders): the caller's headers, then Host, Content-Length, Expect, and
        Connection: Keep-Alive while the ServicePoint's HttpBehaviour is still Unknown (<= HTTP10), that is until
        it has seen an HTTP/1.1 answer."""
        lines = [f"POST {ex.path} HTTP/1.1", *(f"{k}: {v}" for k, v in ex.out_headers), f"Host: {self.host}",
                 f"Content-Length: {len(ex.body)}", "Expect: 100-continue"]
        if first:
            lines.append("Connection: Keep-Alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def transmit(self, ex: Exchange) -> None:
        try:
            if self.wire is None or self.wire.dropped():
                if self.wire is not None:
                    self.wire.close()
                self.wire = Wire(self.addr, self.timeout or 100)
            wire = self.wire
            ex.head = self._head(ex, first=not self.seen_http11)
            ex.request = ex.head + ex.body
            wire.requests += 1
            wire.send(ex.head)
            started = time.monotonic()
            interim = wire.interim(self.continue_timeout)
            ex.continue_wait = round(time.monotonic() - started, 3)
            if interim is not None and interim.status != 100:  # a final answer instead: the body is not sent
                ex.status, ex.reason, ex.headers = interim.status, interim.reason, interim.headers
                ex.answer_bytes = wire.body(interim, self.timeout)
            else:
                if interim is not None:
                    ex.interims.append(interim.status)
                wire.send(ex.body)
                head, data, more = wire.response(self.timeout)
                ex.interims += more
                ex.status, ex.reason, ex.headers, ex.answer_bytes = head.status, head.reason, head.headers, data
            self.seen_http11 = self.seen_http11 or ex.status is not None
            if ex.status is not None and not Head("HTTP/1.1", ex.status, "", ex.headers).keep_alive:
                wire.close()
                self.wire = None
        except socket.timeout:
            ex.transport_error = "The operation has timed out"
            self._drop()
        except ConnectionRefusedError:
            ex.transport_error = "Unable to connect to the remote server"
            self._drop()
        except (Closed, ConnectionResetError, BrokenPipeError):
            ex.transport_error = "The underlying connection was closed: An unexpected error occurred on a receive."
            self._drop()

    def _drop(self) -> None:
        if self.wire is not None:
            self.wire.close()
        self.wire = None

    def close(self) -> None:
        self._drop()

    def read(self, ex: Exchange) -> None:
        failure = None
        if ex.transport_error:
            failure = ex.transport_error
        elif ex.status is not None and not 200 <= ex.status < 300:  # GetResponse() throws a WebException
            failure = f"The remote server returned an error: ({ex.status}) {ex.reason}."
        elif ex.infno == "9102":  # the response stream is the file, whatever its Content-Type
            try:
                rows = result_rows(ex.answer_bytes, "result.txt")
                ex.file, ex.file_rows = ex.answer_bytes, rows
                result = [{"psn_no": r[0], "mdtrt_id": r[1], "setl_id": r[2], "msgid": r[3], "stmt_rslt": r[4],
                           "refd_setl_flag": r[5], "memo": r[6], "medfee_sumamt": Decimal(r[7]),
                           "fund_pay_sumamt": Decimal(r[8]), "acct_pay": Decimal(r[9])} for r in rows]
                ex.text = compact({"infcode": "0", "inf_refmsgid": "", "refmsg_time": "", "respond_time": "",
                                   "enctype": "", "signtype": "", "err_msg": "", "output": {"result": result}})
            except (zipfile.BadZipFile, KeyError, IndexError, ArithmeticError) as e:
                failure = f"{type(e).__name__}: {e}"
        else:
            ex.text = ex.answer_bytes.decode("utf-8", "replace")  # StreamReader(responseStm, Encoding.UTF8)
        if failure is not None:
            ex.text = compact({"infcode": "-1", "inf_refmsgid": "", "refmsg_time": "", "respond_time": "",
                               "enctype": "", "signtype": "", "err_msg": "本地模拟医保返回异常: " + failure})
        try:
            doc = envelope.loads(ex.text)  # JsonConvert.DeserializeObject<OutputReturn>(outputText)
        except ValueError as e:
            ex.view = {"infcode": "-1", "err_msg": f"JSON反序列化BUSINESS_HANDLE函数输出值失败：{e}，输出值：{ex.text}"}
            return
        ex.view = {"infcode": java_string(doc.get("infcode")), "inf_refmsgid": java_string(doc.get("inf_refmsgid")),
                   "err_msg": java_string(doc.get("err_msg")), "output": doc.get("output")}
        ex.ok = ex.view["infcode"] == "0"  # code = outputJson.infcode; if (code == "0")

    null_error = "NullReferenceException"

    def uses(self, ex: Exchange) -> None:
        if ex.infno == "9102":
            return  # ReadToFile already read result.txt
        super().uses(ex)


class OpenHisGbk(OpenHis):
    """openhis's other transport, ClassHelper.YBHttpRequest / YBResponse: the same HttpWebRequest with the
    x-tif-* headers instead of apikey, and the body written with System.Text.Encoding.Default, the system code
    page (GBK on a Chinese Windows), under a Content-Type that names no charset. Nothing in CommonYiBaoApp
    calls it today; a fork that does sends GBK."""

    name = "openhis-gbk"
    paasid, token = "99999999404", "dec15f850fc54c77a91d245663122cb3"  # as published in ClassHelper

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        path, _, body = super().build(infno, input_, msgid)
        nonce = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        times = str(int(self.now().timestamp()))
        signature = hashlib.sha256((times + self.token + nonce + times).encode("utf-8")).hexdigest()
        return path, [("Content-Type", "application/json"), ("User-Agent", self.user_agent),
                      ("x-tif-paasid", self.paasid), ("x-tif-signature", signature), ("x-tif-timestamp", times),
                      ("x-tif-nonce", nonce)], body.decode("utf-8").encode("gbk")


class Sdk(HisClient):
    """medical-insurance-interface-SDK (Hunan, Python). sdk.call: build_request (MedicalInsuranceRequest,
    msgid uuid4().hex.upper()[:30], "null" strings for dev_no, cainfo, sign_no), build_gateway_headers
    (_api_* HmacSHA1 headers), POST {base_url}/{api_code} through a requests Session whose HTTPAdapter
    retries with urllib3 Retry(total=3, backoff_factor=0.5, status_forcelist 429/500/502/503/504, POST
    allowed): a read timeout, a refused or reset connection or one of those statuses sends the same bytes
    again. 30 s timeout. Body json.dumps(ensure_ascii=False, separators=(',', ':')) as a str, which urllib3 2
    encodes as UTF-8. A status >= 400 raises NetworkException; a body is JSON when the Content-Type says
    application/json or it starts with { or [, else {'text': ..., 'status_code': ...}. MedicalInsuranceResponse
    keeps infcode as it came (default -1); is_success() is infcode == 0, an int; validate_response() also
    wants a non-empty output."""

    name = "sdk"
    file_answers = "json"  # it parses every answer as JSON; a file arrives in output.file, Base64
    institution = "H43010400045"
    timeout = 30.0
    base_path = "/fsi/api"  # org_config.base_url; the SDK appends "/{api_code}"
    app_id, app_secret = "hn_fep_test", "0123456789abcdef"
    retries, backoff = 3, 0.5
    retry_statuses = (429, 500, 502, 503, 504)

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.pool: Wire | None = None

    def new_msgid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4)).replace("-", "").upper()[:30]

    def build(self, infno: str, input_: dict[str, Any], msgid: str) -> tuple[str, list[tuple[str, str]], bytes]:
        req = {"infno": infno, "msgid": msgid, "mdtrtarea_admvs": "430100", "insuplc_admdvs": "430100",
               "recer_sys_code": "99", "dev_no": "null", "dev_safe_info": "null", "cainfo": "null", "signtype": "SM3",
               "infver": "1.0.0", "opter_type": "1", "opter": self.institution, "opter_name": "湘雅测试医院",
               "inf_time": self.now().strftime("%Y-%m-%d %H:%M:%S"), "fixmedins_code": self.institution,
               "fixmedins_name": "湘雅测试医院", "sign_no": "null", "input": floats(input_)}
        body = json.dumps(req, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        ts = str(int(self.now().timestamp() * 1000))
        api_name, version = f"api_{infno}", "1.0"
        signed = "&".join(f"{k}={v}" for k, v in sorted({"_api_access_key": self.app_id, "_api_name": api_name,
                                                        "_api_timestamp": ts, "_api_version": version}.items()))
        sig = base64.b64encode(hmac.new(self.app_secret.encode(), signed.encode(), hashlib.sha1).digest()).decode()
        # http.client's Host first; then the Session's headers (User-Agent replaced by the SDK's), then the
        # request's new ones in their dict order, then the Content-Length requests computed
        headers = [("Host", self.host), ("User-Agent", "MedicalInsuranceSDK/1.0"), ("Accept-Encoding", "gzip, deflate"),
                   ("Accept", "*/*"), ("Connection", "keep-alive"), ("Content-Type", "text/plain; charset=utf-8"),
                   ("_api_name", api_name), ("_api_version", version), ("_api_timestamp", ts),
                   ("_api_access_key", self.app_id), ("_api_signature", sig), ("Content-Length", str(len(body)))]
        return f"{self.base_path}/{infno}", headers, body

    def transmit(self, ex: Exchange) -> None:
        history = 0
        while True:
            failure = None
            try:
                if self.pool is None or self.pool.dropped():
                    if self.pool is not None:
                        self.pool.close()
                    self.pool = Wire(self.addr, self.timeout)
                self.pool.send(ex.request)
                head, data, ex.interims = self.pool.response(self.timeout)
                ex.status, ex.reason, ex.headers, ex.answer_bytes = head.status, head.reason, head.headers, data
                ex.transport_error = None
                if not head.keep_alive:
                    self._drop()
                if head.status not in self.retry_statuses:
                    return
                failure = f"status {head.status}"
            except socket.timeout:
                failure = "ReadTimeoutError: Read timed out."
            except ConnectionRefusedError:
                failure = "NewConnectionError: [Errno 111] Connection refused"
            except (Closed, ConnectionResetError, BrokenPipeError) as e:
                failure = f"ProtocolError: Connection aborted. {e}"
            if ex.status is None or failure != f"status {ex.status}":
                ex.transport_error = failure
                self._drop()
            history += 1
            if history > self.retries:  # Retry.increment: MaxRetryError
                ex.transport_error = f"Max retries exceeded ({failure})"
                return
            # urllib3 2: no sleep before the first retry, then backoff_factor * 2 ** (errors - 1)
            time.sleep(0 if history <= 1 else self.backoff * 2 ** (history - 1))
            ex.attempts += 1

    def _drop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.pool = None

    def close(self) -> None:
        self._drop()

    def read(self, ex: Exchange) -> None:
        if ex.transport_error:
            url = f"http://{self.host}{self.base_path}/{ex.infno}"
            ex.error = f"NetworkException: 请求异常: {url} ({ex.transport_error})"
            return
        if ex.status is not None and ex.status >= 400:
            ex.error = f"NetworkException: HTTP请求失败: {ex.status} {ex.reason}"
            return
        ctype = ex.header("content-type")
        charset = ctype.partition("charset=")[2].split(";")[0].strip() or None
        text = ex.answer_bytes.decode(charset or "utf-8", "replace")  # requests' .text, roughly
        ex.text = text
        try:
            if ctype.startswith("application/json") or text.strip().startswith(("{", "[")):
                data = json.loads(text)  # response.json(): amounts become floats
            else:
                data = {"text": text.strip(), "status_code": ex.status}
        except json.JSONDecodeError:
            data = {"text": text, "status_code": ex.status, "headers": dict(ex.headers)}
        ex.view = {"infcode": data.get("infcode", -1), "err_msg": data.get("err_msg", ""),
                   "output": data.get("output", {}), "warn_msg": data.get("warn_msg", ""), "raw": data}
        ex.ok = ex.view["infcode"] == 0  # MedicalInsuranceResponse.is_success()

    def validate_response(self, ex: Exchange) -> str | None:
        """ProtocolProcessor.validate_response: None when valid, else its message."""
        if ex.view is None or ex.view["infcode"] != 0:
            return f"接口调用失败: {(ex.view or {}).get('err_msg')}"
        if not ex.view["output"]:
            return "响应数据为空"
        return None

    null_error = "TypeError ('NoneType' object is not subscriptable)"

    def downloaded(self, ex: Exchange) -> bytes | None:
        # The SDK keeps no bytes: a file answer becomes {'text': <decoded text>}; only a JSON envelope with the
        # file inside (fep's output.file.content_base64) reaches a Python HIS whole.
        out = (ex.view or {}).get("output") or {}
        file = out.get("file") if isinstance(out, dict) else None
        if isinstance(file, dict) and file.get("content_base64"):
            return base64.b64decode(file["content_base64"])
        return None


CLIENTS: dict[str, type[HisClient]] = {"zebone": Zebone, "powersi": Powersi, "openhis": OpenHis, "sdk": Sdk}


# ---- files --------------------------------------------------------------------------------------------------------
def result_rows(zipped: bytes, name: str) -> list[list[str]]:
    """The TAB-separated lines of `name` in a ZIP (a 3202 result: psn_no, mdtrt_id, setl_id, msgid, stmt_rslt,
    refd_setl_flag, memo, medfee_sumamt, fund_pay_sumamt, acct_pay)."""
    with zipfile.ZipFile(io.BytesIO(zipped)) as z:
        text = z.read(name).decode("utf-8")
    return [line.split("\t") for line in text.splitlines() if line]


def detail_zip(rows: list[list[str]], name: str = "detail.txt") -> bytes:
    """The hospital's 3202 detail file: setl_id, mdtrt_id, psn_no, medfee, fund, acct, refd_setl_flag."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, "\n".join("\t".join(r) for r in rows).encode("utf-8"))
    return buf.getvalue()


def signed_bytes(data: bytes) -> list[int]:
    """Java's byte[] as json-lib writes it: a JSON array of signed bytes (Zebone's fsUploadIn.in)."""
    return [b - 256 if b > 127 else b for b in data]
