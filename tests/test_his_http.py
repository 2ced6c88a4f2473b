"""HTTP as real HIS clients speak it (issue 11): `Expect: 100-continue` (.NET Framework, curl), HTTP/1.0
keep-alive (ApacheBench -k), bodies in GBK or GB18030, 9101 as the baseline's multipart form, 9102 answered
with the ZIP itself, and inpatient uploads of 20,000 fee lines under the default limit."""

from __future__ import annotations

import base64
import io
import shutil
import socket
import subprocess
import time
import zipfile
from decimal import Decimal
from typing import Any

import httptools
import pytest
from twisted.internet.testing import StringTransport

from fep import config, envelope
from fep.http11 import HTTPServerProtocol, Response
from fep.client import Client
from fep.sim.world import ROOT, ZHANG, World, admitted, his_msgid
from tests.http_doubles import server

CALL = "/fsi/api/rsfComIfsService/callService"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# ---- reading what fep wrote ----------------------------------------------------------------------------------

class _Messages:
    """Every response on a connection, interim ones (100 Continue) included: [(status, headers, body), ...]."""

    def __init__(self) -> None:
        self.got: list[tuple[int, dict[str, str], bytes]] = []
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self.got.append((self._parser.get_status_code(), self._headers, b"".join(self._body)))
        self._headers, self._body = {}, []

    def feed(self, data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
        self._parser.feed_data(data)
        return self.got

    def finals(self) -> list[tuple[int, dict[str, str], bytes]]:
        return [m for m in self.got if m[0] >= 200]


def _read(sock: socket.socket, messages: _Messages, finals: int = 1) -> _Messages:
    """Read until `finals` final answers have come (or the connection closes)."""
    while len(messages.finals()) < finals:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        messages.feed(chunk)
    return messages


def _closed(sock: socket.socket, within: float = 5.0) -> bool:
    """The server closed the connection (rather than keeping it open without saying so)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def _identify(msgid: str | None = None, opter_name: str = "HIS") -> bytes:
    env: dict[str, Any] = {"infno": "1101", "opter_type": "1", "opter": "his", "opter_name": opter_name,
                           "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}}
    if msgid:
        env["msgid"] = msgid
    return envelope.dumps(env)


def _head(body: bytes, version: str = "1.1", extra: str = "", content_type: str = "application/json") -> bytes:
    return (f"POST {CALL} HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode("latin-1")


# ---- the protocol alone: 100-continue and keep-alive, byte by byte ----------------------------------------------

def test_protocol_expect_100_continue_is_answered_before_the_body_is_sent() -> None:
    proto, transport, handler = server()
    body = b'{"n": 1}'
    proto.dataReceived(_head(body, extra="Expect: 100-continue\r\n"))
    assert transport.value() == CONTINUE  # the client may now send its body
    proto.dataReceived(body)
    assert [r.body for r, _ in handler.taken] == [body]
    handler.answer(0)
    got = _Messages().feed(transport.value())
    assert [s for s, _, _ in got] == [100, 200] and not transport.disconnecting


def test_protocol_expect_with_a_body_over_the_limit_gets_413_at_once_and_no_100() -> None:
    proto, transport, handler = server(max_body=100)
    proto.dataReceived(_head(b"x" * 500, extra="Expect: 100-continue\r\n"))
    got = _Messages().feed(transport.value())
    assert [s for s, _, _ in got] == [413], got  # the client need not send the body at all
    assert "over the limit" in got[0][2].decode()
    assert handler.taken == []


def test_protocol_the_100_of_a_request_waits_for_the_answers_owed_before_it() -> None:
    proto, transport, handler = server()
    body = b'{"n": 2}'
    proto.dataReceived(_head(b'{"n": 1}') + b'{"n": 1}' + _head(body, extra="Expect: 100-continue\r\n"))
    assert transport.value() == b""  # the first request's answer comes first, in order
    handler.answer(0, b"one")
    got = _Messages().feed(transport.value())
    assert [(s, b) for s, _, b in got] == [(200, b"one"), (100, b"")]
    proto.dataReceived(body)
    assert [r.body for r, _ in handler.taken][1] == body


def test_protocol_no_100_once_the_client_sent_its_body_anyway() -> None:
    """.NET waits 350 ms, curl 1 s, and then sends the body without the 100: none is owed any more."""
    proto, transport, handler = server()
    proto.dataReceived(_head(b'{"n": 1}') + b'{"n": 1}' + _head(b'{"n": 2}', extra="Expect: 100-continue\r\n"))
    proto.dataReceived(b'{"n": 2}')
    handler.answer(0)
    handler.answer(1)
    assert [s for s, _, _ in _Messages().feed(transport.value())] == [200, 200]


def test_protocol_requests_read_together_and_answered_at_once_are_each_answered_in_order() -> None:
    """A handler that answers without waiting (a 405, an envelope refused) answers from within the parser's
    callback: the requests read with it are parsed on, not fed to the parser again from inside it (llhttp
    took that for a malformed request: a 400, and the connection closed)."""
    proto = HTTPServerProtocol(lambda req: Response(405, req.path.encode()), 1000)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(b"".join(_head(b"{}").replace(CALL.encode(), f"/{i}".encode()) + b"{}" for i in range(3)))
    got = _Messages().feed(transport.value())
    assert [(status, body) for status, _, body in got] == [(405, b"/0"), (405, b"/1"), (405, b"/2")]
    assert not transport.disconnecting


def test_protocol_http_1_0_keeps_the_connection_only_when_asked_and_says_so() -> None:
    proto, transport, handler = server()
    proto.dataReceived(_head(b"{}", "1.0", "Connection: Keep-Alive\r\n") + b"{}")
    handler.answer(0)
    got = _Messages().feed(transport.value())
    assert got[0][1]["connection"].lower() == "keep-alive" and not transport.disconnecting
    assert handler.taken[0][0].version == "1.0"

    proto, transport, handler = server()
    proto.dataReceived(_head(b"{}", "1.0") + b"{}")
    handler.answer(0)
    got = _Messages().feed(transport.value())
    assert got[0][1]["connection"].lower() == "close" and transport.disconnecting


def test_protocol_http_1_0_ignores_expect() -> None:
    proto, transport, handler = server()
    proto.dataReceived(_head(b"{}", "1.0", "Expect: 100-continue\r\n"))
    assert transport.value() == b""  # an HTTP/1.0 client does not know 100 (RFC 9110 10.1.1)


def test_protocol_http_1_1_connection_close_is_closed_after_the_answer() -> None:
    proto, transport, handler = server()
    proto.dataReceived(_head(b"{}", extra="Connection: close\r\n") + b"{}")
    handler.answer(0)
    got = _Messages().feed(transport.value())
    assert got[0][1]["connection"] == "close" and transport.disconnecting


# ---- through the daemon: what an HIS sees ------------------------------------------------------------------------

def test_apachebench_keep_alive_over_http_1_0_gets_every_answer_on_one_connection(running: World) -> None:
    """ab -k: HTTP/1.0 with `Connection: Keep-Alive`; it reuses the connection only when the answer says
    keep-alive, and otherwise waits for the close. Each answer says it, and the next request is answered."""
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=20) as s:
        for n in range(3):
            body = _identify(his_msgid(100 + n))
            s.sendall(_head(body, "1.0", "Connection: Keep-Alive\r\nUser-Agent: ApacheBench/2.3\r\n") + body)
            status, headers, answer = _read(s, _Messages()).finals()[0]
            assert status == 200 and headers["connection"].lower() == "keep-alive", headers
            assert envelope.loads(answer)["infcode"] == 0


def test_http_1_0_without_keep_alive_is_closed_after_the_answer(running: World) -> None:
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=20) as s:
        body = _identify()
        s.sendall(_head(body, "1.0") + body)
        status, headers, _ = _read(s, _Messages()).finals()[0]
        assert status == 200 and headers["connection"] == "close"
        assert _closed(s)  # a client reading to the end of the connection does not hang


def test_http_1_1_connection_close_is_closed_after_the_answer(running: World) -> None:
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=20) as s:
        body = _identify()
        s.sendall(_head(body, extra="Connection: close\r\n") + body)
        assert _read(s, _Messages()).finals()[0][0] == 200
        assert _closed(s)


def test_curl_style_expect_gets_100_continue_then_the_answer(running: World) -> None:
    """curl sends `Expect: 100-continue` with a large body and waits up to 1 s for the 100 before sending."""
    key = his_msgid(110)  # (once: the stamp in it is the second it is made)
    body = _identify(key)
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=20) as s:
        s.sendall(_head(body, extra="User-Agent: curl/7.88.1\r\nAccept: */*\r\nExpect: 100-continue\r\n"))
        messages = _Messages()
        while not messages.got:
            messages.feed(s.recv(1 << 16))
        assert messages.got[0][0] == 100  # nothing else is said before the body
        s.sendall(body)
        status, _, answer = _read(s, messages).finals()[0]
        assert status == 200 and envelope.loads(answer)["fep_msgid"] == key


def test_dotnet_style_expect_hears_100_continue(running: World) -> None:
    """.NET Framework's HttpWebRequest sends headers with `Expect: 100-continue`, waits 350 ms for the 100, then
    sends the body whether it came or not. The 100 must come; the time is not asserted."""
    body = envelope.dumps({"infno": "1101", "opter_type": "1", "opter": "his", "opter_name": "HIS",
                           "input": {"data": {"mdtrt_cert_type": "02", "mdtrt_cert_no": ZHANG["certno"]}}})
    head = (f"POST {CALL} HTTP/1.1\r\nContent-Type: application/json\r\napikey: x\r\nHost: 127.0.0.1:8097\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: Keep-Alive\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=20) as s:
        s.sendall(head)
        messages = _Messages()
        s.settimeout(0.35)
        try:
            messages.feed(s.recv(1 << 16))
        except socket.timeout:
            pass
        s.settimeout(20)
        s.sendall(body)
        _read(s, messages)
    assert [status for status, _, _ in messages.got] == [100, 200], messages.got


def test_real_curl_hears_100_continue(running: World) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = running.dir / "envelope.json"
    body.write_bytes(_identify())
    done = subprocess.run(["curl", "-sv", "--expect100-timeout", "30", "-H", "Expect: 100-continue",
                           "-H", "Content-Type: application/json", "--data-binary", f"@{body}",
                           f"http://127.0.0.1:{running.his_port}{CALL}"], capture_output=True, text=True, timeout=60)
    assert "< HTTP/1.1 100 Continue" in done.stderr, done.stderr
    assert envelope.loads(done.stdout)["infcode"] == 0


# ---- bodies in GBK and GB18030 ------------------------------------------------------------------------------------

def _registration(msgid: str, opter_name: str, dr_name: str) -> dict[str, Any]:
    return {"infno": "2201", "msgid": msgid, "opter_type": "1", "opter": "0012", "opter_name": opter_name,
            "input": {"data": {"psn_no": ZHANG["psn_no"], "insutype": ZHANG["insutype"],
                               "begntime": "2026-11-23 09:00:00", "mdtrt_cert_type": "02",
                               "mdtrt_cert_no": ZHANG["certno"], "ipt_otp_no": f"B{time.time_ns() % 10**12}",
                               "atddr_no": "D001", "dr_name": dr_name, "dept_code": "01",
                               "dept_name": "心血管内科", "caty": "A03"}}}


def _post(world: World, body: bytes, content_type: str) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", world.his_port), timeout=30) as s:
        s.sendall(_head(body, content_type=content_type) + body)
        return _read(s, _Messages()).finals()[0]


def test_a_gbk_body_reaches_the_bureau_as_the_same_text(running: World) -> None:
    msgid = his_msgid(120)
    env = _registration(msgid, "收费员张三", "欧阳医生")
    body = envelope.dumps(env).decode("utf-8").encode("gbk")
    status, _, answer = _post(running, body, "application/json; charset=GBK")
    assert status == 200 and envelope.loads(answer)["infcode"] == 0, answer
    seen = running.bureau_request(msgid)  # the envelope as the bureau read it
    assert seen["opter_name"] == "收费员张三"
    assert seen["input"]["data"]["dr_name"] == "欧阳医生" and seen["input"]["data"]["dept_name"] == "心血管内科"
    assert '"opter_name":"收费员张三"' in running.trade(msgid)["request"]  # journalled as text, sent as UTF-8


def test_gb2312_and_gb18030_are_honoured_and_gb18030_is_the_fallback_without_a_charset(running: World) -> None:
    # 𠮷 is outside GBK: only GB18030 (four bytes) carries it; names like it are on ID cards.
    for n, (text, charset) in enumerate([("收费员李四", "gb2312"), ("收费员𠮷祥", "GB18030"),
                                         ("收费员王五", None)]):
        msgid = his_msgid(121 + n)
        body = envelope.dumps(_registration(msgid, text, "医生")).decode("utf-8").encode("gb18030")
        ctype = f"application/json; charset={charset}" if charset else "text/plain"
        status, _, answer = _post(running, body, ctype)
        assert status == 200, answer
        assert running.bureau_request(msgid)["opter_name"] == text


def test_bytes_not_of_the_declared_charset_are_a_400_naming_it(running: World) -> None:
    gbk = envelope.dumps(_registration(his_msgid(130), "收费员", "医生")).decode().encode("gbk")
    status, _, answer = _post(running, gbk, "application/json; charset=utf-8")
    refused = envelope.loads(answer)
    # Refused in the interface's own shape (HTTP 200, REFUSED), naming the charset problem.
    assert (status, refused["fep_state"], refused["fep_reason"]) == (200, "REFUSED", "invalid")
    assert "not valid UTF-8" in refused["err_msg"] and "charset=utf-8" in refused["err_msg"]
    status, _, answer = _post(running, b'{"infno":"1101","opter_name":"\xff\xfe","input":{}}',
                              "application/json; charset=gbk")
    assert status == 200 and "not valid GBK" in envelope.loads(answer)["err_msg"]
    status, _, answer = _post(running, b'{"infno":"1101","input":{}}', "application/json; charset=koi8-r")
    assert status == 200 and "koi8-r" in envelope.loads(answer)["err_msg"]
    assert running.journal("msgid=?", (his_msgid(130),)) == []


def test_a_utf8_body_with_a_byte_order_mark_is_read() -> None:
    """.NET's Encoding.UTF8 writes a BOM before the JSON."""
    req = envelope.parse_his_request(envelope.BOM + _identify(opter_name="收费员"))
    assert req.envelope["opter_name"] == "收费员"


# ---- 9101 and 9102: files as the baseline moves them ------------------------------------------------------------

def _zip(name: str = "detail.txt") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(name, "400120001\t300170001\t43010000000000000001\t30.00\t21.00\t9.00\t0\n")
        z.writestr("bytes.bin", bytes(range(256)) * 8 + b"\r\n--\r\n")  # every byte value, and boundary look-alikes
    return buf.getvalue()


def _form(parts: list[tuple[str, str | None, str, bytes]], boundary: str = "hF3kq7vXrZ2nP0wQ") -> tuple[bytes, str]:
    """A multipart/form-data body as Apache HttpClient's MultipartEntityBuilder writes it."""
    out = b""
    for name, filename, ctype, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\nContent-Type: {ctype}\r\n"
                f"Content-Transfer-Encoding: binary\r\n\r\n").encode("utf-8") + content + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}; charset=UTF-8"


