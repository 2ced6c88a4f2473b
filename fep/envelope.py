"""The national request/response envelope (nhsa-interface.md §1), decimal-exact both ways.

Pure data: no sockets, no SQLite. The HIS listener, the bureau link and the simulator all use it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from itertools import chain, repeat
from typing import Any, Callable, Iterable
from urllib.parse import quote, unquote

import msgspec
import multipart
import simplejson

from fep.http11 import Response

REQUIRED_FROM_HIS = ("infno", "input")
# Never shown outside the journal (may carry card or e-certificate password material); never logged.
SECRET_FIELDS = ("cainfo",)
BOM = b"\xef\xbb\xbf"  # .NET's Encoding.UTF8 writes one before the JSON


class BadEnvelope(ValueError):
    """The HIS sent something that is not a usable request; the message names what is wrong."""


# msgspec reads and writes JSON about four times as fast as simplejson (a 3.5 MB upload: 9 ms against 20 to
# read, 3 against 20 to write) with the same bytes out: numbers with a fraction are Decimals both ways, never
# floats, and text is written as UTF-8, unescaped.
_decoder = msgspec.json.Decoder(float_hook=Decimal)
_encoder = msgspec.json.Encoder(decimal_format="number")
_canonical = msgspec.json.Encoder(decimal_format="number", order="sorted")


def loads(data: bytes | str) -> Any:
    """JSON to Python, decimal-exact. Raises ValueError (with the byte where it went wrong) on bad JSON or bad
    UTF-8, a lone UTF-16 surrogate escape, or nesting deeper than the reader's stack. A leading byte-order
    mark is skipped."""
    if data[:3] == BOM or data[:1] == "\ufeff":
        data = data[3:] if isinstance(data, (bytes, bytearray)) else data[1:]
    try:
        return _decoder.decode(data)
    except RecursionError:  # not a ValueError: it would escape every caller's handling as an internal error
        raise ValueError(f"JSON is nested too deeply (more than {MAX_DEPTH} levels of objects and arrays)") from None
    except ValueError as e:
        lone = _LONE_SURROGATE.search(data if isinstance(data, str) else data.decode("latin-1"))
        if lone is None:
            raise
        where = lone.start("high") if lone.group("high") else lone.start("low")
        raise ValueError(f"a lone UTF-16 surrogate {lone.group('high') or lone.group('low')} at character {where}: "
                         f"it is half of a character, not text (\\uD800-\\uDBFF must be followed by \\uDC00-\\uDFFF)") from e


# National envelopes are three or four levels deep (envelope, input, node, list of nodes); 32 is far past
# any of them and far short of what would exhaust a stack.
MAX_DEPTH = 32
# A \uD800-\uDBFF escape not followed by a \uDC00-\uDFFF one, or a low one not preceded by a high one. (Raw UTF-8
# cannot encode a surrogate at all, and GB18030 text decoded by Python never holds one.)
_LONE_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*(?P<high>\\u[dD][89abAB][0-9a-fA-F]{2})(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})(?P<low>\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj)


_field_decoders: dict[str, msgspec.json.Decoder[Any]] = {}


def top_field(data: bytes | str, name: str, default: Any = None) -> Any:
    """One top-level field of a JSON object, read without building the rest: a 3.5 MB upload's sign_no in
    1 ms, against 12 for loads. Raises ValueError on bad JSON, like loads."""
    decoder = _field_decoders.get(name)
    if decoder is None:
        struct = msgspec.defstruct(f"_Top_{name}", [(name, Any, msgspec.UNSET)], forbid_unknown_fields=False)
        decoder = _field_decoders[name] = msgspec.json.Decoder(struct, float_hook=Decimal)
    if data[:3] == BOM or data[:1] == "\ufeff":
        data = data[3:] if isinstance(data, (bytes, bytearray)) else data[1:]
    try:
        value = getattr(decoder.decode(data), name)
    except msgspec.ValidationError as e:  # not an object at all
        raise ValueError(str(e)) from None
    return default if value is msgspec.UNSET else value


DIGEST_PREFIX = "2:"  # of the canonical payload (sorted keys); digests with no prefix are of the first form (simplejson)
# "3:HEAD:INPUT": of the input's bytes as the HIS wrote them, which spares encoding a 3.5 MB upload again (7 ms).
# The same input spelt otherwise (keys reordered, spaced) is still the same payload: same_payload tells by the
# canonical form, which is computed only then.
RAW_PREFIX = "3:"


class Digest(str):
    """A payload digest. It keeps the payload it was taken of, so that a journalled digest of another form (an
    older fep's, or the other spelling's) can still be compared with it: `same_payload`."""

    core: dict[str, Any]

    @functools.cached_property
    def canonical(self) -> bytes:
        return _canonical.encode(self.core)

    def canonical_form(self) -> str:
        return DIGEST_PREFIX + hashlib.sha256(self.canonical).hexdigest()

    def head(self) -> str:
        """What of the payload is not its input: the trade and the insured place."""
        return _head(self.core["infno"], self.core["insuplc_admdvs"])

    def legacy(self) -> str:
        core = loads(self.canonical)
        return hashlib.sha256(simplejson.dumps(core, use_decimal=True, sort_keys=True).encode()).hexdigest()


def payload_hash(envelope: dict[str, Any], input_json: msgspec.Raw | bytes | None = None) -> Digest:
    """What makes two submissions of one msgid "the same": the trade and its input, not the clock. With
    `input_json`, the input as the HIS wrote it (which nothing may change afterwards), the digest is of those
    bytes; otherwise of the canonical payload, computed now (fep maps fee codes in place afterwards)."""
    core = {"infno": envelope.get("infno"), "input": envelope.get("input"),
            "insuplc_admdvs": envelope.get("insuplc_admdvs", "")}
    if input_json is not None:
        digest = Digest(f"{RAW_PREFIX}{_head(core['infno'], core['insuplc_admdvs'])}:"
                        f"{hashlib.sha256(input_json).hexdigest()}")
        digest.core = core
        return digest
    canonical = _canonical.encode(core)
    digest = Digest(DIGEST_PREFIX + hashlib.sha256(canonical).hexdigest())
    digest.core, digest.canonical = core, canonical
    return digest


def _head(infno: Any, insuplc_admdvs: Any) -> str:
    return hashlib.sha256(_canonical.encode([infno, insuplc_admdvs])).hexdigest()[:16]


def same_payload(stored: str, digest: Digest, stored_input: Callable[[], Any]) -> bool:
    """Whether a journalled digest and a new submission's digest name the same payload, whichever form the
    journalled one is of. `stored_input` reads the journalled trade's input: a digest of the HIS's bytes that
    differs is compared by the canonical forms of the two inputs."""
    if stored == digest:
        return True
    if stored.startswith(RAW_PREFIX):
        head = stored[len(RAW_PREFIX):].partition(":")[0]
        return head == digest.head() and _canonical.encode(stored_input()) == _canonical.encode(digest.core["input"])
    if stored.startswith(DIGEST_PREFIX):
        return stored == digest.canonical_form()
    return stored == digest.legacy()


@dataclass
class HisRequest:
    infno: str
    msgid: str | None  # as sent by the HIS; None when absent
    envelope: dict[str, Any]
    # The input's JSON exactly as the HIS sent it, when it was read as it is (a UTF-8 body, input an object in
    # it, nothing rewritten): the journal keeps these bytes, and the bureau is sent them, unless fep changes
    # the input after (fee codes mapped), which saves encoding a 3.4 MB upload again. None otherwise.
    input_json: msgspec.Raw | None = None

    @property
    def input(self) -> dict[str, Any]:
        return self.envelope["input"]


# The Chinese charsets an HIS declares (read as GB18030, which contains them all), and the others it may say.
GB_CHARSETS = frozenset({"gbk", "gb2312", "gb18030", "cp936", "ms936", "x-gbk", "euc-cn", "windows-936"})
UTF8_CHARSETS = frozenset({"utf-8", "utf8"})
ASCII_CHARSETS = frozenset({"us-ascii", "ascii", "iso-8859-1", "latin1", "latin-1"})


def read_json(raw: bytes, charset: str | None, what: str = "request body") -> Any:
    return _checked(_read_json(raw, charset, what), what)[0]


def _read_json(raw: bytes, charset: str | None, what: str) -> tuple[Any, bytes | str]:
    """JSON in its declared charset. UTF-8 (declared, or nothing declared) goes to the JSON reader as it is;
    GBK, GB2312 and GB18030 are read as GB18030, the standard that contains the others. A body with no
    charset that is not UTF-8 is read as GB18030 (Windows HIS programs send the system code page without
    saying so). Bytes not of the charset, and bad JSON, are a BadEnvelope naming which."""
    cs = (charset or "").strip().strip('"').lower()
    if cs in GB_CHARSETS:
        try:
            text = raw.decode("gb18030")
        except UnicodeDecodeError as e:
            raise BadEnvelope(f"{what} is not valid {cs.upper()} (Content-Type charset={cs}): {e.reason} at byte "
                              f"{e.start}") from None
        try:
            return loads(text), text
        except ValueError as e:
            raise BadEnvelope(f"{what} is not valid JSON: {e}") from None
    if cs and cs not in UTF8_CHARSETS and cs not in ASCII_CHARSETS:
        raise BadEnvelope(f"{what} has charset={cs}, which fep does not read: send UTF-8, GBK or GB18030")
    try:
        return loads(raw), raw  # the common case: UTF-8, read once
    except ValueError as e:
        error = e
    try:  # the JSON reader refused it: bad bytes, GB18030 sent without a charset, or bad JSON?
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if cs in UTF8_CHARSETS:
            raise BadEnvelope(f"{what} is not valid {cs.upper()} (Content-Type charset={cs}): {e.reason} at byte "
                              f"{e.start}") from None
        try:
            text = raw.decode("latin-1" if cs else "gb18030")  # Latin-1 as declared; GB18030 when nothing is
        except UnicodeDecodeError:
            raise BadEnvelope(f"{what} is neither UTF-8 nor GB18030 (no charset in Content-Type): {e.reason} at "
                              f"byte {e.start}; send UTF-8, or say charset=gbk") from None
        try:
            return loads(text), text
        except ValueError as e2:
            error = e2
    raise BadEnvelope(f"{what} is not valid JSON: {error}")


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_STRING_B = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
# What a JSON reader makes of a scalar: values of these types have nothing below them.
_SCALARS = frozenset({str, int, Decimal, bool, type(None)})


def _checked(decoded: tuple[Any, bytes | str], what: str) -> tuple[Any, bool]:
    """What the JSON reader accepts that fep does not: nesting past MAX_DEPTH, and a key twice in one object
    (the reader keeps the last; the bureau's may keep the first, and the journal would not show what was
    meant). The strings and keys of the decoded document are counted and compared with the text's: a key
    the reader dropped is a string of the text that is nowhere in the document. Only when they differ is the
    text read again to name the key. Also whether every amount, price and quantity in the whole document is
    fine (check_numbers), told in the same walk: a 5,000-line upload's lines are read once, not twice."""
    obj, text = decoded
    keys, strings, numbers_fine = _tally(obj, what)
    if not _same_strings(text, keys, strings):
        raise BadEnvelope(f"{what} has {_duplicate(text)}: each key may appear once in an object")
    return obj, numbers_fine


