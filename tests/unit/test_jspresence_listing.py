"""Listing the shared presence bucket is bounded: a stuck key listing becomes a typed error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hub import jspresence
from hub.jslog import JetStreamLogError, JetStreamSettings
from hub.jspresence import JetStreamPresence


class _StuckKeys:
    """A bucket whose key listing never ends (nats-py's watcher missing its end marker)."""

    def __init__(self) -> None:
        self.listings = 0

    async def keys(self) -> list[str]:
        self.listings += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_listing_that_never_ends_is_retried_then_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jspresence, "LIST_TIMEOUT_S", 0.05)
    presence = JetStreamPresence(JetStreamSettings(), "hub-a")
    stuck = _StuckKeys()
    presence._kv = stuck  # type: ignore[assignment]
    with pytest.raises(JetStreamLogError, match="timed out 3 times"):
        asyncio.run(presence.current())
    assert stuck.listings == jspresence.LIST_TRIES == 3


def test_an_empty_bucket_lists_nothing() -> None:
    class _Empty:
        async def keys(self) -> Any:
            import nats.js.errors

            raise nats.js.errors.NoKeysError

    presence = JetStreamPresence(JetStreamSettings(), "hub-a")
    presence._kv = _Empty()  # type: ignore[assignment]
    assert asyncio.run(presence.current()) == {}
