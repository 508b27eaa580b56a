"""The lifecycle of an expert's versions in a store folder: retired copies and leftovers.

A replaced or deleted version moves to ``<store>/.retired/<name>@<digest16>.<random>/`` and stays
``RETIRE_GRACE_S`` there, so requests admitted before the change finish on it (experts.store finds
a planned version there by its digest). A publish stages into ``<store>/.staging-<pid>-*/``; what a
dead process (or, for another host's, anything older than ``ORPHAN_STAGING_S``) left is removed.
Callers hold the store's lock around ``retire``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

from deltaserve.experts.atomic import pid_alive
from deltaserve.experts.expert import load_expert
from deltaserve.experts.manifest import MANIFEST_FILE, TENSORS_FILE, ExpertFormatError

RETIRED_DIR = ".retired"
RETIRE_GRACE_S = 600.0
STAGING_PREFIX = ".staging-"
ORPHAN_STAGING_S = 3600.0   # staging of an unknown process (another host) is removed after this long


def collect_garbage(root: Path, grace_s: float = RETIRE_GRACE_S) -> list[Path]:
    """Remove leftovers: staging folders whose process is gone (or, for another host's, older than
    ORPHAN_STAGING_S), trash, and retired versions older than ``grace_s``. Live staging of other
    processes on this host is left alone."""
    now, removed = time.time(), []
    for path in root.glob(f"{STAGING_PREFIX}*"):
        pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
        alive = pid_alive(int(pid)) if pid.isdigit() else False
        if not alive and (pid.isdigit() or now - _mtime(path) > ORPHAN_STAGING_S):
            removed.append(path)
    removed += list(root.glob(".trash-*"))
    removed += [p for p in (root / RETIRED_DIR).glob("*@*") if now - _mtime(p) > grace_s]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def retired_paths(root: Path, name: str, digest: str) -> list[Path]:
    """The retired copies of that version, newest first (a version retired twice has two: each
    retirement gets its own folder, since a reader may hold either open)."""
    found = (root / RETIRED_DIR).glob(f"{name}@{digest[:16]}.*")
    return sorted(found, key=_mtime, reverse=True)


def retire(root: Path, path: Path, name: str) -> None:
    """Move a replaced or deleted version aside (kept RETIRE_GRACE_S for requests still using it)."""
    try:
        digest = load_expert(path).manifest.sha256.get(TENSORS_FILE, uuid.uuid4().hex)
    except ExpertFormatError:
        digest = uuid.uuid4().hex
    target = root / RETIRED_DIR / f"{name}@{digest[:16]}.{uuid.uuid4().hex[:8]}"
    target.parent.mkdir(exist_ok=True)
    os.replace(path, target)
    os.utime(target)   # the grace period counts from retirement


def manifest_digest(path: Path) -> str | None:
    """The tensors' sha256 the manifest in ``path`` records (None if unreadable)."""
    try:
        return json.loads((path / MANIFEST_FILE).read_text())["sha256"][TENSORS_FILE]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()
