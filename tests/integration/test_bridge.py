"""The packet-level bridge (``squall link --bridge``) between two real network namespaces.

Needs root (namespaces, veths, AF_PACKET), as on the development machines and in CI;
never skipped. Each bridge gets a name made from this process's pid, so concurrent runs
do not meet, and every fixture removes what it made even when a test fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from simulator.bridgecore import (
    BridgeCore,
    Way,
    corrupt_frame,
    frame_params,
    is_impaired,
    mark_frame,
)
from simulator.linkcli import cli_link
from simulator.linkmodel import LinkParams, LossParams
from simulator.netns import Topology, create_commands, subnet_clashes
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TAG = os.getpid() % 100_000
SUBNET = "10.77.9.0/24"
ADDR_A, ADDR_B = "10.77.9.1", "10.77.9.2"
LOSS_PCT = 5.0
PROFILES_YAML = f"""
profiles:
  lossy:
    loss: {{model: random, loss_pct: {LOSS_PCT}}}
    delay_ms: 5
    jitter_ms: 2
    rate_kbit: 20000
    queue_limit_bytes: 131072
    mtu: 1372
  blackhole:
    loss: {{model: random, loss_pct: 100}}
    mtu: 1372
"""
LOSSY = LinkParams(
    loss=LossParams.bernoulli(LOSS_PCT),
    delay_ms=5,
    jitter_ms=2,
    rate_kbit=20000,
    queue_limit_bytes=131072,
    mtu=1372,
)
DOWNLOAD_BYTES = 2_000_000


# -- frames for the core tests ------------------------------------------------------------

MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def ipv4_udp_frame(payload: bytes = b"x" * 100, tos: int = 0) -> bytes:
    total = 20 + 8 + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, tos, total, 1, 0, 64, 17, 0, b"\n\0\0\1", b"\n\0\0\2")
    udp = struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0)
    return MAC_B + MAC_A + b"\x08\x00" + ip + udp + payload


ARP = MAC_B + MAC_A + b"\x08\x06" + bytes(28)


def ipv6_frame(next_header: int, first_byte: int) -> bytes:
    ip = struct.pack("!IHBB16s16s", 6 << 28, 8, next_header, 255, bytes(16), bytes(16))
    return MAC_B + MAC_A + b"\x86\xdd" + ip + bytes([first_byte]) + bytes(7)


def ipv4_header_ok(frame: bytes) -> bool:
    header = frame[14:34]
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


# -- the sans-I/O core ----------------------------------------------------------------------


def test_only_ip_frames_are_impaired() -> None:
    assert is_impaired(ipv4_udp_frame())
    assert is_impaired(ipv6_frame(17, 0))
    assert not is_impaired(ARP)
    assert not is_impaired(ipv6_frame(58, 135))  # neighbour solicitation
    assert is_impaired(ipv6_frame(58, 128))  # echo request
    tagged = ipv4_udp_frame()[:12] + b"\x81\x00\x00\x05" + ipv4_udp_frame()[12:]
    assert is_impaired(tagged)
    assert not is_impaired(b"\x00" * 10)


def test_arp_crosses_a_link_that_loses_every_ip_frame() -> None:
    core = BridgeCore(LinkParams(loss=LossParams.bernoulli(100), delay_ms=50), name="t", seed=1)
    for i in range(50):
        assert core.offer(Way.A_TO_B, ARP, now=i * 0.01) == "unimpaired"
        assert core.offer(Way.A_TO_B, ipv4_udp_frame(), now=i * 0.01) == "dropped_loss"
        assert core.pop_due(i * 0.01) == [(Way.A_TO_B, ARP, False)]
    stats = core.stats(1.0).a_to_b
    assert stats.packets["unimpaired"] == 50 and stats.packets["dropped_loss"] == 50
    assert stats.packets["passed"] == 0


def test_frames_are_delayed_and_sent_the_other_way() -> None:
    core = BridgeCore(LinkParams(delay_ms=100), name="t")
    frame = ipv4_udp_frame()
    assert core.offer(Way.B_TO_A, frame, now=1.0) == "passed"
    assert core.pop_due(1.05) == []
    assert core.get_timer() == pytest.approx(1.1)
    assert core.pop_due(1.1) == [(Way.B_TO_A, frame, False)]
    assert core.get_timer() is None
    assert core.stats(2.0).b_to_a.delay_count == 1


def test_same_seed_same_fates_and_loss_near_the_profile() -> None:
    def fates(seed: int) -> list[str]:
        core = BridgeCore(LOSSY, name="t", seed=seed)
        return [core.offer(Way.A_TO_B, ipv4_udp_frame(), i * 0.001) for i in range(4000)]

    first = fates(3)
    assert first == fates(3)
    assert first != fates(4)
    lost = first.count("dropped_loss") / len(first)
    assert 0.04 <= lost <= 0.06


def test_corruption_lands_past_the_ethernet_header() -> None:
    frame = ipv4_udp_frame()
    for bit in range(0, len(frame) * 8, 7):
        bad = corrupt_frame(frame, bit)
        assert bad[:14] == frame[:14]
        diff = [i for i, (x, y) in enumerate(zip(frame, bad, strict=True)) if x != y]
        assert len(diff) == 1


def test_held_frames_are_bounded() -> None:
    core = BridgeCore(LinkParams(delay_ms=1000), name="t", max_pending=3)
    results = [core.offer(Way.A_TO_B, ipv4_udp_frame(), 0.0) for _ in range(5)]
    assert results == ["passed"] * 3 + ["dropped_overflow"] * 2
    assert core.offer(Way.A_TO_B, ARP, 0.0) == "unimpaired"  # never held, never refused
    assert core.pending() == {"a_to_b": 4, "b_to_a": 0}


def test_profile_mtu_becomes_the_frame_and_veth_limits() -> None:
    params = frame_params(LinkParams(mtu=1372))
    assert params.mtu == 1372 + 42
    core = BridgeCore(LinkParams(mtu=1372), name="t")
    fits = ipv4_udp_frame(b"x" * 1372)
    assert core.offer(Way.A_TO_B, fits, 0.0) == "passed"
    assert core.offer(Way.A_TO_B, ipv4_udp_frame(b"x" * 1373), 0.0) == "dropped_mtu"
    assert Topology.make("sq0", "10.77.0.0/24", 1372 + 28).ip_mtu == 1400


def test_capture_marks_keep_ip_headers_valid() -> None:
    frame = ipv4_udp_frame(tos=0x03)
    marked = mark_frame(frame, 33)
    assert marked[15] == (33 << 2) | 0x03
    assert ipv4_header_ok(marked)
    assert mark_frame(ARP, 33) == ARP
    v6 = mark_frame(ipv6_frame(17, 0), 34)
    assert (int.from_bytes(v6[14:18], "big") >> 22) & 0x3F == 34


def test_topology_names_addresses_and_plan() -> None:
    topo = Topology.make("sq0", "10.77.0.0/24", 1400)
    assert (topo.ns_a, topo.ns_b, str(topo.addr_a), str(topo.addr_b)) == (
        "sq0-a",
        "sq0-b",
        "10.77.0.1/24",
        "10.77.0.2/24",
    )
    plan = [" ".join(c) for c in create_commands(topo)]
    for end in ("ethtool -K sq0-a", "ip netns exec sq0-b ethtool -K sq0"):
        (line,) = [c for c in plan if c.startswith(end + " ")]
        assert line.endswith("tx off rx off tso off gso off gro off")
    for bad in ("Sq0", "0sq", "a" * 12, "sq-0"):
        with pytest.raises(ValueError, match="bridge name"):
            Topology.make(bad, "10.77.0.0/24", 1400)
    for subnet in ("8.8.8.0/24", "10.77.0.0/31", "10.77.0.1/24", "fd00::/64"):
        with pytest.raises(ValueError, match="subnet"):
            Topology.make("sq0", subnet, 1400)


def test_subnet_clash_with_host_routes() -> None:
    routes: list[dict[str, Any]] = [
        {"dst": "default", "dev": "eth0"},
        {"dst": "10.0.0.0/8", "dev": "tun0"},
        {"dst": "192.168.1.7", "dev": "wlan0", "type": "local"},
    ]
    topo_net = Topology.make("sq0", "10.77.0.0/24", 1400).subnet
    assert subnet_clashes(topo_net, routes) == ["10.0.0.0/8 dev tun0"]
    other = Topology.make("sq0", "192.168.1.0/24", 1400).subnet
    assert subnet_clashes(other, routes) == ["192.168.1.7 dev wlan0"]
    assert subnet_clashes(Topology.make("sq0", "172.16.5.0/24", 1400).subnet, routes) == []


def test_command_line_refuses_options_of_the_other_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_link(["--bridge", "--listen", "127.0.0.1:5000"]) == 2
    assert "--listen: for the UDP proxy" in capsys.readouterr().err
    assert cli_link(["--metrics", "127.0.0.1:9100"]) == 2
    assert "--metrics: only with --bridge" in capsys.readouterr().err
    assert cli_link(["--bridge", "--name", "Bad-Name"]) == 2
    assert "bridge name" in capsys.readouterr().err
    assert cli_link(["--bridge", "--subnet", "10.0.0.0/31"]) == 2
    assert "subnet" in capsys.readouterr().err


# -- real namespaces ----------------------------------------------------------------------


def host_state(name: str) -> tuple[list[str], list[str]]:
    """The namespaces and root links whose names start with ``name-``."""
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True)
    ns = [line.split()[0] for line in spaces.stdout.splitlines() if line.startswith(name + "-")]
    ln = [
        line.split(":")[1].strip().split("@")[0]
        for line in links.stdout.splitlines()
        if line.split(":")[1].strip().startswith(name + "-")
    ]
    return sorted(ns), sorted(ln)


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "simulator.linkcli", "--bridge", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class RunningBridge:
    """A ``squall link --bridge`` subprocess and what it printed."""

    name: str
    proc: subprocess.Popen[str]
    metrics_port: int
    tmp: Path
    lines: queue.Queue[str] = field(default_factory=queue.Queue)
    out: list[str] = field(default_factory=list)
    err: str = ""

    def status(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_port}/status"
        with urllib.request.urlopen(url, timeout=5) as r:
            body: dict[str, Any] = json.load(r)
        return body

    def metrics(self) -> dict[tuple[str, str], float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "squall_bridge_frames_total":
                    out[(s.labels["direction"], s.labels["result"])] = s.value
        return out

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is not None:  # stopped before
            return self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._collect()
        return code

    def _collect(self) -> None:
        while True:
            try:
                self.out.append(self.lines.get(timeout=2))
            except queue.Empty:
                break
            if self.out[-1] == "":
                break
        assert self.proc.stderr is not None
        self.err = self.proc.stderr.read()


def start_bridge(tmp: Path, name: str, profile: str, seed: int, *extra: str) -> RunningBridge:
    profiles = tmp / "links.yaml"
    profiles.write_text(PROFILES_YAML)
    port = free_port(socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator.linkcli",
            "--bridge",
            "--name",
            name,
            "--subnet",
            SUBNET,
            "--profiles",
            str(profiles),
            "--profile",
            profile,
            "--seed",
            str(seed),
            "--metrics",
            f"127.0.0.1:{port}",
            *extra,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    bridge = RunningBridge(name, proc, port, tmp)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            bridge.lines.put(line.rstrip("\n"))
        bridge.lines.put("")

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = bridge.lines.get(timeout=20)
    except queue.Empty:
        first = ""
    if not first.startswith(f"squall link --bridge: {name}-a {ADDR_A}/24 <-> {name}-b"):
        code = bridge.stop()
        raise AssertionError(f"bridge did not start ({code}): {first!r} {bridge.err}")
    bridge.out.append(first)
    return bridge


def cleanup(name: str) -> None:
    """Safety net: whatever a failed test left of bridge ``name`` goes."""
    if host_state(name) != ([], []):
        run_cli("--cleanup", "--name", name)


def in_ns(ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.communicate(timeout=10)


def finish(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timed out: {out} {err}") from None
    assert proc.returncode == 0, err
    return out


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7000))
print("ready", flush=True)
s.settimeout(float(sys.argv[2]))
try:
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(data, peer)
except TimeoutError:
    pass
"""

