"""The simulated bureau's ledger and business rules: what it settled, cancelled and reversed.

Deterministic rules taken from real answers (shared/reference/samples): medfee_sumamt =
fund_pay_sumamt + psn_part_amt + hosp_part_amt; psn_part_amt = acct_pay + psn_cash_pay; a cancel
(2208, 2305) is a new negative settlement with its own setl_id; a reversal (2601) erases the original
(a settlement, 2207/2304, or an admission, 2401). The same rules hold for an inpatient stay (24xx admit
and discharge, 23xx fees and settlement) as for an outpatient visit (22xx). A msgid already processed gets
its first answer again (rule 13 of fep-semantics.md). `infcode_type`: the bureau answers infcode as a
number (0, -1) or, as some bureaus do, as a string ("0", "-1").
异地 patients (insured in another pooling region: insuplc_admdvs of another city) settle under their home region's
policy (the person's own deductible, ratio, account); a trade naming one must carry their insuplc_admdvs,
one who needs a filing (备案, 2501/2505) settles only with one in force, and their settlements are cleared
under the clearing types and agency of `Remote`. Month end: clearing applications (3203/3204), their audit
(3205A: approved, refused 拒付 with reasons) and the 异地 clearing detail (3260, paged; confirmed by 3261).
No sockets here: the server hands in an envelope and gets one back.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Callable

import sqlite_utils

from fep import catalogs, envelope
from fep.sim import catalogs as published

FEN = Decimal("0.01")
ZERO = Decimal("0.00")


@dataclass
class FileAnswer:
    """9102 answers with the file itself (application/octet-stream), not with a JSON envelope."""

    filename: str
    content: bytes


class BizError(Exception):
    """The bureau refuses: infcode -1 with this message."""


@dataclass(frozen=True)
class Person:
    psn_no: str
    psn_name: str
    certno: str
    insutype: str
    psn_type: str
    balc: Decimal
    deductible: Decimal
    ratio: Decimal
    insuplc_admdvs: str
    filing_required: bool = False  # a 异地 patient who may settle only under a filing (备案) in force


@dataclass(frozen=True)
class Remote:
    """How the bureau clears 异地 settlements: under the province's agency, with clearing types of their own
    (nhsa-interface.md §6: 99963 域外异地门诊, 99968 域外异地住院, 9909 域内异地, ...)."""
    clr_optins: str = "439900"
    outpatient: str = "99963"
    inpatient: str = "99968"
    page_size: int = 100  # rows a 3260 page holds at most


FILINGS = {"2501": "2502", "2503": "2504", "2505": "2506", "2507": None}  # a filing and its cancel
SETTLES_UNDER = ("2501", "2505")  # the filings (转院, 定点) under which a 异地 patient who needs one may settle


def q(x: Decimal) -> Decimal:
    return x.quantize(FEN, rounding=ROUND_HALF_UP)


INFCODE_TYPES = ("number", "string")
POLICY_STORE = "P"  # file_qury_no of a catalog file: in the policy centre's store (9102 with fixmedins_code plc)
SETTLEMENT_COLUMNS = ("setl_id", "msgid", "infno", "psn_no", "mdtrt_id", "insutype", "clr_type", "clr_optins",
                      "medfee", "fund", "acct", "cash", "hosp", "dedc", "setl_time", "kind", "state", "refd_setl_id")


class Ledger:
    def __init__(self, path: Path, persons: list[Person], catalog: list[dict[str, str]], admdvs: str,
                 clr_optins: str, infcode_type: str = "number", diagnoses: list[dict[str, str]] | None = None,
                 catalog_bulk: dict[str, int] | None = None, remote: Remote = Remote()) -> None:
        if infcode_type not in INFCODE_TYPES:
            raise ValueError(f"infcode_type must be one of {', '.join(INFCODE_TYPES)}, got {infcode_type!r}")
        self.infcode_type = infcode_type
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.db = sqlite_utils.Database(self.conn)
        self.db.enable_wal()
        self.conn.execute("PRAGMA synchronous=NORMAL")  # a test double, not the system of record
        # every version of every record, as the bureau publishes them (13xx files, paged queries)
        self.published = published.entries(catalog, diagnoses or [], catalog_bulk or {})
        self.catalog: dict[str, dict[str, str]] = {}  # the current version of the codes in force
        for c in sorted(catalog, key=lambda c: int(c["ver"])):
            self.catalog[c["code"]] = c
        self.catalog = {k: v for k, v in self.catalog.items() if v["vali_flag"] == "1"}
        self.admdvs = admdvs
        self.clr_optins = clr_optins
        self.remote = remote
        self._schema(persons)
        self.handlers: dict[str, Callable[[dict[str, Any], dict[str, Any]], Any]] = {
            "9001": self.sign_in, "9002": lambda env, inp: {"signoutoutb": {"sign_time": _now()}},
            "1101": self.person_info, "2201": self.register, "2202": self.unregister,
            "2203": self.visit_info, "2204": self.fee_upload, "2205": self.fee_cancel,
            "2206": self.presettle, "2207": self.settle, "2208": self.cancel, "2601": self.reverse,
            "3201": self.statement_total, "3202": self.statement_detail, "9101": self.file_upload,
            "9102": self.file_download,
            **{infno: self.catalog_download for infno in catalogs.LAYOUTS},
            **{infno: self.catalog_page for infno in catalogs.PAGED},
            # the inpatient stay (住院): admission and discharge, fees, settlement; and the settlement query
            "2401": self.admit, "2402": self.discharge, "2403": self.admission_change, "2404": self.admission_cancel,
            "2405": self.discharge_cancel, "2301": self.fee_upload, "2302": self.fee_cancel_ipt,
            "2303": self.presettle_ipt, "2304": self.settle_ipt, "2305": self.cancel, "5203": self.settlement_query,
            # filings (备案) and month-end clearing (清算)
            **{f: self.file for f in FILINGS}, **{c: self.file_cancel for c in FILINGS.values() if c},
            "3203": self.clearing_apply, "3204": self.clearing_cancel, "3205A": self.clearing_status,
            "3260": self.remote_detail, "3261": self.remote_confirm,
        }

    def _schema(self, persons: list[Person]) -> None:
        db = self.db
        db["answers"].create({"msgid": str, "infno": str, "response": str, "at": str}, pk="msgid",
                             if_not_exists=True)
        db["counters"].create({"name": str, "value": int}, pk="name", if_not_exists=True)
        db["signins"].create({"sign_no": str, "at": str}, pk="sign_no", if_not_exists=True)
        db["persons"].create({"psn_no": str, "psn_name": str, "certno": str, "insutype": str, "psn_type": str,
                              "balc": str, "deductible": str, "dedc_used": str, "ratio": str,
                              "insuplc_admdvs": str}, pk="psn_no", if_not_exists=True)
        db["visits"].create({"mdtrt_id": str, "msgid": str, "psn_no": str, "insutype": str, "ipt_otp_no": str,
                             "med_type": str, "state": str}, pk="mdtrt_id", if_not_exists=True)
        db["fees"].create({"mdtrt_id": str, "feedetl_sn": str, "chrg_bchno": str, "code": str, "amount": str,
                           "lv": str, "selfpay_prop": str, "setl_id": str}, pk=("mdtrt_id", "feedetl_sn"),
                          if_not_exists=True)
        db["settlements"].create({c: str for c in SETTLEMENT_COLUMNS}, pk="setl_id", if_not_exists=True)
        db["files"].create({"file_qury_no": str, "filename": str, "content": bytes}, pk="file_qury_no",
                           if_not_exists=True)
        # An inpatient stay is a visit (its fees and settlements are kept as an outpatient visit's are) with a
        # stay beside it: in hospital (open), discharged, cancelled (2404) or reversed (2601 of the 2401).
        db["stays"].create({"mdtrt_id": str, "msgid": str, "psn_no": str, "ipt_no": str, "begntime": str,
                            "endtime": str, "state": str}, pk="mdtrt_id", if_not_exists=True)
        db["filings"].create({"trt_dcla_detl_sn": str, "msgid": str, "infno": str, "psn_no": str, "state": str},
                             pk="trt_dcla_detl_sn", if_not_exists=True)
        db["filing_rules"].create({"psn_no": str, "required": int}, pk="psn_no", if_not_exists=True)
        db["clearings"].create({"clr_appy_evt_id": str, "msgid": str, "setlym": str, "insutype": str,
                                "clr_optins": str, "clr_type": str, "medfee": str, "fund": str, "psntime": str,
                                "state": str}, pk="clr_appy_evt_id", if_not_exists=True)
        db["refusals"].create({"setl_id": str, "amount": str, "reason": str}, pk="setl_id", if_not_exists=True)
        db["remote_confirmations"].create({"month": str, "msgid": str, "rows": int, "at": str}, pk="month",
                                          if_not_exists=True)
        for p in persons:
            self.conn.execute(
                "INSERT OR IGNORE INTO persons VALUES (?,?,?,?,?,?,?,?,?,?)",
                (p.psn_no, p.psn_name, p.certno, p.insutype, p.psn_type, str(p.balc), str(p.deductible), "0.00",
                 str(p.ratio), p.insuplc_admdvs))
            self.conn.execute("INSERT OR IGNORE INTO filing_rules VALUES (?,?)", (p.psn_no, int(p.filing_required)))

    # ---- the envelope ---------------------------------------------------------------------------
    def answered(self, env: dict[str, Any]) -> bool:
        """The bureau has answered this msgid before (its repeat gets the first answer)."""
        msgid = str(env.get("msgid") or "")
        return bool(msgid) and self.conn.execute("SELECT 1 FROM answers WHERE msgid=?", (msgid,)).fetchone() is not None

    def handle(self, env: dict[str, Any]) -> dict[str, Any] | FileAnswer:
        """One trade, atomically: its business writes and its stored answer commit together."""
        received = datetime.now()
        msgid = str(env.get("msgid") or "")
        infno = str(env.get("infno", ""))
        sign_no = str(env.get("sign_no") or "")
        if infno != "9001" and sign_no and not self.conn.execute(
                "SELECT 1 FROM signins WHERE sign_no=?", (sign_no,)).fetchone():
            # The session gate: refused before the msgid is looked up, and not remembered as its answer (the
            # trade was never processed; after signing in again the same msgid is processed as new).
            return self._answer(-1, f"签到信息不存在，请重新签到(sign_no {sign_no})", {}, received)
        if msgid:
            row = self.conn.execute("SELECT response FROM answers WHERE msgid=?", (msgid,)).fetchone()
            if row:
                return envelope.loads(row[0])
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute("SAVEPOINT trade")
            try:
                output = self._dispatch(infno, env)
                code, err = 0, None
            except BizError as e:
                self.conn.execute("ROLLBACK TO trade")
                output, code, err = {}, -1, str(e)
            self.conn.execute("RELEASE trade")
            if isinstance(output, FileAnswer):  # a download: the file itself, and nothing to remember
                self.conn.execute("COMMIT")
                return output
            answer = self._answer(code, err, output, received)
            if msgid:
                self.conn.execute("INSERT INTO answers VALUES (?,?,?,?)",
                                  (msgid, infno, envelope.dumps(answer).decode("utf-8"), _now()))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return answer

    def _answer(self, code: int, err: str | None, output: Any, received: datetime) -> dict[str, Any]:
        return {"infcode": self.infcode(code), "inf_refmsgid": self._refmsgid(received), "refmsg_time": _stamp(received),
                "respond_time": _stamp(datetime.now()), "err_msg": err, "warn_msg": None, "cainfo": None,
                "signtype": None, "output": output}

    def infcode(self, code: int) -> int | str:
        return str(code) if self.infcode_type == "string" else code

    def _dispatch(self, infno: str, env: dict[str, Any]) -> Any:
        handler = self.handlers.get(infno)
        if handler is None:
            raise BizError(f"交易编号[{infno}]不存在")
        inp = env.get("input")
        if not isinstance(inp, dict):
            raise BizError("input节点缺失")
        self._check_insured_place(env, inp)
        return handler(env, inp)

    def _check_insured_place(self, env: dict[str, Any], inp: dict[str, Any]) -> None:
        """A trade of a 异地 patient is routed to their home region by the envelope's insuplc_admdvs: without it
        (or with another region's) the bureau cannot route it, and refuses."""
        psn_no = envelope.find_psn_no(inp)
        row = self.conn.execute("SELECT insuplc_admdvs FROM persons WHERE psn_no=?", (psn_no,)).fetchone() \
            if psn_no else None
        if row is None or not self._remote(row[0]):
            return
        given = str(env.get("insuplc_admdvs") or "")
        if not given:
            raise BizError("异地就医人员交易参保地医保区划(insuplc_admdvs)不能为空，请先调用【1101】获取参保地")
        if given != row[0]:
            raise BizError(f"参保地医保区划[{given}]与人员参保地不符")

    def _next(self, name: str, start: int) -> int:
        row = self.conn.execute("SELECT value FROM counters WHERE name=?", (name,)).fetchone()
        value = (row[0] if row else start) + 1
        self.conn.execute("INSERT OR REPLACE INTO counters VALUES (?,?)", (name, value))
        return value

    def _refmsgid(self, when: datetime) -> str:
        return f"{self.admdvs}{when:%Y%m%d%H%M%S}{self._next('refmsgid', 0):010d}"

    # ---- trades -----------------------------------------------------------------------------------
    def sign_in(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        _node(inp, "signIn", ("opter_no", "mac", "ip"))
        sign_no = f"{self._next('sign_no', 359000):06d}"
        self.conn.execute("INSERT INTO signins VALUES (?,?)", (sign_no, _now()))
        return {"signinoutb": {"sign_no": sign_no, "sign_time": _now()}}

    def _person(self, psn_no: str) -> sqlite3.Row | tuple[Any, ...]:
        row = self.conn.execute("SELECT * FROM persons WHERE psn_no=?", (psn_no,)).fetchone()
        if row is None:
            raise BizError(f"人员编号[{psn_no}]不存在")
        return row

    def person_info(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = inp.get("data")
        if isinstance(data, dict) and not data.get("mdtrt_cert_no") and data.get("certno"):
            data = _node(inp, "data", ("psn_cert_type", "certno"))  # the baseline's own example (HN 附录B)
            no = str(data["certno"])
        else:
            data = _node(inp, "data", ("mdtrt_cert_type", "mdtrt_cert_no"))
            no = str(data["mdtrt_cert_no"])
        row = self.conn.execute("SELECT psn_no, psn_name, certno, insutype, psn_type, balc, insuplc_admdvs "
                                "FROM persons WHERE certno=? OR psn_no=?", (no, no)).fetchone()
        if row is None:
            raise BizError(f"未查询到人员参保信息(凭证号{envelope.mask_id(no)})")
        psn_no, name, certno, insutype, psn_type, balc, insuplc = row
        return {
            "baseinfo": {"psn_no": psn_no, "psn_cert_type": "01", "certno": certno, "psn_name": name,
                         "gend": "1", "naty": "01", "brdy": f"{certno[6:10]}-{certno[10:12]}-{certno[12:14]}",
                         "age": Decimal(datetime.now().year - int(certno[6:10]))},
            "insuinfo": [{"balc": Decimal(balc), "insutype": insutype, "psn_type": psn_type,
                          "psn_insu_stas": "1", "psn_insu_date": "2010-01-01", "paus_insu_date": None,
                          "cvlserv_flag": "0", "insuplc_admdvs": insuplc, "emp_name": "测试单位"}],
            "idetinfo": [],
        }

    def register(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "insutype", "ipt_otp_no"))
        self._person(data["psn_no"])
        mdtrt_id = str(self._next("mdtrt_id", 300170000))
        self.conn.execute("INSERT INTO visits VALUES (?,?,?,?,?,?,?)",
                          (mdtrt_id, env.get("msgid"), data["psn_no"], data["insutype"], data["ipt_otp_no"],
                           data.get("med_type", "11"), "open"))
        return {"data": {"mdtrt_id": mdtrt_id, "psn_no": data["psn_no"], "ipt_otp_no": data["ipt_otp_no"],
                         "exp_content": None}}

    def _visit(self, mdtrt_id: str, psn_no: str) -> tuple[Any, ...]:
        row = self.conn.execute("SELECT * FROM visits WHERE mdtrt_id=?", (str(mdtrt_id),)).fetchone()
        if row is None or row[2] != psn_no:
            raise BizError(f"就诊ID[{mdtrt_id}]不存在或不属于该人员")
        if row[6] != "open":
            raise BizError(f"就诊ID[{mdtrt_id}]已撤销")
        return row

    def unregister(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "mdtrt_id"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        if self.conn.execute("SELECT 1 FROM fees WHERE mdtrt_id=? AND setl_id IS NOT NULL",
                             (str(data["mdtrt_id"]),)).fetchone():
            raise BizError("该就诊已有结算，不能撤销挂号")
        self.conn.execute("UPDATE visits SET state='cancelled' WHERE mdtrt_id=?", (str(data["mdtrt_id"]),))
        return {}

    def visit_info(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "mdtrtinfo", ("mdtrt_id", "psn_no", "med_type"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        self.conn.execute("UPDATE visits SET med_type=? WHERE mdtrt_id=?", (data["med_type"], str(data["mdtrt_id"])))
        return {}

    def fee_upload(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        lines = inp.get("feedetail")
        if not isinstance(lines, list) or not lines:
            raise BizError("feedetail节点缺失或为空")
        unknown = sorted({str(x.get("med_list_codg")) for x in lines if str(x.get("med_list_codg")) not in self.catalog})
        if unknown:
            raise BizError(f"医保目录编码不存在: {', '.join(unknown)}")
        result = []
        for line in lines:
            self._visit(line["mdtrt_id"], line["psn_no"])
            if str(env.get("infno")) == "2301":
                self._stay(line["mdtrt_id"], ("open", "discharged"))
            item = self.catalog[str(line["med_list_codg"])]
            amount = q(Decimal(line["det_item_fee_sumamt"]))
            if q(Decimal(line["cnt"]) * Decimal(line["pric"])) != amount:
                raise BizError(f"明细[{line['feedetl_sn']}]金额不等于数量×单价")
            try:
                self.conn.execute("INSERT INTO fees VALUES (?,?,?,?,?,?,?,NULL)",
                                  (str(line["mdtrt_id"]), str(line["feedetl_sn"]), str(line.get("chrg_bchno") or ""),
                                   str(line["med_list_codg"]), str(amount), item["lv"], item["selfpay_prop"]))
            except sqlite3.IntegrityError:
                raise BizError(f"费用明细流水号[{line['feedetl_sn']}]重复") from None
            own = amount if item["lv"] == "03" else ZERO
            pre = q(amount * Decimal(item["selfpay_prop"])) if item["lv"] == "02" else ZERO
            result.append({"feedetl_sn": line["feedetl_sn"], "det_item_fee_sumamt": amount, "cnt": line["cnt"],
                           "pric": line["pric"], "pric_uplmt_amt": Decimal("999999"),
                           "selfpay_prop": Decimal(item["selfpay_prop"]), "fulamt_ownpay_amt": own,
                           "overlmt_amt": ZERO, "preselfpay_amt": pre, "inscp_scp_amt": amount - own - pre,
                           "chrgitm_lv": item["lv"], "med_chrgitm_type": "09", "bas_medn_flag": "0",
                           "hi_nego_drug_flag": "0", "chld_medc_flag": "0", "list_sp_item_flag": None,
                           "lmt_used_flag": "0", "drt_reim_flag": "0", "memo": None})
        return {"result": result}

    def fee_cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("mdtrt_id", "chrg_bchno", "psn_no"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        batch = str(data["chrg_bchno"])
        where = "mdtrt_id=? AND setl_id IS NULL" + ("" if batch == "0000" else " AND chrg_bchno=?")
        args = (str(data["mdtrt_id"]),) + (() if batch == "0000" else (batch,))
        self.conn.execute(f"DELETE FROM fees WHERE {where}", args)
        return {}

    def _compute(self, data: dict[str, Any], clr_type: str = "11") -> dict[str, Any]:
        """The policy: deductible, then the fund pays `ratio` of the in-scope amount. `clr_type`: 11 门诊,
        21 住院."""
        psn = self._person(data["psn_no"])
        _, name, certno, insutype, psn_type, balc, deductible, dedc_used, ratio, insuplc = psn
        self._visit(data["mdtrt_id"], data["psn_no"])
        remote = self._remote(insuplc)
        if remote:
            self._check_filing(data["psn_no"])
        fees = self.conn.execute("SELECT amount, lv, selfpay_prop FROM fees WHERE mdtrt_id=? AND setl_id IS NULL",
                                 (str(data["mdtrt_id"]),)).fetchall()
        if not fees:
            raise BizError(f"就诊ID[{data['mdtrt_id']}]无待结算费用明细")
        medfee = sum((Decimal(a) for a, _, _ in fees), ZERO)
        if q(Decimal(data["medfee_sumamt"])) != medfee:
            raise BizError(f"医疗费总额{data['medfee_sumamt']}与上传明细合计{medfee}不符")
        own = sum((Decimal(a) for a, lv, _ in fees if lv == "03"), ZERO)
        pre = sum((q(Decimal(a) * Decimal(p)) for a, lv, p in fees if lv == "02"), ZERO)
        inscp = medfee - own - pre
        dedc = min(inscp, max(Decimal(deductible) - Decimal(dedc_used), ZERO))
        fund = q((inscp - dedc) * Decimal(ratio))
        psn_part = medfee - fund
        use_acct = str(data.get("acct_used_flag", "1")) == "1"
        acct = min(psn_part, Decimal(balc)) if use_acct else ZERO
        return {"psn_no": data["psn_no"], "psn_name": name, "certno": certno, "insutype": insutype,
                "psn_type": psn_type, "mdtrt_id": str(data["mdtrt_id"]), "medfee_sumamt": medfee,
                "fulamt_ownpay_amt": own, "overlmt_selfpay": ZERO, "preselfpay_amt": pre, "inscp_scp_amt": inscp,
                "act_pay_dedc": dedc, "hifp_pay": fund, "pool_prop_selfpay": q(1 - Decimal(ratio)),
                "cvlserv_pay": ZERO, "hifes_pay": ZERO, "hifmi_pay": ZERO, "hifob_pay": ZERO, "maf_pay": ZERO,
                "oth_pay": ZERO, "fund_pay_sumamt": fund, "psn_part_amt": psn_part, "acct_pay": acct,
                "psn_cash_pay": psn_part - acct, "hosp_part_amt": ZERO, "acct_mulaid_pay": ZERO,
                "balc": Decimal(balc) - acct, "med_type": data.get("med_type", "11"),
                "clr_type": self._remote_clr_type(clr_type) if remote else clr_type,
                "clr_way": "1", "clr_optins": self.remote.clr_optins if remote else self.clr_optins,
                "mdtrt_cert_type": data.get("mdtrt_cert_type", "02"),
                "psn_cert_type": "01", "gend": "1", "naty": "01", "cvlserv_flag": "0"}

    def _setl_output(self, info: dict[str, Any], fund_pay_type: str) -> dict[str, Any]:
        detail = [{"fund_pay_type": fund_pay_type, "fund_payamt": info["fund_pay_sumamt"],
                   "inscp_scp_amt": info["inscp_scp_amt"], "crt_payb_lmt_amt": None, "setl_proc_info": None,
                   "fund_pay_type_name": "基本医疗保险统筹基金"}]
        if info["acct_pay"]:
            detail.append({"fund_pay_type": "310200", "fund_payamt": info["acct_pay"], "inscp_scp_amt": ZERO,
                           "crt_payb_lmt_amt": None, "setl_proc_info": None,
                           "fund_pay_type_name": "城镇职工基本医疗保险个人账户基金"})
        return {"setlinfo": info, "setldetail": detail, "expContent": None}

    def presettle(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "mdtrt_id", "medfee_sumamt"))
        info = self._compute(data)
        info.update(setl_id=None, setl_time=None, medins_setl_id=env.get("msgid"), clr_way=None, clr_optins=None)
        return self._setl_output(info, f"{info['insutype']}100")

    def settle(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "mdtrt_id", "medfee_sumamt", "chrg_bchno"))
        return self._settle(env, "2207", data, self._compute(data))

    def _settle(self, env: dict[str, Any], infno: str, data: dict[str, Any], info: dict[str, Any]) -> Any:
        """The settlement of the visit's (or stay's) unsettled fees, computed as `info`."""
        setl_id = str(self._next("setl_id", 400120000))
        info.update(setl_id=setl_id, setl_time=_now(), medins_setl_id=env.get("msgid"))
        self._record(setl_id, env, infno, info, "settle", None)
        self.conn.execute("UPDATE persons SET balc=?, dedc_used=? WHERE psn_no=?",
                          (str(info["balc"]), str(Decimal(self._person(data["psn_no"])[7]) + info["act_pay_dedc"]),
                           data["psn_no"]))
        self.conn.execute("UPDATE fees SET setl_id=? WHERE mdtrt_id=? AND setl_id IS NULL",
                          (setl_id, str(data["mdtrt_id"])))
        return self._setl_output(info, f"{info['insutype']}100")

    def _record(self, setl_id: str, env: dict[str, Any], infno: str, info: dict[str, Any], kind: str,
                refd: str | None) -> None:
        self.conn.execute(
            f"INSERT INTO settlements VALUES ({', '.join('?' * len(SETTLEMENT_COLUMNS))})",
            (setl_id, env.get("msgid"), infno, info["psn_no"], info["mdtrt_id"], info["insutype"], info["clr_type"],
             info["clr_optins"], str(info["medfee_sumamt"]), str(info["fund_pay_sumamt"]), str(info["acct_pay"]),
             str(info["psn_cash_pay"]), str(info["hosp_part_amt"]), str(info["act_pay_dedc"]), info["setl_time"],
             kind, "live", refd))

    def _settlement(self, where: str, args: tuple[Any, ...]) -> dict[str, Any] | None:
        row = self.conn.execute(f"SELECT * FROM settlements WHERE {where}", args).fetchone()
        return dict(zip(SETTLEMENT_COLUMNS, row)) if row else None

    def _restore(self, s: dict[str, Any]) -> None:
        """Give back what a settlement took from the person's account and deductible."""
        person = self._person(s["psn_no"])
        self.conn.execute("UPDATE persons SET balc=?, dedc_used=? WHERE psn_no=?",
                          (str(Decimal(person[5]) + Decimal(s["acct"])),
                           str(Decimal(person[7]) - Decimal(s["dedc"])), s["psn_no"]))

    def cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("setl_id", "mdtrt_id", "psn_no"))
        infno = str(env.get("infno") or "2208")
        s = self._settlement("setl_id=? AND kind='settle'", (str(data["setl_id"]),))
        if s is None or s["psn_no"] != data["psn_no"] or s["mdtrt_id"] != str(data["mdtrt_id"]) or (
                (s["infno"] == "2304") != (infno == "2305")):
            raise BizError(f"结算ID[{data['setl_id']}]不存在")
        if s["state"] != "live":
            raise BizError(f"结算ID[{data['setl_id']}]已{'撤销' if s['state'] == 'cancelled' else '冲正'}")
        setl_id = str(self._next("setl_id", 400120000))
        neg = {k: -Decimal(s[c]) for k, c in (("medfee_sumamt", "medfee"), ("fund_pay_sumamt", "fund"),
                                              ("acct_pay", "acct"), ("psn_cash_pay", "cash"),
                                              ("hosp_part_amt", "hosp"), ("act_pay_dedc", "dedc"))}
        self._restore(s)
        person = self._person(s["psn_no"])
        info = {"setl_id": setl_id, "psn_no": s["psn_no"], "mdtrt_id": s["mdtrt_id"], "insutype": s["insutype"],
                "clr_type": s["clr_type"], "clr_optins": s["clr_optins"], "setl_time": _now(),
                "medins_setl_id": env.get("msgid"), "psn_name": person[1], "certno": person[2],
                "psn_part_amt": neg["acct_pay"] + neg["psn_cash_pay"], "hifp_pay": neg["fund_pay_sumamt"],
                "inscp_scp_amt": neg["medfee_sumamt"], "balc": Decimal(person[5]), "clr_way": "1", **neg}
        self._record(setl_id, env, infno, info, "cancel", s["setl_id"])
        self.conn.execute("UPDATE settlements SET state='cancelled' WHERE setl_id=?", (s["setl_id"],))
        return {"setlinfo": info, "setldetail": []}

    def reverse(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2601: erase the trade that `omsgid` made, as if it had never arrived."""
        data = _node(inp, "data", ("psn_no", "omsgid", "oinfno"))
        s = self._settlement("msgid=?", (str(data["omsgid"]),))
        if s is None:
            return self._reverse_admission(data)
        if s["psn_no"] != data["psn_no"]:
            raise BizError("原交易人员编号不符")
        if s["state"] == "reversed":
            return {}  # already reversed: a repeat is acknowledged again
        if s["state"] == "cancelled":
            raise BizError(f"原交易已撤销(结算ID {s['setl_id']})，不能冲正")
        if s["kind"] == "cancel":  # erasing a cancel puts the settlement it cancelled back in force
            original = self._settlement("setl_id=?", (s["refd_setl_id"],))
            person = self._person(s["psn_no"])
            self.conn.execute("UPDATE persons SET balc=?, dedc_used=? WHERE psn_no=?",
                              (str(Decimal(person[5]) - Decimal(original["acct"])),
                               str(Decimal(person[7]) + Decimal(original["dedc"])), s["psn_no"]))
            self.conn.execute("UPDATE settlements SET state='live' WHERE setl_id=?", (s["refd_setl_id"],))
        else:
            self._restore(s)
            self.conn.execute("UPDATE fees SET setl_id=NULL WHERE setl_id=?", (s["setl_id"],))
        self.conn.execute("UPDATE settlements SET state='reversed' WHERE setl_id=?", (s["setl_id"],))
        return {}

    # ---- the inpatient stay (2401-2405, 2301-2305), and the settlement query (5203) -------------------
    def _stay(self, mdtrt_id: Any, states: tuple[str, ...]) -> dict[str, Any]:
        row = self.conn.execute("SELECT * FROM stays WHERE mdtrt_id=?", (str(mdtrt_id),)).fetchone()
        if row is None:
            raise BizError(f"就诊ID[{mdtrt_id}]不是住院就诊")
        stay = dict(zip(("mdtrt_id", "msgid", "psn_no", "ipt_no", "begntime", "endtime", "state"), row))
        if stay["state"] not in states:
            raise BizError(f"就诊ID[{mdtrt_id}]{STAY_STATES[stay['state']]}")
        return stay

    def admit(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2401: the patient is in hospital; the bureau's mdtrt_id names the stay from now on."""
        data = _node(inp, "mdtrtinfo", ("psn_no", "insutype", "ipt_no"))
        self._person(data["psn_no"])
        if self.conn.execute("SELECT 1 FROM stays WHERE psn_no=? AND state='open'", (data["psn_no"],)).fetchone():
            raise BizError(f"人员编号[{data['psn_no']}]存在在院信息，不能重复办理入院")
        mdtrt_id = str(self._next("mdtrt_id", 300170000))
        self.conn.execute("INSERT INTO visits VALUES (?,?,?,?,?,?,?)",
                          (mdtrt_id, env.get("msgid"), data["psn_no"], data["insutype"], data["ipt_no"],
                           data.get("med_type", "21"), "open"))
        self.conn.execute("INSERT INTO stays VALUES (?,?,?,?,?,?,?)",
                          (mdtrt_id, env.get("msgid"), data["psn_no"], data["ipt_no"],
                           str(data.get("begntime") or _now()), None, "open"))
        return {"result": {"mdtrt_id": mdtrt_id, "exp_content": None}}

    def admission_change(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "adminfo", ("mdtrt_id", "psn_no"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        self._stay(data["mdtrt_id"], ("open", "discharged"))
        if data.get("med_type"):
            self.conn.execute("UPDATE visits SET med_type=? WHERE mdtrt_id=?",
                              (data["med_type"], str(data["mdtrt_id"])))
        return {}

    def admission_cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2404: only a stay in hospital with no fees waiting (cancel them first, 2302) and no settlement in force
        (cancel it first, 2305)."""
        data = _node(inp, "data", ("mdtrt_id", "psn_no"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        self._stay(data["mdtrt_id"], ("open",))
        if self.conn.execute("SELECT 1 FROM fees WHERE mdtrt_id=? AND setl_id IS NULL",
                             (str(data["mdtrt_id"]),)).fetchone():
            raise BizError("该住院就诊存在费用明细，请先撤销费用明细")
        if self._settlement("mdtrt_id=? AND kind='settle' AND state='live'", (str(data["mdtrt_id"]),)):
            raise BizError(f"就诊ID[{data['mdtrt_id']}]已结算，请先撤销结算")
        self.conn.execute("UPDATE visits SET state='cancelled' WHERE mdtrt_id=?", (str(data["mdtrt_id"]),))
        self.conn.execute("UPDATE stays SET state='cancelled' WHERE mdtrt_id=?", (str(data["mdtrt_id"]),))
        return {}

    def discharge(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "dscginfo", ("mdtrt_id", "psn_no"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        self._stay(data["mdtrt_id"], ("open",))
        self.conn.execute("UPDATE stays SET state='discharged', endtime=? WHERE mdtrt_id=?",
                          (str(data.get("endtime") or _now()), str(data["mdtrt_id"])))
        return {}

    def discharge_cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2405: back in hospital; not while a settlement of the stay is in force (cancel it first, 2305)."""
        data = _node(inp, "data", ("mdtrt_id", "psn_no"))
        self._visit(data["mdtrt_id"], data["psn_no"])
        self._stay(data["mdtrt_id"], ("discharged",))
        if self._settlement("mdtrt_id=? AND kind='settle' AND state='live'", (str(data["mdtrt_id"]),)):
            raise BizError(f"就诊ID[{data['mdtrt_id']}]已结算，请先撤销结算")
        self.conn.execute("UPDATE stays SET state='open', endtime=NULL WHERE mdtrt_id=?", (str(data["mdtrt_id"]),))
        return {}

    def fee_cancel_ipt(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2302: by feedetl_sn, "0000" for all; only fees no settlement has taken. Its data is a list (HN 表93),
        or one row."""
        rows = inp.get("data")
        rows = rows if isinstance(rows, list) else [rows]
        for i, row in enumerate(rows):
            data = _node({"data": row}, "data", ("feedetl_sn", "mdtrt_id", "psn_no"))
            self._visit(data["mdtrt_id"], data["psn_no"])
            self._stay(data["mdtrt_id"], ("open", "discharged"))
            sn = str(data["feedetl_sn"])
            where = "mdtrt_id=? AND setl_id IS NULL" + ("" if sn == "0000" else " AND feedetl_sn=?")
            self.conn.execute(f"DELETE FROM fees WHERE {where}",
                              (str(data["mdtrt_id"]),) + (() if sn == "0000" else (sn,)))
        return {}

    def presettle_ipt(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "mdtrt_id", "medfee_sumamt"))
        self._stay(data["mdtrt_id"], ("open", "discharged"))
        info = self._compute(data, clr_type="21")
        info.update(setl_id=None, setl_time=None, medins_setl_id=env.get("msgid"), clr_way=None, clr_optins=None)
        return self._setl_output(info, f"{info['insutype']}100")

    def settle_ipt(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2304: as 2207, for the stay's fees; in hospital (a 中途结算) or discharged."""
        data = _node(inp, "data", ("psn_no", "mdtrt_id", "medfee_sumamt"))
        self._stay(data["mdtrt_id"], ("open", "discharged"))
        return self._settle(env, "2304", data, self._compute(data, clr_type="21"))

    def _reverse_admission(self, data: dict[str, Any]) -> Any:
        """2601 of a 2401: the stay is erased, as if the admission had never arrived; not once it has fees."""
        row = self.conn.execute("SELECT mdtrt_id, psn_no, state FROM stays WHERE msgid=?",
                                (str(data["omsgid"]),)).fetchone()
        if row is None:
            raise BizError(f"原交易不存在(omsgid {data['omsgid']})")
        mdtrt_id, psn_no, state = row
        if psn_no != data["psn_no"]:
            raise BizError("原交易人员编号不符")
        if state == "reversed":
            return {}  # already reversed: a repeat is acknowledged again
        if self.conn.execute("SELECT 1 FROM fees WHERE mdtrt_id=?", (mdtrt_id,)).fetchone():
            raise BizError(f"就诊ID[{mdtrt_id}]已上传费用明细，不能冲正入院")
        self.conn.execute("UPDATE visits SET state='reversed' WHERE mdtrt_id=?", (mdtrt_id,))
        self.conn.execute("UPDATE stays SET state='reversed' WHERE mdtrt_id=?", (mdtrt_id,))
        return {}

    def settlement_query(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """5203: one settlement (or cancel) as the bureau holds it; one a 2601 erased is not there."""
        data = _node(inp, "data", ("psn_no", "setl_id", "mdtrt_id"))
        s = self._settlement("setl_id=?", (str(data["setl_id"]),))
        if s is None or s["state"] == "reversed" or s["psn_no"] != data["psn_no"] or s["mdtrt_id"] != str(
                data["mdtrt_id"]):
            raise BizError(f"结算信息不存在(结算ID {data['setl_id']})")
        person = self._person(s["psn_no"])
        acct, cash = Decimal(s["acct"]), Decimal(s["cash"])
        info = {"setl_id": s["setl_id"], "mdtrt_id": s["mdtrt_id"], "psn_no": s["psn_no"], "psn_name": person[1],
                "certno": person[2], "insutype": s["insutype"], "psn_type": person[4], "setl_time": s["setl_time"],
                "medfee_sumamt": Decimal(s["medfee"]), "fund_pay_sumamt": Decimal(s["fund"]),
                "hifp_pay": Decimal(s["fund"]),
                "acct_pay": acct, "cash_payamt": cash, "psn_pay": acct + cash, "hosp_part_amt": Decimal(s["hosp"]),
                "act_pay_dedc": Decimal(s["dedc"]), "clr_type": s["clr_type"], "clr_optins": s["clr_optins"],
                "clr_way": "1", "medins_setl_id": s["msgid"], "refd_setl_flag": "1" if s["kind"] == "cancel" else "0",
                "balc": Decimal(person[5])}
        return {"setlinfo": info, "setldetail": [{"fund_pay_type": f"{s['insutype']}100",
                                                  "fund_payamt": info["fund_pay_sumamt"],
                                                  "fund_pay_type_name": "基本医疗保险统筹基金"}]}

    # ---- reconciliation (3201 / 9101 / 3202 / 9102) -------------------------------------------------
    def _day_group(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The bureau's settlements and cancels of one group in the statement period (by its setl_time)."""
        begin, end = str(data["stmt_begndate"]), str(data["stmt_enddate"])
        rows = self.conn.execute(
            "SELECT * FROM settlements WHERE state != 'reversed' AND insutype=? AND clr_type=? AND clr_optins=? "
            "AND substr(setl_time, 1, 10) BETWEEN ? AND ?",
            (str(data["insutype"]), str(data["clr_type"]), str(data["setl_optins"]), begin, end)).fetchall()
        return [dict(zip(SETTLEMENT_COLUMNS, r)) for r in rows]

    def statement_total(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("insutype", "clr_type", "setl_optins", "stmt_begndate", "stmt_enddate"))
        rows = self._day_group(data)
        ours = {"medfee_sumamt": sum((Decimal(r["medfee"]) for r in rows), ZERO),
                "fund_pay_sumamt": sum((Decimal(r["fund"]) for r in rows), ZERO),
                "acct_pay": sum((Decimal(r["acct"]) for r in rows), ZERO), "fixmedins_setl_cnt": Decimal(len(rows))}
        wrong = [f"{k}: 中心{v} 机构{data.get(k)}" for k, v in ours.items() if Decimal(str(data.get(k, 0))) != v]
        return {"stmtinfo": {"setl_optins": data["setl_optins"], "stmt_rslt": "1" if wrong else "0",
                             "stmt_rslt_dscr": "; ".join(wrong) or "对账平"}}

    def file_upload(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        import base64

        data = _node(inp, "fsUploadIn", ("in", "filename"))
        no = f"F{self._next('file', 0):08d}"
        self.conn.execute("INSERT INTO files VALUES (?,?,?)", (no, data["filename"], base64.b64decode(data["in"])))
        return {"file_qury_no": no, "filename": data["filename"], "fixmedins_code": env.get("fixmedins_code"),
                "dld_endtime": _now()}

    def file_download(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """9102: the file itself. Catalog files are in the policy centre's store, which only "plc" reaches."""
        data = _node(inp, "fsDownloadIn", ("file_qury_no",))
        no = str(data["file_qury_no"])
        row = self.conn.execute("SELECT filename, content FROM files WHERE file_qury_no=?", (no,)).fetchone()
        if row is None or no.startswith(POLICY_STORE) and str(data.get("fixmedins_code")) != catalogs.PLC:
            raise BizError(f"文件[{no}]不存在")  # a catalog file is not in the hospital's store
        return FileAnswer(row[0], row[1])

    def _store_file(self, name: str, rows: list[list[Any]], store: str = "F") -> dict[str, Any]:
        """A file the hospital downloads with 9102: one TXT in a ZIP of the same name; `store` begins its number."""
        zipname = name.replace(".txt", ".zip")
        no = f"{store}{self._next('file', 0):08d}"
        self.conn.execute("INSERT INTO files VALUES (?,?,?)", (no, zipname, catalogs.pack(name, rows)))
        return {"file_qury_no": no, "filename": zipname, "dld_endtime": _now(), "data_cnt": len(rows)}

    def statement_detail(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """3202: compare the hospital's detail file (表150) with the ledger; the result file (表151) names every row."""
        data = _node(inp, "data", ("file_qury_no", "stmt_begndate", "stmt_enddate", "setl_optins", "clr_type"))
        row = self.conn.execute("SELECT content FROM files WHERE file_qury_no=?", (data["file_qury_no"],)).fetchone()
        if row is None:
            raise BizError(f"文件[{data['file_qury_no']}]不存在")
        try:
            lines = catalogs.unpack(row[0], catalogs.STATEMENT_UPLOAD, catalogs.STATEMENT_UPLOAD, "对明细账文件")
        except catalogs.FileLayoutError as e:
            raise BizError(str(e)) from None
        theirs = {r["setl_id"]: (r["mdtrt_id"], r["psn_no"], Decimal(r["medfee_sumamt"]), Decimal(r["fund_pay_sumamt"]),
                                 Decimal(r["acct_pay"]), r["refd_setl_flag"]) for r in lines}
        ours = {r["setl_id"]: r for r in self._day_group({**data, "insutype": data.get("insutype", "")})
                } if data.get("insutype") else {r["setl_id"]: r for r in self._group_any_insutype(data)}
        result = []
        for setl_id, s in ours.items():
            refd = "1" if s["kind"] == "cancel" else "0"
            mine = (Decimal(s["medfee"]), Decimal(s["fund"]), Decimal(s["acct"]))
            if setl_id not in theirs:
                rslt, memo = "1", "医院端无此结算"
            elif theirs[setl_id][2:5] != mine:
                rslt, memo = "1", "金额不符"
            else:
                rslt, memo = "0", None
            result.append([s["psn_no"], s["mdtrt_id"], setl_id, s["msgid"], rslt, refd, memo, *mine])
        for setl_id, t in theirs.items():
            if setl_id not in ours:
                result.append([t[1], t[0], setl_id, None, "1", t[5], "中心端无此结算", None, None, None])
        return {"fileinfo": self._store_file("result.txt", result)}

    def _group_any_insutype(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT * FROM settlements WHERE state != 'reversed' AND clr_type=? AND clr_optins=? "
            "AND substr(setl_time, 1, 10) BETWEEN ? AND ?",
            (str(data["clr_type"]), str(data["setl_optins"]), str(data["stmt_begndate"]),
             str(data["stmt_enddate"]))).fetchall()
        return [dict(zip(SETTLEMENT_COLUMNS, r)) for r in rows]

    # ---- the catalog (医保目录), by version -------------------------------------------------------------
    def catalog_download(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """13xx: every record newer than `ver` (入参不能为空), as a file in the catalog's real layout."""
        since = str(_node(inp, "data", ("ver",))["ver"])
        infno = str(env["infno"])
        handle = self._store_file(f"{infno}_{since}.txt", published.download(infno, self.published, since),
                                  POLICY_STORE)
        return {**handle, "dld_end_time": handle.pop("dld_endtime")}  # 13xx spell it so (HN 表14)

    def catalog_page(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """1312, 1316–1319: one page of the records updated since `updt_time`."""
        data = _node(inp, "data", ("updt_time", "page_num", "page_size"))
        return published.page(str(env["infno"]), self.published, self.admdvs, data)

    # ---- 异地 patients: filings (备案 2501-2507) ------------------------------------------------------------
    def _remote(self, insuplc_admdvs: str) -> bool:
        """Insured in another pooling region (统筹区, the city: the first 4 digits); 430199, the city's own
        agency, is of this one."""
        return insuplc_admdvs[:4] != self.admdvs[:4]

    def _remote_clr_type(self, clr_type: str) -> str:
        return self.remote.inpatient if clr_type.startswith("2") else self.remote.outpatient

    def _check_filing(self, psn_no: str) -> None:
        rule = self.conn.execute("SELECT required FROM filing_rules WHERE psn_no=?", (psn_no,)).fetchone()
        if not rule or not rule[0]:
            return
        marks = ", ".join("?" * len(SETTLES_UNDER))
        if not self.conn.execute(f"SELECT 1 FROM filings WHERE psn_no=? AND state='live' AND infno IN ({marks})",
                                 (psn_no, *SETTLES_UNDER)).fetchone():
            raise BizError("异地就医人员未备案或备案已撤销，请先办理异地就医备案(【2501】转院备案/【2505】定点备案)")

    def file(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """2501/2503/2505/2507: a filing for the person, in force until its cancel."""
        data = _node(inp, "data", ("psn_no",))
        self._person(data["psn_no"])
        sn = f"B{self._next('filing', 0):010d}"
        self.conn.execute("INSERT INTO filings VALUES (?,?,?,?,?)",
                          (sn, env.get("msgid"), str(env.get("infno")), data["psn_no"], "live"))
        return {"result": {"trt_dcla_detl_sn": sn}}

    def file_cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("psn_no", "trt_dcla_detl_sn"))
        filing = {c: f for f, c in FILINGS.items() if c}[str(env.get("infno"))]
        if self.conn.execute("UPDATE filings SET state='cancelled' WHERE trt_dcla_detl_sn=? AND psn_no=? AND infno=? "
                             "AND state='live'", (str(data["trt_dcla_detl_sn"]), data["psn_no"], filing)).rowcount != 1:
            raise BizError(f"备案[{data['trt_dcla_detl_sn']}]不存在或已撤销")
        return {}

    # ---- month-end clearing (清算 3203/3204, audit 3205A; 异地清分 3260/3261) --------------------------------
    def clearing_apply(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """3203: the month's application for a clearing type; one in force per month and group."""
        data = _node(inp, "data", ("clr_type", "setlym", "medfee_sumamt", "fund_appy_sum", "begndate", "enddate"))
        group = (str(data["setlym"]), str(data.get("insutype") or ""), str(data.get("clr_optins") or self.clr_optins),
                 str(data["clr_type"]))
        if self.conn.execute("SELECT 1 FROM clearings WHERE setlym=? AND insutype=? AND clr_optins=? AND clr_type=? "
                             "AND state='applied'", group).fetchone():
            raise BizError(f"清算类别[{data['clr_type']}]{data['setlym']}已申请清算，请先撤销")
        evt = f"{self.admdvs}{data['setlym']}{self._next('clr_appy', 0):08d}"
        self.conn.execute("INSERT INTO clearings VALUES (?,?,?,?,?,?,?,?,?,?)",
                          (evt, env.get("msgid"), *group, str(data["medfee_sumamt"]), str(data["fund_appy_sum"]),
                           str(data.get("psntime") or ""), "applied"))
        return {"data": {"clr_appy_evt_id": evt}}

    def _application(self, evt: str) -> dict[str, Any]:
        cols = ("clr_appy_evt_id", "msgid", "setlym", "insutype", "clr_optins", "clr_type", "medfee", "fund",
                "psntime", "state")
        row = self.conn.execute("SELECT * FROM clearings WHERE clr_appy_evt_id=?", (evt,)).fetchone()
        if row is None:
            raise BizError(f"清算申请事件[{evt}]不存在")
        return dict(zip(cols, row))

    def clearing_cancel(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        data = _node(inp, "data", ("clr_appy_evt_id",))
        app = self._application(str(data["clr_appy_evt_id"]))
        if app["state"] != "applied":
            raise BizError(f"清算申请事件[{app['clr_appy_evt_id']}]已撤销")
        self.conn.execute("UPDATE clearings SET state='cancelled' WHERE clr_appy_evt_id=?", (app["clr_appy_evt_id"],))
        return {}

    def clearing_status(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """3205A: the audit of an application: what it approves, and what it refuses (拒付) of which settlement
        and why (refusals planted with `refuse`)."""
        data = _node(inp, "data", ("clr_appy_evt_id",))
        app = self._application(str(data["clr_appy_evt_id"]))
        month = f"{app['setlym'][:4]}-{app['setlym'][4:6]}"
        refused = self.conn.execute(
            "SELECT r.setl_id, r.amount, s.fund, r.reason FROM refusals r JOIN settlements s ON s.setl_id = r.setl_id "
            "WHERE s.insutype=? AND s.clr_optins=? AND s.clr_type=? AND substr(s.setl_time, 1, 7)=? ORDER BY r.setl_id",
            (app["insutype"], app["clr_optins"], app["clr_type"], month)).fetchall()
        refused = [(sid, min(Decimal(a), Decimal(fund)), why) for sid, a, fund, why in refused]  # at most what it paid
        rej = sum((a for _, a, _ in refused), ZERO)
        return {"data": {"clr_appy_evt_id": app["clr_appy_evt_id"], "clr_stas": app["state"],
                         "appy_amt": Decimal(app["fund"]), "appr_amt": Decimal(app["fund"]) - rej, "rej_amt": rej,
                         "rejinfo": [{"setl_id": sid, "rej_amt": a, "rej_rea": why}
                                     for sid, a, why in refused]}}

    def refuse(self, setl_id: str, amount: Decimal, reason: str) -> None:
        """The audit refuses (拒付) part of a settlement."""
        self.conn.execute("INSERT OR REPLACE INTO refusals VALUES (?,?,?)", (setl_id, str(amount), reason))

    def _remote_month(self, month: str) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT s.*, p.certno, p.insuplc_admdvs FROM settlements s JOIN persons p ON p.psn_no = s.psn_no "
            "WHERE s.state != 'reversed' AND substr(p.insuplc_admdvs, 1, 4) != ? AND substr(s.setl_time, 1, 7) = ? "
            "ORDER BY s.setl_time, s.setl_id", (self.admdvs[:4], month)).fetchall()
        return [dict(zip((*SETTLEMENT_COLUMNS, "certno", "insuplc_admdvs"), r)) for r in rows]

    def remote_detail(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """3260: the month's 异地 settlements of the institution as the clearing centre holds them, a page of
        at most `page_size` rows from `startrow` (1 is the first); an empty page after the last."""
        data = _node(inp, "data", ("trt_year", "trt_month", "startrow"))
        month = f"{int(data['trt_year']):04d}-{int(data['trt_month']):02d}"
        start = max(int(data["startrow"]), 1) - 1
        rows = self._remote_month(month)
        page = rows[start:start + self.remote.page_size]
        return {"data": [{"seqno": start + i + 1, "mdtrtarea": self.admdvs, "medins_no": env.get("fixmedins_code"),
                          "certno": r["certno"], "psn_no": r["psn_no"], "insuplc_admdvs": r["insuplc_admdvs"],
                          "mdtrt_id": r["mdtrt_id"], "mdtrt_setl_time": r["setl_time"], "setl_sn": r["setl_id"],
                          "fulamt_advpay_flag": "0", "medfee_sumamt": Decimal(r["medfee"]),
                          "optins_pay_sumamt": Decimal(r["fund"]) + Decimal(r["acct"])}
                         for i, r in enumerate(page)], "recordCounts": len(rows)}

    def remote_confirm(self, env: dict[str, Any], inp: dict[str, Any]) -> Any:
        """3261: the institution confirms the month's 异地 clearing detail."""
        data = _node(inp, "data", ("trt_year", "trt_month"))
        month = f"{int(data['trt_year']):04d}-{int(data['trt_month']):02d}"
        if self.conn.execute("SELECT 1 FROM remote_confirmations WHERE month=?", (month,)).fetchone():
            raise BizError(f"{month}异地清分结果已确认")
        self.conn.execute("INSERT INTO remote_confirmations VALUES (?,?,?,?)",
                          (month, env.get("msgid"), len(self._remote_month(month)), _now()))
        return {}

    # ---- faults in the ledger itself (tests of reconciliation) ---------------------------------------
    def adjust(self, setl_id: str, medfee: Decimal) -> None:
        """The bureau changed a settlement's amount after the fact (e.g. an audit deduction)."""
        self.conn.execute("UPDATE settlements SET medfee=? WHERE setl_id=?", (str(medfee), setl_id))

    def forget(self, setl_id: str) -> None:
        """The bureau has lost a record (or never kept it)."""
        self.conn.execute("DELETE FROM settlements WHERE setl_id=?", (setl_id,))

    # ---- what tests and reconciliation read ------------------------------------------------------
    def settlements(self) -> list[dict[str, Any]]:
        return [dict(zip(SETTLEMENT_COLUMNS, r)) for r in self.conn.execute("SELECT * FROM settlements ORDER BY setl_id")]


STAY_STATES = {"open": "在院", "discharged": "已出院", "cancelled": "已撤销入院", "reversed": "已冲正"}


def _node(inp: dict[str, Any], name: str, required: tuple[str, ...]) -> dict[str, Any]:
    node = inp.get(name)
    if not isinstance(node, dict):
        raise BizError(f"input.{name}节点缺失")
    missing = [f for f in required if node.get(f) in (None, "")]
    if missing:
        raise BizError(f"input.{name}缺少必填项: {', '.join(missing)}")
    return node


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def _stamp(when: datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S%f")[:17]
