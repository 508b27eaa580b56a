"""Following the store: the experts an engine serves, re-reading only those that changed.

A store of 10,000 experts changes one expert at a time. ``follow_store`` reads the store's journal
(experts.journal: which experts each generation changed) and re-reads those experts only; without a usable
journal position (a fresh start, a store written by an older deltaserve) it stats every expert
(``ExpertStore.stamps``) and re-reads those whose stamp moved since the last scan, plus those that could not be
served then. Weights stay on disk until a request needs them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltaserve.experts import journal
from deltaserve.experts.store import ExpertStore, Stamp
from deltaserve.server.engine.types import ExpertInfo


@dataclass(frozen=True)
class Followed:
    """The store as last followed: its servable experts, the unservable ones (name -> why), each expert's stamp
    and the journal position."""

    experts: dict[str, ExpertInfo] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    stamps: dict[str, Stamp] = field(default_factory=dict)
    cursor: journal.Cursor | None = None


def follow_store(store: ExpertStore, last: Followed, generation: int) -> Followed:
    """The store at ``generation`` (read ``store.generation()`` first). A version seen for the first time has its
    manifest, headers and base checked here; its files' digests are checked when it is first loaded to be served
    (``ExpertStore.load_version``), so a replica starting on 10,000 experts does not read all their weights (a
    corrupted one answers 503 and is marked unavailable then)."""
    names, cursor = journal.changes(store.root, last.cursor, generation)
    if names is None:   # every expert, by its stamp
        stamps = store.stamps()
        fresh: dict[str, ExpertInfo] = {}
        broken: dict[str, str] = {}
        todo: list[str] = list(stamps)
    else:               # the journal's names only
        stamps = {n: s for n, s in last.stamps.items() if n not in names}
        stamps.update({n: s for n in names if (s := store.stamp(n)) is not None})
        fresh = {n: info for n, info in last.experts.items() if n not in names}
        broken = {n: why for n, why in last.unavailable.items() if n not in names}
        todo = [n for n in names if n in stamps]
    for name in sorted(todo):
        old = last.experts.get(name)
        if old is not None and last.stamps.get(name) == stamps[name]:
            fresh[name] = old
            continue
        try:
            expert = store.load(name)
        except (ValueError, OSError) as err:
            broken[name] = str(err)
            continue
        fresh[name] = ExpertInfo(name, expert.manifest, store.path(name))
    return Followed(fresh, broken, stamps, cursor)
