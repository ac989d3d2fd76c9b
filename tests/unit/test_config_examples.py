"""The commented example configs in config/ hold exactly the keys and types the code reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import EdgeConfig
from hub.alerts import load_rules
from hub.config import DeviceLimits, HubConfig
from hub.ingest import endpoint_limits
from transport.configload import build, load_yaml
from transport.errors import ConfigError
from transport.quic import HubLimits

CONFIG = Path(__file__).resolve().parents[2] / "config"


def test_hub_example_matches_the_code_and_its_defaults() -> None:
    cfg = build(HubConfig, load_yaml(CONFIG / "hub.yaml"), path="hub.yaml")
    assert cfg.limits.window_records == 8000 and cfg.server.handshake_timeout_s == 10.0
    assert cfg.limits.max_streams == DeviceLimits().max_streams == HubLimits().max_streams == 4
    assert cfg.log.retention_hard_max_bytes == 0 and cfg.http.listen == "127.0.0.1:8080"
    assert cfg.kernel.queue_idle_s == 300.0 and cfg.kernel.default_policy == "block"
    assert cfg.http.tenant_tokens == {} and cfg.subscriptions == []
    assert [a.name for a in cfg.archives] == ["archive"] and cfg.archives[0].rotate_age_s == 86400
    assert cfg.syslog_forwarders == []
    assert cfg.alerts is not None and cfg.alerts.rules == "alerts.yaml"
    assert cfg.alerts.resend_s == 60


def test_alert_rules_example_loads() -> None:
    rules = load_rules(CONFIG / "alerts.yaml")
    assert {r.kind for r in rules.rules} == {"threshold", "rate", "absence"}


def test_edge_example_matches_the_code_and_its_defaults() -> None:
    cfg = build(EdgeConfig, load_yaml(CONFIG / "edge.yaml"), path="edge.yaml")
    assert cfg.sender.linger_ms == 1000 and cfg.spool.group_commit_ms == 50
    assert cfg.spool.durability == "batch" and cfg.inputs.syslog.max_message_bytes == 8192


def test_unknown_key_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "hub.yaml"
    bad.write_text("tls: {cert: a, key: b, device_ca: c}\nlog: {pathh: x}\n")
    with pytest.raises(ConfigError) as exc:
        build(HubConfig, load_yaml(bad), path=str(bad))
    assert exc.value.key == "log.pathh" and str(bad) in str(exc.value)


@pytest.mark.parametrize("value", [1, 0, 129])
def test_max_streams_out_of_range_is_refused_naming_the_key(tmp_path: Path, value: int) -> None:
    bad = tmp_path / "hub.yaml"
    bad.write_text(f"tls: {{cert: a, key: b, device_ca: c}}\nlimits: {{max_streams: {value}}}\n")
    with pytest.raises(ConfigError, match=r"max_streams must be within 2\.\.128") as exc:
        build(HubConfig, load_yaml(bad), path=str(bad))
    assert str(bad) in str(exc.value)


def test_max_streams_reaches_the_quic_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text("tls: {cert: a, key: b, device_ca: c}\nlimits: {max_streams: 2}\n")
    cfg = build(HubConfig, load_yaml(path), path=str(path))
    assert endpoint_limits(cfg.server, cfg.limits).max_streams == 2


def test_stateless_resets_per_s_reaches_the_quic_endpoint(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    path.write_text("tls: {cert: a, key: b, device_ca: c}\nserver: {stateless_resets_per_s: 7}\n")
    cfg = build(HubConfig, load_yaml(path), path=str(path))
    assert endpoint_limits(cfg.server, cfg.limits).stateless_resets_per_s == 7


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_handshakes", 0, "max_handshakes must be at least 1"),
        ("max_connections", -1, "max_connections and server.max_handshakes"),
        ("busy_retry_after_ms", 0, r"busy_retry_after_ms must be within 1\.\.3600000"),
        ("idle_timeout_s", 0, "idle_timeout_s and server.handshake_timeout_s must be positive"),
        ("handshake_timeout_s", -1.0, "handshake_timeout_s must be positive"),
        ("max_tickets", -5, "max_tickets must not be negative"),
        ("udp_receive_buffer_bytes", 1024, "udp_receive_buffer_bytes must be at least 65536"),
        ("stateless_resets_per_s", -1, "stateless_resets_per_s must not be negative"),
    ],
)
def test_server_bounds_out_of_range_are_refused(
    tmp_path: Path, key: str, value: float, message: str
) -> None:
    """A bound that would refuse every device (or never time one out) is a config error."""
    bad = tmp_path / "hub.yaml"
    bad.write_text(f"tls: {{cert: a, key: b, device_ca: c}}\nserver: {{{key}: {value}}}\n")
    with pytest.raises(ConfigError, match=message) as exc:
        build(HubConfig, load_yaml(bad), path=str(bad))
    assert str(bad) in str(exc.value) and exc.value.key == "server"


def test_hard_limit_below_soft_limit_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "hub.yaml"
    bad.write_text(
        "tls: {cert: a, key: b, device_ca: c}\n"
        "log: {retention_max_bytes: 100, retention_hard_max_bytes: 10}\n"
    )
    with pytest.raises(ConfigError, match="retention_hard_max_bytes"):
        build(HubConfig, load_yaml(bad), path=str(bad))


def test_configured_subscriptions_are_checked_at_load(tmp_path: Path) -> None:
    path = tmp_path / "hub.yaml"
    head = "tls: {cert: a, key: b, device_ca: c}\n"
    path.write_text(head + "subscriptions:\n- {queue: ops, subject: acme.>, start: 5}\n")
    (sub,) = build(HubConfig, load_yaml(path), path=str(path)).subscriptions
    assert sub.start == 5 and sub.durable and sub.filter == ""
    path.write_text(
        head + "subscriptions:\n- {queue: ops, subject: acme.>, filter: 'colour == 1'}\n"
    )
    with pytest.raises(ConfigError, match="unknown field 'colour'") as exc:
        build(HubConfig, load_yaml(path), path=str(path))
    assert exc.value.key == "subscriptions[0]"
    path.write_text(head + "http: {tenant_tokens: {acme: short}}\n")
    with pytest.raises(ConfigError, match="at least 16"):
        build(HubConfig, load_yaml(path), path=str(path))


def test_consume_example_matches_the_code_and_its_defaults() -> None:
    from hub.consume import ConsumeConfig, consumer_names

    cfg = build(ConsumeConfig, load_yaml(CONFIG / "consume.yaml"), path="consume.yaml")
    assert cfg.jetstream.stream == "SQUALL" and cfg.jetstream.duplicate_window_s == 120
    assert cfg.ack_wait_s == 60 and cfg.max_ack_pending == 1000 and cfg.metrics_listen == ""
    assert consumer_names(cfg) == ["archive", "alerts"]
    assert cfg.alerts is not None and cfg.alerts.log_sink and cfg.alerts.state_path == ""


def test_hub_example_documents_the_jetstream_backend() -> None:
    cfg = build(HubConfig, load_yaml(CONFIG / "hub.yaml"), path="hub.yaml")
    assert cfg.log.backend == "sqlite" and cfg.name == ""
    assert cfg.jetstream.servers == ["nats://127.0.0.1:4222"] and cfg.jetstream.replicas == 1


def test_jetstream_backend_refuses_in_hub_consumers_naming_squall_consume(
    tmp_path: Path,
) -> None:
    path = tmp_path / "hub.yaml"
    head = "tls: {cert: a, key: b, device_ca: c}\nlog: {backend: jetstream}\n"
    path.write_text(head + "archives: [{name: a, directory: x}]\n")
    with pytest.raises(ConfigError, match="squall consume") as exc:
        build(HubConfig, load_yaml(path), path=str(path))
    assert "archives" in str(exc.value)
    path.write_text(head + "alerts: {rules: r.yaml}\nsyslog_forwarders: []\n")
    with pytest.raises(ConfigError, match=r"alerts: with log\.backend jetstream"):
        build(HubConfig, load_yaml(path), path=str(path))
    path.write_text(head + "subscriptions:\n- {queue: ops, subject: acme.>}\n")
    with pytest.raises(ConfigError, match="subscriptions"):
        build(HubConfig, load_yaml(path), path=str(path))
    path.write_text(head)  # the jetstream backend alone is fine
    assert build(HubConfig, load_yaml(path), path=str(path)).log.backend == "jetstream"


def test_consume_config_needs_a_consumer_and_unique_names(tmp_path: Path) -> None:
    from hub.consume import ConsumeConfig

    path = tmp_path / "consume.yaml"
    path.write_text("jetstream: {stream: S}\n")
    with pytest.raises(ConfigError, match="nothing to run"):
        build(ConsumeConfig, load_yaml(path), path=str(path))
    path.write_text("archives: [{name: a, directory: x}, {name: a, directory: y}]\n")
    with pytest.raises(ConfigError, match="used twice"):
        build(ConsumeConfig, load_yaml(path), path=str(path))
    path.write_text("archives: [{name: a.b, directory: x}]\n")
    with pytest.raises(ConfigError, match="durable name"):
        build(ConsumeConfig, load_yaml(path), path=str(path))
