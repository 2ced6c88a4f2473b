"""9101 as a bureau that takes the baseline's form wants it: multipart/form-data, the envelope in a `jsonStr`
part and the file in a `file` part (HN 附录A, the baseline's Java client: MultipartEntityBuilder,
addTextBody("jsonStr", …), addBinaryBody("file", …)). fep journals every upload in the JSON form
(fsUploadIn.in in Base64); this is only how it goes on the wire (bureau.file_upload: multipart).
"""

from __future__ import annotations

import base64
import binascii

from urllib3.filepost import encode_multipart_formdata

from fep import envelope

FILE_TYPE = "application/octet-stream"


def upload_form(body: bytes) -> tuple[bytes, str] | None:
    """The form of an envelope carrying a file (fsUploadIn.in), and its Content-Type; None for any other."""
    if b'"fsUploadIn"' not in body:
        return None
    env = envelope.loads(body)
    node = (env.get("input") or {}).get("fsUploadIn") if isinstance(env, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("in"), str):
        return None
    try:
        content = base64.b64decode(node["in"], validate=True)
    except binascii.Error:
        return None  # not a file fep can send as one: it goes as it came, and the bureau judges it
    env["input"]["fsUploadIn"] = {k: v for k, v in node.items() if k != "in"}  # the file travels once
    return encode_multipart_formdata([
        ("jsonStr", envelope.dumps(env).decode("utf-8")),
        ("file", (str(node.get("filename") or "upload.zip"), content, FILE_TYPE)),
    ])
