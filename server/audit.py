"""The audit log (``--audit-log PATH``): one JSON line per change to what is served or who may call.

Events: ``register``, ``delete`` (experts), ``name_recipe``, ``delete_recipe``, ``keys_reload`` (ok or not).
Each line says when, who (the key's id, name and tenant — never the key), what (the expert or recipe, and the
served version's digest), and the outcome. The file is only ever appended to (opened in append mode, one
``write`` and ``fsync`` per line); every event also goes to the ``deltaserve.audit`` logger.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

from deltaserve.server.tenants import GLOBAL, Caller

log = logging.getLogger("deltaserve.audit")


class AuditLog:
    def __init__(self, path: Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, caller: Caller | None, **what: Any) -> dict:
        entry = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "event": event,
                 "key_id": caller.key_id if caller else None, "key_name": caller.name if caller else None,
                 "tenant": (caller.tenant or GLOBAL) if caller else None, **what}
        line = json.dumps(entry, sort_keys=False)
        log.info("%s", line)
        if self.path is not None:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, (line + "\n").encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
        return entry
