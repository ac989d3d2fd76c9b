"""Real peers started by tests on loopback ports: rsyslogd with a private config, and
nats-server with JetStream in a temporary directory.

rsyslogd runs in the foreground from a config written into a temp dir: only imtcp is
loaded (no imuxsock, so /dev/log and the system config are never touched), a private
work directory, the main queue in Direct mode, and an omfile action writing every field
the tests check as one JSON object a line.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import free_port

RSYSLOGD = "/usr/sbin/rsyslogd"
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"

CONF = """\
global(workDirectory="{work}" maxMessageSize="64k")
module(load="imtcp")
main_queue(queue.type="Direct")
template(name="squalljson" type="list" option.jsonf="on") {{
  property(outname="pri" name="pri" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="forwarded") {{
  action(type="omfile" file="{out}" template="squalljson")
}}
input(type="imtcp" port="{port}" address="127.0.0.1" ruleset="forwarded")
"""


class Rsyslog:
    """One rsyslogd on a loopback port, restartable on the same port and output file."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.port = free_port(socket.SOCK_STREAM)
        self.out = tmp / "received.jsonl"
        self.conf = tmp / "rsyslog.conf"
        (tmp / "work").mkdir()
        self.conf.write_text(CONF.format(work=tmp / "work", out=self.out, port=self.port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        pidfile = self.tmp / f"rsyslogd.{self.starts}.pid"
        console = (self.tmp / f"rsyslogd.{self.starts}.log").open("wb")
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(pidfile)],
            stdout=console,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        text = (self.tmp / f"rsyslogd.{self.starts}.log").read_text(errors="replace")
        pytest.fail(f"rsyslogd did not listen on 127.0.0.1:{self.port}:\n{text}")

    def kill(self) -> None:
        """SIGKILL: whatever rsyslogd held in memory or in its socket buffer is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def received(self) -> list[dict[str, Any]]:
        """Every complete line of the output; a line torn by the kill is skipped."""
        if not self.out.exists():
            return []
        out = []
        for line in self.out.read_text(encoding="utf-8", errors="replace").splitlines():
            start = line.rfind('{"pri"')  # a torn line runs into the next one
            try:
                out.append(json.loads(line[start:]))
            except ValueError:
                continue
        return out


class NatsServer:
    """One nats-server with JetStream in a temporary directory; stop/start keep port and data.

    ``max_payload`` (bytes; 0: the server's default of 1 MiB) goes into a config file:
    hubs with the default 1 MiB ``limits.max_frame_bytes`` need more (the recipe says 2MB).
    """

    def __init__(self, root: Path, max_payload: int = 0) -> None:
        self.root = root
        self.port = free_port(socket.SOCK_STREAM)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"nats://127.0.0.1:{self.port}"
        self.max_payload = max_payload

    def start(self) -> None:
        store = self.root / "js"
        store.mkdir(exist_ok=True)
        out = (self.root / "nats-server.log").open("ab")
        argv = [NATS_SERVER, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(self.port)]
        if self.max_payload:
            conf = self.root / "nats.conf"
            conf.write_text(f"max_payload: {self.max_payload}\n")
            argv += ["-c", str(conf)]
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.root / 'nats-server.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    if s.recv(4).startswith(b"INFO"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
