"""The expert store: one directory of expert folders, shared by every replica.

Layout of ``<store>/``::

    GENERATION             {"generation": n}; bumped on every publish/delete (replicas poll it)
    <name>/                an expert folder (experts.expert) plus, optionally,
    <name>/exemplars.json  ["example prompt", ...] for the routers
    .retired/<name>@<digest>/  a replaced or deleted version, kept RETIRE_GRACE_S so that
                           requests admitted before the change finish on it
    .staging-<pid>-*/      in-flight publishes (removed on open once their process is gone)

Publishing is atomic: the expert is written into a staging folder, fsynced and
renamed into place (a replacement is swapped in with one atomic exchange), so a
reader sees a whole expert, old or new, never none. Every expert must have been
made for this store's base (fingerprint and shapes); others are refused.
``load_version(name, digest)`` finds the version a request was planned with,
current or retired, and checks its digests.
Registration sources (``import_source``): an already-compressed expert folder,
a PEFT LoRA adapter (kept exactly as its factors, lowrank codec) or a full
fine-tuned HF model (task vector compressed with the given method).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deltaserve.experts.atomic import exchange, fsync_tree, pid_alive, write_json_atomic
from deltaserve.experts.expert import (MANIFEST_FILE, NAME_PATTERN, TENSORS_FILE, BaseMismatchError, Expert, ExpertFormatError,
                            ExpertManifest, load_expert, load_pinned)
from deltaserve.experts.sources import Compression, save_lora_expert, score_stage
from deltaserve.experts.taskvector import _shapes, base_fingerprint

GENERATION_FILE = "GENERATION"
EXEMPLARS_FILE = "exemplars.json"
LOCK_FILE = ".lock"
RETIRED_DIR = ".retired"
RETIRE_GRACE_S = 600.0
STAGING_PREFIX = ".staging-"
ORPHAN_STAGING_S = 3600.0   # staging of an unknown process (another host) is removed after this long
MAX_EXEMPLARS = 10_000
MAX_EXEMPLAR_CHARS = 4_000


class _Moved(Exception):
    """The folder a reader opened no longer held the version it looked for (replaced in between)."""


class StoreError(ValueError):
    """A store operation was refused; the message says why (safe to show to API clients)."""


class ExpertExistsError(StoreError):
    pass


class UnknownExpertError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def source_kind(path: Path) -> str:
    """'expert', 'lora' or 'full', from the marker files of a directory."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"{path} is not a directory")
    if (path / MANIFEST_FILE).is_file():
        return "expert"
    if (path / "adapter_config.json").is_file():
        return "lora"
    if (path / "config.json").is_file():
        return "full"
    raise StoreError(f"{path} is neither an expert folder (manifest.json), a PEFT adapter "
                     "(adapter_config.json) nor an HF model (config.json)")