def _upload_envelope(msgid: str, filename: str | None = None) -> dict[str, Any]:
    node = {"fixmedins_code": "H43010000001"} | ({"filename": filename} if filename else {})
    return {"infno": "9101", "msgid": msgid, "opter_type": "1", "opter": "0012", "opter_name": "对账员",
            "infver": "V1.0", "input": {"fsUploadIn": node}}


def _download(world: World, file_qury_no: str, filename: str, msgid: str) -> bytes:
    return envelope.dumps({"infno": "9102", "msgid": msgid, "opter_type": "1", "opter": "0012",
                           "opter_name": "对账员", "input": {"fsDownloadIn": {
                               "file_qury_no": file_qury_no, "filename": filename, "fixmedins_code": "plc"}}})


def test_9101_as_the_baselines_multipart_form_uploads_the_file_byte_for_byte(running: World) -> None:
    content, msgid = _zip(), his_msgid(140)
    body, ctype = _form([("jsonStr", None, "text/plain; charset=UTF-8",
                          envelope.dumps(_upload_envelope(msgid))),
                         ("file", "2026-11-22明细.zip", "application/octet-stream", content)])
    status, _, answer = _post(running, body, ctype)
    uploaded = envelope.loads(answer)
    assert status == 200 and uploaded["infcode"] == 0, uploaded
    out = uploaded["output"]
    assert out["filename"] == "2026-11-22明细.zip"  # from the file part, the envelope naming none
    # The journal holds the envelope form every other HIS sends: the file in Base64, exactly.
    journalled = envelope.loads(running.trade(msgid)["request"])["input"]["fsUploadIn"]
    assert base64.b64decode(journalled["in"]) == content
    # And the bureau holds the same bytes: downloading them again gives them back.
    status, headers, got = _post(running, _download(running, out["file_qury_no"], out["filename"], his_msgid(141)),
                                 "application/json")
    assert status == 200 and headers["content-type"] == "application/octet-stream" and got == content


