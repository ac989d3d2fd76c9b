"""``squall link``: run the UDP link-impairment proxy, or with ``--bridge`` the packet-level
bridge between two network namespaces, from the command line until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

from simulator.bridge import Bridge, BridgeConfig, BridgePorts, cleanup_bridge
from simulator.netns import DEFAULT_SUBNET, BridgeBusyError, BridgeSetupError
from simulator.pcap import DEFAULT_PCAP_MAX_BYTES
from simulator.profiles import DEFAULT_PROFILES_PATH, load_profiles
from simulator.proxy import ProxyLimits, device_key, start_proxy
from transport.errors import ConfigError

__all__ = ["cli_link", "parse_hostport"]

_PROG = "squall link"


class _UsageError(Exception):
    """A bad command line: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


def parse_hostport(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6addr]:port`` as (host, port); ValueError names what is wrong."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, as [::1]:4434, got {text!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port must be a number, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0-65535, got {text!r}")
    return host, port


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _number(kind: Callable[[str], Any], low: float) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be >= {low:g}, got {text!r}")
        return value

    return convert


def _device(text: str) -> tuple[str, str]:
    key, sep, name = text.partition("=")
    if not sep or not key or not name:
        raise argparse.ArgumentTypeError(f"expected CLIENT=DEVICE, got {text!r}")
    return key, name


def _parser() -> _Parser:
    p = _Parser(
        prog=_PROG,
        description=(
            "UDP proxy that impairs the edge-hub link: loss, delay, jitter, reordering, "
            "duplication, corruption, bandwidth queues, outages and NAT rebinding, "
            "per client, from a seeded model. SIGTERM/SIGINT stop it with a summary. "
            "With --bridge: two network namespaces NAME-a and NAME-b joined through the "
            "same model at the Ethernet level, so any protocol (TCP too) crosses it."
        ),
    )
    p.add_argument(
        "--listen",
        type=_hostport,
        default=("127.0.0.1", 4434),
        metavar="HOST:PORT",
        help="where devices send (default 127.0.0.1:4434)",
    )
    p.add_argument(
        "--upstream",
        type=_hostport,
        default=("127.0.0.1", 4433),
        metavar="HOST:PORT",
        help="the hub (default 127.0.0.1:4433)",
    )
    p.add_argument("--profile", default="lan", help="link profile name (default lan)")
    p.add_argument(
        "--profiles",
        type=Path,
        default=DEFAULT_PROFILES_PATH,
        metavar="FILE",
        help="link profiles YAML (default config/links.yaml)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of every link (default 0)")
    p.add_argument(
        "--device",
        type=_device,
        action="append",
        default=[],
        metavar="CLIENT=DEVICE",
        help="name the link of CLIENT (host:port or host) DEVICE; repeatable",
    )
    p.add_argument(
        "--max-clients",
        type=_number(int, 1),
        default=10_000,
        metavar="N",
        help="clients tracked at once; packets of further ones are dropped (10000)",
    )
    p.add_argument(
        "--client-idle-s",
        type=_number(float, 0.001),
        default=120.0,
        metavar="S",
        help="forget a client idle this long, closing its NAT binding (120)",
    )
    p.add_argument(
        "--max-pending",
        type=_number(int, 1),
        default=None,
        metavar="N",
        help="datagrams in flight inside the proxy, beyond which they are dropped (100000); "
        "with --bridge, frames held per direction (10000)",
    )
    p.add_argument(
        "--control-port",
        type=_number(int, 0),
        default=0,
        metavar="PORT",
        help="HTTP control API on 127.0.0.1:PORT (default 0 = off)",
    )
    p.add_argument(
        "--pcap",
        type=Path,
        metavar="FILE",
        help="capture both directions, dropped packets marked (see simulator/pcap.py)",
    )
    p.add_argument(
        "--pcap-max-bytes",
        type=_number(int, 24),
        default=DEFAULT_PCAP_MAX_BYTES,
        metavar="N",
        help="stop capturing at this file size (100000000)",
    )
    p.add_argument(
        "--decision-log", type=Path, metavar="FILE", help="one JSON line per packet decision"
    )
    p.add_argument(
        "--decision-log-max-bytes",
        type=_number(int, 1),
        default=DEFAULT_PCAP_MAX_BYTES,
        metavar="N",
        help="stop logging decisions at this file size (100000000)",
    )
    p.add_argument("--no-uvloop", action="store_true", help="use asyncio's own event loop")
    b = p.add_argument_group("packet-level bridge (--bridge; needs root)")
    b.add_argument(
        "--bridge",
        action="store_true",
        help="join namespaces NAME-a and NAME-b through the link model instead of proxying UDP",
    )
    b.add_argument("--name", default="sq0", help="bridge name, prefix of its namespaces (sq0)")
    b.add_argument(
        "--subnet",
        default=DEFAULT_SUBNET,
        help=f"private IPv4 subnet: NAME-a gets its first host, NAME-b its second "
        f"(default {DEFAULT_SUBNET}); must not overlap this host's routes",
    )
    b.add_argument(
        "--metrics",
        type=_hostport,
        metavar="HOST:PORT",
        help="serve /metrics, /status and POST /outage there (e.g. 127.0.0.1:9100)",
    )
    b.add_argument(
        "--cleanup",
        action="store_true",
        help="remove the namespaces and veths a crashed bridge NAME left behind, then exit",
    )
    return p