class ExpertStore:
    def __init__(self, root: Path, base_dir: Path) -> None:
        self.root = Path(root)
        self.base_dir = Path(base_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint = base_fingerprint(self.base_dir)
        self.shapes = _shapes(self.base_dir)
        self.collect_garbage()

    def collect_garbage(self, grace_s: float = RETIRE_GRACE_S) -> list[Path]:
        """Remove leftovers: staging folders whose process is gone (or, for another host's, older than
        ORPHAN_STAGING_S), trash, and retired versions older than ``grace_s``. Live staging of other
        processes on this host is left alone."""
        now, removed = time.time(), []
        for path in self.root.glob(f"{STAGING_PREFIX}*"):
            pid = path.name[len(STAGING_PREFIX):].split("-", 1)[0]
            alive = pid_alive(int(pid)) if pid.isdigit() else False
            if not alive and (pid.isdigit() or now - _mtime(path) > ORPHAN_STAGING_S):
                removed.append(path)
        removed += list(self.root.glob(".trash-*"))
        removed += [p for p in (self.root / RETIRED_DIR).glob("*@*") if now - _mtime(p) > grace_s]
        for path in removed:
            shutil.rmtree(path, ignore_errors=True)
        return removed

    # ------------------------------------------------------------------ reading
    def generation(self) -> int:
        try:
            return int(json.loads((self.root / GENERATION_FILE).read_text())["generation"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError) as err:
            raise StoreError(f"{self.root / GENERATION_FILE} is corrupt: {err}") from err

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file())

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
        for path in (self.path(name), *self._retired_paths(name, digest)):
            if _manifest_digest(path) == digest:
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

    def _retired_paths(self, name: str, digest: str) -> list[Path]:
        """The retired copies of that version, newest first (a version retired twice has two: each
        retirement gets its own folder, since a reader may hold either open)."""
        found = (self.root / RETIRED_DIR).glob(f"{check_name(name)}@{digest[:16]}.*")
        return sorted(found, key=_mtime, reverse=True)

    def _retire(self, path: Path, name: str) -> None:
        """Move a replaced or deleted version aside (kept RETIRE_GRACE_S for requests still using it)."""
        try:
            digest = load_expert(path).manifest.sha256.get(TENSORS_FILE, uuid.uuid4().hex)
        except ExpertFormatError:
            digest = uuid.uuid4().hex
        target = self.root / RETIRED_DIR / f"{check_name(name)}@{digest[:16]}.{uuid.uuid4().hex[:8]}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        os.utime(target)   # the grace period counts from retirement

    def exemplars(self, name: str) -> list[str]:
        path = self.path(name) / EXEMPLARS_FILE
        if not path.is_file():
            return []
        try:
            texts = json.loads(path.read_text())
        except ValueError as err:
            raise StoreError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise StoreError(f"{path}: must be a JSON list of strings")
        return texts

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

    def _bump(self) -> int:
        generation = self.generation() + 1
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
                self._install(stage, target, name, replace)
                self._bump()
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
        self._retire(stage, name)

    def delete(self, name: str) -> None:
        target = self.path(name)
        with self._locked():
            if not (target / MANIFEST_FILE).is_file():
                raise UnknownExpertError(f"unknown expert {name!r}; known experts: {self.names()}")
            self._retire(target, name)
            self._bump()

    def set_exemplars(self, name: str, texts: Sequence[str]) -> None:
        self.load(name)
        with self._locked():
            write_json_atomic(self.path(name) / EXEMPLARS_FILE, check_exemplars(texts), sort_keys=False)
            self._bump()

    # ------------------------------------------------------------------ importing
    def import_source(self, name: str, source: Path, *, compression: Compression | None = None,
                      exemplars: Sequence[str] | None = None, replace: bool = False,
                      objective: Any = None, trainer: Any = None) -> ExpertManifest:
        """Register ``source`` (expert folder, PEFT adapter or HF fine-tune) as expert ``name``."""
        source = Path(source)
        kind = source_kind(source)
        if kind == "expert":
            if compression is not None:
                raise StoreError("an already-compressed expert folder is stored as is; drop `compression`")

            def write(stage: Path) -> None:
                manifest = load_expert(source).manifest  # header check before copying anything
                shutil.copytree(source, stage)
                if manifest.name != name:  # the store's name wins: rewrite the manifest's name field
                    raw = json.loads((stage / MANIFEST_FILE).read_text())
                    raw["name"] = name
                    (stage / MANIFEST_FILE).write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        elif kind == "lora" and compression is None:
            def write(stage: Path) -> None:
                save_lora_expert(self.base_dir, source, stage, name=name, fingerprint=self.fingerprint)
        else:
            from deltaserve.experts.compress import compress_expert, extract

            comp = compression or Compression()
            tv = extract(self.base_dir, source if kind == "full" else None, source if kind == "lora" else None)
            if tv.base_fingerprint != self.fingerprint:
                raise BaseMismatchError(f"{source} was not made from this store's base")

            def write(stage: Path) -> None:
                compress_expert(tv, stage, name=name, method=comp.method, options=comp.options, objective=objective,
                                trainer=trainer, task=comp.task, value_dtype=comp.torch_dtype, progress=False)
        return self.publish(name, write, exemplars=exemplars, replace=replace, objective=objective)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise StoreError(f"expert name {name!r} must match {NAME_PATTERN} (lowercase letters, digits, '_', '.', '-')")
    return name


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


__all__ = ["Compression", "ExpertExistsError", "ExpertStore", "StoreError", "UnknownExpertError",
           "ExpertFormatError", "BaseMismatchError", "save_lora_expert", "source_kind", "check_name"]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _manifest_digest(path: Path) -> str | None:
    """The tensors' sha256 the manifest in ``path`` records (None if unreadable)."""
    try:
        return json.loads((path / MANIFEST_FILE).read_text())["sha256"][TENSORS_FILE]
    except (OSError, ValueError, KeyError, TypeError):
        return None
