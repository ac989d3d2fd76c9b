"""Retention keeps up: a log far past ``retention_max_bytes`` is trimmed in many short passes
that follow one another at once, not one capped pass per period."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import pytest

from hub.config import load_hub_config
from hub.log import Log, PendingBatch
from hub.server import Hub
from transport.batchcodec import CODEC_NONE, Record

from .conftest import write_hub_config

pytestmark = pytest.mark.integration

BATCHES = 400
MAX_BYTES = 100_000


def fill(db: Path, batches: int) -> int:
    """``batches`` batches of 10 records (2 KB of body each) in a fresh log; their bytes."""
    rng = random.Random(11)
    log = Log(str(db))
    try:
        items = [
            PendingBatch(
                "acme",
                "t1",
                1,
                1,
                [Record(b * 10 + i, 0, "acme.t1.x", {}, rng.randbytes(200)) for i in range(1, 11)],
                CODEC_NONE,
                None,
                int(time.time() * 1e6),  # received now: only the size limit applies
            )
            for b in range(batches)
        ]
        log.append_group(items, time.time())
        return log.size_bytes()
    finally:
        log.close()


def test_a_backlog_of_many_passes_is_cleared_without_waiting_a_period_each(
    tmp_path: Path, pki: Path
) -> None:
    stored = fill(tmp_path / "hub.db", BATCHES)
    per_batch = stored // BATCHES
    cfg = load_hub_config(
        write_hub_config(
            tmp_path, pki, log={"retention_max_bytes": MAX_BYTES, "retention_max_age_s": 86400}
        )
    )
    outcome: dict[str, Any] = {}

    async def main() -> None:
        hub = Hub(cfg)
        hub.retention_period_s = 3600.0  # only catching up can clear it within the test
        hub.retention_pass_bytes = 10 * per_batch  # ~10 batches a pass: ~35 passes
        await hub.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        while hub.log.size_bytes() > MAX_BYTES:
            assert loop.time() < end, (hub.log.size_bytes(), hub.counters["retention_passes"])
            await asyncio.sleep(0.02)
        passes = hub.counters["retention_passes"]
        await asyncio.sleep(0.3)
        outcome["passes"] = passes, hub.counters["retention_passes"]
        outcome["stats"] = hub.log.stats()
        await hub.stop()

    asyncio.run(asyncio.wait_for(main(), 60))
    before, after = outcome["passes"]
    st = outcome["stats"]
    assert (stored - MAX_BYTES) / (10 * per_batch) < before  # more than one pass's worth
    assert after == before  # caught up: the next pass waits for its period
    assert MAX_BYTES - per_batch < st.bytes <= MAX_BYTES  # down to the limit, not below it
    assert st.retention_records_removed == (BATCHES - st.rows) * 10
