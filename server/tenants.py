"""Tenants: scoped keys from a key file (``--key-file``), and which experts each caller may see.

A key file (TOML) maps keys to a tenant and a role; the file holds salted argon2 hashes, never keys::

    public = ["math", "code-*"]       # experts every tenant may use (names or fnmatch patterns)

    [[keys]]
    id = "k3f9a1c2"                   # a key is dsk_<id>_<secret> (`deltaserve keys new` makes both)
    hash = "$argon2id$v=19$..."
    tenant = "acme"
    role = "admin"                    # inference | admin (its tenant's experts) | global_admin
    rpm = 600                         # requests per minute, tokens per minute, requests in flight (0: no limit)
    tpm = 200000
    max_in_flight = 16

A tenant owns the experts (and named recipes) named ``<tenant>.<name>``: only its admins register or delete
them, and a tenant sees its own plus the public ones. A global admin sees and manages everything. Anything a
caller may not see answers exactly as if it did not exist (the same 404, lists without it), so names cannot be
probed. The file is re-read when it changes (checked at most once a second) and on SIGHUP; a file that does not
parse keeps the previous keys and logs why (never a key or a hash).
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import hmac
import logging
import os
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

log = logging.getLogger("deltaserve")

Role = Literal["inference", "admin", "global_admin"]
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,31}$"
KEY_RE = re.compile(r"^dsk_([A-Za-z0-9]{4,32})_([A-Za-z0-9_-]{16,128})$")
RELOAD_CHECK_S = 1.0
GLOBAL = "_global"   # the tenant label of global admins in /metrics and the audit log


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(pattern=r"^[A-Za-z0-9]{4,32}$", description="the key's public id (dsk_<id>_<secret>)")
    hash: str = Field(pattern=r"^\$argon2(id|i|d)\$", description="argon2 hash of the whole key")
    tenant: str | None = Field(None, pattern=TENANT_PATTERN)
    role: Role = "inference"
    name: str = Field("", max_length=64, description="a label for the audit log")
    rpm: int = Field(0, ge=0, description="requests per minute (0: no limit)")
    tpm: int = Field(0, ge=0, description="prompt + completion tokens per minute (0: no limit)")
    max_in_flight: int = Field(0, ge=0, description="requests at once (0: no limit)")

    @model_validator(mode="after")
    def _tenant_unless_global(self) -> KeyEntry:
        if self.role != "global_admin" and self.tenant is None:
            raise ValueError(f"key {self.id}: a {self.role!r} key needs a tenant")
        return self


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    public: list[str] = Field(default_factory=list, description="experts every tenant may use (fnmatch patterns)")
    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> KeyFile:
        ids = [k.id for k in self.keys]
        if len(ids) != len(set(ids)):
            raise ValueError("key ids must be unique")
        return self


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a key's tenant, role and limits, and the deployment's public experts."""

    key_id: str
    tenant: str | None
    role: Role
    public: tuple[str, ...] = ()
    rpm: int = 0
    tpm: int = 0
    max_in_flight: int = 0
    name: str = ""

    @property
    def is_global(self) -> bool:
        return self.role == "global_admin"

    @property
    def label(self) -> str:
        return GLOBAL if self.tenant is None else self.tenant

    def owns(self, name: str) -> bool:
        """May this caller register or delete ``name`` (an expert or a named recipe)?"""
        return self.is_global or (self.role == "admin" and self.tenant is not None
                                  and name.startswith(self.tenant + "."))

    def sees(self, name: str) -> bool:
        if self.is_global or (self.tenant is not None and name.startswith(self.tenant + ".")):
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.public)


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("deltaserve_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the request being handled (set by server.limits.Tenancy); None without a key file."""
    return CALLER.get()


class KeyFileError(ValueError):
    """A key file that cannot be read or is not valid (the message never holds a key or a hash)."""


def parse_key_file(path: Path) -> KeyFile:
    """The key file at ``path``; KeyFileError naming the problem when it is not valid."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise KeyFileError(f"cannot read the key file {path}: {type(err).__name__}") from None
    except tomllib.TOMLDecodeError as err:
        raise KeyFileError(f"the key file {path} is not TOML: {err}") from None
    try:
        return KeyFile.model_validate(raw)
    except ValidationError as err:
        raise KeyFileError(f"the key file {path} is not valid: {problems(err)}") from None


def problems(err: ValidationError) -> str:
    """A validation error's problems, without the input values (a key file's hashes stay out of logs)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in err.errors(include_input=False))


