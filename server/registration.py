"""Registering experts through the API (``POST /v1/experts``): where a source may come from, the examples a
compression needs, and one import at a time.

Imports run one at a time per kind (plain, compressing): on a small host eight concurrent imports were slower
in all than one at a time (13.5 vs 17.6 experts/s at 100 experts, bench/scale/experts.py) and their threads held
the interpreter lock long enough to delay every other request by ~0.4 s; a slow compression does not hold up
plain registrations. The router's refit after an import is shared by the registrations waiting for it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from deltaserve.experts.sources import Compression
from deltaserve.server.exceptions import Forbidden, InvalidRequest
from deltaserve.server.protocol.admin import ExpertCard, ExpertRegistration

AUTO = "auto"
MAX_INLINE_EXAMPLES = 2000


class Registrations:
    """Mixed into server.service.Service (its settings, store, base name, sync and expert cards)."""

    settings: Any
    store: Any
    base_name: str
    _importing: dict[bool, asyncio.Semaphore]
    check_owner: Any   # server.scoping.Scoping's
    audited: Any
    view: Any
    keys: Any

    async def sync(self, force: bool = False) -> bool:
        raise NotImplementedError

    def expert_card(self, name: str) -> ExpertCard:
        raise NotImplementedError

    def allowed_path(self, raw: str, param: str = "path") -> Path:
        """``raw`` resolved (symlinks followed) and checked to lie under a ``--register-root`` — for a tenant's
        admin (``--key-file``), under its own ``<root>/<tenant>/`` folder: one tenant cannot register another's
        uploads."""
        roots = [Path(os.path.realpath(r)) for r in self.settings.register_roots]
        if not roots:
            raise Forbidden("registration from server paths is disabled: start the server with --register-root DIR")
        caller = self.view().caller
        if self.keys is not None and caller is not None and not caller.is_global and caller.tenant:
            roots = [r / caller.tenant for r in roots]
        path = Path(os.path.realpath(raw))
        if not any(path == r or r in path.parents for r in roots):
            raise Forbidden(f"{param} {raw!r} is outside the allowed registration roots "
                                f"{[str(r) for r in roots]}", param)
        return path

    def _check_links(self, path: Path, raw: str) -> None:
        """Every file and folder under ``path`` must resolve inside a registration root, links included."""
        for root, dirs, files in os.walk(path):
            for entry in [*dirs, *files]:
                inner = Path(root) / entry
                if inner.is_symlink():
                    self.allowed_path(str(inner), "path")

    async def register(self, body: ExpertRegistration) -> ExpertCard:
        if body.name in (self.base_name, AUTO):
            raise InvalidRequest(f"{body.name!r} is reserved", "name")
        self.check_owner(body.name)   # a tenant's admin registers '<tenant>.<name>' only (server.scoping)
        path = self.allowed_path(body.path)
        if not path.is_dir():
            raise InvalidRequest(f"path {body.path!r} is not a directory on the server", "path")
        self._check_links(path, body.path)
        objective, trainer = await asyncio.to_thread(self._compression_helpers, body.compression, body.calibration)
        async with self._importing[body.compression is not None]:
            manifest = await asyncio.to_thread(self.store.import_source, body.name, path, compression=body.compression,
                                               exemplars=body.exemplars, replace=body.replace, objective=objective,
                                               trainer=trainer)
        self.audited("register", expert=body.name, source=str(path), replace=body.replace,
                     sha256=dict(manifest.sha256))
        await self.sync(force=True)   # concurrent registrations share the router's refits (Service.refresh_routing)
        return self.expert_card(body.name)

    def _compression_helpers(self, compression: Compression | None, calibration: Any = None) -> tuple[Any, Any]:
        """The calibration objective and sparse_ft's trainer from the examples the request names
        (experts.compress.compression_helpers; a missing set is a 400 naming its field)."""
        from deltaserve.experts.sources import MissingExamples, compression_helpers

        source, param = calibration, "calibration"
        if compression is not None and compression.calibration is not None:
            source, param = compression.calibration, "compression.calibration"
        training = compression.training if compression is not None else None
        try:
            return compression_helpers(
                self.settings.engine.base_dir, compression.method if compression else None,
                compression.options if compression else None,
                None if source is None else self._examples(source, param),
                None if training is None else self._examples(training, "compression.training"))
        except MissingExamples as err:
            param = "compression.calibration" if err.param == "calibration" else "compression.training"
            raise InvalidRequest(f"this compression method needs `{param}`: chat examples as a JSONL path under a "
                                 "registration root, or a list of {\"messages\": [...]} objects", param) from None

    def _examples(self, source: str | list, param: str) -> list:
        from deltaserve.experts.examples import ChatExample, read_examples

        if isinstance(source, str):
            return read_examples(self.allowed_path(source, param))
        if len(source) > MAX_INLINE_EXAMPLES:
            raise InvalidRequest(f"at most {MAX_INLINE_EXAMPLES} inline examples, got {len(source)}", param)
        return [ChatExample.from_json(obj, f"{param}[{i}]") for i, obj in enumerate(source)]

