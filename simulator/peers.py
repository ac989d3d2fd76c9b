"""Real peers the demo and the fleet start on loopback: rsyslogd and Alertmanager.

Each runs as a child process from a private config in its own folder (rsyslogd loads
only imtcp: it never touches /dev/log or the system's config), on a free loopback
port, and is stopped with the run.  ``start_*`` returns None, with the reason in
``why_not``, when the program is not installed (``make system-deps`` installs both).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RSYSLOGD = ("rsyslogd", "/usr/sbin/rsyslogd")
ALERTMANAGER = ("prometheus-alertmanager", "alertmanager", "/usr/bin/prometheus-alertmanager")

_RSYSLOG_CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
template(name="squall" type="string"
         string="%timereported:::date-rfc3339% %hostname% %app-name% %pri-text%: %msg%\\n")
ruleset(name="fleet") {{
  action(type="omfile" file="{out}" template="squall")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="fleet")
"""

_ALERTMANAGER_CONF = """\
route:
  receiver: "null"
  group_by: [alertname, tenant]
  group_wait: 1s
  group_interval: 5s
  repeat_interval: 1h
receivers:
  - name: "null"
"""


def _which(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


def _free_tcp() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Peer:
    """A child process serving on a loopback port."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    folder: Path
    files: dict[str, Path] = field(default_factory=dict)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


why_not: dict[str, str] = {}


def _wait(peer: Peer, ready: Any, timeout: float = 15.0) -> Peer | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if peer.proc.poll() is not None:
            break
        with contextlib.suppress(OSError):
            if ready():
                return peer
        time.sleep(0.05)
    peer.stop()
    log = peer.folder / "console.log"
    why_not[peer.name] = f"did not start (see {log})"
    return None


def start_rsyslog(folder: Path) -> Peer | None:
    """rsyslogd with imtcp on a free port, writing what it receives to ``folder/messages.log``."""
    binary = _which(RSYSLOGD)
    if binary is None:
        why_not["rsyslog"] = "rsyslogd is not installed (make system-deps)"
        return None
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "work").mkdir(exist_ok=True)
    port, out = _free_tcp(), folder / "messages.log"
    conf = folder / "rsyslog.conf"
    conf.write_text(_RSYSLOG_CONF.format(work=folder / "work", out=out, port=port))
    console = (folder / "console.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-n", "-f", str(conf), "-i", str(folder / "rsyslogd.pid")],
        stdout=console,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    peer = Peer("rsyslog", proc, port, folder, {"messages": out})

    def ready() -> bool:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True

    return _wait(peer, ready)


def start_alertmanager(folder: Path) -> Peer | None:
    """Alertmanager (API v2) on a free port, clustering off, its data in ``folder``."""
    binary = _which(ALERTMANAGER)
    if binary is None:
        why_not["alertmanager"] = "prometheus-alertmanager is not installed (make system-deps)"
        return None
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_tcp()
    conf = folder / "alertmanager.yml"
    conf.write_text(_ALERTMANAGER_CONF)
    console = (folder / "console.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={conf}",
            f"--storage.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=console,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    peer = Peer("alertmanager", proc, port, folder)

    def ready() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=1) as r:
            return bool(r.status == 200)

    return _wait(peer, ready)


def alertmanager_alerts(port: int) -> list[dict[str, Any]]:
    """What Alertmanager holds now (GET /api/v2/alerts)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/alerts", timeout=5) as r:
        data: list[dict[str, Any]] = json.loads(r.read())
    return data
