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
import fcntl
import json
import os
import re
import shutil
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from experts.atomic import exchange, fsync_tree, pid_alive, write_json_atomic
from experts.codecs import get_codec
from experts.expert import (MANIFEST_FILE, NAME_PATTERN, TENSORS_FILE, BaseMismatchError, EncodedDelta, Expert,
                            ExpertFormatError, ExpertManifest, load_expert, save_expert)
from experts.taskvector import _shapes, base_fingerprint, lora_factors

GENERATION_FILE = "GENERATION"
EXEMPLARS_FILE = "exemplars.json"
LOCK_FILE = ".lock"
RETIRED_DIR = ".retired"
RETIRE_GRACE_S = 600.0
STAGING_PREFIX = ".staging-"
ORPHAN_STAGING_S = 3600.0   # staging of an unknown process (another host) is removed after this long
MAX_EXEMPLARS = 10_000
MAX_EXEMPLAR_CHARS = 4_000


class StoreError(ValueError):
    """A store operation was refused; the message says why (safe to show to API clients)."""


class ExpertExistsError(StoreError):
    pass


class UnknownExpertError(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class Compression(BaseModel):
    """How to turn a full fine-tune (or, optionally, a LoRA) into a stored expert.

    ``method`` is a registered compressor (experts.compress); its options (e.g.
    ``density``, ``rank``, NPS's ``generations``) sit beside it and are checked
    against the method's options model. ``calibration`` / ``training`` point at
    chat examples (experts.examples) for methods that need them (NPS,
    sparse_ft): the caller turns them into an objective / a trainer.
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str = Field("magnitude", description="a compression method (deltaserve methods)")
    value_dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="stored value dtype")
    task: str | None = Field(None, max_length=200, description="a label recorded in the manifest")
    calibration: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples NPS scores candidates on: a JSONL path or a list of {messages}")
    training: str | list[dict[str, Any]] | None = Field(
        None, description="chat examples sparse_ft re-trains on: a JSONL path or a list of {messages}")

    @model_validator(mode="after")
    def _method_and_options(self) -> Compression:
        from experts.compress import COMPRESSORS

        COMPRESSORS.parse_options(self.method, self.model_extra or {})
        return self

    @property
    def options(self) -> Any:
        """The method's validated options model."""
        from experts.compress import COMPRESSORS

        return COMPRESSORS.parse_options(self.method, self.model_extra or {})

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.value_dtype)


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
        """The current version of ``name``; ``digests`` checks the files' sha256, ``verify`` all data."""
        path = self.path(name)
        if not (path / MANIFEST_FILE).is_file():
            raise UnknownExpertError(f"unknown expert {name!r}; known experts: {self.names()}")
        expert = load_expert(path, verify=verify)
        expert.check_base(self.fingerprint, self.shapes)
        if digests and not verify:
            expert.check_digests()
        return expert

    def version_dir(self, name: str, digest: str) -> Path:
        """The folder holding the version of ``name`` whose tensors have sha256 ``digest``: the current
        one, or a retired one still within its grace period."""
        for path in (self.path(name), *self._retired_paths(name, digest)):
            try:
                if json.loads((path / MANIFEST_FILE).read_text())["sha256"][TENSORS_FILE] == digest:
                    return path
            except (OSError, ValueError, KeyError, TypeError):
                continue
        raise UnknownExpertError(f"expert {name!r} version {digest[:12]} is no longer in the store")

    def load_version(self, name: str, digest: str) -> Expert:
        """That version loaded, checked against this store's base and its digests, and *pinned*: it reads
        its files through an open handle on its folder (``/proc/self/fd``), so a replacement swapped in
        at ``<name>/`` or its retirement to ``.retired/`` while it is in use does not change what it reads."""
        for _attempt in range(3):   # a replacement may land between finding the folder and opening it
            fd = os.open(self.version_dir(name, digest), os.O_RDONLY | os.O_DIRECTORY)
            try:
                expert = load_expert(Path(f"/proc/self/fd/{fd}"))
                if expert.manifest.sha256.get(TENSORS_FILE) != digest:
                    os.close(fd)
                    continue
                expert.check_base(self.fingerprint, self.shapes)
                expert.check_digests()
            except BaseException:
                os.close(fd)
                raise
            weakref.finalize(expert, os.close, fd)
            return expert
        raise UnknownExpertError(f"expert {name!r} version {digest[:12]} kept changing while it was loaded")

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
    def _locked(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+") as fh:
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
            from experts.compress import compress_expert, extract

            comp = compression or Compression()
            tv = extract(self.base_dir, source if kind == "full" else None, source if kind == "lora" else None)
            if tv.base_fingerprint != self.fingerprint:
                raise BaseMismatchError(f"{source} was not made from this store's base")

            def write(stage: Path) -> None:
                compress_expert(tv, stage, name=name, method=comp.method, options=comp.options, objective=objective,
                                trainer=trainer, task=comp.task, value_dtype=comp.torch_dtype, progress=False)
        return self.publish(name, write, exemplars=exemplars, replace=replace, objective=objective)


def score_stage(stage: Path, objective: Any) -> None:
    """Give a staged expert without a calibration score one: ``objective(decoded deltas)``, i.e. its
    measured quality on the calibration examples (kept as is when the compressor already scored it)."""
    manifest_path = stage / MANIFEST_FILE
    raw = json.loads(manifest_path.read_text())
    if raw.get("calibration_score") is not None:
        return
    expert = load_expert(stage)
    raw["calibration_score"] = float(objective(dict(expert.iter_deltas(torch.float32))))
    manifest_path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def save_lora_expert(base_dir: Path, adapter_dir: Path, out: Path, *, name: str, fingerprint: str) -> ExpertManifest:
    """A PEFT LoRA kept exactly: per adapted weight, A and scaling*B (lowrank codec, adapter dtype)."""
    factors, carried = lora_factors(base_dir, adapter_dir)
    codec = get_codec("lowrank")
    dtype = next(iter(factors.values())).A.dtype
    value_dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    encoded = {}
    for param, f in factors.items():
        B = (f.B.float() * f.scaling).to(value_dtype)
        encoded[param] = EncodedDelta(codec.encode_factors(f.A, B, value_dtype=value_dtype),
                                      (f.B.shape[0], f.A.shape[1]))
    rank = max(f.A.shape[0] for f in factors.values())
    return save_expert(out, encoded, name=name, base_fingerprint=fingerprint, codec="lowrank",
                       source=str(adapter_dir), method={"name": "lora", "rank": rank}, kind="lora",
                       value_dtype=value_dtype, carried=carried)


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
