"""Presence: online / stale / offline transitions, each change reported once."""

from __future__ import annotations

from hub.presence import Presence, State


def test_transitions_and_changes() -> None:
    p = Presence(stale_after_s=10, offline_after_s=30)
    p.connected("acme", "t1", "127.0.0.1:1", 0.0)
    p.heartbeat("acme", "t1", {"d": {"1": [5, 100]}}, 5.0)
    p.tick(14.0)
    assert p.devices[("acme", "t1")].state is State.ONLINE
    p.tick(16.0)
    assert p.devices[("acme", "t1")].state is State.STALE
    p.heard("acme", "t1", 17.0, last_seq=9, records=3)
    assert p.devices[("acme", "t1")].state is State.ONLINE
    p.disconnected("acme", "t1", 20.0)
    changes = [(c.old, c.new) for c in p.take_changes()]
    assert changes == [
        (State.OFFLINE, State.ONLINE),
        (State.ONLINE, State.STALE),
        (State.STALE, State.ONLINE),
        (State.ONLINE, State.OFFLINE),
    ]
    assert p.take_changes() == []
    info = p.devices[("acme", "t1")].as_json(21.0)
    assert info["presence"] == "offline" and info["last_seq"] == 9 and info["spool_depth"]


def test_silent_session_goes_stale_then_offline() -> None:
    p = Presence(stale_after_s=10, offline_after_s=30)
    p.connected("acme", "t1", "a", 0.0)
    p.tick(11.0)
    p.tick(31.0)
    assert p.devices[("acme", "t1")].state is State.OFFLINE
    assert p.counts() == {"online": 0, "stale": 0, "offline": 1}


def test_bounded_device_table() -> None:
    p = Presence(max_devices=3)
    for i in range(5):
        p.connected("acme", f"t{i}", "a", float(i))
        p.disconnected("acme", f"t{i}", float(i))
    assert len(p.devices) == 3 and p.forgotten == 2
