"""Helpers shared by the bench programs: machine, CPUs, /proc, certificates, configs, the hub.

Not a benchmark itself: ``python bench/_common.py`` only says so.  The programs that use
it (bench/edge.py, bench/hub_ingest.py) start every peer as a child process that dies
with the bench (``PR_SET_PDEATHSIG``), stop them in ``finally`` blocks, and bound the
whole run with a watchdog (``SIGALRM``); SIGTERM and SIGINT unwind the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
# The repo goes first, always: bench/transport.py would otherwise shadow the package.
while str(REPO) in sys.path:
    sys.path.remove(str(REPO))
sys.path.insert(0, str(REPO))

from transport import certs  # noqa: E402

_PR_SET_PDEATHSIG = 1
_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run or measure what it set out to (the message says which)."""


class BenchTimeout(BenchError):
    """The watchdog fired: the run took longer than its bound."""


# --- machine and CPUs -------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_mb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mb = int(line.split()[1]) // 1024
    return {
        "platform": platform.platform(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "mem_mb": mem_mb,
        "python": platform.python_version(),
    }


HOST_LOOP = 10_000_000  # multiply-adds of the host-speed reference loop


def _host_loop() -> float:
    t0 = time.process_time()
    x = 0
    for i in range(HOST_LOOP):
        x += i * 3
    return time.process_time() - t0


def host_loop_s() -> list[float]:
    """CPU seconds a fixed pure-Python loop takes on each CPU, all of them at once.

    These VMs' speed moves by a third or more from minute to minute (another tenant on the
    physical cores); a run's figures are comparable with another's only next to this.
    Both CPUs at once, as a two-process run uses them: one CPU alone can look fast while
    the pair is slow.  About 1 s; slower is a slower host.
    """
    import multiprocessing

    n = os.cpu_count() or 1
    with multiprocessing.get_context("fork").Pool(n) as pool:
        return sorted(round(t, 2) for t in pool.starmap(_host_loop, [()] * n))


def machine_line(m: dict[str, Any]) -> str:
    """One line for the human-readable report."""
    return (
        f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_mb']:,} MB, "
        f"{m['platform']}, Python {m['python']}"
    )


def cpu_split() -> tuple[set[int], set[int]]:
    """(the hub's CPU, everybody else's CPUs); both empty when there is only one CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[0]}, set(cpus[1:])


def pin(cpus: set[int], pid: int = 0) -> None:
    """Pin a process (this one by default) to ``cpus``; no-op when empty."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, cpus)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send ``sig`` to this process when its parent dies (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one (many sockets); returns it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


# --- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` in seconds (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def status_kb(pid: int, key: str = "VmRSS") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def cpu_busy_seconds(cpus: set[int]) -> float:
    """Busy time (everything but idle and iowait) of ``cpus`` so far, from /proc/stat."""
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in line.split()[1:9]]
            busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal
    return busy / _CLK_TCK


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the UDP socket bound to ``port`` (receive buffer full)."""
    total = 0
    for name in ("/proc/net/udp", "/proc/net/udp6"):
        with contextlib.suppress(OSError):
            for line in Path(name).read_text().splitlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    total += int(parts[-1])
    return total


# --- files ------------------------------------------------------------------------------


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    """A free loopback port (UDP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def make_pki(directory: Path) -> Path:
    """A development CA, hub certificate and key in ``directory`` (squall certs init)."""
    certs.init_dir(directory)
    return directory


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


@dataclass(frozen=True, slots=True)
class HubFiles:
    """A hub.yaml on disk and what a client needs to reach it."""

    config: Path
    udp_port: int
    http_port: int
    token: str


def write_hub_config(directory: Path, pki: Path, **overrides: Any) -> HubFiles:
    """hub.yaml in ``directory`` on free loopback ports, its log in ``directory``."""
    udp, http, token = free_port(), free_port(socket.SOCK_STREAM), secrets.token_hex(16)
    cfg: dict[str, Any] = {
        "tls": {
            "cert": str(pki / "hub.pem"),
            "key": str(pki / "hub.key"),
            "device_ca": str(pki / "ca.pem"),
        },
        "listen": f"127.0.0.1:{udp}",
        "log": {"path": str(directory / "hub.db"), "synchronous": "normal"},
        "http": {"listen": f"127.0.0.1:{http}", "token": token},
    }
    path = directory / "hub.yaml"
    path.write_text(yaml.safe_dump(_merge(cfg, overrides)))
    return HubFiles(path, udp, http, token)


def write_edge_config(
    directory: Path, pki: Path, device: str, hubs: list[str], **overrides: Any
) -> Path:
    """edge.yaml for acme/<device> with a fresh device certificate; defaults otherwise."""
    cert, key = certs.issue_device(pki, "acme", device)
    cfg: dict[str, Any] = {
        "device": {"cert": str(cert), "key": str(key), "ca": str(pki / "ca.pem")},
        "hubs": hubs,
        "spool": {"path": str(directory / f"{device}.spool.db")},
    }
    path = directory / f"{device}.yaml"
    path.write_text(yaml.safe_dump(_merge(cfg, overrides)))
    return path


def apt_install(packages: list[str], who: str) -> None:
    """Install Debian ``packages`` a bench needs (as root), saying so on stderr."""
    if not packages:
        return
    print(f"{who}: installing Debian packages {' '.join(packages)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    ok = shutil.which("apt-get") is not None
    if ok:
        # their output goes to stderr: stdout is for the report or the JSON
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, stdout=sys.stderr)
        args = ["apt-get", "install", "-y", "-qq", *packages]
        ok = subprocess.run(args, env=env, check=False, stdout=sys.stderr).returncode == 0
    if not ok:
        raise BenchError(f"cannot install {' '.join(packages)}: needs root and the Debian archive")


# --- child processes --------------------------------------------------------------------


class Child:
    """A child process pinned to some CPUs, dying with us, its stderr kept in a file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        cpus: set[int],
        logdir: Path,
        stdout: int | None = subprocess.PIPE,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.stderr_path = logdir / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}

        def setup() -> None:  # runs in the child between fork and exec
            die_with_parent(signal.SIGKILL)
            pin(cpus)
            if nice:
                os.nice(nice)

        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=self._stderr,
            text=True,
            preexec_fn=setup,
        )
        self.pid = self.proc.pid

    def readline(self, timeout: float) -> str:
        """One line of stdout within ``timeout`` s, or BenchError (with the child's stderr)."""
        import selectors

        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                raise BenchError(f"{self.name}: no output within {timeout:.0f} s{self.tail()}")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=5)
            raise BenchError(f"{self.name} exited ({self.proc.returncode}){self.tail()}")
        return line

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def check_alive(self) -> None:
        """BenchError with the child's stderr if it has exited."""
        if not self.alive():
            raise BenchError(f"{self.name} exited ({self.proc.returncode}){self.tail()}")

    def tail(self, lines: int = 15) -> str:
        """The end of the child's stderr, for error messages."""
        self._stderr.flush()
        with contextlib.suppress(OSError):
            text = self.stderr_path.read_text(errors="replace").strip().splitlines()
            if text:
                return "\n  stderr: " + "\n  stderr: ".join(text[-lines:])
        return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` s; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()
        return self.proc.returncode


_HUB_LAUNCHER = """\
import sys
from transport.cli import main
args = sys.argv[1:]
loop, prof = args.pop(0), args.pop(0)
if loop == "uvloop":
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
if prof:
    import cProfile
    p = cProfile.Profile()
    try:
        rc = p.runcall(main, args)
    finally:
        p.dump_stats(prof)
else:
    rc = main(args)
sys.exit(rc)
"""


class Hub(Child):
    """``python -m transport.cli hub --config F`` (what ``squall hub`` runs) as a child.

    ``uvloop`` and ``profile`` run the same ``main`` through a small launcher instead:
    under uvloop's event loop, and/or under cProfile writing ``profile`` at exit.
    ``wrapper`` goes before the command (``valgrind --tool=callgrind ...``).
    """

    def __init__(
        self,
        files: HubFiles,
        cpus: set[int],
        logdir: Path,
        *,
        uvloop: bool = False,
        profile: Path | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        self.files = files
        hub_args = ["hub", "--config", str(files.config), "--log-level", "warning"]
        if uvloop or profile is not None:
            loop = "uvloop" if uvloop else "asyncio"
            argv = [sys.executable, "-c", _HUB_LAUNCHER, loop, str(profile or ""), *hub_args]
        else:
            argv = [sys.executable, "-m", "transport.cli", *hub_args]
        super().__init__("hub", [*(wrapper or []), *argv], cpus, logdir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the hub has printed its banner and answers /healthz."""
        deadline = time.monotonic() + timeout
        line = self.readline(timeout)
        if "listening" not in line:
            raise BenchError(f"hub: unexpected first line {line!r}{self.tail()}")
        url = f"http://127.0.0.1:{self.files.http_port}/healthz"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"hub: /healthz not answering within {timeout:.0f} s")
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        """The hub's /metrics as {'name{labels}': value} (bearer token from the config)."""
        from prometheus_client.parser import text_string_to_metric_families

        req = urllib.request.Request(
            f"http://127.0.0.1:{self.files.http_port}/metrics",
            headers={"Authorization": f"Bearer {self.files.token}"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except OSError as exc:
            raise BenchError(f"hub: cannot scrape /metrics: {exc}{self.tail()}") from exc
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = float(s.value)
        return out

    def stop_clean(self, timeout: float = 30.0) -> None:
        """SIGTERM and wait; BenchError if the hub did not stop cleanly (exit code != 0)."""
        rc = self.stop(timeout)
        if rc != 0:
            raise BenchError(f"hub exited with {rc} on SIGTERM{self.tail()}")


def histogram(metrics: dict[str, float], name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) buckets of a scraped histogram, +Inf last."""
    prefix = f"{name}_bucket{{le="
    buckets = []
    for key, value in metrics.items():
        if key.startswith(prefix):
            buckets.append((float(key[len(prefix) : -1]), value))
    return sorted(buckets)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus ``histogram_quantile``: linear within the bucket holding the q-th sample."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower_bound  # beyond the largest finite bucket: its bound is all we know
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def histogram_delta(
    after: list[tuple[float, float]], before: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """The samples observed between two scrapes of the same cumulative histogram."""
    old = dict(before)
    return [(b, n - old.get(b, 0.0)) for b, n in after]


# --- bounded runs -----------------------------------------------------------------------


@contextlib.contextmanager
def watchdog(seconds: float) -> Iterator[None]:
    """Bound the block to ``seconds`` (BenchTimeout); SIGTERM/SIGINT unwind it too."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise BenchTimeout(f"the run exceeded its {seconds:.0f} s bound")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    old_term = signal.signal(signal.SIGTERM, on_term)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_alarm)
        signal.signal(signal.SIGTERM, old_term)


def print_json(obj: dict[str, Any]) -> None:
    """One JSON object on stdout."""
    print(json.dumps(obj), flush=True)


_SPINE = ("/asyncio/", "/runners.py", "/selectors.py", "/transport/cli.py", "/hub/main.py")
_IDLE = (
    "<method 'poll' of 'select.epoll' objects>",
    "<method 'run' of '_contextvars.Context' objects>",
)


def profile_top(path: Path, n: int = 10) -> dict[str, list[str]]:
    """Top ``n`` functions of a cProfile dump by cumulative and by own (total) time.

    The event loop's own frames (asyncio, selectors, the CLI entry) and waiting in epoll
    are left out: they sit on every stack or measure idleness, not work.
    """
    import pstats

    stats: dict[Any, Any] = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_cc, calls, tottime, cumtime, _callers) in stats.items():
        if name in _IDLE or any(part in file for part in _SPINE):
            continue
        where = file
        for marker in ("site-packages/", str(REPO) + "/"):
            if marker in where:
                where = where.split(marker, 1)[1]
        label = f"{where}:{line}({name})" if file != "~" else name
        rows.append((cumtime, tottime, calls, label))
    out: dict[str, list[str]] = {}
    for key, index in (("cumulative", 0), ("tottime", 1)):
        top = sorted(rows, key=lambda r: r[index], reverse=True)[:n]
        out[key] = [f"cum {c:7.2f} s  own {t:6.2f} s  {k:>9} calls  {lab}" for c, t, k, lab in top]
    return out


if __name__ == "__main__":
    print("bench/_common.py: helpers for bench/edge.py and bench/hub_ingest.py; nothing to run")
