import asyncio

import numpy as np
import pytest

from purifier.errors import InvalidProbabilities
from purifier_server.batcher import Batcher
from purifier_server.metrics import SidecarMetrics


async def _with_batcher(defense, max_rows, max_wait, body):
    b = Batcher(defense, max_rows, max_wait, SidecarMetrics())
    b.start()
    try:
        return await body(b)
    finally:
        await b.close()


def test_concurrent_requests_are_coalesced_and_equal_unbatched(flatten, probs):
    parts = np.array_split(probs, 16)
    expected = [flatten.transform(p) for p in parts]
    flatten.calls.clear()

    async def body(b):
        return await asyncio.gather(*(b.submit(p) for p in parts))

    got = asyncio.run(_with_batcher(flatten, max_rows=1000, max_wait=0.05, body=body))
    assert len(flatten.calls) < len(parts)          # coalesced
    assert sum(flatten.calls) == len(probs)          # every row exactly once
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and np.array_equal(g, e)


def test_max_rows_caps_each_defense_call(flatten, probs):
    parts = np.array_split(probs, 16)  # 4 rows each

    async def body(b):
        return await asyncio.gather(*(b.submit(p) for p in parts))

    asyncio.run(_with_batcher(flatten, max_rows=8, max_wait=0.02, body=body))
    assert max(flatten.calls) <= 8 and sum(flatten.calls) == len(probs)


def test_mixed_dtypes_are_defended_separately_and_errors_reach_every_waiter(flatten, probs):
    bad = probs[:2].copy()
    bad[0, 0] = np.nan

    async def body(b):
        return await asyncio.gather(b.submit(probs[:3]), b.submit(probs[3:5].astype(np.float64)),
                                    b.submit(bad), return_exceptions=True)

    ok32, ok64, err = asyncio.run(_with_batcher(flatten, 1000, 0.05, body))
    assert ok32.dtype == np.float32 and ok64.dtype == np.float64
    assert np.array_equal(ok64, flatten.transform(probs[3:5].astype(np.float64)))
    assert isinstance(err, InvalidProbabilities)


def test_submit_after_close_fails_closed(flatten, probs):
    async def body():
        b = Batcher(flatten, 8, 0.0, SidecarMetrics())
        b.start()
        await b.close()
        with pytest.raises(RuntimeError, match="not running"):
            await b.submit(probs[:1])

    asyncio.run(body())


def test_large_requests_are_chunked_after_small_ones_and_equal_unbatched(flatten, probs):
    """One 64-row request and three 1-row requests, 8 rows per call: the first call holds the three
    small requests only, then the large one is defended in chunks of 8."""
    large, small = probs, [probs[i:i + 1] for i in range(3)]
    expected = flatten.transform(large)
    flatten.calls.clear()

    async def body(b):
        return await asyncio.gather(b.submit(large), *(b.submit(s) for s in small))

    got_large, *got_small = asyncio.run(_with_batcher(flatten, max_rows=8, max_wait=0.0, body=body))
    assert flatten.calls == [3] + [8] * 8
    assert np.array_equal(got_large, expected)                     # chunks reassembled in order
    for got, s in zip(got_small, small, strict=True):
        assert np.array_equal(got, flatten.transform(s))


def test_small_and_large_calls_alternate_while_both_wait(probs):
    """Small requests arriving while a large one is chunked get every other call, not the end of the line."""
    import threading

    from purifier.defenses import IdentityDefense

    calls: list[int] = []
    gate = threading.Semaphore(0)

    class Stepped(IdentityDefense):
        name = "test-stepped"

        def _transform(self, p, inputs):
            calls.append(len(p))
            gate.acquire(timeout=10)        # one call at a time, released by the test
            return p, None

    async def body():
        b = Batcher(Stepped(), 8, 0.0, SidecarMetrics(), max_queued=1000)
        b.start()
        try:
            large = asyncio.ensure_future(b.submit(probs[:32]))           # 4 chunks of 8
            await asyncio.sleep(0.05)                                      # chunk 1 is running
            smalls = [asyncio.ensure_future(b.submit(probs[32 + i:33 + i])) for i in range(2)]
            await asyncio.sleep(0.05)
            for _ in range(8):
                gate.release()
                await asyncio.sleep(0.05)
            return await asyncio.gather(large, *smalls)
        finally:
            for _ in range(8):
                gate.release()
            await b.close()

    large, *smalls = asyncio.run(body())
    assert calls == [8, 2, 8, 8, 8]                                        # the small pair right after chunk 1
    assert np.array_equal(large, probs[:32]) and [len(s) for s in smalls] == [1, 1]


def test_a_full_queue_refuses_at_once_and_keeps_room_for_small_requests(probs):
    import threading

    from purifier.defenses import IdentityDefense
    from purifier_server.errors import TooLarge

    release = threading.Event()

    class Held(IdentityDefense):
        """Blocks the defense thread until released."""

        name = "test-held"

        def _transform(self, p, inputs):
            release.wait(10)
            return p, None

    async def body():
        b = Batcher(Held(), 8, 0.0, SidecarMetrics(), max_queued=40)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(probs[:16]))        # being defended, 16 rows queued
            await asyncio.sleep(0.05)
            second = asyncio.ensure_future(b.submit(probs[16:32]))     # large requests may fill 40 - 8 rows
            await asyncio.sleep(0.05)
            with pytest.raises(TooLarge, match="the defense queue is full"):
                await b.submit(probs[32:41])                           # 9 more large rows: refused at once
            small = asyncio.ensure_future(b.submit(probs[40:41]))      # a small request still fits
            await asyncio.sleep(0.05)
            assert b.metrics.registry.get_sample_value("purifier_defense_queued_rows") == 33
            release.set()
            return await asyncio.gather(first, second, small)
        finally:
            release.set()
            await b.close()

    first, second, small = asyncio.run(body())
    assert np.array_equal(first, probs[:16]) and np.array_equal(second, probs[16:32])
    assert np.array_equal(small, probs[40:41])
