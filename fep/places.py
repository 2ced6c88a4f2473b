"""Each person's insured region (参保地) as the journal holds it, from their last 1101: read once, then kept.

A trade the HIS sends without insuplc_admdvs is filled from it (the bureau routes a 异地 patient's trade by it),
and nearly every 2206/2207 of a local patient asks: a decision reader's round trip each. Only this node's
1101 answers change it while it leads, and each is told here as it is journalled; a node that takes the
lead forgets what it kept (the other node journalled 1101s meanwhile)."""

from __future__ import annotations

from collections import OrderedDict

from fep.journal import Journal, insured_place

KEPT = 50_000  # persons: a few MB; the least recently asked go first


class InsuredPlaces:
    def __init__(self, journal: Journal, kept: int = KEPT) -> None:
        self._journal = journal
        self._kept = kept
        self._places: OrderedDict[str, str | None] = OrderedDict()  # None: no 1101 of theirs journalled
        self._changes = 0  # a read that began before a change may hold the old region: it is not kept

    async def of(self, psn_no: str) -> str | None:
        if psn_no in self._places:
            self._places.move_to_end(psn_no)
            return self._places[psn_no]
        changes = self._changes
        place = await self._journal.read(insured_place(psn_no), decides=True)
        if changes == self._changes:
            self._keep(psn_no, place)
        return place

    def journalled(self, psn_no: str, place: str) -> None:
        """A 1101's answer naming the person's region is durable."""
        self._changes += 1
        self._keep(psn_no, place)

    def forget(self) -> None:
        self._changes += 1
        self._places.clear()

    def _keep(self, psn_no: str, place: str | None) -> None:
        self._places[psn_no] = place
        self._places.move_to_end(psn_no)
        while len(self._places) > self._kept:
            self._places.popitem(last=False)
