"""The ``squall`` command: one entry point, a subcommand per part of the system."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# subcommand -> (summary, "module:function" taking argv and returning an exit code, or None
# with the reason it is not available yet)
_COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "hub": ("run the hub (QUIC ingest, durable log, HTTP API)", "hub.main:cli_hub", ""),
    "edge": ("run an edge agent (spool, sender, inputs)", "edge.main:cli_edge", ""),
    "link": ("run the UDP link-impairment proxy", "simulator.linkcli:cli_link", ""),
    "fleet": ("simulate a fleet of vehicles against a hub", "simulator.demo:cli_fleet", ""),
    "demo": ("run the end-to-end demo (what `make demo` runs)", "simulator.demo:cli_demo", ""),
    "certs": (
        "make a development CA, hub and device certificates",
        "transport.certs:cli_certs",
        "",
    ),
}


def _load(target: str) -> Callable[[list[str]], int]:
    module, _, func = target.partition(":")
    fn: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
    return fn


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``squall <command> ...``; exit codes: 0 ok, 1 runtime failure, 2 usage/config."""
    args = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="squall",
        description="Telemetry and logs from fleets on bad links, delivered exactly once.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (summary, _, _) in _COMMANDS.items():
        sub.add_parser(name, help=summary, add_help=False)
    if not args or args[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in _COMMANDS:
        parser.print_usage(sys.stderr)
        known = ", ".join(_COMMANDS)
        print(f"squall: unknown command {name!r} (choose from {known})", file=sys.stderr)
        return 2
    summary, target, why = _COMMANDS[name]
    fn = _load(target) if target else None
    if fn is None:
        if rest and rest[0] in ("-h", "--help"):
            print(f"usage: squall {name} ...\n\n{summary}\n\nNot available yet: {why}.")
            return 0
        print(f"squall {name}: not available yet: {why} is not built", file=sys.stderr)
        return 2
    return fn(rest)


if __name__ == "__main__":
    sys.exit(main())
