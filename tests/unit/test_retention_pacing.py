"""The hub's retention pacing (hub.ingest): bytes-sized passes, catching up at a bounded duty."""

from __future__ import annotations

import pytest

from hub.ingest import (
    RETENTION_DUTY,
    RETENTION_MIN_PAUSE_S,
    retention_delay,
    retention_rows,
)


def test_a_pass_removes_about_its_byte_budget_in_batches() -> None:
    # 1,000 batches of 20 KB: an 8 MB pass is 409 of them
    assert retention_rows(1_000, 20_000_000, 8 << 20, 10_000) == 419
    # tiny batches: the row cap holds
    assert retention_rows(1_000_000, 100_000_000, 8 << 20, 10_000) == 10_000
    # one huge batch is still removed, one at a time
    assert retention_rows(3, 30 << 20, 8 << 20, 10_000) == 1
    # an empty log: nothing to size by
    assert retention_rows(0, 0, 8 << 20, 10_000) == 10_000


def test_after_a_capped_pass_the_next_comes_soon_at_a_bounded_duty() -> None:
    # the pass removed what it could: a backlog is left
    pause = retention_delay(419, 419, 0.040, 5.0)
    assert pause == pytest.approx(0.040 * (1 - RETENTION_DUTY) / RETENTION_DUTY)
    assert 0.040 / (0.040 + pause) == pytest.approx(RETENTION_DUTY)
    assert retention_delay(10, 10, 0.0001, 5.0) == RETENTION_MIN_PAUSE_S
    assert retention_delay(10, 10, 30.0, 5.0) == 5.0  # never later than the period


def test_after_a_pass_with_room_to_spare_the_next_waits_for_the_period() -> None:
    assert retention_delay(0, 419, 0.001, 5.0) == 5.0
    assert retention_delay(418, 419, 0.040, 5.0) == 5.0