def _tally(obj: Any, what: str) -> tuple[int, int, bool]:
    """(keys, strings, numbers fine) of a decoded document, keys not counted among strings. A list of objects
    (fee lines) is tallied as one node, its values together, at C speed. BadEnvelope past MAX_DEPTH."""
    if not isinstance(obj, (dict, list)):
        return 0, int(isinstance(obj, str)), True
    keys = strings = 0
    fine = True
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadEnvelope(f"{what} is nested more than {MAX_DEPTH} levels deep; national envelopes are a few")
        if depth < MAX_DEPTH and _all_objects(node):
            keys += sum(map(len, node))
            fine = fine and _columns_fine(node)
            values: Iterable[Any] = chain.from_iterable(map(dict.values, node))  # walked again only if nested
            kinds, depth = list(map(type, chain.from_iterable(map(dict.values, node)))), depth + 1
        else:
            if isinstance(node, dict):
                keys += len(node)
                fine = fine and _all_fine_here(node)
                values = list(node.values())
            else:
                values = node
            kinds = list(map(type, values))
        strings += kinds.count(str)
        if not _SCALARS.issuperset(kinds):  # (no set of 130,000 kinds built first)
            stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    return keys, strings, fine


def _all_objects(node: Any) -> bool:
    """A non-empty list of nothing but objects: fee lines, result rows."""
    return type(node) is list and set(map(type, node)) == {dict}


