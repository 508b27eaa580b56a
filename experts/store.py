"""The expert store: one directory of expert folders, shared by every replica.

Layout of ``<store>/``::

    GENERATION             {"generation": n}; bumped on every publish/delete (replicas poll it)
    JOURNAL                the experts each generation changed (experts.journal: replicas follow in O(change))
    RECIPES                {"support-bot": "0.7*tone+0.3*sql", ...}: named recipes (experts.named_recipes)
    <name>/                an expert folder (experts.expert) plus, optionally,
    <name>/exemplars.json  ["example prompt", ...] for the routers
    .retired/<name>@<digest>/  a replaced or deleted version, kept RETIRE_GRACE_S so that
                           requests admitted before the change finish on it
    .staging-<pid>-*/      in-flight publishes (removed on open once their process is gone)
    .features/<encoder>/   the routers' exemplar features, by text (router.index.FeatureCache; a cache)

Publishing is atomic: the expert is written into a staging folder, fsynced and
renamed into place (a replacement is swapped in with one atomic exchange), so a
reader sees a whole expert, old or new, never none. Every expert must have been
made for this store's base (fingerprint and shapes); others are refused.
``load_version(name, digest)`` finds the version a request was planned with,
current or retired, and checks its digests.
Registration sources (``import_source``): experts.sources.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deltaserve.experts import journal
from deltaserve.experts.atomic import exchange, fsync_tree, write_json_atomic
from deltaserve.experts.expert import Expert, load_expert, load_pinned
from deltaserve.experts.manifest import MANIFEST_FILE, TENSORS_FILE, ExpertManifest
from deltaserve.experts.named_recipes import NamedRecipes
from deltaserve.experts.store_errors import ExpertExistsError, StoreError, UnknownExpertError, check_name
from deltaserve.experts.sources import Compression, score_stage, source_writer
from deltaserve.experts.taskvector import _shapes, base_fingerprint
from deltaserve.experts.versions import (RETIRE_GRACE_S, STAGING_PREFIX, collect_garbage, manifest_digest, retire,
                                         retired_paths)

GENERATION_FILE = "GENERATION"
EXEMPLARS_FILE = "exemplars.json"
LOCK_FILE = ".lock"
MAX_EXEMPLARS = 10_000
MAX_EXEMPLAR_CHARS = 4_000
Stamp = tuple[int, int, int, int]   # an expert folder's (st_dev, st_ino, st_mtime_ns) and its manifest's size


class _Moved(Exception):
    """The folder a reader opened no longer held the version it looked for (replaced in between)."""


class ExpertStore(NamedRecipes):
    def __init__(self, root: Path, base_dir: Path) -> None:
        self.root = Path(root)
        self.base_dir = Path(base_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = base_fingerprint(self.base_dir)
        self.shapes = _shapes(self.base_dir)
        self._exemplars: dict[str, tuple[Stamp, list[str]]] = {}   # name -> (file stamp, texts)
        self.collect_garbage()

    def collect_garbage(self, grace_s: float = RETIRE_GRACE_S) -> list[Path]:
        """Remove dead processes' staging folders and retired versions past their grace (experts.versions)."""
        return collect_garbage(self.root, grace_s)

    # ------------------------------------------------------------------ reading
    def generation(self) -> int:
        try:
            return int(json.loads((self.root / GENERATION_FILE).read_text())["generation"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{self.root / GENERATION_FILE} is corrupt: {err}") from err

    def names(self) -> list[str]:
        return sorted(self.stamps())

    def stamps(self) -> dict[str, Stamp]:
        """Every expert's name and the stamp of its current version (``stamp``): a reader re-reads only experts
        whose stamp moved (two ``stat`` calls each instead of opening, parsing and checking every manifest)."""
        out: dict[str, Stamp] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(".") and (stamp := self.stamp(entry.name)) is not None:
                    out[entry.name] = stamp
        return out

    def stamp(self, name: str) -> Stamp | None:
        """(device, inode, mtime) of expert ``name``'s folder and its manifest's size, None if it has none: a
        publish or replacement swaps in a new folder (a new inode), new exemplars change its mtime."""
        try:
            st = os.stat(self.root / name)
            size = os.stat(self.root / name / MANIFEST_FILE).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_dev, st.st_ino, st.st_mtime_ns, size

    def path(self, name: str) -> Path:
        check_name(name)
        return self.root / name

    def load(self, name: str, *, verify: bool = False, digests: bool = False) -> Expert:
        """The current version of ``name``, pinned like ``load_version``'s (a replacement landing while it
        is read cannot mix one version's manifest with another's tensors); ``digests`` checks the files'
        sha256, ``verify`` all data."""
        def find() -> Path:
            path = self.path(name)
            if not (path / MANIFEST_FILE).is_file():
                raise UnknownExpertError(f"unknown expert {name!r}; known experts: {self.names()}")
            return path
        return self._load_pinned(find, lambda e: e.check_digests() if digests and not verify else None, verify)

    def version_dir(self, name: str, digest: str) -> Path:
        """The folder holding the version of ``name`` whose tensors have sha256 ``digest``: the current
        one, or a retired one still within its grace period."""
        return self._settled(lambda: self._find_version(name, digest))

    def _find_version(self, name: str, digest: str) -> Path:
        for path in (self.path(name), *retired_paths(self.root, check_name(name), digest)):
            if manifest_digest(path) == digest:
                return path
        raise UnknownExpertError(f"expert {name!r} version {digest[:12]} is no longer in the store")

    def load_version(self, name: str, digest: str) -> Expert:
        """That version loaded, checked against this store's base and its digests, and *pinned*: it reads
        its files through an open handle on its folder (``/proc/self/fd``), so a replacement swapped in
        at ``<name>/`` or its retirement to ``.retired/`` while it is in use does not change what it reads."""
        def check(expert: Expert) -> None:
            if expert.manifest.sha256.get(TENSORS_FILE) != digest:
                raise _Moved(f"expert {name!r} version {digest[:12]} was replaced while it was opened")
            expert.check_digests()
        return self._load_pinned(lambda: self._find_version(name, digest), check)

    def _settled(self, find: Any, locked: bool = False) -> Any:
        """``find()``, or if it finds nothing, ``find()`` again holding the store's lock: a replacement or
        deletion is two renames (swap in, then retire the old version), so a version can be briefly in
        neither place a reader looks; every install and retirement holds the lock."""
        if not locked:
            try:
                return find()
            except (UnknownExpertError, FileNotFoundError, NotADirectoryError):
                pass
        with self._locked(reader=True):
            return find()

    def _load_pinned(self, find: Any, check: Any, verify: bool = False) -> Expert:
        """The expert in the folder ``find()`` names, pinned (``experts.expert.load_pinned``), checked against
        this store's base and by ``check(expert)``. If it was swapped out between being found and opened, it
        is found and opened again holding the lock."""
        def checked(expert: Expert) -> None:
            expert.check_base(self.fingerprint, self.shapes)
            check(expert)

        for locked in (False, True):
            fd = self._settled(lambda: os.open(find(), os.O_RDONLY | os.O_DIRECTORY), locked)
            try:
                return load_pinned(fd, checked, verify=verify)
            except _Moved as err:
                if locked:
                    raise UnknownExpertError(str(err)) from err
        raise AssertionError("unreachable")

    def exemplars(self, name: str) -> list[str]:
        """The exemplar prompts of ``name`` (a copy; read again only when the file's stamp moved)."""
        path = self.path(name) / EXEMPLARS_FILE
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            self._exemplars.pop(name, None)
            return []
        stamp = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._exemplars.get(name)
        if cached is None or cached[0] != stamp:
            try:
                texts = json.loads(path.read_text())
            except ValueError as err:
                raise StoreError(f"{path}: not valid JSON ({err})") from err
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise StoreError(f"{path}: must be a JSON list of strings")
            cached = self._exemplars[name] = (stamp, texts)
        return list(cached[1])

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self, reader: bool = False) -> Iterator[None]:
        """The store's lock. A ``reader`` that may not open the lock file (a read-only mount of the store)
        goes on without it: nobody can write that store, so there is no install to wait for."""
        try:
            fh = open(self.root / LOCK_FILE, "a+")
        except OSError as err:
            if not reader or err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            yield
            return
        with fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _bump(self, names: Sequence[str] = ()) -> int:
        """The next generation, after journaling that it changes experts ``names`` (experts.journal)."""
        generation = self.generation() + 1
        journal.append(self.root, generation, names)
        write_json_atomic(self.root / GENERATION_FILE, {"generation": generation})
        return generation

    def publish(self, name: str, write: Any, *, exemplars: Sequence[str] | None = None,
                replace: bool = False, objective: Any = None) -> ExpertManifest:
        """Publish expert ``name``: ``write(stage_dir)`` writes the expert folder into ``stage_dir``.

        The staged expert is validated (data digests, base fingerprint, shapes)
        before it is renamed into place; a failure leaves the store untouched.
        """
        check_name(name)
        texts = check_exemplars(exemplars)
        target = self.root / name
        if target.exists() and not replace:
            raise ExpertExistsError(f"expert {name!r} already exists; delete it first or publish with replace")
        stage = self.root / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        try:
            write(stage)
            if objective is not None:
                score_stage(stage, objective)
            expert = load_expert(stage, verify=True)
            if expert.manifest.name != name:
                raise StoreError(f"the expert's manifest names it {expert.manifest.name!r}, not {name!r}")
            expert.check_base(self.fingerprint, self.shapes)
            if texts:
                write_json_atomic(stage / EXEMPLARS_FILE, texts, sort_keys=False)
            fsync_tree(stage)
            with self._locked():
                if name in self.recipes():
                    raise ExpertExistsError(f"{name!r} is a named recipe's name; delete it or pick another name")
                self._install(stage, target, name, replace)
                self._bump([name])
            return expert.manifest
        finally:
            shutil.rmtree(stage, ignore_errors=True)

    def _install(self, stage: Path, target: Path, name: str, replace: bool) -> None:
        """Put ``stage`` at ``target`` (with the lock held); a replaced version is swapped out atomically."""
        if not target.exists():
            os.rename(stage, target)
            return
        if not replace:
            raise ExpertExistsError(f"expert {name!r} already exists")
        if not exchange(stage, target):
            os.replace(target, stage.with_name(stage.name + "-old"))
            os.rename(stage, target)
            stage = stage.with_name(stage.name + "-old")
        retire(self.root, stage, check_name(name))

    def delete(self, name: str) -> None:
        target = self.path(name)
        with self._locked():
            if not (target / MANIFEST_FILE).is_file():
                raise UnknownExpertError(f"unknown expert {name!r}; known experts: {self.names()}")
            retire(self.root, target, check_name(name))
            self._bump([name])

    def set_exemplars(self, name: str, texts: Sequence[str]) -> None:
        self.load(name)
        with self._locked():
            write_json_atomic(self.path(name) / EXEMPLARS_FILE, check_exemplars(texts), sort_keys=False)
            self._bump([name])

    # ------------------------------------------------------------------ importing
    def import_source(self, name: str, source: Path, *, compression: Compression | None = None,
                      exemplars: Sequence[str] | None = None, replace: bool = False,
                      objective: Any = None, trainer: Any = None) -> ExpertManifest:
        """Register ``source`` (expert folder, PEFT adapter or HF fine-tune) as expert ``name``."""
        check_name(name)
        write = source_writer(self.base_dir, self.fingerprint, name, Path(source), compression, objective, trainer)
        return self.publish(name, write, exemplars=exemplars, replace=replace, objective=objective)


def check_exemplars(texts: Sequence[str] | None) -> list[str]:
    texts = list(texts or [])
    if len(texts) > MAX_EXEMPLARS:
        raise StoreError(f"at most {MAX_EXEMPLARS} exemplars per expert, got {len(texts)}")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise StoreError(f"exemplars[{i}] must be a non-empty string")
        if len(text) > MAX_EXEMPLAR_CHARS:
            raise StoreError(f"exemplars[{i}] is {len(text)} characters; the limit is {MAX_EXEMPLAR_CHARS}")
    return texts
