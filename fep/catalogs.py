"""The bureau's files as the interface lays them out: the catalogs (1301–1327, downloaded with 9102), the
paged catalog queries (1312, 1316–1319) and the detail reconciliation's files (3202, through 9101 and 9102).

Layouts are the Hunan specification's (湖南省医疗保障信息平台定点医药机构接口规范 V1.1.27, nhsa-interface.md
§0 HN): a catalog's columns are listed, in order, in the `filename` row of its output table ("第1列：医疗目录编码
第2列：…"; 1301 has 97); a paged query's fields are its output table; 3202's files are 表150 and 表151. Every file
is a ZIP holding one TXT, one record a line, fields separated by TAB in layout order, in UTF-8 ("TXT文件使用字符集
为UTF-8"), an empty field written `null` ("TXT文件中空值使用'null'"). Bureaus on an older version of the
specification send fewer trailing columns (V1.1.23 added 生效时间 and 失效时间 to 1302, 1303 and 1305): those
read as empty. No sockets or SQLite here: bytes in, rows out.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

ENCODING = "utf-8"
NULL = "null"
PLC = "plc"  # 9102's fixmedins_code for catalog files (HN 9102: 两定接口的对象存储配置需要与政策中心一致)
FIRST_VERSION = "v0000"  # the version a first download asks after (HN: 目录下载，初始化版本号为v0000)
VERSION, VALID, UPDATED = "版本号", "有效标志", "数据更新时间"  # columns every catalog has


class FileLayoutError(ValueError):
    """A file that is not what its layout says (not a ZIP, no TXT, a line without its key fields)."""


def _split(columns: str) -> tuple[str, ...]:
    return tuple(columns.split())


@dataclass(frozen=True)
class Layout:
    """A catalog downloaded as a file: its columns, the one that names an entry, and the one that names it
    for people. `fee_codes`: its codes are what fee lines carry as med_list_codg (drugs, services, devices)."""

    infno: str
    title: str
    code: str
    name: str
    columns: str
    fee_codes: bool = False
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _split(self.columns))
        missing = {self.code, self.name, VERSION, VALID} - set(self.fields)
        assert not missing, f"{self.infno}: layout lacks {missing}"

    @property
    def table(self) -> str:
        return f"catalog_{self.infno}"


@dataclass(frozen=True)
class Paged:
    """A catalog read page by page (page_num, page_size, updt_time): each record has its rid (唯一记录号)."""

    infno: str
    title: str
    columns: str
    fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", _split(self.columns))

    @property
    def table(self) -> str:
        return f"catalog_{self.infno}"


LAYOUTS: dict[str, Layout] = {
    "1301": Layout("1301", "西药中成药目录", code="医疗目录编码", name="药品通用名", fee_codes=True, columns="""
        医疗目录编码 药品商品名 通用名编号 药品通用名 化学名称 别名 英文名称 注册名称 药监本位码 药品剂型 药品剂型名称 药品类别 药品类别名称 药品规格 药品规格代码 注册剂型 注册规格 注册规格代码
        每次用量 使用频次 酸根盐基 国家药品编号 用法 中成药标志 生产地类别 生产地类别名称 计价单位类型 非处方药标志 非处方药标志名称 包装材质 包装材质名称 包装规格 包装数量 功能主治 给药途径 说明书
        开始日期 结束日期 最小使用单位 最小销售单位 最小计量单位 最小包装数量 最小包装单位 最小制剂单位 最小包装单位名称 最小制剂单位名称 转换比 药品有效期 最小计价单位 五笔助记码 拼音助记码 分包装厂家
        生产企业编号 生产企业名称 特殊限价药品标志 特殊药品标志 限制使用范围 限制使用标志 药品注册证号 药品注册证号开始日期 药品注册证号结束日期 批准文号 批准文号开始日期 批准文号结束日期 市场状态
        市场状态名称 药品注册批件电子档案 药品补充申请批件电子档案 国家医保药品目录备注 基本药物标志名称 基本药物标志 增值税调整药品标志 增值税调整药品名称 上市药品目录集药品 医保谈判药品标志
        医保谈判药品名称 卫健委药品编码 备注 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称 儿童用药 公司名称 仿制药一致性评价药品 经销企业 经销企业联系人 经销企业授权书电子档案
        国家医保药品目录剂型 国家医保药品目录甲乙类标识 上市许可证持有人 下发标志 传输数据ID 生效时间 失效时间"""),
    "1302": Layout("1302", "中药饮片目录", code="医疗目录编码", name="单味药名称", fee_codes=True, columns="""
        医疗目录编码 单味药名称 单复方标志 质量等级 中草药年份 药用部位 安全计量 常规用法 性味 归经 品种 开始日期 结束日期 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称 药材名称
        功能主治 炮制方法 功效分类 药材种来源 国家医保支付政策 省级医保支付政策 标准名称 标准页码 标准电子档案 下发标志 传输数据ID 生效时间 失效时间"""),
    "1303": Layout("1303", "医疗机构制剂目录", code="医疗目录编码", name="药品商品名", fee_codes=True, columns="""
        医疗目录编码 药品商品名 别名 英文名称 剂型 剂型名称 注册剂型 成分 功能主治 性状 药品规格 药品规格代码 注册规格 注册规格代码 给药途径 贮藏 使用频次 每次用量 药品类别 药品类别名称
        非处方药标志 非处方药标志名称 包装材质 包装材质名称 包装规格 说明书 包装数量 最小使用单位 最小销售单位 最小计量单位 最小包装数量 最小包装单位 最小制剂单位 最小制剂单位名称 药品有效期
        最小计价单位 不良反应 注意事项 禁忌 生产企业编号 生产企业名称 生产企业地址 特殊限价药品标志 批准文号 批准文号开始日期 批准文号结束日期 药品注册证号 药品注册证号开始日期 药品注册证号结束日期
        转换比 限制使用范围 最小包装单位名称 注册名称 分包装厂家 市场状态 药品注册批件电子档案 药品补充申请批件电子档案 国家医保药品目录编号 国家医保药品目录备注 增值税调整药品标志 增值税调整药品名称
        上市药品目录集药品 卫健委药品编码 备注 有效标志 开始时间 结束时间 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称 自制剂许可证号 儿童用药 老年患者用药 医疗机构联系人姓名 医疗机构联系人电话
        自制剂许可证电子档案 下发标志 传输数据ID 所在地区 医院制剂申请人单位名称 医院制剂申请人单位地址"""),
    "1305": Layout("1305", "医疗服务项目目录", code="医疗目录编码", name="医疗服务项目名称", fee_codes=True, columns="""
        医疗目录编码 计价单位 计价单位名称 诊疗项目说明 诊疗除外内容 诊疗项目内涵 有效标志 备注 服务项目类别 医疗服务项目名称 项目说明 开始日期 结束日期 唯一记录号 版本号 版本名称 下发标志
        传输数据ID 生效时间"""),
    "1306": Layout("1306", "医用耗材目录", code="医疗目录编码", name="耗材名称", fee_codes=True, columns="""
        医疗目录编码 耗材名称 医疗器械唯一标识码 医保通用名代码 医保通用名 产品型号 规格代码 规格 耗材分类 规格型号 材质代码 耗材材质 包装规格 包装数量 产品包装材质 包装单位 产品转换比 最小使用单位
        生产地类别 生产地类别名称 产品标准 产品有效期 性能结构与组成 适用范围 产品使用方法 产品图片编号 产品质量标准 说明书 其他证明材料 专机专用标志 专机名称 组套名称 机套标志 限制使用标志
        医保限用范围 最小销售单位 高值耗材标志 医用材料分类代码 植入材料和人体器官标志 灭菌标志 灭菌标志名称 植入或介入类标志 植入或介入类名称 一次性使用标志 一次性使用标志名称 注册备案人名称 开始日期
        结束日期 医疗器械管理类别 医疗器械管理类别名称 注册备案号 注册备案产品名称 结构及组成 其他内容 批准日期 注册备案人住所 注册证有效期开始时间 注册证有效期结束时间 生产企业编号 生产企业名称 生产地址
        代理人企业 代理人企业地址 生产国或地区 售后服务机构 注册或备案证电子档案 产品影像 有效标志 唯一记录号 版本号 版本名称"""),
    "1307": Layout("1307", "疾病与诊断目录", code="诊断代码", name="诊断名称", columns="""
        西医疾病诊断ID 章 章代码范围 章名称 节代码范围 节名称 类目代码 类目名称 亚目代码 亚目名称 诊断代码 诊断名称 使用标记 国标版诊断代码 国标版诊断名称 临床版诊断代码 临床版诊断名称 备注
        有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称"""),
    "1308": Layout("1308", "手术操作目录", code="手术操作代码", name="手术操作名称", columns="""
        手术标准目录ID 章 章代码范围 章名称 类目代码 类目名称 亚目代码 亚目名称 细目代码 细目名称 手术操作代码 手术操作名称 使用标记 团标版手术操作代码 团标版手术操作名称 临床版手术操作代码
        临床版手术操作名称 备注 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称"""),
    "1309": Layout("1309", "门诊慢特病种目录", code="门慢门特病种目录代码", name="门慢门特病种名称", columns="""
        门慢门特病种目录代码 门慢门特病种大类名称 门慢门特病种细分类名称 医保区划 备注 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 病种内涵 版本名称 诊疗指南页码 诊疗指南电子档案
        门慢门特病种名称 门慢门特病种大类代码"""),
    "1310": Layout("1310", "按病种付费病种目录", code="按病种结算病种目录代码", name="按病种结算病种名称", columns="""
        病种结算目录ID 按病种结算病种目录代码 按病种结算病种名称 限定手术操作代码 限定手术操作名称 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 病种内涵 备注 版本名称 诊疗指南页码
        诊疗指南电子档案"""),
    "1311": Layout("1311", "日间手术治疗病种目录", code="日间手术病种目录代码", name="日间手术病种名称", columns="""
        日间手术治疗目录ID 日间手术病种目录代码 日间手术病种名称 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 病种内涵 备注 版本名称 诊疗指南页码 诊疗指南电子档案 手术操作名称 手术操作代码"""),
    "1313": Layout("1313", "肿瘤形态学目录", code="肿瘤/细胞类型代码", name="肿瘤/细胞类型", columns="""
        肿瘤形态学ID 肿瘤/细胞类型代码 肿瘤/细胞类型 形态学分类代码 形态学分类 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称"""),
    "1314": Layout("1314", "中医疾病目录", code="疾病分类代码", name="疾病分类名称", columns="""
        中医疾病诊断ID 科别类目代码 科别类目名称 专科系统分类目代码 专科系统分类目名称 疾病分类代码 疾病分类名称 备注 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称"""),
    "1315": Layout("1315", "中医证候目录", code="证候分类代码", name="证候分类名称", columns="""
        中医证候ID 证候类目代码 证候类目名称 证候属性代码 证候属性 证候分类代码 证候分类名称 备注 有效标志 唯一记录号 数据创建时间 数据更新时间 版本号 版本名称"""),
    "1320": Layout("1320", "中药配方颗粒目录", code="中药配方颗粒代码", name="中药配方颗粒名称", fee_codes=True, columns="""
        中药配方颗粒Id 中药配方颗粒代码 中药配方颗粒名称 最小计量单位 道地药材 规格 中药配方颗粒包装规格 保质期 生产企业名称 生产企业地址 上市备案号 上市备案时间 上市备案状态 上市备案地方机构
        上市备案信息 中药配方颗粒执行标准 执行标准 中药配方颗粒执行标准电子文档 不良反应检查信息 中药饮片代码 中药饮片名称 药材名称 功效分类 功能主治 常规用法 中药饮片执行标准 生产企业统一社会信用代码
        下发标志 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名 数据创建时间 创建机构编号 经办人ID 经办人姓名 经办时间 经办机构编号 医保区划 备注 版本号 版本名称 传输数据ID"""),
    "1321": Layout("1321", "医疗服务项目（新）目录", code="医疗目录编码", name="医疗服务项目名称", fee_codes=True, columns="""
        传输数据ID 父级ID 医疗目录编码 分解码 加收码 顺序码 医疗服务项目名称 医疗服务项目输出 价格构成 基本物料损耗 计价单位 计价说明 附件 有效标志 层级 层级树 诊疗项目说明 费用类型口径 医保区划
        下发标志 版本号 版本名称 生效时间 失效时间 数据唯一记录号 创建人ID 创建人姓名 数据创建时间 数据更新时间 创建机构编号 经办人ID 经办人姓名 经办时间 经办机构编号"""),
    "1322": Layout("1322", "体外诊断试剂产品信息", code="试剂产品ID", name="单件产品名称", columns="""
        试剂产品ID 医保试剂分类码 体外诊断试剂分类编码 体外诊断试剂分类编码名称 试剂检测指标码 试剂检测指标名称 试剂应用方式 检测类型 检测类型-检测项数量 检测类型-检测项 单件产品名称 检测结果属性
        试剂包装规格 人份 容量(ml) 其他 包装计量单位 产品图片附件 企业名称 统一社会信用代码 注册备案号组 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名 数据创建时间 创建机构编号
        经办人ID 经办人姓名 经办时间 经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID 试剂编码ID 适应仪器"""),
    "1323": Layout("1323", "体外诊断试剂产品信息与注册证关联信息", code="试剂关联ID", name="注册备案号", columns="""
        试剂关联ID 试剂产品ID 医保试剂分类码 注册证ID 注册备案号 医疗器械唯一标识码 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名 数据创建时间 创建机构编号 经办人ID 经办人姓名
        经办时间 经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID"""),
    "1324": Layout("1324", "体外诊断试剂检测指标信息", code="试剂检测指标码", name="试剂检测指标名称", columns="""
        试剂检测指标ID 试剂检测指标码 试剂检测指标名称 试剂检测类别 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名 数据创建时间 创建机构编号 经办人ID 经办人姓名 经办时间
        经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID"""),
    "1325": Layout("1325", "体外诊断试剂产品信息编码", code="试剂编码ID", name="试剂检测指标名称", columns="""
        试剂编码ID 试剂分类一级名称 试剂分类二级名称 试剂分类三级名称 试剂检测类别 试剂检测指标名称 试剂产品应用方式 试剂产品检测类型 企业名称 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID
        创建人姓名 数据创建时间 创建机构编号 经办人ID 经办人姓名 经办时间 经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID"""),
    "1326": Layout("1326", "体外诊断试剂试剂注册证信息", code="注册证ID", name="注册备案产品名称", columns="""
        注册证ID 注册备案号 注册备案号（原） 医疗器械管理类别 注册备案产品名称 注册备案人名称 注册备案人住所 生产地址 代理人名称；注册类型为境外是有值 代理人地址；注册类型为境外是有值 试剂包装规格
        主要成分 预期用途 产品储存条件及有效期 适用仪器设备 其他内容 批准日期 生效日期 有效期至 注册或备案证电子档案 产地 生产国或地区 生产企业名称 售后服务机构 总经销企业名称 联系人 联系电话
        经销企业授权电子档案 产品说明书附件 注册证附件 注册证检验报告 企业ID 企业名称 统一社会信用代码 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名 数据创建时间 创建机构编号
        经办人ID 经办人姓名 经办时间 经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID"""),
    "1327": Layout("1327", "体外诊断试剂分类目录", code="试剂分类代码", name="试剂分类三级名称", columns="""
        试剂分类目录ID 试剂分类代码 试剂分类一级代码 试剂分类一级名称 试剂分类二级代码 试剂分类二级名称 试剂分类三级代码 试剂分类三级名称 备注 有效标志 数据唯一记录号 数据更新时间 创建人ID 创建人姓名
        数据创建时间 创建机构编号 经办人ID 经办人姓名 经办时间 经办机构编号 统筹区编号 版本号 版本名称 下发标志 传输数据ID"""),
}

# The catalog a diagnosis line's code comes from, by its diag_type (HN 表427: 1 西医诊断, 2 中医主病诊断, 3 中医主证诊断).
DIAGNOSIS_CATALOGS = {"1": "1307", "2": "1314", "3": "1315"}

PAGED: dict[str, Paged] = {
    "1312": Paged("1312", "医保目录信息查询", columns="""
        hilist_code hilist_name insu_admdvs begndate enddate med_chrgitm_type chrgitm_lv lmt_used_flag list_type
        med_use_flag matn_used_flag hilist_use_type lmt_cpnd_type wubi pinyin memo vali_flag rid updt_time
        crter_id crter_name crte_time crte_optins_no opter_id opter_name opt_time optins_no poolarea_no"""),
    "1316": Paged("1316", "医疗目录与医保目录匹配信息查询", columns="""
        med_list_codg hilist_code list_type insu_admdvs begndate enddate memo vali_flag rid updt_time crter_id
        crter_name crte_time crte_optins_no opter_id opter_name opt_time optins_no poolarea_no"""),
    "1317": Paged("1317", "医药机构目录匹配信息查询", columns="""
        fixmedins_code medins_list_codg medins_list_name insu_admdvs list_type med_list_codg begndate enddate
        aprvno dosform exct_cont item_cont prcunt spec pacspec memo vali_flag rid updt_time crter_id crter_name
        crte_time crte_optins_no opter_id opter_name opt_time optins_no poolarea_no"""),
    "1318": Paged("1318", "医保目录限价信息查询", columns="""
        hilist_code hilist_lmtpric_type overlmt_dspo_way insu_admdvs begndate enddate hilist_pric_uplmt_amt
        vali_flag rid updt_time crter_id crter_name crte_time crte_optins_no opter_id opter_name opt_time
        optins_no tabname poolarea_no"""),
    "1319": Paged("1319", "医保目录先自付比例信息查询", columns="""
        hilist_code selfpay_prop_psn_type selfpay_prop_type insu_admdvs begndate enddate selfpay_prop vali_flag
        rid updt_time crter_id crter_name crte_time crte_optins_no opter_id opter_name opt_time optins_no
        tabname poolarea_no"""),
}

# 3202 对明细账: the hospital's file (表150) and the bureau's result (表151, with the bureau's own figures).
STATEMENT_UPLOAD = ("setl_id", "mdtrt_id", "psn_no", "medfee_sumamt", "fund_pay_sumamt", "acct_pay", "refd_setl_flag")
STATEMENT_RESULT = ("psn_no", "mdtrt_id", "setl_id", "msgid", "stmt_rslt", "refd_setl_flag", "memo", "medfee_sumamt",
                    "fund_pay_sumamt", "acct_pay")


def version_key(ver: str | None) -> tuple[int, ...]:
    """Versions compare by their numbers in order (v0000 < 1.0.9 < 1.0.10 < 9 < 10), not as text ("9" > "10")."""
    return tuple(int(n) for n in re.findall(r"\d+", ver or ""))


def pack(name: str, rows: Iterable[Sequence[Any]]) -> bytes:
    """A ZIP holding `name`: one TAB-separated UTF-8 line per row, None written `null`."""
    text = "\n".join("\t".join(NULL if v is None else str(v) for v in row) for row in rows)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, text.encode(ENCODING))
    return buf.getvalue()


def unpack(zipped: bytes, fields: Sequence[str], required: Sequence[str], what: str) -> list[dict[str, str | None]]:
    """The records of a ZIP of TAB-separated TXT as dicts over `fields` (`null` and missing trailing fields read as
    None, fields beyond the layout are ignored). A record lacking a `required` field refuses the whole file."""
    text = _text(zipped, what)
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        values = [None if v == NULL or v == "" else v for v in line.split("\t")[:len(fields)]]
        lacking = [f for f in required if fields.index(f) >= len(values) or values[fields.index(f)] is None]
        if lacking:
            raise FileLayoutError(f"{what}: line {n} has {len(values)} field(s) and lacks {', '.join(lacking)} "
                                  f"(the layout has {len(fields)}, from {fields[0]})")
        out.append(dict(zip(fields, values + [None] * (len(fields) - len(values)))))
    return out


def _text(zipped: bytes, what: str) -> str:
    try:
        with zipfile.ZipFile(io.BytesIO(zipped)) as z:
            names = [n for n in z.namelist() if not n.endswith("/")]
            if not names:
                raise FileLayoutError(f"{what}: the ZIP holds no file")
            raw = z.read(names[0])
    except zipfile.BadZipFile as e:
        raise FileLayoutError(f"{what}: not a ZIP ({e})") from None
    try:
        return raw.decode("utf-8-sig")  # a BOM, as Windows tools write one, is not part of the first code
    except UnicodeDecodeError as e:
        raise FileLayoutError(f"{what}: not UTF-8 as the interface requires ({e})") from None