# Options that only mean something to the UDP proxy, refused with --bridge.
_PROXY_ONLY: tuple[str, ...] = (
    "listen",
    "upstream",
    "device",
    "max_clients",
    "client_idle_s",
    "control_port",
)
_BRIDGE_ONLY: tuple[str, ...] = ("metrics", "cleanup")


def _raise_fd_limit() -> None:
    """One socket per client: let the process open as many as the hard limit allows."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def _serve(args: argparse.Namespace, profiles: dict[str, Any]) -> str:
    """Run the proxy until SIGTERM/SIGINT; returns the summary of the run."""
    proxy = await start_proxy(
        args.upstream,
        listen=args.listen,
        profile=args.profile,
        profiles=profiles,
        seed=args.seed,
        limits=ProxyLimits(args.max_clients, args.client_idle_s, args.max_pending or 100_000),
        devices=dict(args.device),
        control_port=args.control_port or None,
        pcap=args.pcap,
        pcap_max_bytes=args.pcap_max_bytes,
        decision_log=args.decision_log,
        decision_log_max_bytes=args.decision_log_max_bytes,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = f", control http://{device_key(proxy.control_addr)}" if proxy.control_addr else ""
    print(
        f"{_PROG}: {device_key(proxy.listen_addr)} -> {device_key(proxy.upstream_addr)}, "
        f"profile {proxy.profile}, seed {args.seed}{control}, io {proxy.io_path}",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await proxy.close()
    return proxy.stats().summary()


def _run(main: Coroutine[Any, Any, str], use_uvloop: bool) -> str:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _check_mode(parser: _Parser, args: argparse.Namespace) -> None:
    """Refuse options of the other mode (a proxy option with --bridge, or the reverse)."""
    if args.bridge:
        given = [d for d in _PROXY_ONLY if getattr(args, d) != parser.get_default(d)]
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            raise _UsageError(f"{flags}: for the UDP proxy, not --bridge")
    else:
        given = [d for d in _BRIDGE_ONLY if getattr(args, d) != parser.get_default(d)]
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            raise _UsageError(f"{flags}: only with --bridge")


def cli_link(argv: list[str]) -> int:
    """Run ``squall link``: 0 after SIGTERM/SIGINT, 2 for bad arguments or profile, 1 on failure."""
    try:
        parser = _parser()
        args = parser.parse_args(argv)
        _check_mode(parser, args)
        profiles = load_profiles(args.profiles)
        if args.profile not in profiles:
            known = ", ".join(sorted(profiles))
            raise _UsageError(
                f"unknown link profile {args.profile!r} in {args.profiles} (known: {known})"
            )
    except (_UsageError, ConfigError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return 0 if exc.code is None else int(exc.code)
    if args.bridge:
        return _cli_bridge(args, profiles)
    _raise_fd_limit()
    try:
        summary = _run(_serve(args, profiles), use_uvloop=not args.no_uvloop)
    except ValueError as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{_PROG}: cannot start: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(BrokenPipeError):
        print(f"{_PROG}: stopped: {summary}", flush=True)
    return 0


# -- the bridge ---------------------------------------------------------------------------

_BRIDGE_PROG = f"{_PROG} --bridge"


class _Interrupted(BaseException):
    """SIGINT/SIGTERM before the event loop took the signals over (during setup)."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise _Interrupted(signum)