def _same_strings(text: bytes | str, keys: int, strings: int) -> bool:
    """Whether the JSON text has just these keys and strings. Where no quote is escaped, every quote delimits
    a string: its quotes are counted at C speed (a 3.5 MB upload in 1 ms, against 17 for matching every key's
    end). Otherwise the strings are removed and the colons left, one a key, are counted."""
    if isinstance(text, str):
        if "\\" not in text or '\\"' not in text:  # (a backslash is rare, and found at once; a quote is not)
            return text.count('"') == 2 * (keys + strings)
        return _STRING.sub("", text).count(":") == keys
    if b"\\" not in text or b'\\"' not in text:
        return text.count(b'"') == 2 * (keys + strings)
    return _STRING_B.sub(b"", text).count(b":") == keys


def _duplicate(text: bytes | str) -> str:
    """The first key that appears twice in one object, read with the standard library (slow, only on error)."""
    found: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for k, _ in items:
            if k in seen and not found:
                found.append(k)
            seen.add(k)
        return dict(items)

    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    try:
        json.loads(text.lstrip("\ufeff"), object_pairs_hook=pairs, parse_float=Decimal)
    except ValueError:
        pass
    return f"the key {found[0]!r} twice" if found else "a key twice"


def parse_his_request(body: bytes, charset: str | None = None) -> HisRequest:
    if not body.strip():
        raise BadEnvelope("empty request body: expected a JSON object holding the national envelope")
    decoded = _read_json(body, charset, "request body")
    return _his_envelope(*_checked(decoded, "request body"), text=decoded[1])


