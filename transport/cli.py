"""The ``squall`` command: one entry point, a subcommand per part of the system."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

# subcommand -> (summary, "module:function" taking argv and returning an exit code, or None
# with the reason it is not available yet)
_COMMANDS: dict[str, tuple[str, str | None, str]] = {
    "hub": ("run the hub (QUIC ingest, durable log, HTTP API)", "hub.main:cli_hub", ""),
    "edge": ("run an edge agent (spool, sender, inputs)", "edge.main:cli_edge", ""),
    "consume": (
        "run the durable consumers (archives, syslog forwarders, alerts) against the shared "
        "JetStream log of many hubs",
        "hub.consume:cli_consume",
        "",
    ),
    "link": (
        "run the UDP link-impairment proxy (or, with --bridge, the packet bridge between "
        "two network namespaces)",
        "simulator.linkcli:cli_link",
        "",
    ),
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


def run_service(
    argv: list[str],
    name: str,
    doc: str | None,
    load: Callable[[str], Any],
    run: Callable[[Any], Coroutine[Any, Any, int]],
) -> int:
    """The common shell of ``squall hub``, ``edge`` and ``consume``: parse, load the config (exit
    2 with one line naming file and key on error), run until signalled (exit 1 on failure)."""
    ap = argparse.ArgumentParser(prog=f"squall {name}", description=doc)
    ap.add_argument("--config", required=True, help=f"{name} YAML (see config/{name}.yaml)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    if args.log_level != "debug":  # aioquic logs every handshake at INFO: keep that for debug
        logging.getLogger("quic").setLevel(logging.WARNING)
    from transport.errors import SquallError

    try:
        cfg = load(args.config)
    except SquallError as exc:
        print(f"squall {name}: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run(cfg))
    except SquallError as exc:
        print(f"squall {name}: {exc}", file=sys.stderr)
        return 1
