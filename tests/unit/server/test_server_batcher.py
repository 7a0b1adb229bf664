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


def test_large_requests_are_chunked_smallest_first_and_equal_unbatched(flatten, probs):
    """One 64-row request and three 1-row requests, 8 rows per call: the first call holds the three
    small requests and 5 rows of the large one, which is then defended in chunks of 8."""
    large, small = probs, [probs[i:i + 1] for i in range(3)]
    expected = flatten.transform(large)
    flatten.calls.clear()

    async def body(b):
        return await asyncio.gather(b.submit(large), *(b.submit(s) for s in small))

    got_large, *got_small = asyncio.run(_with_batcher(flatten, max_rows=8, max_wait=0.0, body=body))
    assert flatten.calls == [8] * 8 + [3]
    assert np.array_equal(got_large, expected)                     # chunks reassembled in order
    for got, s in zip(got_small, small, strict=True):
        assert np.array_equal(got, flatten.transform(s))


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