class _Input(msgspec.Struct, forbid_unknown_fields=False):
    input: msgspec.Raw


_input_decoder = msgspec.json.Decoder(_Input)


def _his_envelope(env: Any, numbers_fine: bool = False, text: bytes | str | None = None) -> HisRequest:
    """`numbers_fine`: every amount, price and quantity in the whole document was found fine as it was read;
    `text`: what was read, whose input's own bytes are kept (HisRequest.input_json) when they are UTF-8."""
    if not isinstance(env, dict):
        raise BadEnvelope("request body must be a JSON object (the national envelope)")
    missing = [f for f in REQUIRED_FROM_HIS if f not in env]
    if missing:
        raise BadEnvelope(f"envelope is missing {', '.join(missing)}")
    infno = env["infno"]
    if isinstance(infno, int):
        infno = str(infno)
    if not isinstance(infno, str) or not re.fullmatch(r"[0-9A-Za-z]{4,6}", infno):
        raise BadEnvelope(f"infno must be a trade number such as \"2207\", got {env['infno']!r}")
    as_sent = not isinstance(env["input"], str)
    if not as_sent:  # Powersi's settlement path sends input as a JSON string: read as the body is
        env["input"], numbers_fine = _checked(_read_json(env["input"].encode("utf-8"), "utf-8",
                                                         "input (a JSON string)"), "input (a JSON string)")
    if not isinstance(env["input"], dict):
        raise BadEnvelope("input must be a JSON object")
    as_sent = not _file_as_base64(env["input"]) and as_sent
    if not numbers_fine:  # (a number not fine elsewhere in the document may still leave the input's fine)
        check_numbers(env["input"])
    env["infno"] = infno
    msgid = env.get("msgid")
    if isinstance(msgid, int) and not isinstance(msgid, bool):  # a msgid written as a JSON number is still a key
        msgid = env["msgid"] = str(msgid)
    input_json = None
    if as_sent and isinstance(text, bytes):  # (a skim of the text for one field: 1 ms for a 3.4 MB upload)
        input_json = _input_decoder.decode(text[3:] if text[:3] == BOM else text).input
    return HisRequest(infno=infno, msgid=msgid if isinstance(msgid, str) and msgid else None, envelope=env,
                      input_json=input_json)


# Amounts, prices and quantities in a trade's input (nhsa-interface.md: 数值型(16,2) for amounts, (16,6) for
# a unit price, (16,4) for a quantity): a number, or a string holding one in plain decimal form, with at most
# that many places after the point, below BOUND. 10^10 yuan is past any single trade a hospital makes (and
# past any reconciliation day's total), and well within the 16 digits of the field; every number below it
# with two places is exact in the bureau's doubles. `1E+999999999` is a number JSON allows; nobody's ledger
# can hold it.
BOUND = Decimal(10) ** 10
_AMOUNT = re.compile(r"(amt|_pay|selfpay)$")
_PLACES = ((re.compile(r"pric$"), 6), (re.compile(r"cnt$"), 4), (_AMOUNT, 2))
# ASCII digits only: Python's Decimal (and Java's BigDecimal) read a full-width １００ as 100, and a bureau may not
_PLAIN = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?")


def is_amount(key: str) -> bool:
    """Whether a field of the interface is an amount of money (*amt, *_pay, *selfpay)."""
    return bool(_AMOUNT.search(key))


def check_numbers(input_: Any, where: str = "input") -> None:
    """Every amount, price and quantity in `input_` (fields named *amt, *_pay, *pric, *cnt, ...), wherever it
    is: a BadEnvelope names the first that is not an exact decimal of its places within BOUND. Absent, null
    and "" are left to the trade's own checks (the interface has optional amounts)."""
    if not _numbers_fine(input_):
        _name_number_problem(input_, where)


