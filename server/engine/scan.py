"""Following the store: the experts an engine serves, re-reading only those whose version changed.

A store of 10,000 experts changes one expert at a time; opening, parsing and checking every manifest on every
change made each registration O(store). ``scan_store`` stats each expert's manifest (``ExpertStore.stamps``) and
reads only the experts whose stamp moved since the last scan, plus those that could not be served then.
Weights stay on disk until a request needs them.
"""

from __future__ import annotations

from deltaserve.experts.store import ExpertStore, Stamp
from deltaserve.server.engine.types import ExpertInfo


def scan_store(store: ExpertStore, known: dict[str, ExpertInfo], stamps: dict[str, Stamp]
               ) -> tuple[dict[str, ExpertInfo], dict[str, str], dict[str, Stamp]]:
    """``(experts, unavailable: name -> why, stamps)`` now, given the experts and stamps of the last scan. A version
    seen for the first time has its manifest, headers and base checked here; its files' digests are checked when
    it is first loaded to be served (``ExpertStore.load_version``), so a replica starting on 10,000 experts does
    not read all their weights (a corrupted one answers 503 and is marked unavailable then)."""
    fresh: dict[str, ExpertInfo] = {}
    broken: dict[str, str] = {}
    now = store.stamps()
    for name, stamp in sorted(now.items()):
        old = known.get(name)
        if old is not None and stamps.get(name) == stamp:
            fresh[name] = old
            continue
        try:
            expert = store.load(name)
        except (ValueError, OSError) as err:
            broken[name] = str(err)
            continue
        fresh[name] = ExpertInfo(name, expert.manifest, store.path(name))
    return fresh, broken, now
