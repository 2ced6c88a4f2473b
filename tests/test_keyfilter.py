"""The filter that spares a new trade's key its journal lookup: it may say "maybe" of a key never seen, and
must never say "new" of one the journal holds, even one committed while the journal's keys are being read."""

from __future__ import annotations

import uuid

from fep.keyfilter import KeyFilter, KnownKeys


def keys(n: int) -> list[str]:
    return [uuid.uuid4().hex for _ in range(n)]


def test_every_key_put_in_is_found_and_few_others_are() -> None:
    held, others = keys(100_000), keys(10_000)
    f = KeyFilter()
    f.update(held)
    assert all(k in f for k in held)
    assert sum(k in f for k in others) < 100  # (at 100,000 keys about 1 in 500,000 would be)


def test_until_the_journal_has_been_read_every_key_may_be_held() -> None:
    known = KnownKeys()
    assert known.may_hold("anything")
    known.reading()
    assert known.may_hold("anything")


def test_a_key_committed_while_the_journal_is_read_is_held_after_the_reading() -> None:
    known = KnownKeys()
    reading = known.reading()
    stored = KeyFilter()
    stored.update(["in-the-snapshot"])
    known.committed(["after-the-snapshot"])
    known.read(reading, stored)
    known.committed(["after-the-reading"])
    assert all(known.may_hold(k) for k in ("in-the-snapshot", "after-the-snapshot", "after-the-reading"))
    assert not known.may_hold("never-journalled")


def test_a_reading_overtaken_by_a_later_one_is_not_used() -> None:
    """Keys kept since the first reading began were handed to the second: the first's result lacks them."""
    known = KnownKeys()
    first = known.reading()
    known.committed(["between"])
    second = known.reading()
    known.read(first, KeyFilter())
    assert known.may_hold("never-journalled")  # still unread: the first reading's result was dropped
    known.read(second, KeyFilter())
    assert not known.may_hold("never-journalled")


def test_a_node_that_stopped_leading_or_could_not_read_its_keys_forgets_them_and_keeps_none() -> None:
    known = KnownKeys()
    reading = known.reading()
    known.forget()
    known.committed(["after-the-failure"] * 1000)
    known.read(reading, KeyFilter())
    assert known.may_hold("never-journalled") and known._kept is None


def test_fep_status_says_whether_new_keys_are_spared_their_lookup_and_why_not() -> None:
    known = KnownKeys()
    assert known.state.startswith("not read")
    reading = known.reading()
    assert known.state.startswith("being read")
    known.read(reading, KeyFilter())
    assert known.state.startswith("read:")
    known.failed(known.reading(), "the reading failed (OperationalError: disk I/O error; see the log)")
    assert known.state == "the reading failed (OperationalError: disk I/O error; see the log): every key is looked up"


def test_an_earlier_reading_that_failed_leaves_a_later_one_under_way_alone() -> None:
    known = KnownKeys()
    first = known.reading()
    second = known.reading()  # (a takeover began another)
    known.committed(["during-the-second"])
    known.failed(first, "the reading failed (OperationalError: database is locked; see the log)")
    known.read(second, KeyFilter())
    assert known.may_hold("during-the-second") and not known.may_hold("never-journalled")
    assert known.state.startswith("read:")
