"""``squall demo``: a fleet on a bad link delivering everything, in about a minute.

One process runs a hub (durable SQLite log), the link-impairment proxy on a 3G profile
with a tunnel outage in the middle, N vehicles (real edge agents with on-disk spools,
talking QUIC through the proxy), and a JSON-lines archive consumer.  At the end it
checks every accepted record against the archive and says plainly what arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from edge.agent import Agent
from edge.config import DeviceFiles, EdgeConfig, SenderSettings, SpoolConfig
from hub.alertsinks import ALERTS_DEVICE, AlertSettings
from hub.archive import ArchiveSettings, JsonArchive
from hub.config import HttpSettings, HubConfig, LogSettings, PresenceSettings, TlsFiles
from hub.consumers import Consumers
from hub.http import start_http
from hub.server import Hub
from hub.syslogfwd import SyslogForwardSettings
from simulator import peers as real_peers
from simulator import virtual
from simulator.plots import Sample, plot_latency, plot_spool
from simulator.proxy import start_proxy
from simulator.vehicle import drive
from transport import certs


def _free_udp() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The demo's alert rules (written to <out>/alerts.yaml; config/alerts.yaml has the
# production-sized examples): a fleet in a tunnel is one page, not fifty.
DEMO_RULES: dict[str, Any] = {
    "rules": [
        {
            "name": "device_offline",
            "kind": "absence",
            "for": "5s",  # a blip on a poor link is not a page; a tunnel is
            "group_by": ["tenant"],
            "group_min": 3,
            "group_wait": "3s",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "{device} offline for more than {for} s"},
            "group_annotations": {"summary": "{count} devices of {tenant} offline: {devices}"},
        },
        {
            "name": "auth_failure_burst",
            "kind": "rate",
            "subject": "*.*.log.*",
            "filter": 'body ~ "Failed password*"',
            "more_than": 20,  # demo-sized; config/alerts.yaml says 50 in 60 s
            "window": "60s",
            "for": 0,
            "labels": {"severity": "critical"},
            "annotations": {"summary": "{device}: {count} failed SSH logins in {window} s"},
        },
        {
            "name": "low_battery",
            "kind": "threshold",
            "subject": "*.*.telemetry.gps",
            "field": "body.battery_pct",
            "op": "<",
            "value": 10,
            "for": "30s",
            "labels": {"severity": "warning"},
        },
    ]
}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Demo:
    """Everything the demo runs, in one event loop."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.agents: list[Agent] = []
        self.published = 0
        self.result: dict[str, Any] = {}
        self.samples: list[Sample] = []
        self.outages: list[tuple[float, float]] = []
        self.peers: dict[str, real_peers.Peer] = {}
        self.t0 = 0.0

    def _setup_pki(self) -> Path:
        pki = self.out / "certs"
        certs.init_dir(pki)
        return pki

    async def run(self) -> int:
        a = self.args
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        pki = self._setup_pki()
        hub_port = _free_udp()
        consumers = self._consumers()
        hub_cfg = HubConfig(
            tls=TlsFiles(str(pki / "hub.pem"), str(pki / "hub.key"), str(pki / "ca.pem")),
            listen=f"127.0.0.1:{hub_port}",
            log=LogSettings(path=str(self.out / "hub.db")),
            # a tunnel longer than offline_after_s takes the fleet offline (and pages once)
            presence=PresenceSettings(stale_after_s=6, offline_after_s=a.offline_after),
            http=HttpSettings(listen="127.0.0.1:0", token=secrets.token_hex(8)),
            **consumers,
        )
        hub = Hub(hub_cfg)
        await hub.start()
        runner, http_port = await start_http(hub)
        proxy = await start_proxy(
            ("127.0.0.1", hub_port), listen=("127.0.0.1", 0), profile=a.profile, seed=a.seed
        )
        link = f"{proxy.listen_addr[0]}:{proxy.listen_addr[1]}"
        print(
            f"squall demo: {a.vehicles} vehicles -> link {a.profile} ({link}) -> hub udp {hub_port}"
        )
        api = f"http://127.0.0.1:{http_port}/v1/devices"
        print(f"             HTTP API {api} (token {hub_cfg.http.token})")
        print(f"             a {a.outage_s:.0f} s tunnel outage starts at t={a.outage_at:.0f} s\n")
        for i in range(a.vehicles):
            self.agents.append(self._make_agent(pki, i, link))
        for agent in self.agents:
            agent.start()
        archive = _consumers(hub).archives[0].archive
        self._print_peers()
        loop = asyncio.get_running_loop()
        rng = random.Random(a.seed)
        attacked = set(rng.sample(range(a.vehicles), k=max(1, a.vehicles // 25)))
        drives = [
            loop.create_task(
                drive(ag, a.rate, a.duration, random.Random(a.seed + i), i in attacked)
            )
            for i, ag in enumerate(self.agents)
        ]
        t0 = self.t0 = time.monotonic()
        outage_done = False
        while not all(d.done() for d in drives):
            await asyncio.sleep(2.0)
            t = time.monotonic() - t0
            if not outage_done and a.outage_s > 0 and t >= a.outage_at:
                proxy.force_outage(a.outage_s)
                self.outages.append((t, t + a.outage_s))
                outage_done = True
                print(
                    f"  t={t:5.1f}s  >>> entering a tunnel: the link is down for {a.outage_s:.0f} s"
                )
            self._progress(t, hub, archive)
        self.published = sum(d.result() for d in drives)
        print("  publishing stopped; draining spools ...")
        deadline = time.monotonic() + a.drain
        while time.monotonic() < deadline and any(self._depth(ag) for ag in self.agents):
            await asyncio.sleep(1.0)
            self._progress(time.monotonic() - t0, hub, archive)
        await self._settle(hub)
        stats = proxy.stats()
        for agent in self.agents:
            await agent.stop()
        await proxy.close()
        alerts_firing = [dict(al.labels) for al in _consumers(hub).active_alerts()]
        await hub.stop()  # the archive catches up with the log before the hub stops
        await runner.cleanup()
        in_alertmanager = self._alertmanager_alerts()
        for peer in self.peers.values():
            peer.stop()
        return self._report(stats, hub, alerts_firing, in_alertmanager)

    def _consumers(self) -> dict[str, Any]:
        """Every consumer on: the archive, syslog to a private rsyslogd, alerts to Alertmanager."""
        a = self.args
        rules = self.out / "alerts.yaml"
        rules.write_text(yaml.safe_dump(DEMO_RULES, sort_keys=False))
        if a.peers:
            for name, start in (
                ("rsyslog", real_peers.start_rsyslog),
                ("alertmanager", real_peers.start_alertmanager),
            ):
                peer = start(self.out / name)
                if peer is not None:
                    self.peers[name] = peer
        forwarders = []
        if "rsyslog" in self.peers:
            target = f"127.0.0.1:{self.peers['rsyslog'].port}"
            forwarders.append(
                SyslogForwardSettings(name="syslog", target=target, subject="*.*.log.>")
            )
        managers = []
        if "alertmanager" in self.peers:
            managers.append(f"http://127.0.0.1:{self.peers['alertmanager'].port}")
        return {
            "archives": [ArchiveSettings(name="archive", directory=str(self.out / "archive"))],
            "syslog_forwarders": forwarders,
            "alerts": AlertSettings(
                rules=str(rules), alertmanager_urls=managers, resend_s=10.0, poll_s=0.25
            ),
        }

    def _print_peers(self) -> None:
        for name in ("rsyslog", "alertmanager"):
            peer = self.peers.get(name)
            if peer is not None:
                print(f"             {name} on 127.0.0.1:{peer.port} (started for the demo)")
            elif self.args.peers:
                print(f"             {name}: not started — {real_peers.why_not.get(name, '?')}")

    async def _settle(self, hub: Hub) -> None:
        """Give the consumers a moment to catch up with the last commits and presence."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            behind = hub.log.next_offset - 1 - _consumers(hub).archives[0].archive.cursor.committed
            if behind <= 0:
                break
            await asyncio.sleep(0.2)

    def _alertmanager_alerts(self) -> list[dict[str, Any]] | None:
        peer = self.peers.get("alertmanager")
        if peer is None:
            return None
        try:
            return real_peers.alertmanager_alerts(peer.port)
        except OSError:
            return None

    def _make_agent(self, pki: Path, i: int, link: str) -> Agent:
        device = f"truck-{i:03d}"
        cert, key = certs.issue_device(pki, "acme", device)
        cfg = EdgeConfig(
            device=DeviceFiles(str(cert), str(key), str(pki / "ca.pem")),
            hubs=[link],
            spool=SpoolConfig(path=str(self.out / "spools" / f"{device}.db")),
            # 3G data costs money: wait up to a second to fill a batch, heartbeat every 5 s
            sender=SenderSettings(linger_ms=1000, heartbeat_s=5.0),
        )
        (self.out / "spools").mkdir(exist_ok=True)
        cfg.backoff.base_s = 0.5
        cfg.backoff.cap_s = 4.0
        return Agent(cfg, seed=i)

    @staticmethod
    def _depth(agent: Agent) -> int:
        return sum(d[0] for d in agent.spool.depth().values())

    def _progress(self, t: float, hub: Hub, archive: JsonArchive) -> None:
        accepted = sum(ag.stats.accepted for ag in self.agents)
        acked = sum(ag.stats.acked for ag in self.agents)
        spooled = sum(self._depth(ag) for ag in self.agents)
        online = hub.presence.counts()["online"]
        firing = len(_consumers(hub).active_alerts())
        self.samples.append(Sample(t, spooled, accepted, archive.stats.written, online))
        print(
            f"  t={t:5.1f}s  accepted {accepted:7d}  acked {acked:7d}  in spools {spooled:6d}"
            f"  archived {archive.stats.written:7d}  online {online:3d}/{len(self.agents)}"
            f"  alerts firing {firing}",
            flush=True,
        )

    def _report(
        self,
        link: Any,
        hub: Hub,
        firing: list[dict[str, str]],
        in_alertmanager: list[dict[str, Any]] | None,
    ) -> int:
        self.result = self._result(link, hub)
        self.result["alerts"]["firing_at_end"] = firing
        if in_alertmanager is not None:
            self.result["alerts"]["alertmanager_active"] = len(in_alertmanager)
        self.result["where"] = self._where()
        self.result["plots"] = self._plots()
        _print_result(self.result, self.out)
        return 0 if self.result["lost"] == 0 and self.result["duplicates"] == 0 else 1

    def _result(self, link: Any, hub: Hub) -> dict[str, Any]:
        accepted: dict[str, int] = {ag.device: ag.spool.last_seq for ag in self.agents}
        evicted: dict[str, int] = defaultdict(int)
        for ag in self.agents:
            for lane, reasons in ag.spool.evicted.items():
                evicted[lane] += sum(reasons.values())
        seen: dict[str, list[int]] = defaultdict(list)
        latencies: list[float] = []
        self._points: list[tuple[float, float]] = []
        events: list[dict[str, Any]] = []
        presence = 0
        wall0 = time.time() - (time.monotonic() - self.t0)
        for path in sorted((self.out / "archive").glob("*.jsonl")):
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec["subject"].endswith(".presence"):
                    presence += 1
                    continue
                if rec["device"] == ALERTS_DEVICE:
                    events.append(rec["body"])
                    continue
                seen[rec["device"]].append(rec["seq"])
                ms = (rec["received_us"] - rec["ts_us"]) / 1000
                latencies.append(ms)
                self._points.append((rec["ts_us"] / 1e6 - wall0, ms))
        lost = duplicates = 0
        for device, last in accepted.items():
            got = seen.get(device, [])
            duplicates += len(got) - len(set(got))
            lost += len(set(range(1, last + 1)) - set(got))
        delivered = sum(len(set(v)) for v in seen.values())
        up, down = link.direction("up"), link.direction("down")
        offered = sum(up.packets.values()) + sum(down.packets.values())
        summary = {
            "sent": sum(accepted.values()),
            "delivered": delivered,
            "duplicates": duplicates,
            "lost": lost,
            "evicted": dict(evicted),
            "latency_ms": {
                "p50": round(_percentile(latencies, 0.5), 1),
                "p99": round(_percentile(latencies, 0.99), 1),
                "max": round(max(latencies, default=0.0), 1),
            },
            "wire_bytes_per_record": round((up.bytes_out + down.bytes_out) / max(delivered, 1), 1),
            "link_packets": offered,
            "link_dropped": up.dropped + down.dropped,
        }
        return {
            **summary,
            "devices": len(self.agents),
            "profile": link.profile,
            "presence_records": presence,
            "outages_unix_s": [[round(wall0 + a, 3), round(wall0 + b, 3)] for a, b in self.outages],
            "hub_duplicates_skipped": hub.counters["duplicates"],
            "alerts": {
                "fired": sum(e["status"] == "firing" for e in events),
                "resolved": sum(e["status"] == "resolved" for e in events),
                "events": [
                    {
                        **e["labels"],
                        "status": e["status"],
                        "summary": _summary(e),
                        "starts_at": e["startsAt"],
                        "ends_at": e["endsAt"],
                    }
                    for e in events
                ],
            },
            "profiles": {link.profile: summary},
        }

    def _where(self) -> dict[str, Any]:
        where: dict[str, Any] = {
            "archive": str(self.out / "archive"),
            "log": str(self.out / "hub.db"),
        }
        rs = self.peers.get("rsyslog")
        if rs is not None:
            path = rs.files["messages"]
            lines = len(path.read_text(errors="replace").splitlines()) if path.exists() else 0
            where["rsyslog"] = {"file": str(path), "lines": lines}
        am = self.peers.get("alertmanager")
        if am is not None:
            where["alertmanager"] = f"http://127.0.0.1:{am.port}"
        return where

    def _plots(self) -> list[str]:
        title = f"{len(self.agents)} vehicles on {self.args.profile}"
        return [
            str(plot_latency(self.out / "latency.png", self._points, self.outages, title)),
            str(plot_spool(self.out / "spool.png", self.samples, self.outages, title)),
        ]


def _consumers(hub: Hub) -> Consumers:
    assert hub.consumers is not None, "the demo's hub runs its consumers (SQLite log)"
    return hub.consumers


def _summary(event: dict[str, Any]) -> str:
    text: str = event.get("annotations", {}).get("summary") or ""
    return text


def _print_result(r: dict[str, Any], out: Path) -> None:
    lat = r["latency_ms"]
    print("\n=== squall: result ===")
    print(f"records accepted by the edges : {r['sent']}")
    print(f"records delivered (archive)   : {r['delivered']}")
    print(f"lost                          : {r['lost']}")
    print(f"duplicated                    : {r['duplicates']}")
    print(f"evicted by spool policy       : {sum(r['evicted'].values())} {r['evicted'] or ''}")
    p50, p99, worst = lat["p50"], lat["p99"], lat["max"]
    print(f"accept -> hub latency ms      : p50 {p50:.0f}  p99 {p99:.0f}  max {worst:.0f}")
    wire = r["wire_bytes_per_record"]
    print(f"bytes on the link per record  : {wire} (UDP payload, both directions)")
    print(f"link {r['profile']:24} : {r['link_dropped']} packets dropped of {r['link_packets']}")
    print(f"presence changes recorded     : {r['presence_records']}")
    print(f"hub duplicates skipped        : {r['hub_duplicates_skipped']}")
    w = r["where"]
    print("\nwhere it went:")
    print(f"  archive (JSON lines per tenant)  {w['archive']}/")
    if "rsyslog" in w:
        rs = w["rsyslog"]
        print(f"  syslog (a real rsyslogd)         {rs['file']} ({rs['lines']} lines)")
    print(f"  durable log (SQLite)             {w['log']}")
    print(f"  plots                            {', '.join(r['plots'])}")
    al = r["alerts"]
    print(f"\nalerts: {al['fired']} fired, {al['resolved']} resolved", end="")
    print(f" (Alertmanager at {w['alertmanager']})" if "alertmanager" in w else "")
    for e in al["events"]:
        print(f"  {e['status']:8} {e.get('alertname', '?'):20} {e.get('summary') or ''}")
    if r["lost"] == 0 and r["duplicates"] == 0:
        print("\nEverything accepted was delivered exactly once.")
    else:
        print(f"\nNOT CLEAN: {r['lost']} lost, {r['duplicates']} duplicated.")


def _common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--rate", type=float, default=2.0, help="telemetry records/s per vehicle")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of driving")
    ap.add_argument("--profile", default="3g-poor", help="link profile (config/links.yaml)")
    ap.add_argument("--drain", type=float, default=90.0, help="max seconds to empty the spools")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--offline-after", type=float, default=10.0, help="presence: silent this long = offline"
    )
    ap.add_argument(
        "--no-peers",
        dest="peers",
        action="store_false",
        help="do not start rsyslogd and Alertmanager (archive and alert log only)",
    )


def cli_fleet(argv: list[str]) -> int:
    """Entry point of ``squall fleet`` (real sockets; one process runs everything)."""
    ap = argparse.ArgumentParser(
        prog="squall fleet",
        description="Simulate N vehicles through the link proxy into an embedded hub, then "
        "check every accepted record against the archive consumer and write a JSON report.",
    )
    ap.add_argument("--devices", type=int, default=20)
    _common_args(ap)
    ap.add_argument("--outage-at", type=float, default=0.0)
    ap.add_argument("--outage-s", type=float, default=0.0, help="force one outage (0: none)")
    ap.add_argument("--report", help="write the JSON report here")
    ap.add_argument(
        "--out", help="work directory (default: fleet-out; --virtual: a removed tmpfs scratch)"
    )
    virtual.add_arguments(ap)
    args = ap.parse_args(argv)
    args.vehicles = args.devices
    if args.devices < 1 or args.rate <= 0 or args.duration <= 0:
        print("squall fleet: --devices, --rate and --duration must be positive", file=sys.stderr)
        return 2
    if args.virtual:
        return virtual.cli(args)
    args.out = args.out or "fleet-out"
    demo = Demo(args)
    try:
        code = asyncio.run(demo.run())
    except KeyboardInterrupt:
        return 130
    if args.report:
        Path(args.report).write_text(json.dumps(demo.result, indent=2) + "\n")
        print(f"report: {args.report}")
    return code


def cli_demo(argv: list[str]) -> int:
    """Entry point of ``squall demo`` (and ``make demo``)."""
    ap = argparse.ArgumentParser(prog="squall demo", description=__doc__)
    ap.add_argument("--vehicles", type=int, default=50)
    _common_args(ap)
    ap.add_argument("--outage-at", type=float, default=20.0)
    ap.add_argument("--outage-s", type=float, default=25.0)
    ap.add_argument("--out", default="demo-out")
    args = ap.parse_args(argv)
    try:
        return asyncio.run(Demo(args).run())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli_demo(sys.argv[1:]))