def _cli_bridge(args: argparse.Namespace, profiles: dict[str, Any]) -> int:
    """Set up, bridge until SIGTERM/SIGINT, tear down; or ``--cleanup``."""
    config = BridgeConfig(
        params=profiles[args.profile],
        profile=args.profile,
        name=args.name,
        subnet=args.subnet,
        seed=args.seed,
        max_pending=args.max_pending or 10_000,
        pcap=args.pcap,
        pcap_max_bytes=args.pcap_max_bytes,
        decision_log=args.decision_log,
        decision_log_max_bytes=args.decision_log_max_bytes,
    )
    try:
        topo = config.topology()
    except ValueError as exc:
        print(f"{_BRIDGE_PROG}: error: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(
            f"{_BRIDGE_PROG}: error: needs root (network namespaces, veths, packet sockets)",
            file=sys.stderr,
        )
        return 1
    if args.cleanup:
        return _cleanup(args.name)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    ports = BridgePorts(topo, config.lock_dir)
    summary = "interrupted during setup"
    code = 0
    try:
        ports.open()
        summary = asyncio.run(_serve_bridge(config, ports, args.metrics))
    except _Interrupted:
        pass
    except BridgeBusyError as exc:
        print(f"{_BRIDGE_PROG}: error: {exc}", file=sys.stderr)
        code = 1
    except (BridgeSetupError, OSError) as exc:
        print(f"{_BRIDGE_PROG}: cannot start: {exc}", file=sys.stderr)
        code = 1
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the teardown short
            signal.signal(sig, signal.SIG_IGN)
        try:
            removed = ports.close()
        except BridgeSetupError as exc:
            print(f"{_BRIDGE_PROG}: teardown failed: {exc}", file=sys.stderr)
            removed, code = [], 1
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code == 0:
        gone = f"; removed {', '.join(removed)}" if removed else ""
        with contextlib.suppress(BrokenPipeError):
            print(f"{_BRIDGE_PROG}: stopped: {summary}{gone}", flush=True)
    return code


def _cleanup(name: str) -> int:
    try:
        removed = cleanup_bridge(name)
    except BridgeBusyError as exc:
        print(f"{_BRIDGE_PROG}: error: {exc}; stop it instead", file=sys.stderr)
        return 1
    except (BridgeSetupError, OSError) as exc:
        print(f"{_BRIDGE_PROG}: cleanup failed: {exc}", file=sys.stderr)
        return 1
    print(f"{_BRIDGE_PROG}: removed {', '.join(removed) if removed else 'nothing'}", flush=True)
    return 0


async def _serve_bridge(
    config: BridgeConfig, ports: BridgePorts, metrics: tuple[str, int] | None
) -> str:
    """Bridge until SIGTERM/SIGINT; returns the summary of the run."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bridge = Bridge.start(config, ports)
    try:
        if metrics is not None:
            await bridge.start_metrics(*metrics)
        _print_ready(bridge, config)
        await stop.wait()
    finally:
        await bridge.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)  # this puts SIG_DFL back: the teardown is next,
            signal.signal(sig, signal.SIG_IGN)  # which a signal must not cut short
    return bridge.stats().summary()


def _print_ready(bridge: Bridge, config: BridgeConfig) -> None:
    t = bridge.topology
    where = ""
    if bridge.metrics_addr is not None:
        host, port = bridge.metrics_addr
        where = f", metrics http://{device_key((host, port))}/metrics"
    print(
        f"{_BRIDGE_PROG}: {t.ns_a} {t.addr_a} <-> {t.ns_b} {t.addr_b}, profile "
        f"{config.profile}, seed {config.seed}, ip mtu {t.ip_mtu}{where}\n"
        f"  ip netns exec {t.ns_a} <cmd>   runs <cmd> on side a; it reaches "
        f"{t.addr_b.ip} (side b) through the link\n"
        f"  ip netns exec {t.ns_b} <cmd>   runs <cmd> on side b; it reaches {t.addr_a.ip}\n"
        f"  stop with Ctrl-C or SIGTERM; after a crash: squall link --bridge --cleanup "
        f"--name {t.name}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(cli_link(sys.argv[1:]))
