"""``deltaserve keys``: make, list and revoke the scoped keys of a key file (``serve --key-file``).

``keys new --key-file keys.toml --tenant acme --role admin`` appends a key's entry (its id and argon2 hash, never
the key) to the file and prints the key once: store it, it cannot be recovered. ``keys list`` shows the entries
(no hashes); ``keys revoke ID`` removes one. The file is rewritten atomically and checked before it replaces
the old one; a running server picks the change up within a second (or on SIGHUP).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HELP = "make, list and revoke scoped API keys in a key file (serve --key-file)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    new = sub.add_parser("new", help="append a new key to the key file and print it (once)")
    new.add_argument("--key-file", type=Path, required=True)
    new.add_argument("--tenant", default=None, help="the tenant (a-z, 0-9, _ and -); none for a global admin")
    new.add_argument("--role", choices=["inference", "admin", "global_admin"], default="inference")
    new.add_argument("--name", default="", help="a label for the audit log")
    new.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    new.add_argument("--tpm", type=int, default=0, help="prompt + completion tokens per minute (0: no limit)")
    new.add_argument("--max-in-flight", type=int, default=0, help="requests at once (0: no limit)")
    listing = sub.add_parser("list", help="the key file's entries (ids, tenants, roles, limits; no hashes)")
    listing.add_argument("--key-file", type=Path, required=True)
    revoke = sub.add_parser("revoke", help="remove a key from the key file")
    revoke.add_argument("key_id")
    revoke.add_argument("--key-file", type=Path, required=True)


def _entry_toml(entry) -> str:
    lines = ["", "[[keys]]"]
    for field, value in entry.model_dump(exclude_none=True).items():
        lines.append(f"{field} = {json.dumps(value)}")   # a JSON string or integer is valid TOML
    return "\n".join(lines) + "\n"


def _write_checked(path: Path, text: str) -> None:
    from deltaserve.experts.atomic import write_bytes_atomic
    from deltaserve.server.tenants import parse_key_file

    staged = path.with_name(path.name + ".check")
    staged.write_text(text)
    try:
        parse_key_file(staged)
    finally:
        staged.unlink()
    write_bytes_atomic(path, text.encode())


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from deltaserve.server.tenants import KeyEntry, hash_key, new_key, parse_key_file, problems

    path: Path = args.key_file
    try:
        current = parse_key_file(path) if path.exists() else None
        text = path.read_text() if path.exists() else "# deltaserve key file (docs/tenants.md)\npublic = []\n"
        if args.action == "list":
            for k in current.keys if current else []:
                print(f"{k.id}\ttenant={k.tenant or '-'}\trole={k.role}\trpm={k.rpm}\ttpm={k.tpm}\t"
                      f"max_in_flight={k.max_in_flight}\tname={k.name}")
            return 0
        if args.action == "revoke":
            return _revoke(path, text, args.key_id)
        key, key_id = new_key()
        entry = KeyEntry(id=key_id, hash=hash_key(key), tenant=args.tenant, role=args.role, name=args.name,
                         rpm=args.rpm, tpm=args.tpm, max_in_flight=args.max_in_flight)
    except ValidationError as err:
        raise SystemExit(f"deltaserve keys: error: {problems(err)}") from None
    except ValueError as err:
        raise SystemExit(f"deltaserve keys: error: {err}") from None
    _write_checked(path, text + _entry_toml(entry))
    print(key)
    return 0


def _revoke(path: Path, text: str, key_id: str) -> int:
    blocks = re.split(r"(?m)^(?=\[\[keys\]\])", text)
    kept = [b for b in blocks if not re.search(rf'(?m)^id\s*=\s*"{re.escape(key_id)}"\s*$', b)]
    if len(kept) == len(blocks):
        raise SystemExit(f"deltaserve keys: error: no key {key_id!r} in {path}")
    _write_checked(path, "".join(kept))
    print(f"revoked {key_id}")
    return 0