UDP_CLIENT = """
import socket, sys, time
n = int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 7000))
got = set()
s.settimeout(float(sys.argv[3]))
s.send(b"first")
try:
    first = s.recv(2048) == b"first"
except TimeoutError:
    first = False
s.setblocking(False)
for i in range(n):
    s.send(i.to_bytes(4, "big") + bytes(196))
    if i % 20 == 19:
        time.sleep(0.004)
    try:
        while True:
            got.add(int.from_bytes(s.recv(2048)[:4], "big"))
    except BlockingIOError:
        pass
s.settimeout(1.0)
try:
    while True:
        got.add(int.from_bytes(s.recv(2048)[:4], "big"))
except TimeoutError:
    pass
print(int(first), len(got), flush=True)
"""

TCP_SERVER = """
import random, socket, sys
data = random.Random(7).randbytes(int(sys.argv[2]))
srv = socket.create_server((sys.argv[1], 7001))
print("ready", flush=True)
srv.settimeout(20)
conn, _ = srv.accept()
conn.sendall(data)
conn.close()
"""

TCP_CLIENT = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], 7001), timeout=20)
h, n = hashlib.sha256(), 0
while chunk := s.recv(65536):
    h.update(chunk)
    n += len(chunk)
print(n, h.hexdigest(), flush=True)
"""


def first_frames_pass(name: str) -> int:
    """A seed under which the first IP frame each way passes (the "first packet" check)."""
    for seed in range(100):
        core = BridgeCore(LOSSY, name=name, seed=seed)
        frame = ipv4_udp_frame()
        ab = core.offer(Way.A_TO_B, frame, 0.0)
        if ab == "passed" and core.offer(Way.B_TO_A, frame, 0.0) == "passed":
            return seed
    raise AssertionError("no seed found")


@pytest.fixture(scope="module")
def lossy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBridge]:
    name = f"sqt{TAG}"
    tmp = tmp_path_factory.mktemp("bridge")
    extra = ("--pcap", str(tmp / "link.pcap"), "--decision-log", str(tmp / "decisions.jsonl"))
    bridge = start_bridge(tmp, name, "lossy", first_frames_pass(name), *extra)
    try:
        yield bridge
    finally:
        bridge.stop()
        cleanup(name)


def test_udp_first_packet_then_profile_loss_in_the_counters(lossy: RunningBridge) -> None:
    n = 1000
    before = lossy.status()
    assert before["a_to_b"]["packets"]["passed"] == 0  # nothing crossed yet: ARP caches empty
    server = in_ns(f"{lossy.name}-b", UDP_ECHO, ADDR_B, "20")
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    client = in_ns(f"{lossy.name}-a", UDP_CLIENT, ADDR_B, str(n), "3")
    first, received = map(int, finish(client).split())
    stop_server(server)
    after = lossy.status()

    assert first == 1  # resolved by ARP and carried, though nothing had crossed before
    ab, ba = after["a_to_b"]["packets"], after["b_to_a"]["packets"]
    assert ab["unimpaired"] >= 1 and ba["unimpaired"] >= 1  # the ARP request and reply
    # Every datagram not echoed was dropped by the bridge, and counted, one way or back.
    assert n - received == ab["dropped_loss"] + ba["dropped_loss"]
    for packets in (ab, ba):
        judged = packets["passed"] + packets["dropped_loss"]
        assert 0.4 * LOSS_PCT / 100 <= packets["dropped_loss"] / judged <= 2 * LOSS_PCT / 100
    assert lossy.metrics()[("a_to_b", "dropped_loss")] == ab["dropped_loss"]


def test_a_second_bridge_of_the_same_name_is_refused(lossy: RunningBridge) -> None:
    done = run_cli("--name", lossy.name, "--profile", "3g-poor", "--seed", "1")
    assert done.returncode == 1
    assert f"bridge {lossy.name!r} is already running (pid {lossy.proc.pid}" in done.stderr
    # ... and it left the running bridge's namespaces alone.
    both = [f"{lossy.name}-a", f"{lossy.name}-b"]
    assert host_state(lossy.name) == (both, both)


def test_tcp_download_through_the_lossy_link_is_intact(lossy: RunningBridge) -> None:
    before = lossy.status()
    server = in_ns(f"{lossy.name}-b", TCP_SERVER, ADDR_B, str(DOWNLOAD_BYTES))
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    client = in_ns(f"{lossy.name}-a", TCP_CLIENT, ADDR_B)
    size, digest = finish(client, timeout=25).split()
    finish(server)
    expected = hashlib.sha256(random.Random(7).randbytes(DOWNLOAD_BYTES))
    assert (int(size), digest) == (DOWNLOAD_BYTES, expected.hexdigest())
    after = lossy.status()
    lost = after["b_to_a"]["packets"]["dropped_loss"] - before["b_to_a"]["packets"]["dropped_loss"]
    assert lost > 0  # TCP recovered from real losses
    assert after["b_to_a"]["bytes_out"] - before["b_to_a"]["bytes_out"] > DOWNLOAD_BYTES


def test_stop_removes_everything_and_leaves_a_marked_capture(lossy: RunningBridge) -> None:
    final = lossy.status()
    assert lossy.stop() == 0, lossy.err
    assert host_state(lossy.name) == ([], [])
    assert not Path(f"/run/squall/bridge-{lossy.name}.lock").exists()
    assert any(line.startswith("squall link --bridge: stopped:") for line in lossy.out)

    from scapy.all import ARP as ScapyARP
    from scapy.all import IP, rdpcap

    frames = rdpcap(str(lossy.tmp / "link.pcap"))
    dropped = [f for f in frames if IP in f and f[IP].tos >> 2 == 33]
    drops = final["a_to_b"]["packets"]["dropped_loss"] + final["b_to_a"]["packets"]["dropped_loss"]
    assert len(dropped) == drops
    assert any(ScapyARP in f for f in frames)
    log = (lossy.tmp / "decisions.jsonl").read_text().splitlines()
    decided = [json.loads(line) for line in log if '"event":"packet"' in line]
    assert sum(d["fate"] == "dropped_loss" for d in decided) == drops
    assert {d["dir"] for d in decided} == {"a_to_b", "b_to_a"}


def test_arp_passes_when_every_ip_frame_is_lost(tmp_path: Path) -> None:
    name = f"sqh{TAG}"
    bridge = start_bridge(tmp_path, name, "blackhole", 1)
    try:
        server = in_ns(f"{name}-b", UDP_ECHO, ADDR_B, "20")
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        first, received = map(
            int, finish(in_ns(f"{name}-a", UDP_CLIENT, ADDR_B, "5", "0.5")).split()
        )
        stop_server(server)
        assert (first, received) == (0, 0)
        neigh = subprocess.run(
            ["ip", "-n", f"{name}-a", "-j", "neigh", "show", ADDR_B],
            capture_output=True,
            text=True,
            check=True,
        )
        mac_b = json.loads(
            subprocess.run(
                ["ip", "-n", f"{name}-b", "-j", "link", "show", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )[0]["address"]
        (entry,) = json.loads(neigh.stdout)
        assert entry.get("lladdr") == mac_b  # ARP resolved through the bridge
        status = bridge.status()
        assert status["a_to_b"]["packets"]["dropped_loss"] == 6
        assert status["a_to_b"]["packets"]["passed"] == 0
        assert status["b_to_a"]["packets"]["unimpaired"] >= 1  # the ARP reply
    finally:
        code = bridge.stop()
        cleanup(name)
    assert code == 0, bridge.err
    assert host_state(name) == ([], [])


def test_a_crashed_bridge_is_refused_until_cleanup(tmp_path: Path) -> None:
    name = f"sqk{TAG}"
    bridge = start_bridge(tmp_path, name, "lossy", 1)
    try:
        bridge.stop(signal.SIGKILL)
        both = [f"{name}-a", f"{name}-b"]
        assert host_state(name) == (both, both)
        again = run_cli("--name", name, "--subnet", SUBNET)
        assert again.returncode == 1
        assert "--cleanup" in again.stderr and f"netns {name}-a" in again.stderr
        assert host_state(name)[0]  # refusing did not remove them either
        done = run_cli("--cleanup", "--name", name)
        assert done.returncode == 0, done.stderr
        assert f"removed link {name}-a, link {name}-b, netns {name}-a, netns {name}-b" in (
            done.stdout
        )
        assert host_state(name) == ([], [])
    finally:
        cleanup(name)