def _numbers_fine(input_: Any) -> bool:
    """Whether every amount, price and quantity in `input_` is fine, told without keeping paths; a list of
    objects (fee lines) is read a field at a time, across its objects."""
    stack = [input_]
    while stack:
        node = stack.pop()
        if _all_objects(node):
            if not _columns_fine(node):
                return False
            if not set(map(type, chain.from_iterable(map(dict.values, node)))) <= _SCALARS:
                stack.extend(v for v in chain.from_iterable(map(dict.values, node)) if isinstance(v, (dict, list)))
        elif isinstance(node, dict):
            if not _all_fine_here(node):
                return False
            stack.extend(v for k, v in node.items() if _places(k) is None and isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    return True


def _columns_fine(node: list[dict[str, Any]]) -> bool:
    """Whether the amounts, prices and quantities of a list of objects are fine, a field at a time."""
    for key in set().union(*node):  # (a set takes a dict's keys with their hashes: twice as fast as one at a time)
        places = _places(key)
        if places is not None and not _all_fine(list(map(dict.get, node, repeat(key))), places):
            return False
    return True


def _all_fine_here(node: dict[str, Any]) -> bool:
    """Whether the amounts, prices and quantities directly in one object are fine."""
    for key, value in node.items():
        places = _places(key)
        if places is not None and not _all_fine([value], places):
            return False
    return True


_BOUND_INT, _BOUND_DIGITS = int(BOUND), BOUND.adjusted()
_QUANTA = {places: Decimal(1).scaleb(-places) for _, places in _PLACES}
_NUMBERS = frozenset({int, Decimal})


def _all_fine(values: list[Any], places: int) -> bool:
    """Whether each value is absent or a number of at most `places` places within BOUND. A column of plain
    ints and Decimals (nearly every one) is told at C speed: its bounds, and whether rounding to `places`
    leaves every value as it was; anything else is judged a value at a time."""
    kinds = set(map(type, values))
    if values and kinds <= _NUMBERS and -_BOUND_INT < min(values) and max(values) < _BOUND_INT:
        if Decimal not in kinds:
            return True
        decimals = values if int not in kinds else list(map(Decimal, values))
        if list(map(Decimal.quantize, decimals, repeat(_QUANTA[places]))) == decimals:
            return True
    return _each_fine(values, places)


def _each_fine(values: list[Any], places: int) -> bool:
    for value in values:
        cls = value.__class__
        if cls is int:
            if -_BOUND_INT < value < _BOUND_INT:
                continue
        elif cls is Decimal:
            _, digits, exponent = value.as_tuple()
            if exponent.__class__ is int and exponent >= -places and len(digits) + exponent <= _BOUND_DIGITS:
                continue
        elif value is None or value == "":
            continue
        if _number_problem(value, places):
            return False
    return True


def _name_number_problem(input_: Any, where: str) -> None:
    """The BadEnvelope for the first number in `input_` that is not fine, named by its path."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(input_, (where,))]  # the path is joined only for a message
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((v, (*path, [i])) for i, v in enumerate(node) if isinstance(v, (dict, list)))
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            places = _places(key)
            if places is None and isinstance(value, (dict, list)):
                stack.append((value, (*path, key)))
            if places is None or value is None or value == "":
                continue
            problem = _number_problem(value, places)
            if problem:
                raise BadEnvelope(f"{_joined((*path, key))} is {_show(value)}: {problem}")


@functools.lru_cache(maxsize=4096)
def _places(key: str) -> int | None:
    """The decimal places a field of this name may have; None: not a number fep checks."""
    return next((n for pattern, n in _PLACES if pattern.search(key)), None)


def _joined(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p[0]}]" if isinstance(p, list) else (p if i == 0 else f".{p}") for i, p in enumerate(path))


def _number_problem(value: Any, places: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, Decimal, str)):  # true, [..], {..}
        return f"it must be a number (or a string holding one), with at most {places} decimal places"
    if isinstance(value, str):
        if not _PLAIN.fullmatch(value.strip()):
            return f"it must be a plain decimal number such as 12.50, with at most {places} decimal places"
        value = Decimal(value.strip())
    number = Decimal(value)
    if not number.is_finite() or (number != 0 and number.adjusted() >= BOUND.adjusted()):  # abs() overflows on 1E+999999999
        return f"it must be below {BOUND:,.0f} in size"
    if number != number.quantize(Decimal(1).scaleb(-places)):
        return f"it has more than {places} decimal places"
    return ""


def _show(value: Any) -> str:
    text = str(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---- 9101: the file upload, as JSON with Base64 or as the baseline's multipart form -----------------------
UPLOAD = "9101"
FORM_JSON = "jsonStr"  # the form field holding the envelope (the baseline's Java example, HN appendix A)
FORM_FILES = ("file", "in")  # the form field holding the file: the baseline's name, and fsUploadIn's own


def parse_his_form(body: bytes, boundary: str | None) -> HisRequest:
    """A multipart/form-data request: the envelope in the jsonStr part and, for 9101, the file in the file
    part, as the baseline posts it. It becomes the envelope every other HIS sends (fsUploadIn.in the file in
    Base64, fsUploadIn.filename from the envelope or the file part), the file's bytes exactly as they came."""
    if not boundary:
        raise BadEnvelope("multipart/form-data without a boundary in Content-Type")
    fields: dict[str, tuple[Any, bytes]] = {}
    try:
        with multipart.PushMultipartParser(boundary, content_length=len(body), max_segment_count=16) as parser:
            segment, chunks = None, []
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    segment, chunks = event, []
                elif event:
                    chunks.append(event)
                elif segment is not None:
                    fields.setdefault(segment.name or "", (segment, b"".join(chunks)))
    except multipart.MultipartError as e:
        raise BadEnvelope(f"malformed multipart/form-data request: {e}") from None
    if FORM_JSON not in fields:
        raise BadEnvelope(f"multipart/form-data request has no {FORM_JSON} part (the envelope); it has "
                          f"{', '.join(sorted(fields)) or 'no parts'}")
    segment, raw = fields[FORM_JSON]
    env = read_json(raw, segment.charset, f"the {FORM_JSON} part")
    file = next((fields[name] for name in FORM_FILES if name in fields), None)
    if file is None:
        return _his_envelope(env)
    if isinstance(env, dict) and "input" not in env and "infno" not in env:
        env = {"infno": UPLOAD, "input": {"fsUploadIn": env}}  # fsUploadIn's fields alone, as some HIS post them
    if not isinstance(env, dict) or not isinstance(env.get("input"), dict) or str(env.get("infno")) != UPLOAD:
        raise BadEnvelope(f"a file part comes only with 9101 (文件上传): the {FORM_JSON} part must be its envelope")
    node = env["input"].setdefault("fsUploadIn", {})
    if not isinstance(node, dict):
        raise BadEnvelope("9101 input.fsUploadIn must be a JSON object")
    if node.get("in"):
        raise BadEnvelope("9101 carries its file once: in the file part, or as fsUploadIn.in, not both")
    part, content = file
    node["in"] = base64.b64encode(content).decode("ascii")
    if not node.get("filename"):
        node["filename"] = part.filename or ""
    return _his_envelope(env)


def _file_as_base64(input_: dict[str, Any]) -> bool:
    """A 9101's file as Java byte[] serialises it (Zebone: a list of signed bytes) becomes the Base64 the
    bureau's JSON form takes, byte for byte. Whether it did."""
    upload = input_.get("fsUploadIn")
    data = upload.get("in") if isinstance(upload, dict) else None
    if isinstance(data, list) and all(isinstance(b, int) and -128 <= b <= 255 for b in data):
        upload["in"] = base64.b64encode(bytes(b & 0xFF for b in data)).decode("ascii")
        return True
    return False


def find_psn_no(input_: dict[str, Any]) -> str | None:
    """psn_no sits in the input's root node (`data`, `mdtrtinfo`, `feedetail[0]`, ...)."""
    for node in input_.values():
        if isinstance(node, list) and node:
            node = node[0]
        if isinstance(node, dict) and node.get("psn_no"):
            return str(node["psn_no"])
    return None


def inf_time(at: float) -> str:
    """The envelope's inf_time of the moment `at` (seconds since the epoch, local time), to the second."""
    return _stamp(int(at))


@functools.lru_cache(maxsize=4)
def _stamp(second: int) -> str:  # every trade of a second shares it: strftime was 1.5% of the reactor's time
    return datetime.fromtimestamp(second).strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class BureauAnswer:
    """The bureau's answer: infcode and err_msg read at once, the envelope itself (`raw`, `output`) only when
    something reads it. Most answers go to the HIS as they came, and an inpatient upload's is 2 MB."""

    infcode: int
    err_msg: str
    body: bytes

    @property
    def ok(self) -> bool:
        return self.infcode == 0

    @functools.cached_property
    def raw(self) -> dict[str, Any]:
        env = loads(self.body)
        env["infcode"] = self.infcode  # fep's own readers of the parsed answer compare numbers; the stored bytes stay as sent
        return env  # type: ignore[no-any-return]

    @property
    def output(self) -> Any:
        return self.raw.get("output")


def succeeded(answer: dict[str, Any]) -> bool:
    """infcode 0, whether the bureau (or fep, per config) writes it as a number or a string."""
    return str(answer.get("infcode")).strip() == "0"


class BadAnswer(ValueError):
    """The bureau's bytes are not an envelope: the outcome of the trade is unknown."""


class _Head(msgspec.Struct, forbid_unknown_fields=False):
    """What every answer is read for at once; the rest of the text is checked to be JSON, and skipped."""
    infcode: Any = msgspec.UNSET
    err_msg: Any = None


_head_decoder = msgspec.json.Decoder(_Head, float_hook=Decimal)


def parse_bureau_answer(body: bytes) -> BureauAnswer:
    """Lenient as the real answers need: infcode as number or string, null err_msg, no inf_refmsgid. Only
    infcode and err_msg are built; the rest is checked to be JSON, as the full reader would (bad UTF-8, a lone
    surrogate, nesting past what can be read are BadAnswer), and read in full only for a refusal's reason."""
    try:
        head = _head_decoder.decode(body[3:] if body[:3] == BOM else body)
        if not body.isascii():
            body.decode("utf-8")  # in a string the head skipped: the reader checks only what it builds
        if b"\\" in body and b"\\u" in body:  # (one byte is looked for at memchr's speed, two are not)
            loads(body)  # an escape the head skipped may be half a character
    except (ValueError, UnicodeDecodeError, RecursionError):  # not JSON, or not an object
        return _parse_in_full(body)
    if head.infcode is msgspec.UNSET:
        raise BadAnswer("bureau answer has no infcode")
    return BureauAnswer(infcode=_infcode(head.infcode), err_msg=head.err_msg or "", body=body)


def _parse_in_full(body: bytes) -> BureauAnswer:
    try:
        env = loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadAnswer(f"bureau answer is not JSON: {e}") from None
    if not isinstance(env, dict) or "infcode" not in env:
        raise BadAnswer("bureau answer has no infcode")
    answer = BureauAnswer(infcode=_infcode(env["infcode"]), err_msg=env.get("err_msg") or "", body=body)
    env["infcode"] = answer.infcode
    answer.raw = env
    return answer


def _infcode(value: Any) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise BadAnswer(f"bureau answer has a non-numeric infcode {value!r}") from None


# How every envelope `file_answer` makes begins: a fresh answer that does not is no download (is_file_answer).
FILE_ANSWER_HEAD = b'{"infcode":0,"err_msg":null,"output":{"file":'


def file_answer(content: bytes, disposition: str) -> bytes:
    """9102 (and 13xx downloads) answer with the file itself; fep keeps it as an envelope like any other."""
    return FILE_ANSWER_HEAD + dumps({"filename": disposition_filename(disposition), "size": len(content),
                                     "content_base64": base64.b64encode(content).decode("ascii")}) + b"}}"


def is_file_answer(body: bytes) -> bool:
    """Whether the bureau's answer, as fep received it, is a file fep wrapped (file_answer): told by its first
    bytes, where a 2 MB answer would otherwise be searched whole."""
    return body.startswith(FILE_ANSWER_HEAD)


def disposition_filename(disposition: str) -> str:
    """The file name in a Content-Disposition header (read as Latin-1): filename*=UTF-8''... first (RFC 6266),
    else filename="...", whose bytes are taken as UTF-8 when they are (a name sent unencoded)."""
    star = re.search(r"filename\*\s*=\s*([\w-]+)'[^']*'([^;\s]+)", disposition)
    if star:
        try:
            return unquote(star.group(2), encoding=star.group(1), errors="strict")
        except (LookupError, UnicodeDecodeError):
            pass
    m = re.search(r'filename\s*=\s*"?([^";]+)', disposition)
    if not m:
        return ""
    name = m.group(1).strip()
    try:
        return name.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return name


def file_content(output: Any) -> bytes:
    return base64.b64decode(output["file"]["content_base64"])


@dataclass
class FileDownload:
    filename: str
    content: bytes


def downloaded_file(answer: dict[str, Any]) -> FileDownload | None:
    """The file in a successful download's answer (what `file_answer` kept), or None for any other answer."""
    output = answer.get("output")
    if answer.get("infcode") != 0 or not isinstance(output, dict) or set(output) != {"file"}:
        return None
    node = output["file"]
    if not isinstance(node, dict) or not isinstance(node.get("content_base64"), str):
        return None
    return FileDownload(str(node.get("filename") or ""), base64.b64decode(node["content_base64"]))


def file_response(status: int, file: FileDownload, answer: dict[str, Any]) -> Response:
    """A download as the HIS reads it: the file itself (application/octet-stream) with its name, as the bureau
    sends it; fep's fields (fep_msgid, fep_state, ...) are headers: X-Fep-Msgid, X-Fep-State, ..."""
    headers = {"Content-Disposition": content_disposition(file.filename)}
    for key, value in answer.items():
        if key.startswith("fep_") and isinstance(value, (str, int)) and not isinstance(value, bool):
            text = _header_safe(str(value))
            headers["X-Fep-" + "-".join(w.capitalize() for w in key[4:].split("_"))] = text
    return Response(status, file.content, headers, content_type="application/octet-stream")


def content_disposition(filename: str) -> str:
    """attachment; filename="..." for a plain name; a name outside Latin-1 gets filename*=UTF-8''... (RFC 6266)
    beside an ASCII fallback."""
    name = re.sub(r'[\x00-\x1f\x7f"\\/]', "_", filename) or "download"
    try:
        name.encode("latin-1")
        return f'attachment; filename="{name}"'
    except UnicodeEncodeError:
        fallback = name.encode("ascii", "replace").decode("ascii").replace("?", "_")
        return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _header_safe(text: str) -> str:
    """A header value: one line, Latin-1 (anything else percent-encoded)."""
    text = re.sub(r"[\r\n]+", " ", text)
    try:
        text.encode("latin-1")
        return text
    except UnicodeEncodeError:
        return quote(text, safe=" !#$%&'()*+,-./:;<=>?@[]^_`{|}~")


def answer(envelope: dict[str, Any], *, msgid: str, state: str, note: str = "", **extra: Any) -> dict[str, Any]:
    """The national response envelope plus fep's own fields, all prefixed `fep_`."""
    out = dict(envelope)
    out["fep_msgid"] = msgid
    out["fep_state"] = state
    if note:
        out["fep_note"] = note
    out.update({f"fep_{k}": v for k, v in extra.items() if v is not None})
    return out


def splice(raw: bytes, fields: dict[str, Any]) -> bytes:
    """fep's fields added to the bureau's answer as it came, without decoding and encoding it again.
    `raw` is an answer parse_bureau_answer accepted: a JSON object with at least infcode in it."""
    end = len(raw.rstrip()) - 1  # the closing brace
    return b"".join((memoryview(raw)[:end], b",", memoryview(dumps(fields))[1:]))  # one copy of a 2 MB answer


def local_failure(message: str, when: datetime, output: str = "data") -> dict[str, Any]:
    """An envelope for an answer fep gives itself (the bureau said nothing). `output`: the trade's output
    node ("setlinfo", or "result[]" for a list), there but empty, so a strict HIS parser accepts it."""
    stamp = when.strftime("%Y%m%d%H%M%S%f")[:17]
    node = {output[:-2]: []} if output.endswith("[]") else {output: {}}
    return {"infcode": -1, "inf_refmsgid": "", "refmsg_time": stamp, "respond_time": stamp,
            "err_msg": message, "output": node, "warn_msg": ""}


# Why fep refused, for programs that branch on it; the HIS hears every refusal as HTTP 200, infcode -1,
# because HIS clients turn any other status into a transport error and lose the message.
REASONS = {400: "invalid", 403: "not_for_the_his", 404: "not_found", 409: "conflict", 413: "too_large",
           421: "standby", 422: "msgid_reused", 503: "journal_cannot_write"}
STANDBY = 421  # this node of a pair stands by: the refusal names the leader, where the HIS sends trades


def refusal(status: int, message: str, **fields: Any) -> Response:
    """fep refuses a request before accepting it: nothing was journalled or sent. `status` is the HTTP
    status: only for what is not a trade at all (bad HTTP, a body over the limit)."""
    env = local_failure(message, datetime.now())
    env["fep_state"] = "REFUSED"
    env.update({f"fep_{k}": v for k, v in fields.items()})
    return Response(status, dumps(env))


def his_refusal(status: int, message: str, infcode_type: str = "number", output: str = "data") -> Response:
    """A trade fep will not take, answered in the national interface's own shape (HTTP 200, infcode -1)."""
    env = typed(local_failure(message, datetime.now(), output), infcode_type)
    env.update(fep_state="REFUSED", fep_reason=REASONS.get(status, "refused"))
    return Response(200, dumps(env))


def typed(env: dict[str, Any], infcode_type: str) -> dict[str, Any]:
    """fep's own envelopes write infcode as the bureau does: a number, or a string ("0", "-1")."""
    if infcode_type == "string":
        env["infcode"] = str(env["infcode"])
    return env


def mask_id(value: str) -> str:
    """ID numbers and person numbers in logs: keep enough to find the row, not to identify anyone."""
    if len(value) <= 6:
        return "*" * len(value)
    return value[:3] + "*" * (len(value) - 7) + value[-4:]
