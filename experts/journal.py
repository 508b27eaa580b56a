"""The store's change journal: which experts each generation changed.

Every write to a store bumps its ``GENERATION``; replicas poll it and follow. Following a change by statting
every expert costs ~70 ms at 10,000 experts, per change. ``<store>/JOURNAL`` records, per generation, the experts
it changed (one JSON line: ``{"generation": 7, "names": ["sql-lora"]}``, appended and fsynced under the store's
lock before ``GENERATION`` moves), so a reader holding a ``Cursor`` reads the lines after it and re-reads those
experts only.

A reader without a cursor (a fresh start), or whose cursor no longer fits (the journal was started afresh, a
generation is missing: a store written by an older deltaserve), gets ``None``: scan everything, once, and go
on from the cursor it is handed. The journal starts afresh past ``MAX_JOURNAL_BYTES``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

JOURNAL_FILE = "JOURNAL"
MAX_JOURNAL_BYTES = 4 << 20   # ~100,000 changes; then the journal starts afresh (readers scan once)


@dataclass(frozen=True)
class Cursor:
    inode: int        # the journal file read (a journal started afresh is a new file)
    offset: int       # bytes of it read
    generation: int   # the generation the reader has followed up to


def append(root: Path, generation: int, names: Iterable[str]) -> None:
    """Record that ``generation`` changed ``names`` (the caller holds the store's lock)."""
    path = Path(root) / JOURNAL_FILE
    try:
        if path.stat().st_size > MAX_JOURNAL_BYTES:
            fresh = path.with_name(f".{JOURNAL_FILE}.{os.getpid()}")
            fresh.write_bytes(b"")
            os.replace(fresh, path)
    except FileNotFoundError:
        pass
    line = json.dumps({"generation": generation, "names": sorted(set(names))}) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def changes(root: Path, cursor: Cursor | None, generation: int) -> tuple[set[str] | None, Cursor | None]:
    """The experts changed after ``cursor`` up to ``generation`` (read ``GENERATION`` first), and the cursor past
    them; ``None`` for the names when only a full scan can tell (then the cursor returned is where to go on from
    after that scan)."""
    path = Path(root) / JOURNAL_FILE
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None, None
    with fh:
        size, inode = os.fstat(fh.fileno()).st_size, os.fstat(fh.fileno()).st_ino
        if cursor is None or cursor.inode != inode or cursor.offset > size:
            return None, Cursor(inode, size, generation)
        fh.seek(cursor.offset)
        data = fh.read(size - cursor.offset)
    names: set[str] = set()
    offset, followed = cursor.offset, cursor.generation
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break   # a line being appended
        try:
            record = json.loads(line)
            g, changed = int(record["generation"]), record["names"]
        except (ValueError, KeyError, TypeError):
            return None, Cursor(inode, size, generation)
        if g > generation:
            break
        if g != followed + 1:
            return None, Cursor(inode, size, generation)
        names.update(str(n) for n in changed)
        offset, followed = offset + len(line), g
    if followed != generation:
        return None, Cursor(inode, size, generation)
    return names, Cursor(inode, offset, generation)
