"""The batch codec is safe to use from several threads at once (hub loop + consumer threads)."""

from __future__ import annotations

import random
import threading

from simulator.telemetry import Drive
from transport.batchcodec import Record, decode_batch, encode_batch


def test_concurrent_encode_and_decode_never_corrupt() -> None:
    """With one zstd context shared by all threads this corrupted data or crashed."""
    car = Drive(random.Random(3))
    batches = []
    for b in range(20):
        recs = [
            Record(
                b * 100 + i + 1, 1_700_000_000_000_000 + i, "acme.t1.gps", {"u": "si"}, car.step()
            )
            for i in range(100)
        ]
        batches.append((recs, *encode_batch(recs)))
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(150):
                recs, codec, payload = rng.choice(batches)
                assert decode_batch(codec, payload, recs[0].seq, len(recs)) == recs
                assert encode_batch(recs) == (codec, payload)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
