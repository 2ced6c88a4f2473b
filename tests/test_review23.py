"""Review 23: this session's changes tried from outside (the new-key filter and the accept's own search of the
archive, a quiet stop, the bureau link's TLS reads). Each story compares what the HIS heard, the journal and the
bureau's ledger. What held is in the commit that added this file."""

from __future__ import annotations

from typing import Any

from fep.sim.world import ZHANG, Visit, World, said, wait_for
from tests.test_archive import AGE, age
from tests.test_breaker17 import family, taken_in_after_the_lead
from tests.test_breaker22 import his_key, not_settled_again, reversed_under_its_key
from tests.test_catalog import RETIRED, visit_with_hospital_codes

AMOX = "XA01AAA001A001010100001"


def _map(world: World, national: str) -> None:
    csv = world.dir / "map.csv"
    csv.write_text(f"hosp_code,national_code\nH-AMOX,{national}\n", encoding="utf-8")
    done = world.cli("catalog", "map", "import", str(csv))
    assert done.returncode == 0, done.stdout + done.stderr


def _archived_upload_taken_in_after_the_start(world: World, pg_url: str) -> tuple[dict[str, Any], str,
                                                                                   dict[str, Any]]:
    """A pair on PostgreSQL ran a release before the archive tables. Zhang's fees went up under the HIS's key
    (hospital codes only: fep filled the national ones) and were answered; that release's nightly run moved
    the upload into the month's file beside node a's journal.path, which was on the backup disk at the
    upgrade and is restored once node a leads; tonight's archive run takes it in (the leader's filter of
    keys never hears of it). Returns the upload's input, its key and what the HIS heard first."""
    world.share_journal(pg_url)
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    assert world.cli("catalog", "sync").returncode == 0
    _map(world, AMOX)
    _, input_ = visit_with_hospital_codes(world.his, ["H-AMOX"])
    key = his_key()
    first = world.his.call("2204", input_, msgid=key)
    assert first["infcode"] == 0, said(first)
    world.stop()
    age(world, AGE)
    taken_in_after_the_lead(world, [first["fep_msgid"]])
    return input_, key, first


def _heard_the_stored_answer(world: World, again: dict[str, Any], first: dict[str, Any], key: str) -> None:
    under_key = [(r["msgid"], r["state"]) for r in world.journal("his_msgid = ?", (key,))]
    uploads = [(s["msgid"], s.get("state")) for s in world.ledger()]
    facts = f"HIS heard {said(again)} under fep_msgid {again.get('fep_msgid')}; journal holds {under_key} under " \
            f"{key}; bureau ledger {uploads}; bureau answers {world.sim_answers()}"
    assert again["infcode"] == 0 and again.get("fep_msgid") == first["fep_msgid"], facts
    assert not under_key, facts


# ---- what broke ---------------------------------------------------------------------------------------------------

def test_an_archived_fee_upload_sent_again_after_its_code_was_remapped_hears_its_stored_answer(
        world: World, pg_url: str) -> None:
    """The upload of _archived_upload_taken_in_after_the_start went up and was answered. Since, the hospital's
    mapping of H-AMOX changed (here: to a code the catalog has retired). The HIS's retry job sends the upload
    again under its key, byte for byte: same msgid and same payload must hear the stored answer, as it did
    before 331e6e0 (the look-up came before any check). Today the filter calls the key new, nothing is looked
    up, and the engine maps the fee codes and judges them before the accept ever searches the archive
    (KeyInArchive): the HIS is refused its own answered upload, and told the line cannot go."""
    input_, key, first = _archived_upload_taken_in_after_the_start(world, pg_url)
    _map(world, RETIRED)
    again = world.his.call("2204", input_, msgid=key)
    _heard_the_stored_answer(world, again, first, key)


def test_an_archived_settlement_sent_again_after_a_field_became_required_hears_its_stored_answer(
        world: World, pg_url: str) -> None:
    """A pair on PostgreSQL ran a release before the archive tables; its nightly run moved Zhang's reversed
    settlement (the HIS's uuid key; fep reversed it when its answer was lost) into the month's file beside node
    a's journal.path, restored there once node a leads and taken in by tonight's archive run. Meanwhile the
    hospital's trades.yaml came to require a field of 2207 the HIS's old job does not send. The retry job sends
    the settlement again under its key, byte for byte: it must hear that trade (fep_msgid and all), as the
    engine's own comment has it ("a trade journalled before a field was required is known"), and did before
    331e6e0. Today the filter calls the key new, and the input checks refuse it (400) before the accept
    searches the archive: the HIS hears a refusal of a settlement it does not know is reversed."""
    world.share_journal(pg_url)
    visit, key, first = reversed_under_its_key(world)
    world.stop()
    world.configure(fep={"journal": {"keep_days": 30}},
                    trades={"2207": {"required": ["data.psn_no", "data.mdtrt_id", "data.fulamt_ownpay_amt"]}})
    age(world, AGE)
    taken_in_after_the_lead(world, family(world, first["fep_msgid"]))

    again = visit.settle(msgid=key)
    facts = f"HIS heard {said(again)} under fep_msgid {again.get('fep_msgid')}; bureau " \
            f"{[(s['msgid'], s['state']) for s in world.ledger()]}"
    assert again.get("fep_msgid") == first["fep_msgid"], facts
    not_settled_again(world, again, first)


def test_an_archived_settlement_the_bureau_holds_sent_again_hears_it_is_settled_not_refused(
        world: World, pg_url: str) -> None:
    """As above, but Zhang's settlement was answered and stands at the bureau (paid). Its month's file, left by
    the earlier release, is taken in after node a leads; trades.yaml has come to require a field of 2207 the
    HIS's old retry job does not send, and the job sends the settlement again under its key, byte for byte. It
    must hear that settlement (infcode 0, its fep_msgid): told instead that fep refused it ("input is missing
    ..."), an HIS records the visit as not settled and the cashier settles it again under a new msgid, a
    second settlement at the bureau. Before 331e6e0 the look-up came first and the HIS heard the settlement."""
    world.share_journal(pg_url)
    world.configure(fep={"journal": {"keep_days": 30}})
    world.start()
    wait_for(lambda: world.leading() == "a", what="node a to lead")
    visit = Visit(world.his, ZHANG)
    visit.up_to_settlement()
    key = his_key()
    first = visit.settle(msgid=key)
    assert first["infcode"] == 0, said(first)
    world.stop()
    world.configure(fep={"journal": {"keep_days": 30}},
                    trades={"2207": {"required": ["data.psn_no", "data.mdtrt_id", "data.fulamt_ownpay_amt"]}})
    age(world, AGE)
    taken_in_after_the_lead(world, [first["fep_msgid"]])

    again = visit.settle(msgid=key)
    facts = f"HIS heard {said(again)} under fep_msgid {again.get('fep_msgid')}; bureau " \
            f"{[(s['msgid'], s['state']) for s in world.ledger()]}"
    assert again["infcode"] == 0 and again.get("fep_msgid") == first["fep_msgid"], facts
    assert not world.journal("his_msgid = ?", (key,)), facts
