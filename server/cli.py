"""``deltaserve`` command line: one module per command in server.commands, heavy imports deferred.

Each module of server.commands whose name does not start with ``_`` is a command: its ``HELP`` is the
one-line help, ``add_arguments(parser)`` declares its arguments and ``run(args)`` carries it out, so a
new command is one new file. ``serve`` and ``demo`` take their flags from the settings models
(server.settings_flags); ``compress``, ``merge`` and ``store add`` one flag per registered option
(server.commands._options).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from types import ModuleType

from deltaserve.server import commands


def command_modules() -> dict[str, ModuleType]:
    """Every command module by name (the module names under server.commands)."""
    return {m.name: importlib.import_module(f"{commands.__name__}.{m.name}")
            for m in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name)
            if not m.name.startswith("_")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description="deltaserve: one resident base LLM, many "
                                     "compressed experts, routed and merged per request, served by vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=(module.__doc__ or module.HELP).split("\n\n")[0])
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; an input the experts package refuses (an expert that does not fit the base, a bad
    source or expert folder) or a bad key file is one line on stderr and exit status 2, as argparse's own errors,
    not a traceback."""
    from deltaserve.experts.expert import ExpertFormatError
    from deltaserve.experts.sources import SourceError
    from deltaserve.experts.taskvector import TaskVectorError
    from deltaserve.server.tenants import KeyFileError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TaskVectorError, SourceError, ExpertFormatError, KeyFileError) as err:
        print(f"deltaserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