def test_9101_as_a_form_of_fsuploadin_fields_and_an_in_part_is_taken_too() -> None:
    """Some HIS post only fsUploadIn's fields in jsonStr, and the file under fsUploadIn's own name, in."""
    content = _zip()
    body, ctype = _form([("jsonStr", None, "text/plain; charset=ISO-8859-1",
                          b'{"filename":"detail.zip","fixmedins_code":"H43010000001"}'),
                         ("in", "detail.zip", "application/octet-stream", content)])
    req = envelope.parse_his_form(body, ctype.split("boundary=")[1].split(";")[0])
    assert req.infno == "9101"
    node = req.input["fsUploadIn"]
    assert node["filename"] == "detail.zip" and base64.b64decode(node["in"]) == content


def test_9101_as_json_with_base64_is_accepted(running: World) -> None:
    content, msgid = _zip(), his_msgid(142)
    env = _upload_envelope(msgid, "detail.zip")
    env["input"]["fsUploadIn"]["in"] = base64.b64encode(content).decode()  # openhis: byte[] as Newtonsoft writes it
    answer = Client.tcp("127.0.0.1", running.his_port).request("POST", CALL, envelope.dumps(env))[1]
    assert answer["infcode"] == 0 and answer["output"]["filename"] == "detail.zip"
    status, _, got = _post(running, _download(running, answer["output"]["file_qury_no"], "detail.zip",
                                              his_msgid(143)), "application/json")
    assert status == 200 and got == content


