"""Keys: inference keys call and read, admin keys also manage experts; no keys configured means open.

One parser of the ``Authorization: Bearer <key>`` header and one check, used by the
routes (server.routes) and by the ``--ops-need-key`` middleware (server.app).
"""

from __future__ import annotations

from collections.abc import Collection

from deltaserve.server.exceptions import Forbidden, Unauthenticated


def bearer_token(authorization: str | None) -> str:
    """The key of an ``Authorization: Bearer <key>`` header ('' when there is none)."""
    header = authorization or ""
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def check_key(authorization: str | None, api_keys: Collection[str], admin_keys: Collection[str], *,
              admin: bool) -> None:
    """Raise unless the header's key may do this: an admin key for expert writes (``admin``), an
    inference or admin key otherwise; nothing is checked when no key of the needed kind is configured."""
    required = admin_keys if admin else api_keys
    if not required:
        return
    token = bearer_token(authorization)
    if not token:
        raise Unauthenticated("missing bearer token: send 'Authorization: Bearer <key>'")
    allowed = set(admin_keys) if admin else set(api_keys) | set(admin_keys)
    if token not in allowed:
        if admin and token in api_keys:
            raise Forbidden("this key may not manage experts")
        raise Unauthenticated("invalid API key")
