"""``deltaserve serve``: serve the base and the store's experts over an OpenAI-compatible API.

Every flag comes from the settings models (server.settings, server.settings_flags):
``deltaserve serve --help`` lists them with their defaults and environment variables.
"""

from __future__ import annotations

import argparse
from typing import Any

from deltaserve.server.settings_flags import Flag, add_settings_flags, settings_from_args

HELP = "serve the base and the store's experts over an OpenAI-compatible API"
#: On SIGTERM: stop accepting, let in-flight requests finish for at most this long, then exit.
SHUTDOWN_GRACE_S = 30


def add_arguments(p: argparse.ArgumentParser, **options: Any) -> list[Flag]:
    """The settings' flags (``options``: ``defaults`` / ``exclude`` for commands that reuse them, the demo)."""
    from deltaserve.server.settings import ServerSettings

    flags = add_settings_flags(p, ServerSettings, **options)
    p.set_defaults(settings_flags=flags)
    return flags


def settings(args: argparse.Namespace, **fixed: Any) -> Any:
    """The ``ServerSettings`` the command line (then the environment, then the defaults) gives."""
    from deltaserve.server.settings import ServerSettings

    return settings_from_args(ServerSettings, args, args.settings_flags, **fixed)


def serve(settings: Any, banner: str = "", access_log: bool = True) -> int:
    """Run the server with ``settings`` until it is stopped (``banner`` printed once it is ready; ``access_log``:
    uvicorn's line per request)."""
    import uvicorn

    from deltaserve.server.app import create_app

    app = create_app(settings, on_ready=(lambda: print(banner, flush=True)) if banner else None)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=access_log,
                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0


def run(args: argparse.Namespace) -> int:
    checked = settings(args)
    if not (checked.engine.base_dir / "config.json").is_file():
        raise SystemExit(f"error: --base {checked.engine.base_dir} is not an HF model directory (no config.json)")
    return serve(checked)