def test_a_malformed_or_odd_multipart_request_is_refused_naming_the_problem(running: World) -> None:
    body, ctype = _form([("file", "a.zip", "application/octet-stream", b"PK")])
    status, _, answer = _post(running, body, ctype)
    assert status == 200 and "no jsonStr part" in envelope.loads(answer)["err_msg"]  # refused, in the interface's shape
    body, ctype = _form([("jsonStr", None, "text/plain", _identify()), ("file", "a.zip", "application/zip", b"PK")])
    status, _, answer = _post(running, body, ctype)
    assert status == 200 and "only with 9101" in envelope.loads(answer)["err_msg"]
    status, _, answer = _post(running, b"--x\r\nnot a form", "multipart/form-data; boundary=x")
    assert status == 200 and "multipart" in envelope.loads(answer)["err_msg"]


def _uploaded(world: World, content: bytes, filename: str) -> dict[str, Any]:
    env = _upload_envelope(his_msgid(150), filename)
    env["input"]["fsUploadIn"]["in"] = base64.b64encode(content).decode()
    answer = world.his.call("9101", env["input"], msgid=env["msgid"])
    assert answer["infcode"] == 0, answer
    return answer["output"]


def test_9102_answers_with_the_zip_itself_fresh_and_resubmitted_a_lookup_without_it(running: World) -> None:
    content = _zip()
    up = _uploaded(running, content, "对账结果.zip")
    msgid = his_msgid(151)
    request = _download(running, up["file_qury_no"], up["filename"], msgid)
    for attempt in ("fresh", "resubmitted"):
        status, headers, got = _post(running, request, "application/json")
        assert status == 200 and got == content, attempt
        assert headers["content-type"] == "application/octet-stream"
        assert "attachment" in headers["content-disposition"]
        assert "filename*=UTF-8''%E5%AF%B9%E8%B4%A6%E7%BB%93%E6%9E%9C.zip" in headers["content-disposition"]
        assert headers["x-fep-msgid"] == msgid and headers["x-fep-state"] == "ANSWERED"
        assert zipfile.ZipFile(io.BytesIO(got)).read("bytes.bin").startswith(bytes(range(256)))
    with socket.create_connection(("127.0.0.1", running.his_port), timeout=30) as s:
        s.sendall(f"GET /fep/trades/{msgid} HTTP/1.1\r\nHost: fep\r\n\r\n".encode())
        status, headers, got = _read(s, _Messages()).finals()[0]
    # A lookup needs only a msgid, so it shows state and codes, not the file (issue 12): the file goes to the
    # resubmission of the same msgid and payload.
    looked = envelope.loads(got)
    assert status == 200 and headers["content-type"].startswith("application/json") and looked["infcode"] == 0
    assert looked["fep_state"] == "ANSWERED" and looked["fep_view"] and "content_base64" not in got.decode()
    assert running.events(msgid) == ["accept", "answer"]  # sent once: the resubmission got the stored file