class KeyRing:
    """The key file's keys, re-read when the file changes; ``identify`` turns a bearer key into a Caller.

    Verifying an argon2 hash costs ~0.1 s of CPU, so a verified key is remembered (as its SHA-256, compared in
    constant time) until the file changes; a failed key is remembered too, so a client retrying a bad key does
    not cost a verification each time.
    """

    def __init__(self, path: Path, on_reload=None) -> None:
        self.path = Path(path)
        self.on_reload = on_reload           # called with (ok, detail) after every reload attempt
        self._lock = threading.Lock()
        self.config = parse_key_file(self.path)   # a bad file at start is an error, not an empty ring
        self.generation = 0
        self._stamp = self._stat()
        self._checked = time.monotonic()
        self._index: dict[str, KeyEntry] = {k.id: k for k in self.config.keys}
        self._verified: dict[str, bytes] = {}   # key id -> SHA-256 of the key that verified
        self._failed: dict[bytes, float] = {}   # SHA-256 of keys that did not verify -> when

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def maybe_reload(self) -> None:
        """Re-read the file if it changed (looked at no more than once a second)."""
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        if self._stat() != self._stamp:
            self.reload()

    def reload(self) -> bool:
        """Re-read the key file; a file that does not parse keeps the current keys (and is logged)."""
        with self._lock:
            self._stamp = self._stat()
            try:
                config = parse_key_file(self.path)
            except KeyFileError as err:
                log.error("key file not reloaded, keeping the previous keys: %s", err)
                self._notify(False, str(err))
                return False
            self.config = config
            self._index = {k.id: k for k in config.keys}
            self._verified, self._failed = {}, {}
            self.generation += 1
        log.info("key file reloaded: %d keys, %d public expert patterns", len(config.keys), len(config.public))
        self._notify(True, f"{len(config.keys)} keys")
        return True

    def _notify(self, ok: bool, detail: str) -> None:
        if self.on_reload is not None:
            self.on_reload(ok, detail)

    def entry_for(self, token: str) -> tuple[KeyEntry | None, bool]:
        """(the entry whose id ``token`` names, whether it is already known to match) without verifying."""
        m = KEY_RE.match(token)
        if m is None:
            return None, False
        entry = self._index.get(m.group(1))
        if entry is None:
            return None, False
        digest = hashlib.sha256(token.encode()).digest()
        known = self._verified.get(entry.id)
        if known is not None and hmac.compare_digest(known, digest):
            return entry, True
        if digest in self._failed:
            return None, False
        return entry, False

    def verify(self, entry: KeyEntry, token: str) -> bool:
        """argon2 verification of ``token`` against ``entry`` (slow: run it off the event loop)."""
        from argon2 import PasswordHasher
        from argon2.exceptions import InvalidHashError, VerificationError

        digest = hashlib.sha256(token.encode()).digest()
        try:
            ok: bool = PasswordHasher().verify(entry.hash, token)
        except (VerificationError, InvalidHashError):
            ok = False
        with self._lock:
            if ok:
                self._verified[entry.id] = digest
            else:
                if len(self._failed) >= 4096:
                    self._failed.clear()
                self._failed[digest] = time.monotonic()
        return ok

    def caller(self, entry: KeyEntry) -> Caller:
        return Caller(key_id=entry.id, tenant=entry.tenant, role=entry.role, public=tuple(self.config.public),
                      rpm=entry.rpm, tpm=entry.tpm, max_in_flight=entry.max_in_flight, name=entry.name)

    def tenants(self) -> list[str]:
        return sorted({k.tenant or GLOBAL for k in self.config.keys})


def new_key() -> tuple[str, str]:
    """A fresh key ``dsk_<id>_<secret>`` and its id."""
    import secrets

    key_id = "k" + secrets.token_hex(4)
    return f"dsk_{key_id}_{secrets.token_urlsafe(32)}", key_id


def hash_key(key: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(key)


@dataclass(frozen=True)
class View:
    """What one request may see: everything without a key file (``enabled`` False) or for a global admin,
    else its tenant's experts and the public ones."""

    enabled: bool
    caller: Caller | None

    @property
    def everything(self) -> bool:
        return not self.enabled or (self.caller is not None and self.caller.is_global)

    @property
    def key(self) -> tuple:
        """Equal for callers that see the same names (listings are cached per view)."""
        if self.everything:
            return ("*",)
        c = self.caller
        return ("-",) if c is None else (c.tenant, c.public)

    def sees(self, name: str) -> bool:
        return self.everything or (self.caller is not None and self.caller.sees(name))

    def owns(self, name: str) -> bool:
        return not self.enabled or (self.caller is not None and self.caller.owns(name))
