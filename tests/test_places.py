"""The insured regions fep fills a trade's insuplc_admdvs from: read from the journal once per person, then kept,
and never older than the last 1101 this node journalled (tests/rooms.py's bench: a real journal)."""

from __future__ import annotations

from twisted.internet import defer

from fep.journal import answer_with_place
from fep.places import InsuredPlaces
from tests.rooms import Bench, bench  # noqa: F401,F811 (the fixture)


def journal_1101(bench: Bench, psn: str, place: str) -> None:
    """A 1101 answered, its region journalled with it (as the engine journals one), nothing told to the places."""
    row = bench.accept("1101", {"psn_no": psn})
    bench.run(bench.journal.run(answer_with_place(row.msgid, {"answer": "{}"}, psn, place)))


def test_a_persons_region_is_read_once_and_kept(bench: Bench) -> None:
    places = InsuredPlaces(bench.journal)
    journal_1101(bench, "P1", "430100")
    assert bench.run(places.of("P1")) == "430100"
    journal_1101(bench, "P1", "110100")  # behind its back: what it kept is what it answers
    assert bench.run(places.of("P1")) == "430100"
    places.forget()  # as at a takeover
    assert bench.run(places.of("P1")) == "110100"


def test_a_1101_journalled_by_this_node_is_what_the_next_trade_hears(bench: Bench) -> None:
    places = InsuredPlaces(bench.journal)
    assert bench.run(places.of("P2")) is None  # no 1101 yet
    journal_1101(bench, "P2", "440100")
    places.journalled("P2", "440100")
    assert bench.run(places.of("P2")) == "440100"


def test_a_read_under_way_when_a_1101_is_journalled_does_not_put_the_older_region_back(bench: Bench) -> None:
    places = InsuredPlaces(bench.journal)
    journal_1101(bench, "P3", "430100")
    reading = defer.ensureDeferred(places.of("P3"))  # its answer comes on the bench's next pump
    places.journalled("P3", "320100")
    assert bench.run(reading) == "430100"  # the read's own answer, as the journal held it then
    assert bench.run(places.of("P3")) == "320100"


def test_it_keeps_the_persons_asked_for_last(bench: Bench) -> None:
    places = InsuredPlaces(bench.journal, kept=2)
    for psn in ("P4", "P5", "P6"):
        places.journalled(psn, "430100")
    journal_1101(bench, "P4", "110100")
    assert bench.run(places.of("P4")) == "110100"  # P4 went first: read afresh