def test_a_failed_9102_stays_a_json_envelope(running: World) -> None:
    status, headers, answer = _post(running, _download(running, "F99999999", "none.zip", his_msgid(160)),
                                    "application/json")
    failed = envelope.loads(answer)
    assert status == 200 and headers["content-type"].startswith("application/json")
    assert failed["infcode"] == -1 and "不存在" in failed["err_msg"] and failed["fep_state"] == "ANSWERED"


def test_the_python_client_still_reads_a_download() -> None:
    """fep.client (fep call, scripts) gets the envelope form back from the octet-stream answer."""
    file = envelope.FileDownload("r.zip", b"PK\x03\x04zip")
    resp = envelope.file_response(200, file, {"fep_msgid": "M1", "fep_state": "ANSWERED", "fep_infno": "9102"})
    answer = Client.read_file_answer(resp.headers, resp.body)
    assert answer["infcode"] == 0 and answer["fep_msgid"] == "M1" and answer["fep_state"] == "ANSWERED"
    assert envelope.file_content(answer["output"]) == b"PK\x03\x04zip"
    assert answer["output"]["file"]["filename"] == "r.zip"


# ---- big inpatient uploads ----------------------------------------------------------------------------------------

def test_the_default_limit_takes_a_20000_line_inpatient_upload(running: World) -> None:
    cfg = config.load(ROOT / "conf" / "fep.yaml")
    visit = admitted(running.his, ZHANG)
    body = envelope.dumps({"infno": "2301", "opter_type": "1", "opter": "0012", "opter_name": "护士",
                           "input": visit.inpatient_fees(20_000)})
    assert cfg.his.max_body >= len(body) * 1.5, (cfg.his.max_body, len(body))  # room for indented JSON too
    status, _, answer = _post(running, body, "application/json")
    uploaded = envelope.loads(answer)
    assert status == 200 and uploaded["infcode"] == 0, answer[:300]
    assert len(uploaded["output"]["result"]) == 20_000
    assert running.trade(uploaded["fep_msgid"])["state"] == "ANSWERED"


def test_the_production_template_has_the_same_default_limit() -> None:
    dev = config.load(ROOT / "conf" / "fep.yaml").his.max_body
    assert f"max_body: {dev}" in (ROOT / "conf" / "fep.production.yaml").read_text()


# ---- the faster JSON keeps every promise of the slower one ---------------------------------------------------------

def _sample() -> dict[str, Any]:
    return {"infno": "2207", "msgid": "H43010000099202611231044550001", "opter_name": "收费员𠮷祥",
            "memo": "tab\there \"quoted\" back\\slash \x01 \x7f \u2028",
            "input": {"data": {"medfee_sumamt": Decimal("4.52"), "cnt": Decimal("2"), "zero": Decimal("0.00"),
                               "big": 12345678901234567890123, "neg": Decimal("-25.10"), "exp": Decimal("1E+2"),
                               "none": None, "flag": True, "list": [Decimal("0.1"), "a", {"b": []}]}}}


def test_json_is_written_byte_for_byte_as_before_and_read_decimal_exact() -> None:
    import simplejson

    env = _sample()
    before = simplejson.dumps(env, use_decimal=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert envelope.dumps(env) == before
    back = envelope.loads(before)
    assert back == env and isinstance(back["input"]["data"]["medfee_sumamt"], Decimal)
    assert str(back["input"]["data"]["zero"]) == "0.00" and str(back["input"]["data"]["neg"]) == "-25.10"
    assert envelope.loads(envelope.BOM + before) == env
    with pytest.raises(ValueError):
        envelope.loads(b'{"infno": ')


def test_a_payload_digest_journalled_by_an_earlier_fep_still_names_the_same_payload() -> None:
    import hashlib

    import simplejson

    env = _sample()
    core = {"infno": env["infno"], "input": env["input"], "insuplc_admdvs": ""}
    first_form = hashlib.sha256(simplejson.dumps(core, use_decimal=True, sort_keys=True).encode()).hexdigest()
    digest = envelope.payload_hash(env)
    assert digest != first_form and same(first_form, digest)
    assert same(str(digest), envelope.payload_hash(envelope.loads(envelope.dumps(env))))
    reordered = dict(reversed(list(env.items())))
    reordered["input"] = {"data": dict(reversed(list(env["input"]["data"].items())))}
    assert envelope.payload_hash(reordered) == digest  # key order is not the payload
    other = envelope.payload_hash(env | {"input": {"data": {"medfee_sumamt": Decimal("4.53")}}})
    assert not same(first_form, other) and not same(str(digest), other)
    assert envelope.payload_hash(env | {"inf_time": "2026-11-23 10:00:00"}) == digest  # nor is the clock
    env["input"]["data"]["medfee_sumamt"] = Decimal("9.99")  # fep maps fee codes in place after hashing
    assert same(first_form, digest)


def same(stored: str, digest: envelope.Digest) -> bool:
    return envelope.same_payload(stored, digest, lambda: pytest.fail("a digest of the canonical form is enough"))


def test_a_digest_of_the_his_own_bytes_tells_the_same_input_spelt_otherwise() -> None:
    """A digest of the input's bytes as the HIS wrote them ("3:") is the same payload as any spelling of that
    input, and of its canonical digest ("2:"), in either direction; not of another trade's or another input's."""
    env = _sample()
    as_written = envelope.dumps(env["input"])
    raw = envelope.payload_hash(env, as_written)
    assert raw.startswith(envelope.RAW_PREFIX) and raw != envelope.payload_hash(env)
    spelt = b'{ "data" : ' + envelope.dumps(dict(reversed(list(env["input"]["data"].items())))) + b" }"
    other_spelling = envelope.payload_hash(env | {"input": envelope.loads(spelt)}, spelt)
    assert other_spelling != raw
    assert envelope.same_payload(str(raw), other_spelling, lambda: envelope.loads(as_written))
    assert envelope.same_payload(str(raw), envelope.payload_hash(env), lambda: envelope.loads(as_written))
    assert envelope.same_payload(str(envelope.payload_hash(env)), raw, lambda: pytest.fail("not read"))
    more = env["input"]["data"] | {"medfee_sumamt": Decimal("4.53")}
    assert not envelope.same_payload(str(raw), envelope.payload_hash(env | {"input": {"data": more}}),
                                     lambda: envelope.loads(as_written))
    assert not envelope.same_payload(str(raw), envelope.payload_hash(env | {"insuplc_admdvs": "430100"}),
                                     lambda: pytest.fail("another place is another payload, read or not"))


def test_one_top_level_field_is_read_without_reading_the_rest() -> None:
    """The sender's sign_no of a journalled request (envelope.top_field), not the one inside input."""
    request = envelope.dumps({"infno": "9002", "input": {"signOut": {"sign_no": "OLD"}}, "sign_no": "359001"})
    assert envelope.top_field(request, "sign_no") == "359001"
    assert envelope.top_field(request.decode(), "sign_no") == "359001"
    assert envelope.top_field(b'{"infno":"1101"}', "sign_no", "") == ""
    assert envelope.top_field(b'{"n":4.52}', "n") == Decimal("4.52")
    with pytest.raises(ValueError):
        envelope.top_field(b'[]', "sign_no")
